"""A stage's output directory: guarded against overwrites, with provenance and a `metrics.json` written last.

Life of an output dir:
  1. before anything is written, `check_output_dir` refuses a finished run (one with `metrics.json`) unless
     `--overwrite`, and refuses a non-empty directory that is not an rlhf run at all;
  2. `start_run` clears what an earlier (finished with --overwrite, or crashed) run left, writes
     `recipe.resolved.yaml` with its provenance (seed, library versions, git commit, command line);
  3. the stage saves its model and tokenizer;
  4. `finish_run` writes `metrics.json` atomically: its presence means the stage finished.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import UserError

METRICS_FILE = "metrics.json"
RECIPE_FILE = "recipe.resolved.yaml"
LIBRARIES = ("rlhf-pipeline", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
             "huggingface_hub", "safetensors")


def is_finished(output_dir: str | Path) -> bool:
    return (Path(output_dir) / METRICS_FILE).is_file()


def output_dir_status(output_dir: str | Path) -> str:
    """'new', 'finished', 'unfinished' (an rlhf run that did not finish) or 'foreign' (a non-empty other dir)."""
    path = Path(output_dir)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return "new"
    if not path.is_dir():
        return "foreign"
    if is_finished(path):
        return "finished"
    if (path / RECIPE_FILE).is_file():
        return "unfinished"
    return "foreign"


def check_output_dir(output_dir: str | Path, overwrite: bool) -> str:
    """Raise a UserError if the stage may not write to `output_dir`; return its status."""
    status = output_dir_status(output_dir)
    if status == "finished" and not overwrite:
        raise UserError(
            f"{output_dir} holds a finished run ({METRICS_FILE} is there). Pass --overwrite to replace it, "
            "or choose another --output-dir."
        )
    if status == "foreign":
        raise UserError(
            f"{output_dir} exists and is not an rlhf run directory (no {RECIPE_FILE}); refusing to write into it. "
            "Choose another --output-dir or empty it."
        )
    return status


def start_run(output_dir: str | Path, resolved_recipe_yaml: str) -> Path:
    """Clear a previous (finished-and-overwritten or crashed) run and write the resolved recipe."""
    path = Path(output_dir)
    if output_dir_status(path) in ("finished", "unfinished"):
        # metrics.json goes first so that an interrupted clean-up never leaves a run that looks finished
        (path / METRICS_FILE).unlink(missing_ok=True)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / RECIPE_FILE, resolved_recipe_yaml)
    return path


def finish_run(output_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write metrics.json last and atomically: its presence marks the stage as finished."""
    path = Path(output_dir) / METRICS_FILE
    atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True, default=_jsonable) + "\n")
    return path


def read_metrics(output_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(output_dir) / METRICS_FILE).read_text())


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def provenance() -> dict[str, Any]:
    """What is needed to reproduce a run besides the recipe: library versions, git commit, command line."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["rlhf", *sys.argv[1:]]) if sys.argv else "",
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "versions": versions,
        "git": git_commit(),
    }


def git_commit() -> dict[str, Any] | None:
    """The commit of the rlhf-pipeline checkout this code runs from, and whether it has uncommitted changes."""
    source = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
