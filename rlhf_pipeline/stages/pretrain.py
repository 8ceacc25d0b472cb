"""Pre-training: a causal LM on plain text (the "unsupervised pre-training" step of the RLHF recipe).

Optionally trains a byte-level BPE tokenizer on the recipe's text and initialises a new GPT-2 model from an
architecture; otherwise continues from a checkpoint. Texts are joined with EOS and cut into fixed-length blocks.
"""

from __future__ import annotations

from typing import Any

from rlhf_pipeline import data as data_io
from rlhf_pipeline import models
from rlhf_pipeline.recipe.load import LoadedRecipe
from rlhf_pipeline.stages.common import (
    RunOptions,
    begin,
    check_context,
    context_length,
    finish_outputs,
    save_trained,
    say,
    setting_up,
    start_outputs,
    train_and_evaluate,
    training_config,
)


def run(loaded: LoadedRecipe, options: RunOptions) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments, default_data_collator

    recipe = loaded.recipe
    begin(loaded)

    # 1. data
    train_text, eval_text = data_io.load_splits(loaded)
    train_text = data_io.select_columns(loaded, train_text, recipe.data.train_split, ["text"])
    if eval_text is not None:
        eval_text = data_io.select_columns(loaded, eval_text, "held-out", ["text"])

    # 2. tokenizer and model
    if recipe.tokenizer.train:
        say("pretrain", f"training a byte-level BPE tokenizer on {len(train_text)} texts")
        tokenizer = models.train_bpe_tokenizer(
            (batch["text"] for batch in train_text.iter(batch_size=1000)), recipe.tokenizer.train
        )
    else:
        tokenizer = models.load_tokenizer(loaded, recipe.tokenizer, recipe.model)
    args = training_config(loaded, TrainingArguments)  # before the model is made: ZeRO-3 shards it as it loads
    if recipe.model.init:
        model = models.init_gpt2(recipe.model.init, tokenizer)
    else:
        model = models.load_pretrained(loaded, recipe.model)
    models.align_special_tokens(model, tokenizer)
    block_size = recipe.data.block_size or context_length(model)
    check_context(loaded, "data.block_size", block_size, model)
    say("pretrain", f"model: {models.count_parameters(model)['num_parameters']:,} parameters; "
                    f"vocabulary {len(tokenizer)}; blocks of {block_size} tokens")

    train_blocks = to_blocks(train_text, tokenizer, block_size, "train")
    eval_blocks = to_blocks(eval_text, tokenizer, block_size, "held-out") if eval_text is not None else None
    if len(train_blocks) == 0:
        raise loaded.error("data.block_size", f"the training text is shorter than one block of {block_size} tokens")

    # 3. trainer
    with setting_up(loaded):
        trainer = Trainer(model=model, args=args, train_dataset=train_blocks, eval_dataset=eval_blocks,
                          data_collator=default_data_collator, processing_class=tokenizer)

    # 4. train
    start_outputs(loaded, options)
    metrics = train_and_evaluate(trainer, options, loaded.stage, has_eval=eval_blocks is not None, perplexity=True)

    # 5. save
    save_trained(trainer, loaded)
    metrics.update(models.count_parameters(model), train_blocks=len(train_blocks), block_size=block_size,
                   vocab_size=len(tokenizer))
    return finish_outputs(loaded, options, metrics)


def to_blocks(dataset, tokenizer, block_size: int, name: str):
    """Tokenize, append EOS to every text, concatenate and cut into `block_size` blocks (the remainder is dropped)."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        return {"input_ids": [ids + [eos] for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]}

    def group(batch):
        joined = [token for ids in batch["input_ids"] for token in ids]
        usable = len(joined) // block_size * block_size
        blocks = [joined[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    tokens = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc=f"Tokenizing {name} text")
    return tokens.map(group, batched=True, batch_size=2000, desc=f"Cutting {name} text into blocks")
