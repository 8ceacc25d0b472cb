"""The experiment trackers a recipe's `training.report_to` may name, checked without importing torch or transformers.

The TRL-backed stages (pretrain, sft, reward, dpo) hand `report_to` to transformers, whose integrations report;
`rlhf ppo` hands it to Accelerate's trackers (`Accelerator(log_with=...)`). The two lists below are copies of the
libraries' own (transformers' `INTEGRATION_TO_CALLBACK`, Accelerate's `LOGGER_TYPE_TO_CLASS`), so that `rlhf recipe
validate` needs neither library; tests/test_recipes.py fails when they disagree with the installed versions.

A name is checked when the recipe is validated; whether its package is installed, at `--dry-run` and before a run
loads any model (`missing_packages`: `importlib.util.find_spec`, no import).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from rlhf_pipeline.errors import did_you_mean

TRANSFORMERS_TRACKERS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow",
                         "mlflow", "neptune", "swanlab", "tensorboard", "trackio", "wandb")
ACCELERATE_TRACKERS = ("aim", "clearml", "comet_ml", "dvclive", "mlflow", "swanlab", "tensorboard", "trackio", "wandb")
KEYWORDS = ("none", "all")  # no tracker; every installed one

# name -> (the modules the library looks for, what to pip install); kubeflow needs no package (a server's env var)
PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "aim": (("aim",), "aim"),
    "azure_ml": (("azureml.core",), "azureml-core"),
    "clearml": (("clearml",), "clearml"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "dagshub": (("dagshub", "mlflow"), "dagshub mlflow"),
    "dvclive": (("dvclive",), "dvclive"),
    "flyte": (("flytekit",), "flytekit"),
    "mlflow": (("mlflow",), "mlflow"),
    "neptune": (("neptune",), "neptune"),
    "swanlab": (("swanlab",), "swanlab"),
    "tensorboard": (("tensorboard",), "tensorboard"),
    "trackio": (("trackio",), "trackio"),
    "wandb": (("wandb",), "wandb"),
}


def accepted(stage: str) -> tuple[str, ...]:
    """The tracker names a stage's `report_to` may hold (besides `none` and `all`)."""
    return ACCELERATE_TRACKERS if stage == "ppo" else TRANSFORMERS_TRACKERS


def names(report_to: Any) -> list[str]:
    """`report_to` (a name, a list of names, or null) as a list of names, `none` left out."""
    values = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [name for name in values if name != "none"]


def problem(stage: str, report_to: Any) -> str | None:
    """What is wrong with a `report_to` value for `stage`, or None."""
    if report_to is None:
        return None
    if not (isinstance(report_to, str) or (isinstance(report_to, list)
                                            and all(isinstance(n, str) for n in report_to))):
        return f"expected a tracker name or a list of names (got {report_to!r})"
    known = accepted(stage)
    for name in names(report_to):
        if name in known or name == "all":
            continue
        if stage == "ppo" and name in TRANSFORMERS_TRACKERS:
            return (f"{name!r} reports the TRL-backed stages (a transformers integration), not rlhf ppo, which "
                    f"reports through Accelerate's trackers: {', '.join(known)}, all or none")
        return f"unknown tracker {name!r}; expected {', '.join(known)}, all or none{did_you_mean(name, known)}"
    return None


def missing_packages(report_to: Any) -> list[tuple[str, str]]:
    """(tracker, what to pip install) for each named tracker whose package is not installed (`all` needs none)."""
    missing = []
    for name in names(report_to):
        modules, pip = PACKAGES.get(name, ((), ""))
        if any(_not_installed(module) for module in modules):
            missing.append((name, pip))
    return missing


def _not_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return True
