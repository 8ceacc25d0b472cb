"""What every stage does the same way: seed, build the TRL config, train (resumably, stoppable with Ctrl-C), save,
finish. Where a run writes, and that no run is ever lost, is `runs.py`'s job; `commands.execute_stage` plans it."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline import runs
from rlhf_pipeline.errors import EXIT_USER_ERROR, Interrupted, UserError, unreadable
from rlhf_pipeline.recipe.load import LoadedRecipe

if TYPE_CHECKING:
    from transformers import Trainer


@dataclass(frozen=True)
class RunOptions:
    """How a stage runs: where it writes and whether it resumes (`runs.RunPlan`, made by commands.execute_stage)."""

    plan: runs.RunPlan


# Defaults applied under the recipe's own `training:` keys (which win).
TRAINER_DEFAULTS: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "logging_steps": 10,
                                    "save_total_limit": 2,
                                    # every parameter of our models takes part in every step: DDP need not search
                                    "ddp_find_unused_parameters": False}


def distributed_state():
    """Accelerate's state of this process among those launched together (torchrun, accelerate launch). Asked for CPU
    processes (gloo) on a machine without an accelerator: otherwise Accelerate, and the Trainer after it, would see
    one process in each copy, and two launched processes would train two independent copies."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available())


def is_main_process() -> bool:
    return distributed_state().is_main_process


def deepspeed_on_cpu() -> bool:
    """A DeepSpeed launch on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, on a machine without GPUs): the
    processes meet over gloo. Accelerate runs DeepSpeed only when not told `cpu`, so it is told the backend instead."""
    import os

    import torch

    return (sharding_engine() == "deepspeed" and os.environ.get("DS_ACCELERATOR") == "cpu"
            and not torch.accelerator.is_available())


def sharding_engine() -> str | None:
    """The engine `accelerate launch` asked for: "fsdp", "deepspeed" or None (one process or DDP), read from the
    environment it sets for every process."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def zero_stage() -> int | None:
    import os

    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if sharding_engine() == "deepspeed" and stage else None


def check_engine(loaded: LoadedRecipe) -> None:
    """Refuse, before anything is loaded, a launch this stage cannot honour (`engine_refusals`, read from the
    environment `accelerate launch` sets): the first reason stops it."""
    import os

    import torch

    engine = sharding_engine()
    version = int(os.environ.get("FSDP_VERSION", "1")) if engine == "fsdp" else None
    refusals = engine_refusals(loaded, engine, zero_stage(), version, torch.accelerator.is_available(),
                               deepspeed_cpu=deepspeed_on_cpu())
    if refusals:
        key, reason = refusals[0]
        raise loaded.error(key, reason) if key else UserError(reason)


def engine_refusals(loaded: LoadedRecipe, engine: str | None, zero: int | None, fsdp_version: int | None,
                    gpu: bool, deepspeed_cpu: bool = False) -> list[tuple[str | None, str]]:
    """What a stage refuses about a launch under `engine` ("fsdp", "deepspeed" or None), as (the recipe key at
    fault or None, the reason): FSDP or DeepSpeed on a machine without GPUs (Accelerate runs them only on a GPU
    backend: it would silently fall back to plain data parallel), except DeepSpeed on its CPU accelerator
    (`deepspeed_cpu`: DS_ACCELERATOR=cpu); what `rlhf ppo` does not run under (ZeRO-3, FSDP1, checkpoints under
    FSDP); and a merged LoRA save where the weights are sharded (FSDP, ZeRO-3): no process holds them whole to fold
    the adapter in. The stage stops at the first (`check_engine`); `rlhf plan` lists them. Imports no torch."""
    if engine is None:
        return []
    name = "FSDP" if engine == "fsdp" else f"DeepSpeed ZeRO-{zero if zero is not None else '?'}"
    refusals: list[tuple[str | None, str]] = []
    if loaded.stage == "ppo" and engine == "deepspeed" and zero == 3:
        refusals.append((None, "rlhf ppo runs under DDP, FSDP and DeepSpeed ZeRO-1/2, not ZeRO-3 (its generation "
                               "would gather the weights layer by layer at every token); to shard the weights of a "
                               "PPO run, launch it with recipes/accelerate/fsdp.yaml, or zero2.yaml to shard the "
                               "optimizer state and gradients"))
    if not gpu and not (engine == "deepspeed" and deepspeed_cpu):
        refusals.append((None, f"this launch asks for {name} (the Accelerate config's distributed_type), which "
                               "Accelerate runs only on GPUs (DeepSpeed also on DeepSpeed's CPU accelerator, "
                               "DS_ACCELERATOR=cpu); on CPU launch plain data parallel instead: torchrun "
                               f"--standalone --nproc_per_node N -m rlhf_pipeline {loaded.stage} RECIPE"))
    if loaded.stage == "ppo" and engine == "fsdp" and fsdp_version != 2:
        refusals.append((None, "rlhf ppo under FSDP needs FSDP2 (fsdp_version: 2 in the Accelerate config, as in "
                               "recipes/accelerate/fsdp.yaml)"))
    lora = getattr(loaded.recipe, "peft", None)
    if lora is not None and lora.save == "merged" and (engine == "fsdp" or zero == 3):
        refusals.append(("peft.save", f"under {name} the weights are sharded across processes and no process can "
                                      "fold the adapter into them; set `peft.save: adapter` (the adapter loads on "
                                      "its base with AutoModelForCausalLM.from_pretrained), or train under DDP or "
                                      "ZeRO-2"))
    return refusals


def wait_for_everyone() -> None:
    distributed_state().wait_for_everyone()


def gather_lists(items: list) -> list:
    """Every process's `items` (picklable) joined into one list, in process order, in every process."""
    state = distributed_state()
    if state.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def decided_by_main(decide: Callable[[], Any]) -> Any:
    """`decide()` run by process 0 alone, its result (or the UserError it raised) shared with every process: the
    output dir is inspected and prepared once, and every process acts on the same answer. One process: `decide()`
    (and no torch import)."""
    if runs.world_size() == 1:
        return decide()
    result, refusal = None, None
    if runs.is_main_process():
        try:
            result = decide()
        except UserError as exc:
            refusal = exc
    result, refusal = share_from_main((result, refusal))
    if refusal is not None:
        if not runs.is_main_process():  # process 0 prints the message
            raise SystemExit(EXIT_USER_ERROR)
        raise refusal
    return result


def check_shared_dir(output_dir: str | Path) -> None:
    """Several processes: every one must see the directory process 0 writes (one shared filesystem), or each would
    read a copy of its own (a gate's metrics.json, a checkpoint to resume). Process 0 leaves a random token beside
    the output dir and every process reads it back (a process that does not see it retries for a few seconds, for a
    network filesystem's caches); if one cannot, every process stops, with one message, before any work."""
    if runs.world_size() == 1:
        return
    import socket
    import time
    import uuid

    probe = runs.lock_path(output_dir).with_suffix(".probe")  # `.NAME.probe`, as this process sees it
    main = runs.is_main_process()
    token = uuid.uuid4().hex if main else None
    if main:
        runs.atomic_write_text(probe, token)
    token = share_from_main(token)
    deadline = time.monotonic() + 5
    while True:
        try:
            seen = probe.read_text(encoding="utf-8") == token
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    views = gather_lists([(socket.gethostname(), str(probe), seen)])
    if main:
        probe.unlink(missing_ok=True)
    blind = [(rank, host, path) for rank, (host, path, ok) in enumerate(views) if not ok]
    if blind:
        if not main:  # process 0 prints the message
            raise SystemExit(EXIT_USER_ERROR)
        rank, host, path = blind[0]
        raise UserError(f"the processes of this launch do not see the same {output_dir}: process {rank} (on {host}) "
                        f"cannot read {path}, which process 0 wrote beside it; run every process on one shared "
                        "filesystem (with several machines: the output dir on a shared disk)")


def share_from_main(value: Any) -> Any:
    """Process 0's `value` (any picklable object) in every process; the value itself when there is one process."""
    state = distributed_state()
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def say(stage: str, message: str) -> None:
    """A progress line on stderr, from the main process only."""
    if is_main_process():
        print(f"[rlhf {stage}] {message}", file=sys.stderr, flush=True)


def quiet_library_warnings() -> None:
    """TRL's and peft's own code uses transformers' deprecated `gradient_checkpointing` names: nothing a user can
    act on, so those two warnings are not shown."""
    for message in (r"`gradient_checkpointing` is deprecated", r"`is_gradient_checkpointing` is deprecated"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def begin(loaded: LoadedRecipe) -> None:
    """Seed everything and quiet the warnings nobody can act on (the output dir was checked by the plan)."""
    from transformers import set_seed

    quiet_library_warnings()
    set_seed(loaded.recipe.seed)


@contextmanager
def setting_up(loaded: LoadedRecipe) -> Iterator[None]:
    """Around building the trainer: settings it rejects become a message about `training`, and a set-up that fails
    removes the empty dir it created (nothing is written before `start_outputs`)."""
    path = Path(loaded.recipe.output_dir)
    existed = path.exists()
    try:
        yield
    except (ValueError, TypeError) as exc:
        _remove_if_empty(path, existed)
        raise loaded.error("training", f"the trainer rejected these settings: {type(exc).__name__}: "
                                       f"{_first_line(exc)}") from None
    except BaseException:
        _remove_if_empty(path, existed)
        raise


def _remove_if_empty(path: Path, existed: bool) -> None:
    if not existed and path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def start_outputs(loaded: LoadedRecipe, options: RunOptions) -> None:
    """Write the run marker and recipe.resolved.yaml (with provenance); a resumed run keeps what it has. Called once
    the stage is set up (what an earlier attempt left was cleared before: `runs.prepare_run`)."""
    if is_main_process():
        runs.start_run(options.plan, loaded.stage, loaded.resolved_yaml(runs.provenance()))
    wait_for_everyone()


def finish_outputs(loaded: LoadedRecipe, options: RunOptions, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write metrics.json (the run is finished; a staged run takes the output dir's place), then push to the Hub
    when the recipe's `hub:` section says so."""
    push_error: UserError | None = None
    if is_main_process():
        plan = options.plan
        path = runs.finish_run(plan, metrics)
        say(loaded.stage, f"finished: {path}" + (" (replacing the run that was there)" if plan.staged else ""))
        from rlhf_pipeline.hub import push_if_configured

        try:
            push_if_configured(plan.output_dir, getattr(loaded.recipe, "hub", None))
        except UserError as exc:  # raised once the other processes are released, so that none of them hangs
            push_error = exc
    wait_for_everyone()
    if push_error is not None:
        raise push_error
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C: stop at the next safe point, save, exit 130
# ---------------------------------------------------------------------------------------------------------------
class _StopRequest:
    requested = False


STOP = _StopRequest()


@contextmanager
def graceful_interrupt(stage: str) -> Iterator[None]:
    """The first Ctrl-C asks the stage to stop after the current step (Trainer) or update (PPO), save a checkpoint
    and exit 130 with the command that resumes it; a second Ctrl-C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def request_stop(signum, frame):
        STOP.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\n[rlhf {stage}] Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop "
              "at once, losing the work since the last checkpoint)", file=sys.stderr, flush=True)

    STOP.requested = False
    signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        STOP.requested = False


def stop_requested() -> bool:
    """Whether any process was asked to stop (processes must agree, or they would wait on each other forever)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import torch

        flag = torch.tensor([1.0 if STOP.requested else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
    return STOP.requested


def interrupted(plan: runs.RunPlan, checkpoint: Path | None) -> Interrupted:
    flags = ("--resume", "--overwrite") if plan.staged else ("--resume",)
    saved = f"checkpoint saved: {checkpoint}" if checkpoint else "no checkpoint could be saved"
    return Interrupted(f"interrupted; {saved}", runs.command_line(flags) if checkpoint else None)


def trainer_callbacks() -> list:
    """What every Trainer of ours gets: complete-checkpoint markers and the Ctrl-C stop."""
    from transformers import TrainerCallback

    class MarkCheckpointComplete(TrainerCallback):
        """A Trainer writes checkpoint-N in place; once every process has written its part, fsync it and mark it
        complete (`runs.latest_checkpoint` resumes only from marked ones: a kill during a save never leaves a
        half-written checkpoint to resume from)."""

        def on_save(self, args, state, control, **kwargs):
            wait_for_everyone()
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if is_main_process() and checkpoint.is_dir():
                runs.ordinary_modes(checkpoint)  # safetensors writes through mkstemp (0600): readable as the model is
                runs.fsync_tree(checkpoint)
                runs.atomic_write_text(checkpoint / runs.CHECKPOINT_COMPLETE, "")
            wait_for_everyone()

    class StopOnCtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop_requested():
                control.should_save = True
                control.should_training_stop = True

    return [MarkCheckpointComplete(), StopOnCtrlC()]


def training_config(loaded: LoadedRecipe, config_class: type, model=None):
    """The TRL / transformers config built from `training:` over the defaults; its own errors name the section.
    Built before the model loads (stages pass the model's config: `models.load_config`), so that DeepSpeed ZeRO-3
    shards the weights as they load.

    Given the model (or its config), a config with `max_length` (SFT, reward) defaults it to the model's context and
    refuses a longer one, which would crash mid-training."""
    import dataclasses

    import torch

    recipe = loaded.recipe
    gpu = torch.cuda.is_available()
    defaults: dict[str, Any] = {**TRAINER_DEFAULTS, "dataloader_pin_memory": gpu}  # pinning without a GPU warns
    if not gpu:
        defaults["bf16"] = False  # TRL defaults to bf16, which a CPU run rejects or slows down
        # several CPU processes (torchrun) meet over gloo only when the Trainer's Accelerate state is asked for CPU:
        # without it, each process would train its own copy on all the data. DeepSpeed's CPU accelerator is the
        # exception: Accelerate drops DeepSpeed when told cpu, so it is told gloo instead
        defaults.update({"use_cpu": False, "ddp_backend": "gloo"} if deepspeed_on_cpu() else {"use_cpu": True})
    has_max_length = "max_length" in {f.name for f in dataclasses.fields(config_class)}
    if model is not None and has_max_length:
        defaults["max_length"] = context_length(model)
    if "save_steps" in recipe.training and "save_strategy" not in recipe.training:
        defaults["save_strategy"] = "steps"  # asking for checkpoints every N steps means saving by steps
    kwargs = {**defaults, **recipe.training, "output_dir": recipe.output_dir, "seed": recipe.seed}
    try:
        args = config_class(**kwargs)
    except (ValueError, TypeError) as exc:
        raise loaded.error("training", f"{config_class.__name__} rejected these settings: {exc}") from None
    if model is not None and has_max_length:
        check_context(loaded, "training.max_length", args.max_length, model)
    return args


def train_and_evaluate(trainer: Trainer, options: RunOptions, stage: str, has_eval: bool,
                       perplexity: bool = False) -> dict[str, Any]:
    """Train (from the plan's checkpoint when resuming), then evaluate on the held-out split; return the metrics every
    stage reports. The history goes to log.jsonl as it is logged and is drawn at the end (`<stage>_curves.png`).
    Ctrl-C saves a checkpoint and raises Interrupted."""
    plan = options.plan
    checkpoint = plan.checkpoint if plan.mode == "resume" else None
    keep_token_count(trainer, checkpoint)  # first: its file is part of each checkpoint the next callback completes
    for callback in trainer_callbacks():
        trainer.add_callback(callback)
    log_path = Path(trainer.args.output_dir) / runs.LOG_FILE
    trainer.add_callback(training_log(log_path, checkpoint))
    resume_from = str(checkpoint) if checkpoint else trainer.args.resume_from_checkpoint
    try:  # a checkpoint outside the output dir named by training.resume_from_checkpoint is the Trainer's to load
        result = trainer.train(resume_from_checkpoint=resume_from)
    except Exception as exc:
        damaged = damaged_checkpoint(exc, resume_from)
        if damaged is not None:
            raise damaged from None
        if isinstance(exc, (OSError, RuntimeError)):
            raise runs.disk_full(exc, trainer.args.output_dir) or exc from None
        raise
    if STOP.requested:
        wait_for_everyone()
        raise interrupted(plan, runs.latest_checkpoint(trainer.args.output_dir))
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    metrics: dict[str, Any] = {
        "train_runtime": result.metrics.get("train_runtime"),
        "train_loss": _whole_run_loss(trainer, result.training_loss, checkpoint),
        "final_train_loss": losses[-1] if losses else result.training_loss,
        "train_steps": trainer.state.global_step,
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
    }
    if has_eval:
        evaluation = trainer.evaluate()
        metrics.update({k: v for k, v in evaluation.items() if k.startswith("eval_") and "runtime" not in k
                        and "per_second" not in k})
        if perplexity and "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    if is_main_process():
        from rlhf_pipeline.plots import plot_training_curves

        plot_training_curves(log_path, log_path.with_name(curves_file(stage)), stage)
    return metrics


def curves_file(stage: str) -> str:
    """The PNG of a stage's history, drawn from its log.jsonl."""
    return f"{stage}_curves.png"


def training_log(path: Path, checkpoint: Path | None):
    """A callback that appends each Trainer log event to log.jsonl as one row of numbers: `step`, `epoch`, then what
    the Trainer logged (loss, learning_rate, grad_norm, the trainer's own metrics, `eval_*` rows), flushed as it
    goes. The Trainer's end-of-training summary (a session's `train_loss`, `train_runtime`, `total_flos`) is left
    out: the whole run's figures are in metrics.json. A fresh run starts the file empty; a resumed one keeps the rows
    up to its checkpoint's step and continues (what was logged after it is logged again). docs/training-logs.md
    defines the keys."""
    from transformers import TrainerCallback

    if is_main_process():
        if checkpoint is None:
            runs.atomic_write_text(path, "")
        else:
            runs.keep_rows_through(path, "step", runs.checkpoint_step(checkpoint))

    class TrainingLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "train_loss" in logs:  # the end-of-training summary
                return
            row: dict[str, float] = {"step": state.global_step}
            if "epoch" in logs:
                row["epoch"] = logs["epoch"]
            row.update((key, value) for key, value in logs.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool))
            with open(path, "a", encoding="utf-8") as handle:  # closed, hence flushed, at every event
                handle.write(json.dumps(row) + "\n")

    return TrainingLog()


TOKEN_COUNT_FILE = "rlhf_token_count.json"


def keep_token_count(trainer: Trainer, checkpoint: Path | None) -> None:
    """TRL's SFT, reward and DPO trainers count the training tokens seen (their logged `num_tokens`, and
    `eval_num_tokens` in metrics.json) in `_total_train_tokens`, which a checkpoint does not keep: a resumed run would
    count only the tokens since the resume. The count is saved with each checkpoint and restored from it. (The
    Trainer's own `num_input_tokens_seen`, off by default, is kept in trainer_state.json.)"""
    from transformers import TrainerCallback

    if not hasattr(trainer, "_total_train_tokens"):
        return
    if checkpoint is not None:
        saved = runs.read_json(Path(checkpoint) / TOKEN_COUNT_FILE)
        if isinstance(saved, dict) and isinstance(saved.get("total_train_tokens"), (int, float)):
            trainer._total_train_tokens = saved["total_train_tokens"]

    class SaveTokenCount(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if is_main_process() and folder.is_dir():
                runs.atomic_write_text(folder / TOKEN_COUNT_FILE,
                                       json.dumps({"total_train_tokens": trainer._total_train_tokens}) + "\n")

    trainer.add_callback(SaveTokenCount())


# The Trainer's methods that read a checkpoint it resumes from, and what each reads.
CHECKPOINT_READERS = {
    "_load_from_checkpoint": "its model weights",
    "_load_rng_state": "its random states (rng_state*.pth)",
    "_load_optimizer_and_scheduler": "its optimizer or scheduler state (optimizer.pt, scheduler.pt)",
    "_load_scaler": "its loss scaler (scaler.pt)",
    "load_from_json": "trainer_state.json",
    "_load_callback_state": "trainer_state.json (callback states)",
}


def damaged_checkpoint(exc: BaseException, checkpoint: str | None) -> UserError | None:
    """A UserError naming the checkpoint when `exc` was raised while the Trainer read it (a damaged or doctored
    file: torch.load(weights_only=True) refuses code, and says so in an UnpicklingError), else None."""
    if not checkpoint or isinstance(exc, (KeyboardInterrupt, UserError)):
        return None
    reading, frame = None, exc.__traceback__
    while frame is not None:
        reading = CHECKPOINT_READERS.get(frame.tb_frame.f_code.co_name, reading)
        frame = frame.tb_next
    if reading is None:
        return None
    return UserError(f"cannot resume from {checkpoint}: {reading} cannot be read ({unreadable(exc)}); nothing in it "
                     "was run. Start over with --overwrite (or name an earlier checkpoint with "
                     "training.resume_from_checkpoint)")


def _whole_run_loss(trainer: Trainer, session_loss: float, checkpoint: Path | None) -> float:
    """The mean training loss over the whole run. A Trainer resumed at step k reports the mean of steps k+1... only;
    the steps before come back from the loss windows logged before the checkpoint (exact when the checkpoint falls on
    a logging step, as with logging_steps dividing save_steps)."""
    if checkpoint is None:
        return session_loss
    resumed_at = runs.checkpoint_step(checkpoint)
    total, previous = 0.0, 0
    for row in trainer.state.log_history:
        if "loss" in row and row["step"] <= resumed_at:
            total += row["loss"] * (row["step"] - previous)
            previous = row["step"]
    session_steps = trainer.state.global_step - resumed_at
    return (total + session_loss * session_steps) / max(previous + session_steps, 1)


def save_trained(trainer: Trainer, loaded: LoadedRecipe, lora=None) -> str:
    """Save the trained model and tokenizer to the output dir: 'full', 'merged' (LoRA folded in) or 'adapter' (with
    the adapter the model started from folded in: `models.fold_start_adapter`)."""
    from peft import PeftModel

    from rlhf_pipeline import models

    output_dir = loaded.recipe.output_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel) and (lora is None or lora.save == "merged"):
        if is_main_process():
            models.save_model(model, trainer.processing_class, output_dir, lora)
        wait_for_everyone()
        return "merged"
    trainer.save_model(output_dir)  # distributed-aware; also saves the tokenizer (processing_class)
    saved = "adapter" if isinstance(model, PeftModel) else "full"
    if is_main_process():
        # a pickle of the TrainingArguments: the resolved recipe already records them, and outputs stay pickle-free
        (Path(output_dir) / "training_args.bin").unlink(missing_ok=True)
        if saved == "adapter" and (start := models.start_adapter(loaded.recipe.model.name_or_path)) is not None:
            models.fold_start_adapter(output_dir, start)
    wait_for_everyone()
    return saved


def check_context(loaded: LoadedRecipe, key: str, length: int | None, model) -> None:
    """Sequences longer than the model's position embeddings would crash mid-training: refuse them up front. `model`:
    the model or its config."""
    config = getattr(model, "config", model)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit and length and length > limit:
        raise loaded.error(key, f"{length} tokens is longer than the model's context ({limit} tokens)")


def context_length(model, cap: int | None = 1024) -> int:
    """The longest sequence the model (or its config) reads (GPT-2: n_positions), capped at 1024 as TRL's default."""
    config = getattr(model, "config", model).get_text_config()
    length = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024
    return min(length, cap) if cap else length


def check_dropped_pairs(loaded: LoadedRecipe, trainer, n_train: int, n_held_out: int, *, every: str, some: str,
                        shorter: str) -> dict[str, int]:
    """TRL's preference trainers drop the pairs that do not fit `max_length`: say how many, and stop if a split is
    left empty. The wording is the stage's: `every` ("pair is longer than"), `some` ("are longer than {max_length}
    tokens"), `shorter` ("texts")."""
    max_length = trainer.args.max_length
    dropped = {"train_pairs_too_long": n_train - len(trainer.train_dataset),
               "eval_pairs_too_long": n_held_out - len(trainer.eval_dataset)}
    key = "training.max_length" if "max_length" in loaded.recipe.training else "model.name_or_path"
    for name, n_left, n_dropped in (("train", len(trainer.train_dataset), dropped["train_pairs_too_long"]),
                                    ("held-out", len(trainer.eval_dataset), dropped["eval_pairs_too_long"])):
        if n_left == 0:
            raise loaded.error(key, f"every {name} {every} max_length ({max_length} tokens); raise "
                                    f"training.max_length (up to the model's context length) or use shorter {shorter}")
        if n_dropped:
            say(loaded.stage, f"{n_dropped} of {n_left + n_dropped} {name} pairs {some.format(max_length=max_length)} "
                              "and were left out")
    return dropped

