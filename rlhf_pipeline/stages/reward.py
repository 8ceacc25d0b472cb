"""Reward modelling with TRL's RewardTrainer on preference pairs (Bradley-Terry loss).

Explicit-prompt pairs (`prompt`, `chosen`, `rejected`) and implicit-prompt pairs (`chosen` and `rejected` hold whole
dialogues sharing a prefix, as in Anthropic HH-RLHF) are both accepted. The saved model loads with
`AutoModelForSequenceClassification` (one output: the score).

Held-out metrics: `eval_accuracy` (a tie counts as wrong) and `eval_margin` are RewardTrainer's own, averaged over
its evaluation batches. After training, every held-out pair is also scored on its own, by the scorer PPO and
`rlhf eval` use; that adds what TRL does not report (ties, score statistics, the per-pair scores in
`eval_pairs.jsonl` and their plot `reward_scores.png`) and checks that the two agree: the per-pair accuracy and
margin, averaged over the same batches, must equal TRL's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline import data as data_io
from rlhf_pipeline import models, runs
from rlhf_pipeline.recipe.load import LoadedRecipe
from rlhf_pipeline.scoring import preference_metrics, score_sequences
from rlhf_pipeline.stages.common import (
    RunOptions,
    begin,
    check_dropped_pairs,
    distributed_state,
    finish_outputs,
    is_main_process,
    save_trained,
    say,
    setting_up,
    start_outputs,
    train_and_evaluate,
    training_config,
)

if TYPE_CHECKING:
    import torch

PAIRS_FILE = "eval_pairs.jsonl"
SCORES_PLOT = "reward_scores.png"


def run(loaded: LoadedRecipe, options: RunOptions) -> dict[str, Any]:
    from trl import RewardConfig, RewardTrainer

    recipe = loaded.recipe
    if not (recipe.data.eval_split or recipe.data.eval_size):
        raise loaded.error("data", "the reward stage reports held-out accuracy: set `eval_split` or `eval_size`")
    begin(loaded)
    models.check_adapter_chain(loaded, recipe.peft, recipe.model.name_or_path, "model.name_or_path")

    # 1. data
    train, held_out = data_io.load_splits(loaded)
    roles = (["chosen", "rejected"], ["prompt", "margin"])
    train = data_io.select_columns(loaded, train, recipe.data.train_split, *roles)
    held_out = data_io.select_columns(loaded, held_out, "held-out", *roles)
    prompt_kind = "explicit" if "prompt" in train.column_names else "implicit"

    # 2. tokenizer and model (a one-score sequence classifier on top of the base)
    tokenizer = models.load_tokenizer(loaded, recipe.tokenizer, recipe.model)
    config = models.load_config(loaded, recipe.model)
    models.check_lora_vocabulary(loaded, recipe.peft, tokenizer, config)
    args = training_config(loaded, RewardConfig, config)  # before the weights load
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

    # 4. train (TRL evaluates the held-out pairs), then score every held-out pair on its own
    start_outputs(loaded, options)
    metrics = train_and_evaluate(trainer, options, loaded.stage, has_eval=True)
    # every process scores: under FSDP or ZeRO-3 each forward gathers the weights from all of them
    chosen, rejected = held_out_pair_scores(trainer, tokenizer.pad_token_id)
    if is_main_process():
        if distributed_state().num_processes == 1:  # several processes average over other (sharded) batches
            check_agreement(metrics, chosen, rejected, args.per_device_eval_batch_size)
        summary = preference_metrics(chosen, rejected)
        metrics.update({f"eval_{k}": v for k, v in summary.items() if k not in ("accuracy", "margin")})
        write_pair_scores(Path(recipe.output_dir), chosen, rejected)
        say("reward", f"held-out accuracy {metrics['eval_accuracy']:.3f}, margin {metrics['eval_margin']:.3f} "
                      f"over {metrics['eval_num_pairs']} pairs")

    # 5. save
    saved = save_trained(trainer, loaded, recipe.peft)
    metrics.update(models.count_parameters(trainer.model), prompt=prompt_kind, saved=saved,
                   train_pairs=len(trainer.train_dataset), **too_long)
    return finish_outputs(loaded, options, metrics)



def held_out_pair_scores(trainer, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the trainer's tokenized held-out pairs exactly as they were trained on: chosen and rejected scores."""
    pairs = trainer.eval_dataset
    model = trainer.accelerator.unwrap_model(trainer.model)
    chosen = score_sequences(model, pairs["chosen_ids"], pad_token_id, desc="Scoring held-out chosen")
    rejected = score_sequences(model, pairs["rejected_ids"], pad_token_id, desc="Scoring held-out rejected")
    return chosen, rejected


def batch_means(values: torch.Tensor, batch_size: int) -> float:
    """The mean of per-batch means over consecutive batches: how RewardTrainer averages its evaluation metrics (the
    last batch may be smaller, so this is not the plain mean)."""
    means = [float(values[start : start + batch_size].double().mean()) for start in range(0, len(values), batch_size)]
    return sum(means) / len(means)


def check_agreement(metrics: dict[str, Any], chosen: torch.Tensor, rejected: torch.Tensor, batch_size: int) -> None:
    """Our per-pair scores, averaged as RewardTrainer averages, must give its accuracy and margin. A gap means the
    scorer PPO and `rlhf eval` use reads the model differently from training (e.g. another pooling position)."""
    margin = chosen.double() - rejected.double()
    ours = {"eval_accuracy": batch_means((margin > 0).double(), batch_size),
            "eval_margin": batch_means(margin, batch_size)}
    # our batches are padded differently, which moves float32 scores by ~1e-6 and may flip a near-tie: allow for
    # each near-tie flipping, in the smallest (last) batch
    near_ties = int((margin.abs() < 1e-4).sum())
    smallest = len(margin) - batch_size * ((len(margin) - 1) // batch_size)
    batches = -(-len(margin) // batch_size)
    slack = {"eval_accuracy": 1e-6 + near_ties / smallest / batches,
             "eval_margin": 1e-4 * max(float(margin.abs().mean()), 1.0)}
    agrees = {key: abs(value - metrics[key]) <= slack[key] for key, value in ours.items()}
    for key, value in ours.items():
        if not agrees[key]:
            say("reward", f"WARNING: RewardTrainer's {key} {metrics[key]:.6f} differs from the per-pair scores' "
                          f"{value:.6f}: the scorer PPO and `rlhf eval` use does not read the model as training did. "
                          "Please report this with the recipe.")
    metrics["eval_scoring_agrees"] = all(agrees.values())


def write_pair_scores(output_dir: Path, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Every held-out pair's scores (in the order of the held-out split), and their plot."""
    from rlhf_pipeline.plots import plot_reward_scores

    rows = [{"pair": i, "chosen_score": c, "rejected_score": r, "margin": c - r}
            for i, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist()))]
    runs.atomic_write_text(output_dir / PAIRS_FILE, "".join(json.dumps(row) + "\n" for row in rows))
    plot_reward_scores(chosen.tolist(), rejected.tolist(), output_dir / SCORES_PLOT)
