"""Supervised fine-tuning with TRL's SFTTrainer: plain text, prompt/completion or conversational demonstrations.

Prompt/completion data trains on the completion only (TRL's default for that format); conversational data needs a
chat template. With a `peft:` section LoRA adapters are trained and, by default, merged into the saved model.
"""

from __future__ import annotations

from typing import Any

from rlhf_pipeline import data as data_io
from rlhf_pipeline import models
from rlhf_pipeline.recipe.load import LoadedRecipe
from rlhf_pipeline.stages.common import (
    RunOptions,
    begin,
    finish_outputs,
    save_trained,
    say,
    setting_up,
    start_outputs,
    train_and_evaluate,
    training_config,
)

SFT_ROLES = ("text", "prompt", "completion", "messages")


def run(loaded: LoadedRecipe, options: RunOptions) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    recipe = loaded.recipe
    begin(loaded)
    models.check_adapter_chain(loaded, recipe.peft, recipe.model.name_or_path, "model.name_or_path")

    # 1. data
    train, held_out = data_io.load_splits(loaded)
    data_format, roles = detect_format(loaded, train)
    train = data_io.select_columns(loaded, train, recipe.data.train_split, roles)
    if held_out is not None:
        held_out = data_io.select_columns(loaded, held_out, "held-out", roles)

    # 2. tokenizer and model
    tokenizer = models.load_tokenizer(loaded, recipe.tokenizer, recipe.model)
    if _is_conversational(train) and not tokenizer.chat_template:
        raise loaded.error("tokenizer.chat_template", models.NO_TEMPLATE)
    config = models.load_config(loaded, recipe.model)
    models.check_lora_vocabulary(loaded, recipe.peft, tokenizer, config)
    args = training_config(loaded, SFTConfig, config)  # before the weights load
    model = models.load_pretrained(loaded, recipe.model)
    models.align_special_tokens(model, tokenizer)
    peft_config = models.lora_config(recipe.peft, "CAUSAL_LM", model) if recipe.peft else None
    say("sft", f"{data_format} data: {len(train)} train rows, "
               f"{len(held_out) if held_out is not None else 0} held-out; "
               f"{'LoRA r=' + str(recipe.peft.r) if recipe.peft else 'full fine-tuning'}")

    # 3. trainer
    with setting_up(loaded):
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                             processing_class=tokenizer, peft_config=peft_config)

    # 4. train
    start_outputs(loaded, options)
    metrics = train_and_evaluate(trainer, options, loaded.stage, has_eval=held_out is not None, perplexity=True)

    # 5. save
    saved = save_trained(trainer, loaded, recipe.peft)
    metrics.update(models.count_parameters(trainer.model), data_format=data_format, saved=saved)
    return finish_outputs(loaded, options, metrics)


def detect_format(loaded: LoadedRecipe, dataset) -> tuple[str, list[str]]:
    """Which of TRL's SFT formats the data is in, and the roles (columns) that carry it."""
    present = data_io.roles_present(loaded, dataset, SFT_ROLES)
    # roles mapped in `data.columns` choose the format; columns that merely carry a role's name do not override them
    mapped = {r for r in SFT_ROLES if getattr(data_io.column_mapping(loaded.recipe.data), r, None) is not None}
    chosen = mapped or present
    if "messages" in chosen:
        return "conversational", ["messages"]
    if "prompt" in chosen or "completion" in chosen:
        if not {"prompt", "completion"} <= present:
            missing = ({"prompt", "completion"} - present).pop()
            raise loaded.error("data.columns", f"prompt/completion data needs a `{missing}` column too "
                                               f"(the data has: {', '.join(dataset.column_names)})")
        return "prompt-completion", ["prompt", "completion"]
    if "text" in chosen:
        return "language-modelling", ["text"]
    raise loaded.error(
        "data.columns",
        f"found none of the SFT formats' columns (text; prompt + completion; messages) in "
        f"{', '.join(dataset.column_names)}; map them with data.columns",
    )


def _is_conversational(dataset) -> bool:
    from trl.data_utils import is_conversational

    return len(dataset) > 0 and is_conversational(dataset[0])
