"""Direct preference optimisation with TRL's DPOTrainer, on the same preference pairs as `rlhf reward`.

Explicit-prompt pairs (`prompt`, `chosen`, `rejected`) and implicit-prompt pairs (whole texts sharing a prefix, cut at
`data.implicit_prompt_end`) are both accepted. The reference of the DPO loss is a frozen copy of the starting model,
or `reference.name_or_path`; with LoRA and no `reference.name_or_path`, the policy with its adapter disabled (no second
copy), as TRL does. TRL's held-out pair metrics (`eval_rewards/accuracies`, `eval_rewards/margins`, `eval_loss`, ...)
are reported after training; before and after training, one response per held-out prompt is sampled with a fixed seed
and scored by `reward:` and `gold:` when given, with the KL to the reference (`rlhf_pipeline.held_out`, the function
PPO uses). Metric names are defined in docs/dpo.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf_pipeline import data as data_io
from rlhf_pipeline import models, runs
from rlhf_pipeline.recipe.load import LoadedRecipe
from rlhf_pipeline.stages.common import (
    RunOptions,
    begin,
    check_dropped_pairs,
    context_length,
    finish_outputs,
    is_main_process,
    save_trained,
    say,
    setting_up,
    start_outputs,
    train_and_evaluate,
    training_config,
)

EVAL_BEFORE_FILE = "eval_before.json"


def run(loaded: LoadedRecipe, options: RunOptions) -> dict[str, Any]:
    from trl import DPOConfig, DPOTrainer

    from rlhf_pipeline.stages.ppo import build_scorer, read_eval_before, write_eval_samples

    recipe = loaded.recipe
    begin(loaded)
    models.check_adapter_chain(loaded, recipe.peft, recipe.model.name_or_path, "model.name_or_path")

    # 1. data: (prompt, chosen, rejected) pairs
    train, held_out = data_io.load_splits(loaded)
    train, prompt_kind = preference_pairs(loaded, train, "training")
    held_out, _ = preference_pairs(loaded, held_out, "held-out")

    # 2. tokenizer, policy, reference, evaluation prompts and scorers
    tokenizer = models.load_tokenizer(loaded, recipe.tokenizer, recipe.model)
    if isinstance(train[0]["prompt"], list) and not tokenizer.chat_template:
        raise loaded.error("tokenizer.chat_template", models.NO_TEMPLATE)
    config = models.load_config(loaded, recipe.model)
    models.check_lora_vocabulary(loaded, recipe.peft, tokenizer, config)
    args = training_config(loaded, DPOConfig, config)  # before the weights load
    model = models.load_pretrained(loaded, recipe.model)
    models.align_special_tokens(model, tokenizer)
    peft_config = models.lora_config(recipe.peft, "CAUSAL_LM", model) if recipe.peft else None
    reference, reference_kind = load_reference(loaded, tokenizer)
    scorer = build_scorer(loaded, recipe.reward, "reward", args.device) if recipe.reward else None
    gold = build_scorer(loaded, recipe.gold, "gold", args.device) if recipe.gold else None
    eval_prompts = evaluation_prompts(loaded, held_out, tokenizer, context_length(model, cap=None), (scorer, gold))
    say("dpo", f"{len(train)} train pairs, {len(held_out)} held-out ({prompt_kind} prompt); "
               f"{'LoRA r=' + str(recipe.peft.r) if recipe.peft else 'full fine-tuning'}; reference {reference_kind}; "
               f"beta {args.beta:g}, loss {'+'.join(args.loss_type)}; {len(eval_prompts or [])} evaluation prompts")

    # 3. trainer
    with setting_up(loaded):
        trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=train, eval_dataset=held_out,
                             processing_class=tokenizer, peft_config=peft_config)
        too_long = check_dropped_pairs(loaded, trainer, len(train), len(held_out), every="pair's prompt fills",
                                       some="have a prompt of {max_length} tokens or more", shorter="prompts")

    # 4. evaluate, train, evaluate
    start_outputs(loaded, options)
    output_dir = Path(recipe.output_dir)
    evaluate = _evaluator(loaded, trainer, tokenizer, eval_prompts, scorer, gold)
    before = None
    if eval_prompts is not None:
        if options.plan.mode == "resume" and (output_dir / EVAL_BEFORE_FILE).is_file():
            before = read_eval_before(output_dir)
        else:
            before = evaluate()
            if is_main_process():
                runs.atomic_write_text(output_dir / EVAL_BEFORE_FILE, json.dumps(before, indent=1))
    metrics = train_and_evaluate(trainer, options, loaded.stage, has_eval=True)
    after = evaluate() if eval_prompts is not None else None

    # 5. save (after the evaluation: saving merges a LoRA adapter into the weights)
    saved = save_trained(trainer, loaded, recipe.peft)
    if is_main_process():
        if before is not None:
            metrics.update(generation_metrics(before, after, len(eval_prompts)))
            write_eval_samples(output_dir, before, after)
        metrics.update(models.count_parameters(trainer.model), prompt=prompt_kind, reference=reference_kind,
                       saved=saved, train_pairs=len(trainer.train_dataset), eval_pairs=len(trainer.eval_dataset),
                       pairs_per_second=metrics["train_samples_per_second"], **too_long)
        say("dpo", summary(metrics))
    return finish_outputs(loaded, options, metrics)


# -------------------------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------------------------
def preference_pairs(loaded: LoadedRecipe, split, name: str):
    """The split as (prompt, chosen, rejected) rows, and which kind of prompt it had: `explicit` (a prompt column) or
    `implicit` (chosen and rejected hold the whole text; see stages.ppo.explicit_pairs)."""
    from rlhf_pipeline.stages.ppo import explicit_pairs

    present = data_io.roles_present(loaded, split, ["prompt", "chosen", "rejected"])
    if "prompt" in present:
        if loaded.recipe.data.implicit_prompt_end is not None:
            say("dpo", "data.implicit_prompt_end is not used: the data has a prompt column")
        return data_io.select_columns(loaded, split, name, ["prompt", "chosen", "rejected"]), "explicit"
    pairs = data_io.select_columns(loaded, split, name, ["chosen", "rejected"])
    return explicit_pairs(loaded, pairs, name, "data"), "implicit"


def evaluation_prompts(loaded: LoadedRecipe, held_out, tokenizer, context: int, scorers: tuple = ()):
    """The prompts of the held-out pairs, in order, at most `evaluation.prompts` of them, that leave room for a whole
    response in the model's context and the reward models' (`stages.ppo.prompt_limit`); None when the generation
    evaluation is off."""
    from rlhf_pipeline.stages.ppo import prompt_limit, tokenize_prompts

    settings = loaded.recipe.evaluation
    if settings.prompts == 0:
        return None
    prompts = held_out["prompt"]
    limit = prompt_limit(loaded, tokenizer, context, settings.max_prompt_length, scorers,
                         conversational=len(prompts) > 0 and isinstance(prompts[0], list))
    prompts = tokenize_prompts(loaded, prompts, tokenizer, limit, "held-out", "evaluation.max_prompt_length")
    return prompts.select(list(range(min(settings.prompts, len(prompts)))))


# -------------------------------------------------------------------------------------------------------------
# models
# -------------------------------------------------------------------------------------------------------------
def load_reference(loaded: LoadedRecipe, tokenizer):
    """(the frozen reference model or None, how it is described): `reference.name_or_path`; else a frozen copy of
    the starting model; with LoRA, None: the policy with its adapter disabled."""
    recipe = loaded.recipe
    if recipe.reference.name_or_path:
        section = models.section_for(recipe.model, recipe.reference.name_or_path, recipe.reference)
        reference, kind = models.load_pretrained(loaded, section, key="reference.name_or_path"), \
            recipe.reference.name_or_path
    elif recipe.peft:
        return None, "the policy with its adapter disabled"
    else:
        reference, kind = models.load_pretrained(loaded, recipe.model), "a frozen copy of the model"
    models.align_special_tokens(reference, tokenizer)
    reference.eval()
    reference.requires_grad_(False)
    return reference, kind


def _evaluator(loaded: LoadedRecipe, trainer, tokenizer, prompts, scorer, gold):
    """One held-out generation pass of the trainer's current policy (the same seed every time)."""
    from rlhf_pipeline.held_out import evaluate_generation
    from rlhf_pipeline.ppo.modules import gathered, scorer_model

    recipe = loaded.recipe

    def evaluate() -> dict[str, Any]:
        unwrap = trainer.accelerator.unwrap_model
        policy = unwrap(trainer.model)
        reference = unwrap(trainer.ref_model) if trainer.ref_model is not None else None
        was_training = policy.training
        policy.eval()  # no dropout in the log-probabilities either, whatever training.disable_dropout says
        try:  # sharded models (FSDP, ZeRO-3) held whole: the evaluation calls their parts, on uneven shards
            with gathered(trainer.accelerator, trainer.model_wrapped, trainer.ref_model, scorer_model(scorer),
                          scorer_model(gold)):
                return evaluate_generation(policy, reference, tokenizer, prompts, recipe.generation,
                                           trainer.accelerator, seed=recipe.seed + 100_003,
                                           batch_size=recipe.evaluation.batch_size, scorer=scorer, gold=gold)
        finally:
            policy.train(was_training)

    return evaluate


# -------------------------------------------------------------------------------------------------------------
# outputs
# -------------------------------------------------------------------------------------------------------------
def generation_metrics(before: dict, after: dict, n_prompts: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {"eval_prompts": n_prompts, "eval_kl": after["kl"], "eval_kl_before": before["kl"]}
    for name in ("score", "gold", "response_length", "eos_rate"):
        if name in before:
            metrics[f"eval_{name}_before"] = before[name]
            metrics[f"eval_{name}_after"] = after[name]
    return metrics


def summary(metrics: dict[str, Any]) -> str:
    parts = [f"held-out pairs: reward accuracy {metrics['eval_rewards/accuracies']:.3f}, "
             f"margin {metrics['eval_rewards/margins']:.3f}"]
    for name, label in (("score", "score"), ("gold", "gold")):
        if f"eval_{name}_before" in metrics:
            parts.append(f"{label} {metrics[f'eval_{name}_before']:.3f} -> {metrics[f'eval_{name}_after']:.3f}")
    if "eval_kl" in metrics:
        parts.append(f"KL {metrics['eval_kl']:.2f}")
    if metrics.get("pairs_per_second"):
        parts.append(f"{metrics['pairs_per_second']:.1f} pairs/s")
    return "; ".join(parts)
