"""The `training:` keys each TRL-backed stage accepts, checked without importing transformers.

`training:` is passed to `transformers.TrainingArguments` (pretrain), `trl.SFTConfig` (sft), `trl.RewardConfig`
(reward) or `trl.DPOConfig` (dpo). So that `rlhf recipe validate` stays fast, the field names, their types and help
texts are read from a snapshot (`training_fields.json`) taken from the installed libraries. Regenerate it after
upgrading them:

    python -m rlhf_pipeline.recipe.training_fields

A test fails when the snapshot and the installed libraries disagree.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import did_you_mean
from rlhf_pipeline.recipe import trackers, trl_names

SNAPSHOT = Path(__file__).with_name("training_fields.json")

# stage -> the config class its `training:` section becomes
CONFIG_CLASSES = {
    "pretrain": "transformers.TrainingArguments",
    "sft": "trl.SFTConfig",
    "reward": "trl.RewardConfig",
    "dpo": "trl.DPOConfig",
}

def owned_elsewhere(stage: str) -> dict[str, str]:
    """Fields of the stage's config class that a recipe sets outside `training:` (the table of TRL names says where),
    such as `push_to_hub` (`hub.push`): field -> where it goes. Refused under `training:`."""
    owned = {}
    for name in fields_for(stage):
        alias = trl_names.alias_for(stage, name)
        if alias is not None and not (alias.key or "").startswith("training."):
            where = f"set `{alias.key}`" + (f" ({alias.note})" if alias.note else "") if alias.key else alias.note
            owned[name] = where
    return owned


@cache
def snapshot() -> dict[str, Any]:
    return json.loads(SNAPSHOT.read_text())


def fields_for(stage: str) -> dict[str, dict[str, Any]]:
    """name -> {"types": [...], "choices": [...] | None, "default": ..., "help": str} for a stage's config class."""
    return snapshot()["classes"][CONFIG_CLASSES[stage]]


# Values the config classes accept but training cannot use (they would crash mid-run, or train nothing): checked
# when the recipe is validated. key -> (what is expected, test).
VALUE_RULES: dict[str, tuple[str, Any]] = {
    "learning_rate": ("a finite number >= 0", lambda v: v >= 0),
    "per_device_train_batch_size": ("at least 1", lambda v: v >= 1),
    "per_device_eval_batch_size": ("at least 1", lambda v: v >= 1),
    "gradient_accumulation_steps": ("at least 1", lambda v: v >= 1),
    "num_train_epochs": ("a finite number >= 0", lambda v: v >= 0),
    "max_steps": ("-1 (train num_train_epochs) or at least 1", lambda v: v == -1 or v >= 1),
    "weight_decay": ("a finite number >= 0", lambda v: v >= 0),
    "max_grad_norm": ("a finite number >= 0", lambda v: v >= 0),
    "warmup_steps": ("a finite number >= 0 (a fraction of the steps below 1)", lambda v: v >= 0),
    "adam_beta1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "adam_beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "adam_epsilon": ("a finite number > 0", lambda v: v > 0),
    "logging_steps": ("a number > 0", lambda v: v > 0),
    "save_steps": ("a number > 0", lambda v: v > 0),
    "eval_steps": ("a number > 0", lambda v: v > 0),
    "save_total_limit": ("at least 1", lambda v: v >= 1),
    "max_length": ("at least 1", lambda v: v >= 1),
}


# List fields whose config class also takes one string (its __post_init__ wraps it in a list).
STRING_AS_LIST = {"trl.DPOConfig": {"loss_type"}}


def check_training(stage: str, training: dict[str, Any]) -> list[tuple[str, str]]:
    """Problems with a `training:` mapping as (key, message) pairs; empty when it is fine."""
    from rlhf_pipeline.recipe.suggest import unknown_key  # (it reads this module's fields)

    fields, owned = fields_for(stage), owned_elsewhere(stage)
    problems = []
    for key, value in training.items():
        if key in owned:
            problems.append((key, f"not set here: {owned[key]}"))
        elif key not in fields:
            problems.append((key, unknown_key(stage, ("training", key), fields, f"unknown key for "
                                                                                 f"{CONFIG_CLASSES[stage]}")))
        elif isinstance(value, str) and key in STRING_AS_LIST.get(CONFIG_CLASSES[stage], ()):
            continue  # `loss_type: ipo` means [ipo]
        elif key == "report_to":  # transformers would refuse an unknown name only once the models are loaded
            message = trackers.problem(stage, value)
            if message:
                problems.append((key, message))
        else:
            message = type_problem(value, fields[key]) or _value_problem(key, value)
            if message:
                problems.append((key, message))
    epochs, steps = training.get("num_train_epochs"), training.get("max_steps", -1)
    if epochs == 0 and isinstance(steps, int) and steps < 1 and not problems:
        problems.append(("num_train_epochs", "0 epochs and no max_steps: the run would train nothing; set "
                                             "num_train_epochs > 0 or max_steps >= 1"))
    return problems


def _value_problem(key: str, value: Any) -> str | None:
    """NaN or infinity for any number; the rules above for the keys they name."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number (got {value})"
    rule = VALUE_RULES.get(key)
    if rule is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    expected, test = rule
    return None if test(value) else f"expected {expected} (got {value!r})"


def type_problem(value: Any, field: dict[str, Any]) -> str | None:
    """What is wrong with `value` for a snapshot field ({"types": [...], "choices": [...] | None}), or None."""
    kinds = field["types"]
    if "any" in kinds:
        return None
    choices = field.get("choices")
    if isinstance(value, str) and choices:
        if value in choices:
            return None
        return f"expected one of {', '.join(map(str, choices))} (got {value!r}){did_you_mean(value, choices)}"
    if _matches(value, kinds):
        return None
    return f"expected {' or '.join(kinds)} (got {value!r})"


def _matches(value: Any, kinds: list[str]) -> bool:
    checks = {
        "null": lambda v: v is None,
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "list": lambda v: isinstance(v, list),
        "dict": lambda v: isinstance(v, dict),
    }
    return any(checks[k](value) for k in kinds if k in checks)


# ---------------------------------------------------------------------------------------------------------------
# Snapshot generation (imports transformers and trl; run by developers, and by the test that checks freshness)
# ---------------------------------------------------------------------------------------------------------------
def take_snapshot() -> dict[str, Any]:
    import dataclasses
    import enum
    import importlib
    import typing
    from importlib.metadata import version

    classes = {}
    for dotted in sorted(set(CONFIG_CLASSES.values())):
        module_name, class_name = dotted.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
        hints = typing.get_type_hints(cls)
        fields = {}
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            kinds, choices = annotation_kinds(hints.get(f.name, f.type))
            default = f.default if f.default is not dataclasses.MISSING else None
            if isinstance(default, enum.Enum):
                default = default.value
            if not isinstance(default, (bool, int, float, str, type(None))):
                default = None
            fields[f.name] = {
                "types": kinds,
                "choices": choices,
                "default": default,
                "help": _plain_help(f.metadata.get("help", "")),
            }
        classes[dotted] = fields
    return {"versions": {"transformers": version("transformers"), "trl": version("trl")}, "classes": classes}


def _plain_help(text: Any) -> str:
    """A field's help on one line, as printed: transformers writes `%` as `%%` for argparse, which we do not use."""
    return " ".join(str(text).replace("%%", "%").split())


def annotation_kinds(annotation: Any) -> tuple[list[str], list[str] | None]:
    """The YAML kinds (`int`, `str`, `null`, ...) a field's type annotation admits, and its string choices (from a
    Literal or an Enum) if any. Used by the snapshots, which import the libraries."""
    import enum
    import typing

    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, _union_type()) else ()
    members = args or (annotation,)
    kinds: list[str] = []
    choices: list[str] | None = None
    for member in members:
        origin = typing.get_origin(member) or member
        if member is type(None):
            kinds.append("null")
        elif member is typing.Any:
            kinds.append("any")
        elif origin is typing.Literal:
            literal = typing.get_args(member)
            choices = (choices or []) + [v for v in literal if isinstance(v, str)]
            kinds.extend(sorted({"bool" if isinstance(v, bool) else "str" for v in literal}))
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            choices = (choices or []) + [e.value for e in origin]
            kinds.append("str")
        elif origin in (bool, int, float, str):
            kinds.append(origin.__name__)
        elif origin in (list, tuple):
            kinds.append("list")
        elif origin is dict:
            kinds.append("dict")
        else:
            kinds.append("object")  # e.g. ParallelismConfig: cannot be written in YAML
    return sorted(set(kinds)), choices


def _union_type():
    import types

    return types.UnionType


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(take_snapshot(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
