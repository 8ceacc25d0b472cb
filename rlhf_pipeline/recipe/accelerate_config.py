"""Accelerate config files (`accelerate launch --config_file FILE`), recognised and checked without importing
accelerate (which imports torch), so that `rlhf recipe validate` stays fast.

Which files: a YAML file whose top level is a mapping with a `distributed_type` or `compute_environment` key and no
`stage` key is an Accelerate config, wherever it lives; any other file is a recipe. (Accelerate itself requires
`distributed_type` and defaults `compute_environment`; every recipe names its `stage`.)

What is checked: what Accelerate's loader (`accelerate.commands.config.config_args.load_config_from_file`) rejects,
and what `accelerate launch` would otherwise misread or silently ignore:

- top-level keys against the fields of Accelerate's `ClusterConfig` (`SageMakerConfig` when compute_environment is
  AMAZON_SAGEMAKER), with a did-you-mean, and their YAML types against the fields' annotations;
- `distributed_type`, `compute_environment` and `mixed_precision` against Accelerate's enums (an unquoted `NO` or
  `no` is YAML's false: the message says to quote it);
- the keys of `fsdp_config` and `deepspeed_config` against the `accelerate launch` options they become (Accelerate
  copies them without checking: a misspelt one is silently ignored); `zero_stage` 0 to 3, `fsdp_version` 1 or 2; such
  a section under a `distributed_type` that ignores it;
- process counts: `num_processes` and `num_machines` at least 1, `num_processes` a multiple of `num_machines`,
  `machine_rank` below `num_machines`, `main_process_ip` on several machines; several processes asked of a
  `distributed_type` that `accelerate launch` runs as one process (NO; MULTI_CPU without an mpirun hostfile).

The names come from a snapshot (`accelerate_config.json`) taken from the installed Accelerate. Regenerate it after
upgrading Accelerate:

    python -m rlhf_pipeline.recipe.accelerate_config

A test fails when the snapshot and the installed Accelerate disagree; another loads every shipped config with
Accelerate's real loader.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import Problem, RecipeError, did_you_mean
from rlhf_pipeline.recipe.training_fields import type_problem
from rlhf_pipeline.recipe.yaml_io import load_yaml

SNAPSHOT = Path(__file__).with_name("accelerate_config.json")

# Keys of an older format that Accelerate's loader still accepts and converts (BaseConfig.process_config).
LEGACY_KEYS = {"fp16", "dynamo_backend"}
# Keys the loader fills in when they are missing (BaseConfig.process_config): not required in the file.
FILLED_BY_LOADER = {"compute_environment", "mixed_precision", "use_cpu", "debug", "enable_cpu_affinity"}
# Sections whose keys `accelerate launch` turns into its own options: section -> (distributed_type that uses it,
# prefix Accelerate adds to a key that lacks it).
SECTIONS = {"fsdp_config": ("FSDP", "fsdp"), "deepspeed_config": ("DEEPSPEED", "")}
# distributed_types that `accelerate launch` runs as one process whatever num_processes says.
ONE_PROCESS = {"NO": "distributed_type NO runs one process; use MULTI_GPU (DDP) for several",
               "MULTI_CPU": "accelerate launch runs MULTI_CPU as one process unless mpirun_config.mpirun_hostfile "
                            "is set; on one machine use torchrun --standalone --nproc_per_node N (see "
                            "recipes/accelerate/README.md)"}


@cache
def snapshot() -> dict[str, Any]:
    return json.loads(SNAPSHOT.read_text())


def is_accelerate_config(data: Any) -> bool:
    """Whether a file's YAML data is an Accelerate config rather than a recipe (the rule in the module docstring)."""
    return (isinstance(data, dict) and "stage" not in data
            and ("distributed_type" in data or "compute_environment" in data))


def check_file(path: Path) -> str | None:
    """None when `path` is not an Accelerate config; else a one-line description of it. Raises RecipeError naming
    the file, line and key of each problem (and RecipeError for a file that is not YAML)."""
    import yaml

    _, lines = load_yaml(path)  # YAML errors and duplicate keys, with lines
    data = yaml.safe_load(path.read_text(encoding="utf-8"))  # the values exactly as Accelerate's loader reads them
    if not is_accelerate_config(data):
        return None
    problems = [Problem(message, key, str(path), _line(lines, key)) for key, message in config_problems(data)]
    if problems:
        raise RecipeError(sorted(problems, key=lambda p: p.line or 0))
    return describe(data)


def config_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """What is wrong with an Accelerate config's data, as (dotted key, message) pairs; empty when it is fine."""
    snap = snapshot()
    sagemaker = data.get("compute_environment") == "AMAZON_SAGEMAKER"
    fields = snap["sagemaker_config" if sagemaker else "cluster_config"]
    choices = {
        "compute_environment": snap["compute_environments"],
        "distributed_type": snap["sagemaker_distributed_types" if sagemaker else "distributed_types"],
        "mixed_precision": snap["mixed_precisions"],
    }
    problems: list[tuple[str, str]] = []
    for key, value in data.items():
        if key in LEGACY_KEYS:
            continue
        if key not in fields:
            problems.append((key, f"unknown key for Accelerate's {'SageMakerConfig' if sagemaker else 'ClusterConfig'}"
                                  f"{did_you_mean(key, fields)}"))
            continue
        if key in choices:
            message = _choice_problem(value, choices[key])
        else:  # a field defaulting to None takes null too (Accelerate's annotations do not always say Optional)
            types = fields[key]["types"]
            if fields[key]["default"] is None and not fields[key]["required"] and "null" not in types:
                types = [*types, "null"]
            message = type_problem(value, {"types": types})
        if message:
            problems.append((key, message))
    required = [k for k, f in fields.items() if f["required"] and k not in FILLED_BY_LOADER]
    problems.extend((key, "required key is missing") for key in required if key not in data)
    if not problems and not sagemaker:
        problems.extend(_section_problems(data))
        problems.extend(_process_problems(data))
    return problems


def describe(data: dict[str, Any]) -> str:
    """`FSDP version 2, 8 processes, bf16`: what `rlhf recipe validate` prints for a valid config."""
    kind = data["distributed_type"]
    if data.get("compute_environment") == "AMAZON_SAGEMAKER":
        return f"Accelerate config: SageMaker {kind}, {_count(data.get('num_machines', 1), 'machine')}"
    fsdp = data.get("fsdp_config") or {}
    version = fsdp.get("fsdp_version", fsdp.get("version"))  # launch reads `version` as fsdp_version
    if kind == "FSDP" and version is not None:
        kind += f" version {version}"
    if kind == "DEEPSPEED":
        stage = (data.get("deepspeed_config") or {}).get("zero_stage")
        kind = "DeepSpeed" + (f" ZeRO-{stage}" if stage is not None else "")
    processes = data.get("num_processes", 1 if data["distributed_type"] == "NO" else None)
    parts = [kind, _count(processes, "process") if processes is not None else "num_processes not set"]
    if data.get("num_machines", 1) > 1:
        parts[-1] += f" on {data['num_machines']} machines"
    if data.get("mixed_precision") not in (None, "no"):
        parts.append(data["mixed_precision"])
    return "Accelerate config: " + ", ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def _choice_problem(value: Any, choices: list[str]) -> str | None:
    if isinstance(value, str) and value in choices:
        return None
    if value is None:
        return None  # the loader puts its default in (mixed_precision: none; compute_environment: LOCAL_MACHINE)
    message = f"expected one of {', '.join(choices)} (got {value!r})"
    if isinstance(value, bool) and not value:
        spelt = next((c for c in choices if c.lower() == "no"), None)
        if spelt:
            message += f": YAML reads an unquoted {spelt} as false; write \"{spelt}\""
    elif isinstance(value, str):
        message += did_you_mean(value, choices)
    return message


def _section_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for section, (used_by, prefix) in SECTIONS.items():
        entries = data.get(section) or {}
        if entries and data["distributed_type"] != used_by:
            problems.append((section, f"ignored: accelerate launch reads it only when distributed_type is {used_by} "
                                      f"(here {data['distributed_type']})"))
        options = snapshot()["sections"][section]
        for key, value in entries.items():
            option = key if not prefix or str(key).startswith(prefix) else f"{prefix}_{key}"
            if option not in options:
                problems.append((f"{section}.{key}", f"unknown key: accelerate launch has no such option, and "
                                                     f"would ignore it{did_you_mean(option, options)}"))
            elif option == "zero_stage" and value not in (0, 1, 2, 3):
                problems.append((f"{section}.{key}", f"expected 0, 1, 2 or 3 (got {value!r})"))
            elif option == "fsdp_version" and value not in (1, 2, "1", "2"):
                problems.append((f"{section}.{key}", f"expected 1 or 2 (got {value!r})"))
    return problems


def _process_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    processes, machines = data.get("num_processes"), data.get("num_machines", 1)
    problems = []
    if processes is not None and processes < 1:
        problems.append(("num_processes", f"expected at least 1: all processes on all machines (got {processes})"))
    if machines < 1:
        problems.append(("num_machines", f"expected at least 1 (got {machines})"))
    if problems:
        return problems
    rank = data.get("machine_rank", 0)
    if not 0 <= rank < machines:
        problems.append(("machine_rank", f"expected 0 to {machines - 1} for {machines} machines (got {rank})"))
    if machines > 1 and not data.get("main_process_ip"):
        problems.append(("main_process_ip", f"required on {machines} machines: the address of machine_rank 0"))
    if processes is not None and processes % machines:
        problems.append(("num_processes", f"{processes} processes do not divide evenly over {machines} machines "
                                          "(num_processes counts all machines together)"))
    kind = data["distributed_type"]
    hostfile = (data.get("mpirun_config") or {}).get("mpirun_hostfile")
    if processes is not None and processes > 1 and kind in ONE_PROCESS and not (kind == "MULTI_CPU" and hostfile):
        problems.append(("num_processes", f"{processes} processes asked, but {ONE_PROCESS[kind]}"))
    return problems


def _line(lines: dict[tuple, int], key: str) -> int | None:
    parts = tuple(key.split("."))
    for end in range(len(parts), 0, -1):
        if parts[:end] in lines:
            return lines[parts[:end]]
    return None


# ---------------------------------------------------------------------------------------------------------------
# Snapshot generation (imports accelerate, hence torch; run by developers, and by the test that checks freshness)
# ---------------------------------------------------------------------------------------------------------------
def take_snapshot() -> dict[str, Any]:
    import dataclasses
    import typing
    from importlib.metadata import version

    from accelerate.commands.config.config_args import ClusterConfig, SageMakerConfig
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import ComputeEnvironment, DistributedType, PrecisionType, SageMakerDistributedType

    from rlhf_pipeline.recipe.training_fields import annotation_kinds

    def fields_of(cls: type) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        fields = {}
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = None if required else f.default
            fields[f.name] = {
                "types": annotation_kinds(hints[f.name])[0],
                "default": default if isinstance(default, (bool, int, float, str, type(None))) else None,
                "required": required,
            }
        return fields

    groups = {group.title: sorted({action.dest for action in group._group_actions})
              for group in launch_command_parser()._action_groups}
    return {
        "versions": {"accelerate": version("accelerate")},
        "cluster_config": fields_of(ClusterConfig),
        "sagemaker_config": fields_of(SageMakerConfig),
        "compute_environments": [e.value for e in ComputeEnvironment],
        "distributed_types": [e.value for e in DistributedType],
        "sagemaker_distributed_types": [e.value for e in SageMakerDistributedType],
        "mixed_precisions": [e.value for e in PrecisionType],
        "sections": {"fsdp_config": groups["FSDP Arguments"], "deepspeed_config": groups["DeepSpeed Arguments"]},
    }


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(take_snapshot(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
