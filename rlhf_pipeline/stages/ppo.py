"""PPO: optimise the policy against a reward model or function, with a KL penalty to a frozen reference.

Same shape as the other stages: data (prompts), models (policy, reference, value, reward, gold), trainer, train,
save. The algorithm is ours (TRL dropped PPOTrainer in 1.13): see rlhf_pipeline/ppo/ and docs/ppo.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf_pipeline import data as data_io
from rlhf_pipeline import models, runs
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.ppo.plan import BatchPlan
from rlhf_pipeline.recipe.load import LoadedRecipe
from rlhf_pipeline.recipe.schema import ModelSection, RewardSource
from rlhf_pipeline.stages.common import RunOptions, context_length, finish_outputs, quiet_library_warnings, say

EVAL_BEFORE_FILE = "eval_before.json"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"
CURVES_FILE = "ppo_curves.png"


def run(loaded: LoadedRecipe, options: RunOptions = RunOptions()) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator

    recipe = loaded.recipe
    if not (recipe.data.eval_split or recipe.data.eval_size):
        raise loaded.error("data", "PPO reports scores on held-out prompts: set `eval_split` or `eval_size`")
    quiet_library_warnings()
    checkpoint = check_ppo_output_dir(loaded, options)
    # cpu=True on machines without an accelerator, so that several processes (torchrun) meet over gloo
    accelerator = Accelerator(mixed_precision=recipe.training.mixed_precision,
                              cpu=not torch.accelerator.is_available())
    try:
        BatchPlan.of(recipe.training, accelerator.num_processes)  # does it divide across these processes?
    except ValueError as exc:
        raise loaded.error("training", str(exc)) from None
    metrics = _train(loaded, accelerator, checkpoint)
    finish_outputs(loaded, metrics)  # every process waits here; the main one writes
    # DDP's reducer must be freed before its process group is destroyed, or the process hangs on exit
    accelerator.free_memory()
    accelerator.end_training()
    return metrics


def _train(loaded: LoadedRecipe, accelerator, checkpoint: Path | None) -> dict[str, Any]:
    import torch
    from transformers import set_seed

    from rlhf_pipeline.ppo.modules import PolicyAndValue
    from rlhf_pipeline.ppo.trainer import PPOTrainer

    recipe, cfg = loaded.recipe, loaded.recipe.training
    set_seed(recipe.seed)

    # 1. data: tokenized prompts that leave room for a response in the policy's context
    tokenizer = models.load_tokenizer(loaded, recipe.tokenizer, recipe.policy)
    policy = models.load_pretrained(loaded, recipe.policy, key="policy")
    train_prompts, eval_prompts = load_prompts(loaded, tokenizer, context_length(policy, cap=None),
                                               eval_limit=cfg.eval_prompts)

    # 2. models
    models.align_special_tokens(policy, tokenizer)
    _disable_dropout(policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.peft:
        from peft import get_peft_model

        policy = get_peft_model(policy, models.lora_config(recipe.peft, "CAUSAL_LM", policy))
    reference = None
    if recipe.reference.name_or_path or not recipe.peft:  # with LoRA the default is the adapter switched off
        path = recipe.reference.name_or_path or recipe.policy.name_or_path
        reference = _frozen(models.load_pretrained(loaded, recipe.policy.model_copy(update={"name_or_path": path}),
                                                   key="reference" if recipe.reference.name_or_path else "policy"))
    value_model = None
    if recipe.value.mode == "separate":
        value_path = recipe.value.name_or_path or recipe.reward.model or recipe.policy.name_or_path
        value_model = models.load_pretrained(loaded, recipe.policy.model_copy(update={"name_or_path": value_path}),
                                             kind="reward", key="value" if recipe.value.name_or_path else "reward")
        value_model.config.pad_token_id = tokenizer.pad_token_id
        _disable_dropout(value_model)
        if recipe.peft:
            from peft import get_peft_model

            value_model = get_peft_model(value_model, models.lora_config(recipe.peft, "SEQ_CLS", value_model))
    model = PolicyAndValue(policy, value_model)
    scorer = build_scorer(loaded, recipe.reward, "reward", tokenizer, accelerator.device)
    gold = build_scorer(loaded, recipe.gold, "gold", tokenizer, accelerator.device) if recipe.gold else None

    # 3. trainer
    from rlhf_pipeline.tracking import Tracker

    tracker = Tracker.for_recipe(loaded, accelerator.is_main_process)
    trainer = PPOTrainer(config=cfg, generation=recipe.generation, model=model, reference=reference,
                         tokenizer=tokenizer, scorer=scorer, gold=gold, prompts=train_prompts,
                         output_dir=recipe.output_dir, seed=recipe.seed, accelerator=accelerator,
                         on_log=tracker.log)
    say("ppo", f"{len(train_prompts)} training prompts, {len(eval_prompts)} held-out; value {recipe.value.mode}; "
               f"reference {'adapter disabled' if reference is None else 'frozen copy'}; {trainer.plan.describe()}")

    # 4. evaluate, train, evaluate
    output_dir = Path(recipe.output_dir)
    eval_seed = recipe.seed + 100_003
    if checkpoint is None:
        if accelerator.is_main_process:
            runs.start_run(output_dir, loaded.resolved_yaml(runs.provenance()))
        accelerator.wait_for_everyone()
        before = trainer.evaluate(eval_prompts, eval_seed)
        if accelerator.is_main_process:
            runs.atomic_write_text(output_dir / EVAL_BEFORE_FILE, json.dumps(before, indent=1))
        torch.manual_seed(recipe.seed + 1000 * accelerator.process_index)  # processes sample different responses
    else:  # the checkpoint restores the RNG states too
        trainer.load_checkpoint(checkpoint)
        if accelerator.is_main_process:
            _truncate_logs(output_dir, trainer.state.update)
        before = json.loads((output_dir / EVAL_BEFORE_FILE).read_text())
        say("ppo", f"resuming from {checkpoint.name} ({trainer.state.update} of {trainer.plan.num_updates} updates)")
    state = trainer.train()
    after = trainer.evaluate(eval_prompts, eval_seed)
    tracker.finish()

    # 5. save
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(trainer.model)
        saved = models.save_model(unwrapped.policy, tokenizer, output_dir, recipe.peft)
        _write_eval_samples(output_dir, before, after)
        metrics = ppo_metrics(output_dir, before, after, state, trainer.plan, saved)
        from rlhf_pipeline.plots import plot_ppo_curves

        plot_ppo_curves(output_dir / "log.jsonl", output_dir / CURVES_FILE)
        say("ppo", _summary(metrics))
    return metrics


# -------------------------------------------------------------------------------------------------------------
# output dir and resuming
# -------------------------------------------------------------------------------------------------------------
def check_ppo_output_dir(loaded: LoadedRecipe, options: RunOptions) -> Path | None:
    """The checkpoint to resume from (with --resume), or None for a fresh run; UserError when neither is allowed."""
    from rlhf_pipeline.ppo.trainer import latest_checkpoint

    output_dir = loaded.recipe.output_dir
    status = runs.check_output_dir(output_dir, options.overwrite)
    checkpoint = latest_checkpoint(output_dir)
    if options.resume:
        if status != "unfinished" or checkpoint is None:
            raise UserError(f"--resume: {output_dir} holds no unfinished PPO run with a checkpoint "
                            f"({'it is finished' if status == 'finished' else 'none found'}); "
                            "set training.save_every to write checkpoints")
        _check_same_recipe(loaded, Path(output_dir) / runs.RECIPE_FILE)
        return checkpoint
    if status == "unfinished" and checkpoint is not None and not options.overwrite:
        raise UserError(f"{output_dir} holds an unfinished PPO run with checkpoint {checkpoint.name}: pass --resume "
                        "to continue it, or --overwrite to start over")
    return None


def _check_same_recipe(loaded: LoadedRecipe, saved_path: Path) -> None:
    from rlhf_pipeline.recipe.load import diff_keys, resolved_data

    differences = diff_keys(resolved_data(saved_path.read_text()), resolved_data(loaded.resolved_yaml()))
    if differences:
        raise UserError(f"--resume: the recipe differs from the one the run started with ({saved_path}) at: "
                        f"{', '.join(differences)}. Resume with the same recipe, or start over with --overwrite.")


def _truncate_logs(output_dir: Path, updates_done: int) -> None:
    """Drop log rows written after the checkpoint: they will be written again."""
    from rlhf_pipeline.ppo.trainer import LOG_FILE, SAMPLES_FILE

    for name, key in ((LOG_FILE, "train/update"), (SAMPLES_FILE, "update")):
        path = output_dir / name
        if path.exists():
            rows = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line).get(key, 0) <= updates_done]
            runs.atomic_write_text(path, "".join(line + "\n" for line in kept))


# -------------------------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------------------------
def load_prompts(loaded: LoadedRecipe, tokenizer, context: int, key: str = "data", eval_limit: int | None = None):
    """Tokenized training and held-out prompts from the `key` section. Preference data without a prompt column gives
    its shared prefix as the prompt. Prompts longer than `max_prompt_length` tokens, or than what leaves room for a
    whole response in the model's `context`, are left out (and counted)."""
    from rlhf_pipeline.ppo.trainer import Prompts

    section = getattr(loaded.recipe, key)
    response_length = loaded.recipe.generation.response_length
    limit = min(section.max_prompt_length, context - response_length)
    if limit < 1:
        raise loaded.error("generation.response_length", f"{response_length} tokens leave no room for a prompt in "
                                                         f"the model's context of {context} tokens")
    train, held_out = data_io.load_splits(loaded, key)
    tokenized = []
    for split, name in ((train, "training"), (held_out, "held-out")):
        present = data_io.roles_present(loaded, split, ["prompt", "chosen", "rejected"], key)
        if "prompt" not in present and {"chosen", "rejected"} <= present:
            from trl.data_utils import extract_prompt

            split = data_io.select_columns(loaded, split, name, ["chosen", "rejected"], key=key)
            split = split.map(extract_prompt, desc=f"Extracting {name} prompts")
        else:
            split = data_io.select_columns(loaded, split, name, ["prompt"], key=key)  # names a missing column
        texts = [_prompt_text(p, tokenizer, loaded) for p in split["prompt"]]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        keep = [i for i, seq in enumerate(ids) if 0 < len(seq) <= limit]
        if len(keep) < len(ids):
            say(loaded.stage, f"left out {len(ids) - len(keep)} of {len(ids)} {name} prompts longer than {limit} "
                              "tokens (or empty)")
        if not keep:
            raise loaded.error(f"{key}.max_prompt_length", f"no {name} prompt fits in {limit} tokens")
        tokenized.append(Prompts([texts[i] for i in keep], [ids[i] for i in keep]))
    train_prompts, eval_prompts = tokenized
    if eval_limit is not None:
        eval_prompts = Prompts(eval_prompts.texts[:eval_limit], eval_prompts.ids[:eval_limit])
    return train_prompts, eval_prompts


def _prompt_text(prompt: Any, tokenizer, loaded: LoadedRecipe) -> str:
    """A text prompt as is; a conversational one through the chat template, ready for the assistant's turn."""
    if isinstance(prompt, str):
        return prompt
    if not tokenizer.chat_template:
        raise loaded.error("tokenizer.chat_template", "the prompts are conversational but the tokenizer has no chat "
                                                      "template; set one")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


# -------------------------------------------------------------------------------------------------------------
# models
# -------------------------------------------------------------------------------------------------------------
def build_scorer(loaded: LoadedRecipe, source: RewardSource, key: str, policy_tokenizer, device):
    """A reward model or a reward function, as a callable on rollouts."""
    from rlhf_pipeline.ppo.modules import FunctionScorer, ModelScorer
    from rlhf_pipeline.rewards import load_function

    if source.function:
        try:
            return FunctionScorer(load_function(source.function))
        except UserError as exc:
            raise loaded.error(f"{key}.function", str(exc)) from None
    section = ModelSection(name_or_path=source.model, revision=source.revision,
                           trust_remote_code=source.trust_remote_code, dtype=source.dtype)
    from rlhf_pipeline.recipe.schema import TokenizerSection

    reward_tokenizer = models.load_tokenizer(loaded, TokenizerSection(), section, key=key)
    model = _frozen(models.load_pretrained(loaded, section, kind="reward", key=key)).to(device)
    model.config.pad_token_id = reward_tokenizer.pad_token_id
    try:
        return ModelScorer(model, reward_tokenizer, policy_tokenizer)
    except UserError as exc:
        raise loaded.error(f"{key}.model", str(exc)) from None


def _frozen(model):
    model.eval()
    model.requires_grad_(False)
    return model


def _disable_dropout(model) -> None:
    """No dropout in PPO: it would make the old and new log-probabilities of the same tokens differ [N+]."""
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(model)


# -------------------------------------------------------------------------------------------------------------
# outputs
# -------------------------------------------------------------------------------------------------------------
def ppo_metrics(output_dir: Path, before: dict, after: dict, state, plan, saved: str) -> dict[str, Any]:
    from rlhf_pipeline.ppo.trainer import read_log

    log = read_log(output_dir)
    last = log[-1] if log else {}
    metrics = {
        "eval_score_before": before["score"],
        "eval_score_after": after["score"],
        "eval_kl": after["kl"],
        "eval_kl_before": before["kl"],
        "eval_eos_rate_before": before["eos_rate"],
        "eval_eos_rate_after": after["eos_rate"],
        "eval_response_length_before": before["response_length"],
        "eval_response_length_after": after["response_length"],
        "episodes_per_second": state.episodes / state.train_seconds if state.train_seconds else None,
        "train_runtime": state.train_seconds,
        "episodes": state.episodes,
        "num_updates": state.update,
        "optimizer_steps": state.optimizer_steps,
        "planned_optimizer_steps": plan.total_optimizer_steps,
        "final_policy_loss": last.get("loss/policy"),
        "final_value_loss": last.get("loss/value"),
        "final_score": last.get("objective/score"),
        "final_kl": last.get("objective/kl"),
        "saved": saved,
    }
    if "gold" in before:
        metrics["eval_gold_before"] = before["gold"]
        metrics["eval_gold_after"] = after["gold"]
    return metrics


def _write_eval_samples(output_dir: Path, before: dict, after: dict) -> None:
    rows = [{"phase": phase, **sample} for phase, result in (("before", before), ("after", after))
            for sample in result.get("samples", [])]
    runs.atomic_write_text(output_dir / EVAL_SAMPLES_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def _summary(metrics: dict[str, Any]) -> str:
    text = (f"held-out score {metrics['eval_score_before']:.3f} -> {metrics['eval_score_after']:.3f}, "
            f"KL {metrics['eval_kl']:.2f}")
    if "eval_gold_before" in metrics:
        text += f", gold {metrics['eval_gold_before']:.3f} -> {metrics['eval_gold_after']:.3f}"
    if metrics["episodes_per_second"]:
        text += f"; {metrics['episodes_per_second']:.1f} episodes/s"
    return text
