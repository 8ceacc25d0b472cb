"""Experiment tracking for our own PPO loop: TensorBoard, trackio or Weights & Biases, chosen by `report_to`.

The TRL-backed stages pass `training.report_to` to transformers, which does the same for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import UserError

BACKENDS = ("tensorboard", "trackio", "wandb")


def backends_from(report_to: Any) -> list[str]:
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n != "none"]
    if "all" in names:
        names = list(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise UserError(f"report_to: unknown tracker(s) {unknown}; use {', '.join(BACKENDS)}, all or none")
    return names


class Tracker:
    """Sends each logged row to the configured trackers (main process only); does nothing for `none`."""

    def __init__(self, backends: list[str], output_dir: Path, run_name: str, config: dict[str, Any]):
        self._writers: list[Any] = []
        self._step = 0
        for name in backends:
            try:
                if name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    self._writers.append(("tensorboard", SummaryWriter(log_dir=str(output_dir / "runs"))))
                elif name == "trackio":
                    import trackio

                    trackio.init(project="rlhf-pipeline", name=run_name, config=config)
                    self._writers.append(("trackio", trackio))
                elif name == "wandb":
                    import wandb

                    self._writers.append(("wandb", wandb.init(project="rlhf-pipeline", name=run_name, config=config)))
            except ImportError:
                raise UserError(f"report_to {name}: the package is not installed "
                                "(pip install 'rlhf-pipeline[tracking]')") from None

    @classmethod
    def for_recipe(cls, loaded, is_main_process: bool) -> Tracker:
        recipe = loaded.recipe
        backends = backends_from(getattr(recipe.training, "report_to", "none")) if is_main_process else []
        config = recipe.model_dump(mode="json", exclude={"provenance", "extends"})
        run_name = Path(loaded.published_output_dir or recipe.output_dir).name  # not a staging dir's name
        return cls(backends, Path(recipe.output_dir), run_name, config)

    def log(self, row: dict[str, float]) -> None:
        self._step = int(row.get("train/update", self._step + 1))
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        for name, writer in self._writers:
            if name == "tensorboard":
                for key, value in scalars.items():
                    writer.add_scalar(key, value, self._step)
            else:
                writer.log(scalars, step=self._step)

    def finish(self) -> None:
        for name, writer in self._writers:
            if name == "tensorboard":
                writer.close()
            elif name == "trackio":
                writer.finish()
            else:
                writer.finish()
        self._writers = []
