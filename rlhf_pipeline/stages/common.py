"""What every stage does the same way: guard the output dir, seed, build the TRL config, train, save, finish."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline import runs
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.recipe.load import LoadedRecipe

if TYPE_CHECKING:
    from transformers import Trainer


@dataclass(frozen=True)
class RunOptions:
    overwrite: bool = False
    resume: bool = False  # PPO only: continue from the last checkpoint


# Defaults applied under the recipe's own `training:` keys (which win).
TRAINER_DEFAULTS: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "logging_steps": 10}


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def say(stage: str, message: str) -> None:
    """A progress line on stderr, from the main process only."""
    if is_main_process():
        print(f"[rlhf {stage}] {message}", file=sys.stderr, flush=True)


def quiet_library_warnings() -> None:
    """TRL's and peft's own code uses transformers' deprecated `gradient_checkpointing` names: nothing a user can
    act on, so those two warnings are not shown."""
    for message in (r"`gradient_checkpointing` is deprecated", r"`is_gradient_checkpointing` is deprecated"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def begin(loaded: LoadedRecipe, options: RunOptions) -> None:
    """Refuse a finished output dir (unless --overwrite) before any work, and seed everything."""
    from transformers import set_seed

    quiet_library_warnings()
    runs.check_output_dir(loaded.recipe.output_dir, options.overwrite)
    set_seed(loaded.recipe.seed)


@contextmanager
def setting_up(loaded: LoadedRecipe) -> Iterator[None]:
    """Around building the trainer: it creates the output dir, so a set-up that fails removes the empty dir again
    (nothing is written before `start_outputs`)."""
    path = Path(loaded.recipe.output_dir)
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise


def start_outputs(loaded: LoadedRecipe) -> None:
    """Clear an old run and write recipe.resolved.yaml (with provenance). Called once the stage is set up."""
    if is_main_process():
        runs.start_run(loaded.recipe.output_dir, loaded.resolved_yaml(runs.provenance()))
    wait_for_everyone()


def finish_outputs(loaded: LoadedRecipe, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write metrics.json (the stage is finished), then push to the Hub when the recipe's `hub:` section says so."""
    push_error: UserError | None = None
    if is_main_process():
        path = runs.finish_run(loaded.recipe.output_dir, metrics)
        say(loaded.stage, f"finished: {path}")
        from rlhf_pipeline.hub import push_if_configured

        try:
            push_if_configured(loaded.recipe.output_dir, getattr(loaded.recipe, "hub", None))
        except UserError as exc:  # raised once the other processes are released, so that none of them hangs
            push_error = exc
    wait_for_everyone()
    if push_error is not None:
        raise push_error
    return metrics


def training_config(loaded: LoadedRecipe, config_class: type, model=None):
    """The TRL / transformers config built from `training:` over the defaults; its own errors name the section.

    Given the model, a config with `max_length` (SFT, reward) defaults it to the model's context and refuses a longer
    one, which would crash mid-training."""
    import dataclasses

    import torch

    recipe = loaded.recipe
    gpu = torch.cuda.is_available()
    defaults: dict[str, Any] = {**TRAINER_DEFAULTS, "dataloader_pin_memory": gpu}  # pinning without a GPU warns
    if not gpu:
        defaults["bf16"] = False  # TRL defaults to bf16, which a CPU run rejects or slows down
    has_max_length = "max_length" in {f.name for f in dataclasses.fields(config_class)}
    if model is not None and has_max_length:
        defaults["max_length"] = context_length(model)
    kwargs = {**defaults, **recipe.training, "output_dir": recipe.output_dir, "seed": recipe.seed}
    try:
        args = config_class(**kwargs)
    except (ValueError, TypeError) as exc:
        raise loaded.error("training", f"{config_class.__name__} rejected these settings: {exc}") from None
    if model is not None and has_max_length:
        check_context(loaded, "training.max_length", args.max_length, model)
    return args


def train_and_evaluate(trainer: Trainer, has_eval: bool, perplexity: bool = False) -> dict[str, Any]:
    """Train, then evaluate on the held-out split; return the metrics every stage reports."""
    result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    metrics: dict[str, Any] = {
        "train_runtime": result.metrics.get("train_runtime"),
        "train_loss": result.training_loss,
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
    return metrics


def save_trained(trainer: Trainer, loaded: LoadedRecipe, lora=None) -> str:
    """Save the trained model and tokenizer to the output dir: 'full', 'merged' (LoRA folded in) or 'adapter'."""
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
    if is_main_process():
        # a pickle of the TrainingArguments: the resolved recipe already records them, and outputs stay pickle-free
        (Path(output_dir) / "training_args.bin").unlink(missing_ok=True)
    wait_for_everyone()
    return "adapter" if isinstance(model, PeftModel) else "full"


def check_context(loaded: LoadedRecipe, key: str, length: int | None, model) -> None:
    """Sequences longer than the model's position embeddings would crash mid-training: refuse them up front."""
    config = model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit and length and length > limit:
        raise loaded.error(key, f"{length} tokens is longer than the model's context ({limit} tokens)")


def context_length(model, cap: int | None = 1024) -> int:
    """The longest sequence the model reads (GPT-2: n_positions), capped at 1024 as TRL's default."""
    config = model.config.get_text_config()
    length = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024
    return min(length, cap) if cap else length
