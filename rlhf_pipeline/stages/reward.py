"""Reward modelling with TRL's RewardTrainer on preference pairs (Bradley-Terry loss).

Explicit-prompt pairs (`prompt`, `chosen`, `rejected`) and implicit-prompt pairs (`chosen` and `rejected` hold whole
dialogues sharing a prefix, as in Anthropic HH-RLHF) are both accepted. After training, every held-out pair is scored
and `eval_accuracy` (a tie counts as wrong) and `eval_margin` (mean chosen - rejected score) are reported. The saved
model loads with `AutoModelForSequenceClassification` (one output: the score).
"""

from __future__ import annotations

from typing import Any

from rlhf_pipeline import data as data_io
from rlhf_pipeline import models
from rlhf_pipeline.recipe.load import LoadedRecipe
from rlhf_pipeline.scoring import preference_metrics, score_sequences
from rlhf_pipeline.stages.common import (
    RunOptions,
    begin,
    check_dropped_pairs,
    finish_outputs,
    is_main_process,
    save_trained,
    say,
    setting_up,
    start_outputs,
    train_and_evaluate,
    training_config,
)


def run(loaded: LoadedRecipe, options: RunOptions) -> dict[str, Any]:
    from trl import RewardConfig, RewardTrainer

    recipe = loaded.recipe
    if not (recipe.data.eval_split or recipe.data.eval_size):
        raise loaded.error("data", "the reward stage reports held-out accuracy: set `eval_split` or `eval_size`")
    begin(loaded)

    # 1. data
    train, held_out = data_io.load_splits(loaded)
    roles = (["chosen", "rejected"], ["prompt", "margin"])
    train = data_io.select_columns(loaded, train, recipe.data.train_split, *roles)
    held_out = data_io.select_columns(loaded, held_out, "held-out", *roles)
    prompt_kind = "explicit" if "prompt" in train.column_names else "implicit"

    # 2. tokenizer and model (a one-score sequence classifier on top of the base)
    tokenizer = models.load_tokenizer(loaded, recipe.tokenizer, recipe.model)
    args = training_config(loaded, RewardConfig, models.load_config(loaded, recipe.model))  # before the weights load
    model = models.load_pretrained(loaded, recipe.model, kind="reward")
    models.align_special_tokens(model, tokenizer)
    peft_config = models.lora_config(recipe.peft, "SEQ_CLS", model) if recipe.peft else None
    say("reward", f"{len(train)} train pairs, {len(held_out)} held-out ({prompt_kind} prompt); "
                  f"{'LoRA r=' + str(recipe.peft.r) if recipe.peft else 'full fine-tuning'}")

    # 3. trainer
    with setting_up(loaded):
        trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                                processing_class=tokenizer, peft_config=peft_config)
        too_long = check_dropped_pairs(loaded, trainer, len(train), len(held_out), every="pair is longer than",
                                       some="are longer than {max_length} tokens", shorter="texts")

    # 4. train, then score every held-out pair
    start_outputs(loaded, options)
    metrics = train_and_evaluate(trainer, options, has_eval=True)
    if is_main_process():
        metrics.update(held_out_pair_metrics(trainer, tokenizer.pad_token_id))
        say("reward", f"held-out accuracy {metrics['eval_accuracy']:.3f}, margin {metrics['eval_margin']:.3f} "
                      f"over {metrics['eval_num_pairs']} pairs")

    # 5. save
    saved = save_trained(trainer, loaded, recipe.peft)
    metrics.update(models.count_parameters(trainer.model), prompt=prompt_kind, saved=saved,
                   train_pairs=len(trainer.train_dataset), **too_long)
    return finish_outputs(loaded, options, metrics)



def held_out_pair_metrics(trainer, pad_token_id: int) -> dict[str, float]:
    """Score the trainer's tokenized held-out pairs exactly as they were trained on; prefix the metrics `eval_`."""
    pairs = trainer.eval_dataset
    model = trainer.accelerator.unwrap_model(trainer.model)
    chosen = score_sequences(model, pairs["chosen_ids"], pad_token_id, desc="Scoring held-out chosen")
    rejected = score_sequences(model, pairs["rejected_ids"], pad_token_id, desc="Scoring held-out rejected")
    return {f"eval_{k}": v for k, v in preference_metrics(chosen, rejected).items()}
