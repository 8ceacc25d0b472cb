"""PPO: optimise the policy against a reward model or function, with a KL penalty to a frozen reference.

Same shape as the other stages: data (prompts), models (policy, reference, value, reward, gold), trainer, train,
save. The algorithm is ours (TRL dropped PPOTrainer in 1.13): see rlhf_pipeline/ppo/ and docs/ppo.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline import data as data_io
from rlhf_pipeline import models, runs
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.ppo.plan import plan_of
from rlhf_pipeline.recipe.load import LoadedRecipe
from rlhf_pipeline.recipe.schema import ModelSection, RewardSource
from rlhf_pipeline.stages.common import (
    RunOptions,
    context_length,
    deepspeed_on_cpu,
    finish_outputs,
    interrupted,
    quiet_library_warnings,
    say,
    sharding_engine,
    start_outputs,
    stop_requested,
)

if TYPE_CHECKING:
    from rlhf_pipeline.ppo.modules import Prompts

EVAL_BEFORE_FILE = "eval_before.json"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"
CURVES_FILE = "ppo_curves.png"


def run(loaded: LoadedRecipe, options: RunOptions) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    recipe = loaded.recipe
    if not (recipe.data.eval_split or recipe.data.eval_size):
        raise loaded.error("data", "PPO reports scores on held-out prompts: set `eval_split` or `eval_size`")
    quiet_library_warnings()
    accelerator = Accelerator(mixed_precision=recipe.training.mixed_precision, **engine_settings(recipe),
                              **tracker_settings(recipe))
    plan = plan_of(loaded, accelerator.num_processes)  # does it divide across these processes?
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.state.deepspeed_plugin.deepspeed_config.update(deepspeed_settings(plan, recipe.training))
    metrics = _train(loaded, options, accelerator)
    finish_outputs(loaded, options, metrics)  # every process waits here; the main one writes
    # DDP's reducer must be freed before the process group is destroyed (at the command's end), or the process hangs
    accelerator.free_memory()
    return metrics


@dataclass
class PpoSetup:
    """What the trainer is built from: tokenizer, prompts and every model, as the recipe asks."""

    tokenizer: Any
    train_prompts: Prompts
    eval_prompts: Prompts
    model: Any  # PolicyAndValue: the policy and the value function, what the optimizer trains
    reference: Any  # a frozen causal LM, or None: the LoRA policy with its adapter disabled
    scorer: Any
    gold: Any
    value_source: str  # where the value function starts, for the log
    restore_dropout: Any  # puts the policy config's dropout values back before it is saved


def build(loaded: LoadedRecipe, device) -> PpoSetup:
    """Steps 1 (data) and 2 (models) of the stage."""
    from rlhf_pipeline.ppo.modules import PolicyAndValue

    recipe, cfg = loaded.recipe, loaded.recipe.training

    models.check_adapter_chain(loaded, recipe.peft, recipe.policy.name_or_path, "policy.name_or_path")

    # 1. data: tokenized prompts that leave room for a response in the policy's and the reward models' contexts
    tokenizer = models.load_tokenizer(loaded, recipe.tokenizer, recipe.policy, model_key="policy.name_or_path")
    policy = models.load_pretrained(loaded, recipe.policy, key="policy.name_or_path")
    scorer = build_scorer(loaded, recipe.reward, "reward", device)
    gold = build_scorer(loaded, recipe.gold, "gold", device) if recipe.gold else None
    train_prompts, eval_prompts = load_prompts(loaded, tokenizer, context_length(policy, cap=None),
                                               eval_limit=cfg.eval_prompts, scorers=(scorer, gold))

    # 2. models
    if len(tokenizer) > policy.get_input_embeddings().num_embeddings:  # the reference and critic would not match it
        raise loaded.error("tokenizer.chat_template", "the tokenizer has tokens the policy has no embeddings for "
                                                      "(ChatML's markers): set `tokenizer.chat_template: chatml` in "
                                                      "the SFT recipe, whose output carries them, not here")
    models.align_special_tokens(policy, tokenizer)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.peft:
        from peft import get_peft_model

        policy = get_peft_model(policy, models.lora_config(recipe.peft, "CAUSAL_LM", policy))
    restore_dropout = models.disable_dropout(policy)  # after LoRA: its adapters bring dropout layers of their own
    models.fuse_gelu(policy)
    reference = None
    if recipe.reference.name_or_path:
        reference = _frozen(models.load_pretrained(
            loaded, models.section_for(recipe.policy, recipe.reference.name_or_path, recipe.reference),
            key="reference.name_or_path"))
    elif not recipe.peft:  # a frozen copy of the policy; with LoRA the default is the adapter switched off
        reference = _frozen(models.load_pretrained(loaded, recipe.policy, key="policy.name_or_path"))
    if reference is not None:
        models.fuse_gelu(reference)
    value_model, value_source = None, "a head on the policy's trunk (shared)"
    critic = cfg.advantage_estimator == "gae"
    if not critic:
        value_source = f"none ({cfg.advantage_estimator} needs no critic)"
    elif recipe.value.mode == "separate":
        value_path, value_key, value_source, own = value_start(recipe, getattr(scorer, "tokenizer", None), tokenizer)
        value_model = models.load_pretrained(loaded, models.section_for(recipe.policy, value_path, own),
                                             kind="reward", key=value_key)
        value_model.config.pad_token_id = tokenizer.pad_token_id
        if recipe.peft:
            from peft import get_peft_model

            value_model = get_peft_model(value_model, models.lora_config(recipe.peft, "SEQ_CLS", value_model))
        models.disable_dropout(value_model)
        models.fuse_gelu(value_model)
    return PpoSetup(tokenizer, train_prompts, eval_prompts, PolicyAndValue(policy, value_model, critic), reference,
                    scorer, gold, value_source, restore_dropout)


def value_start(recipe, reward_tokenizer, policy_tokenizer) -> tuple[str, str, str, Any]:
    """(checkpoint, recipe key, description, the section that names it) of the separate value model's starting
    point: `value.name_or_path`; else the reward model [Z19, N+] when it reads the policy's token ids (same
    vocabulary); else the policy."""
    if recipe.value.name_or_path:
        return (recipe.value.name_or_path, "value.name_or_path", f"separate, from {recipe.value.name_or_path}",
                recipe.value)
    policy = recipe.policy.name_or_path
    if recipe.reward.model and reward_tokenizer is not None:
        if reward_tokenizer.get_vocab() == policy_tokenizer.get_vocab():
            return (recipe.reward.model, "reward.model", f"separate, from the reward model {recipe.reward.model}",
                    recipe.reward)
        return (policy, "policy.name_or_path", f"separate, from the policy {policy} (the reward model's vocabulary "
                "differs from the policy's, so it cannot read the policy's token ids; set value.name_or_path to "
                "choose)", None)
    return policy, "policy.name_or_path", f"separate, from the policy {policy}", None


def make_trainer(loaded: LoadedRecipe, setup: PpoSetup, accelerator, on_log=None):
    """Step 3: the trainer over what `build` made."""
    from rlhf_pipeline.ppo.trainer import PPOTrainer

    recipe = loaded.recipe
    return PPOTrainer(config=recipe.training, generation=recipe.generation, model=setup.model,
                      reference=setup.reference, tokenizer=setup.tokenizer, scorer=setup.scorer, gold=setup.gold,
                      prompts=setup.train_prompts, output_dir=recipe.output_dir, seed=recipe.seed,
                      accelerator=accelerator, on_log=on_log)


def _train(loaded: LoadedRecipe, options: RunOptions, accelerator) -> dict[str, Any]:
    import torch
    from accelerate.utils import DistributedType
    from transformers import set_seed

    from rlhf_pipeline.ppo.modules import (
        policy_state_dict,
        prepare_frozen,
        rollout_generation_config,
        scorer_model,
        stop_token_ids,
    )

    recipe = loaded.recipe
    set_seed(recipe.seed)
    setup = build(loaded, accelerator.device)
    tokenizer, eval_prompts = setup.tokenizer, setup.eval_prompts
    for scorer in (setup.scorer, setup.gold):  # frozen reward models, sharded like the policy under FSDP
        if (model := scorer_model(scorer)) is not None:
            scorer.reward_model.model = prepare_frozen(model, accelerator)

    # 3. trainer
    trainer = make_trainer(loaded, setup, accelerator)
    say("ppo", f"{len(setup.train_prompts)} training prompts, {len(eval_prompts)} held-out; value "
               f"{setup.value_source}; reference {'adapter disabled' if setup.reference is None else 'frozen copy'}; "
               f"{trainer.plan.describe()}")

    # 4. evaluate, train, evaluate
    output_dir = Path(recipe.output_dir)
    eval_seed = recipe.seed + 100_003
    checkpoint = options.plan.checkpoint if options.plan.mode == "resume" else None
    start_outputs(loaded, options)
    start_trackers(accelerator, loaded)  # after the run marker: their files are the run's
    try:
        if checkpoint is None:
            before = trainer.evaluate(eval_prompts, eval_seed)
            if accelerator.is_main_process:
                runs.atomic_write_text(output_dir / EVAL_BEFORE_FILE, json.dumps(before, indent=1))
            torch.manual_seed(recipe.seed + 1000 * accelerator.process_index)  # processes sample different responses
        else:  # the checkpoint restores the RNG states too
            trainer.load_checkpoint(checkpoint)
            if accelerator.is_main_process:
                _truncate_logs(output_dir, trainer.state.update)
            before = read_eval_before(output_dir)
            say("ppo", f"resuming from {checkpoint.name} ({trainer.state.update} of {trainer.plan.num_updates} "
                       "updates)")
        state = trainer.train(stop_requested)
        if state.update < trainer.plan.num_updates:  # Ctrl-C: the trainer saved a checkpoint and stopped
            raise interrupted(options.plan, runs.latest_checkpoint(output_dir))
        after = trainer.evaluate(eval_prompts, eval_seed)
    finally:
        finish_trackers(accelerator)

    # 5. save
    metrics: dict[str, Any] = {}
    gathered = None
    if accelerator.distributed_type == DistributedType.FSDP:  # every process takes part; the main one writes
        gathered = policy_state_dict(accelerator.get_state_dict(trainer.model))
    if accelerator.is_main_process:
        policy = accelerator.unwrap_model(trainer.model).policy
        setup.restore_dropout()  # the saved config is the checkpoint's own
        stops = stop_token_ids(policy, tokenizer)
        saved = models.save_model(policy, tokenizer, output_dir, recipe.peft, state_dict=gathered,
                                  start=models.start_adapter(recipe.policy.name_or_path))
        # what the policy was trained to sample with, so that sampling from the saved model draws from it (with an
        # adapter too: the file documents it there, and GenerationConfig.from_pretrained reads it)
        rollout_generation_config(recipe.generation, tokenizer, stops).save_pretrained(output_dir)
        write_eval_samples(output_dir, before, after)
        metrics = ppo_metrics(output_dir, before, after, state, trainer.plan, saved)
        from rlhf_pipeline.plots import plot_ppo_curves

        plot_ppo_curves(output_dir / runs.LOG_FILE, output_dir / CURVES_FILE)
        say("ppo", _summary(metrics))
    return metrics


def engine_settings(recipe) -> dict[str, Any]:
    """How the Accelerator meets the launch. Without GPUs: cpu=True, so that several processes (torchrun) meet over
    gloo; but DeepSpeed on its CPU accelerator (DS_ACCELERATOR=cpu) needs cpu=False and gloo named (Accelerate
    runs DeepSpeed only when not told cpu). Under DeepSpeed, which accumulates gradients itself, the count of
    micro-batches per optimizer step."""
    import torch
    from accelerate.utils import InitProcessGroupKwargs

    if sharding_engine() != "deepspeed":
        return {"cpu": not torch.accelerator.is_available()}
    settings: dict[str, Any] = {"gradient_accumulation_steps": recipe.training.gradient_accumulation_steps}
    if deepspeed_on_cpu():
        settings["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    return settings


def deepspeed_settings(plan, training) -> dict[str, Any]:
    """What DeepSpeed's engine must be told, as no dataloader passes through `accelerator.prepare`: the micro-batch,
    how many make an optimizer step (the engine steps inside `backward` at that boundary), the clipping (the engine
    clips), and our torch AdamW (ZeRO shards its state like any optimizer's). Set before any model is prepared: trl's
    prepare_deepspeed builds the frozen models' inference engines from the same config."""
    return {"train_micro_batch_size_per_gpu": plan.micro_batch_size,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "train_batch_size": plan.micro_batch_size * plan.gradient_accumulation_steps * plan.num_processes,
            "gradient_clipping": training.max_grad_norm or 0.0, "zero_allow_untested_optimizer": True}


# -------------------------------------------------------------------------------------------------------------
# experiment tracking: Accelerate's trackers
# -------------------------------------------------------------------------------------------------------------
def tracker_settings(recipe) -> dict[str, Any]:
    """The Accelerator's trackers for `training.report_to` (their packages were checked before the run started:
    Accelerate itself would silently drop one that is not installed). Those that write files write them inside the
    run, under output_dir/runs/ (TensorBoard: runs/<project>/), which a Hub push leaves out."""
    from accelerate.utils import ProjectConfiguration

    from rlhf_pipeline.recipe.trackers import names

    log_with = names(recipe.training.report_to)
    if not log_with:
        return {}
    output_dir = Path(recipe.output_dir)
    return {"log_with": log_with,
            "project_config": ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs"))}


def start_trackers(accelerator, loaded: LoadedRecipe) -> None:
    """Start the trackers (main process only: Accelerate's trackers act there alone) with the resolved recipe as the
    run's configuration, under `training.project`, the run named after the output dir."""
    if not accelerator.log_with:
        return
    recipe = loaded.recipe
    run_name = Path(loaded.published_output_dir or recipe.output_dir).name  # not a staging dir's name
    local = Path(recipe.output_dir) / "runs"
    names_the_run = {"wandb": {"name": run_name, "dir": str(local)}, "trackio": {"name": run_name},
                     "mlflow": {"run_name": run_name}, "swanlab": {"experiment_name": run_name},
                     "clearml": {"task_name": run_name}, "dvclive": {"dir": str(local / "dvclive")}}
    config = flat_config(recipe.model_dump(mode="json", exclude={"provenance", "extends"}))
    if accelerator.is_main_process:
        local.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(recipe.training.project, config=config, init_kwargs=names_the_run)


def finish_trackers(accelerator) -> None:
    """Close the runs. Not `accelerator.end_training()`: it also destroys the process group, which the later stages
    of a multi-process pipeline still use (the command ends it once: `commands.end_process_group`)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as one level of dotted keys with scalar values, as every tracker takes hyper-parameters
    (TensorBoard's refuses nested ones); a list becomes its text."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if value is None or isinstance(value, (bool, int, float, str)) \
                else str(value)
    return flat


# -------------------------------------------------------------------------------------------------------------
# resuming
# -------------------------------------------------------------------------------------------------------------
def _truncate_logs(output_dir: Path, updates_done: int) -> None:
    """Drop log rows written after the checkpoint (they will be written again), and a last line torn by a kill."""
    from rlhf_pipeline.ppo.trainer import LOG_FILE, SAMPLES_FILE

    for name, key in ((LOG_FILE, "train/update"), (SAMPLES_FILE, "update")):
        runs.keep_rows_through(output_dir / name, key, updates_done)


# -------------------------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------------------------
def load_prompts(loaded: LoadedRecipe, tokenizer, context: int, key: str = "data", eval_limit: int | None = None,
                 scorers: tuple = ()):
    """Tokenized training and held-out prompts from the `key` section (held-out: None when there is no held-out
    split). Preference data without a prompt column gives its shared prefix as the prompt (see `implicit_prompts`).
    Prompts longer than `max_prompt_length` tokens, or than what leaves room for a whole response (`prompt_limit`) in
    the policy's `context` and in the reward models' of `scorers`, are left out (and counted)."""

    section = getattr(loaded.recipe, key)
    train, held_out = data_io.load_splits(loaded, key)
    tokenized = []
    for split, name in ((train, "training"), (held_out, "held-out")):
        if split is None:  # no held-out split (a label recipe may have none)
            tokenized.append(None)
            continue
        present = data_io.roles_present(loaded, split, ["prompt", "chosen", "rejected"], key)
        columns: dict[str, list] = {}
        if "prompt" not in present and {"chosen", "rejected"} <= present:
            split = data_io.select_columns(loaded, split, name, ["chosen", "rejected"], key=key)
            prompts = implicit_prompts(loaded, split, name, key)
        else:
            prompt_column = data_io.column_mapping(section).prompt or "prompt"
            # the other columns go to reward functions written for TRL (e.g. a reference answer, `solution`)
            columns = {c: split[c] for c in split.column_names if c != prompt_column}
            split = data_io.select_columns(loaded, split, name, ["prompt"], key=key)  # names a missing column
            prompts = split["prompt"]
        limit = prompt_limit(loaded, tokenizer, context, section.max_prompt_length, scorers,
                             conversational=len(prompts) > 0 and isinstance(prompts[0], list))
        tokenized.append(tokenize_prompts(loaded, prompts, tokenizer, limit, name, f"{key}.max_prompt_length",
                                          columns))
    train_prompts, eval_prompts = tokenized
    if eval_limit is not None and eval_prompts is not None:
        eval_prompts = eval_prompts.select(list(range(min(eval_limit, len(eval_prompts)))))
    return train_prompts, eval_prompts


def prompt_limit(loaded: LoadedRecipe, tokenizer, context: int, max_prompt_length: int, scorers: tuple = (),
                 conversational: bool = False) -> int:
    """The longest prompt, in the policy's tokens, that leaves room for a whole response of
    `generation.response_length` tokens: in the policy's `context` (and an EOS), and in the context of every reward
    model among `scorers` (None and reward functions skipped) with what its sequence adds to the prompt and the
    response: the EOS RewardTrainer appends to plain text, or the chat template's end of the assistant's turn
    (`scoring.sequence_overhead`). At most `max_prompt_length`."""
    from rlhf_pipeline.ppo.modules import ModelScorer
    from rlhf_pipeline.scoring import sequence_overhead

    response_length = loaded.recipe.generation.response_length
    room = [(context - response_length - 1, "the policy's", context)]
    for scorer in scorers:
        if isinstance(scorer, ModelScorer):
            reward = scorer.reward_model
            extra = sequence_overhead(reward.tokenizer, conversational)
            room.append((reward.context - response_length - extra, "the reward model's", reward.context))
    limit, whose, size = min(room)
    if limit < 1:
        raise loaded.error("generation.response_length", f"{response_length} tokens (and the tokens that end a "
                                                         f"response) leave no room for a prompt in {whose} context "
                                                         f"of {size} tokens")
    return min(max_prompt_length, limit)


def tokenize_prompts(loaded: LoadedRecipe, prompts: list, tokenizer, limit: int, name: str, limit_key: str,
                     columns: dict[str, list] | None = None):
    """`Prompts` from prompt texts (or conversations, through the chat template), leaving out (and counting) those
    longer than `limit` tokens or empty. `columns`: the data's other columns, row for row, kept with their prompts.

    Tokenized as TRL's trainers tokenize a prompt (SFTTrainer's prompt-completion data, GRPOTrainer's prompts): a
    text with the tokenizer's special tokens (the BOS that Llama, Gemma and OPT tokenizers put first, as SFT trained
    with it), a conversation through `apply_chat_template(..., add_generation_prompt=True, tokenize=True)` (the
    template writes its own BOS, if any)."""
    from rlhf_pipeline.ppo.modules import Prompts

    texts = [_prompt_text(p, tokenizer, loaded) for p in prompts]
    if isinstance(prompts[0], str):
        ids = tokenizer(texts)["input_ids"]
    else:
        ids = [list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for p in prompts]
    keep = [i for i, seq in enumerate(ids) if 0 < len(seq) <= limit and texts[i]]
    if len(keep) < len(ids):
        say(loaded.stage, f"left out {len(ids) - len(keep)} of {len(ids)} {name} prompts longer than {limit} "
                          "tokens (or empty)")
    if not keep:
        raise loaded.error(limit_key, f"no {name} prompt fits in {limit} tokens")
    messages = [prompts[i] for i in keep] if isinstance(prompts[0], list) else None
    return Prompts([texts[i] for i in keep], [ids[i] for i in keep], messages,
                   {c: [values[i] for i in keep] for c, values in (columns or {}).items()})


def implicit_prompts(loaded: LoadedRecipe, split, name: str, key: str) -> list:
    """The prompts of preference pairs whose chosen and rejected hold the whole text (see `explicit_pairs`)."""
    return explicit_pairs(loaded, split, name, key)["prompt"]


def explicit_pairs(loaded: LoadedRecipe, split, name: str, key: str):
    """Preference pairs whose chosen and rejected hold the whole text, as (prompt, chosen, rejected) rows: the prompt
    is their shared prefix (TRL's `extract_prompt`), cut just after the last `implicit_prompt_end` in it when that is
    set (what follows the cut goes back to the start of both responses). Without the cut, a shared prefix runs into
    the response when both responses begin alike (HH-RLHF: "...Assistant: I"). Rows whose shared prefix lacks the
    marker have no prompt and are left out (and counted)."""
    from trl.data_utils import extract_prompt

    end = getattr(loaded.recipe, key).implicit_prompt_end
    pairs = split.map(extract_prompt, desc=f"Extracting {name} prompts")
    if end is None or len(pairs) == 0:
        return pairs
    prompts = pairs["prompt"]
    if not isinstance(prompts[0], str):
        raise loaded.error(f"{key}.implicit_prompt_end", "applies to plain-text data; conversational prompts end "
                                                         "where chosen and rejected part, message by message")
    keep = [i for i, p in enumerate(prompts) if end in p]
    if len(keep) < len(prompts):
        say(loaded.stage, f"left out {len(prompts) - len(keep)} of {len(prompts)} {name} pairs whose shared prefix has "
                          f"no {end!r}")
    if not keep:
        raise loaded.error(f"{key}.implicit_prompt_end", f"no {name} pair's shared prefix contains {end!r}")

    def cut(row):
        at = row["prompt"].rfind(end) + len(end)
        rest = row["prompt"][at:]
        return {"prompt": row["prompt"][:at], "chosen": rest + row["chosen"], "rejected": rest + row["rejected"]}

    return pairs.select(keep).map(cut, desc=f"Cutting {name} prompts after {end!r}")


def _prompt_text(prompt: Any, tokenizer, loaded: LoadedRecipe) -> str:
    """A text prompt as is; a conversational one through the chat template, ready for the assistant's turn."""
    if isinstance(prompt, str):
        return prompt
    if not tokenizer.chat_template:
        raise loaded.error("tokenizer.chat_template", models.NO_TEMPLATE.replace("the data is", "the prompts are"))
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


# -------------------------------------------------------------------------------------------------------------
# models
# -------------------------------------------------------------------------------------------------------------
def build_scorer(loaded: LoadedRecipe, source: RewardSource, key: str, device):
    """A reward model (scoring pairs as RewardTrainer built them, see `rlhf_pipeline.scoring`) or a reward function,
    as a callable on rollouts."""
    from rlhf_pipeline.ppo.modules import FunctionScorer, ModelScorer
    from rlhf_pipeline.rewards import load_function

    if source.function:
        try:
            return FunctionScorer(load_function(source.function), source.function)
        except UserError as exc:
            raise loaded.error(f"{key}.function", str(exc)) from None
    return ModelScorer(load_reward_model(loaded, source, key, device))


def load_reward_model(loaded: LoadedRecipe, source: RewardSource, key: str, device, batch_size: int = 64):
    """The reward model named by `source.model`, frozen on `device`, with its own tokenizer."""
    from rlhf_pipeline.recipe.schema import TokenizerSection
    from rlhf_pipeline.scoring import RewardModel

    section = ModelSection(name_or_path=source.model, revision=source.revision,
                           trust_remote_code=source.trust_remote_code, dtype=source.dtype)
    tokenizer = models.load_tokenizer(loaded, TokenizerSection(), section, model_key=f"{key}.model")
    model = _frozen(models.load_pretrained(loaded, section, kind="reward", key=f"{key}.model")).to(device)
    return RewardModel(model, tokenizer, batch_size)


def _frozen(model):
    model.eval()
    model.requires_grad_(False)
    return model


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


def read_eval_before(output_dir: Path) -> dict:
    """The held-out evaluation before training, saved when the run started (a resumed run cannot redo it: its policy
    has trained since). UserError when it is missing or damaged."""
    before = runs.read_json(output_dir / EVAL_BEFORE_FILE)
    if not isinstance(before, dict):
        raise UserError(f"cannot resume: {output_dir / EVAL_BEFORE_FILE} (the evaluation before training) is missing "
                        "or damaged; start over with --overwrite")
    return before


def write_eval_samples(output_dir: Path, before: dict, after: dict) -> None:
    """eval_samples.jsonl: the held-out samples before and after training (PPO and DPO)."""
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
