"""A stage's output directory: never lost, never half-written, one run at a time. Imports no torch.

Life of a run:
  1. `lock` takes an exclusive lock for the output dir (a second run on it gets a clear error, not a mix of two);
  2. `plan_run` decides where this run writes, from what is there (`output_dir_status`):
     - nothing (or a crashed run with nothing to resume): the output dir itself;
     - a finished or resumable run, with --overwrite: a staging sibling `.NAME.next`, so that the old run stays
       complete and usable until the new one has finished;
     - --resume: the unfinished run (or the staged replacement) from its last complete checkpoint;
  3. `start_run` writes the run marker `.rlhf-run.json` (a run id: what makes a directory ours, and the only thing
     that lets this tool delete one) and `recipe.resolved.yaml` with its provenance;
  4. the stage trains and saves; checkpoints are written whole (temporary name, fsync, rename) or marked complete;
  5. `finish_run` writes `metrics.json` (fsync'd, renamed into place: its presence means finished) and, for a
     staged run, swaps it into place (`promote`); an interrupted swap is completed or undone by `recover`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import DiskFull, UserError

METRICS_FILE = "metrics.json"
RECIPE_FILE = "recipe.resolved.yaml"
MARKER_FILE = ".rlhf-run.json"
CHECKPOINT_COMPLETE = ".rlhf-complete"  # in a Trainer checkpoint: every file of it is on disk
PPO_CHECKPOINTS = "checkpoints"  # our PPO's checkpoints/update-NNNNNN (complete by construction: renamed into place)
LIBRARIES = ("rlhf-pipeline", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
             "huggingface_hub", "safetensors")

_UMASK = os.umask(0)
os.umask(_UMASK)


# ---------------------------------------------------------------------------------------------------------------
# what a directory holds
# ---------------------------------------------------------------------------------------------------------------
def is_finished(output_dir: str | Path) -> bool:
    return (Path(output_dir) / METRICS_FILE).is_file()


def run_marker(output_dir: str | Path) -> dict[str, Any] | None:
    """The marker this tool writes into every run it starts, or None."""
    path = Path(output_dir) / MARKER_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("run_id") else None


def is_ours(output_dir: str | Path) -> bool:
    """A real directory (not a link) holding this tool's run marker: the only kind it ever deletes."""
    path = Path(output_dir)
    return path.is_dir() and not path.is_symlink() and run_marker(path) is not None


def output_dir_status(output_dir: str | Path) -> str:
    """'new' (missing or empty), 'finished', 'unfinished' (a run of ours that did not finish), 'link' (a symbolic
    link) or 'foreign' (anything else that is not empty)."""
    path = Path(output_dir)
    if path.is_symlink():
        return "link"
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return "new"
    if not path.is_dir():
        return "foreign"
    ours = run_marker(path) is not None
    if is_finished(path) and (ours or (path / RECIPE_FILE).is_file()):  # a run of an older version too
        return "finished"
    return "unfinished" if ours else "foreign"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The last complete checkpoint of a run: our PPO's `checkpoints/update-N`, or a Trainer's `checkpoint-N` marked
    complete."""
    path = Path(output_dir)
    found = [p for p in (path / PPO_CHECKPOINTS).glob("update-*") if p.is_dir() and not p.name.endswith(".tmp")]
    found += [p for p in path.glob("checkpoint-*") if (p / CHECKPOINT_COMPLETE).is_file()]
    return max(found, key=_checkpoint_step) if found else None


def _checkpoint_step(path: Path) -> int:
    digits = path.name.rsplit("-", 1)[-1]
    return int(digits) if digits.isdigit() else -1


def resumable_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint an unfinished run of ours can resume from, or None."""
    return latest_checkpoint(output_dir) if output_dir_status(output_dir) == "unfinished" else None


def staging_dir(output_dir: str | Path) -> Path:
    """Where a run that replaces `output_dir` is built."""
    path = Path(output_dir)
    return path.parent / f".{path.name}.next"


def _retired_dir(output_dir: str | Path) -> Path:
    path = Path(output_dir)
    return path.parent / f".{path.name}.old"


# ---------------------------------------------------------------------------------------------------------------
# one run at a time
# ---------------------------------------------------------------------------------------------------------------
def lock_path(output_dir: str | Path) -> Path:
    """The lock file: beside the output dir (`.NAME.lock`, there while a run holds it), so that it stays put when a
    staged run swaps in."""
    path = Path(output_dir).absolute()
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def lock(output_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` for the block (fcntl.flock: released by the OS if the process dies).
    Another holder gets a UserError naming the directory and the holder's pid. The lock file is removed on release
    (while still held; an acquirer checks that the file it locked is still the one at the path, so two processes
    never both hold a lock)."""
    import fcntl

    path = lock_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the whole block)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UserError(f"{output_dir} is in use by another rlhf run (pid {holder}; lock {path}): wait for it "
                            "to finish, or stop it") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # the previous holder removed this file as we locked it: lock the new one
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()  # closing releases the lock


def is_main_process() -> bool:
    """Process 0 of a multi-process launch (torchrun / accelerate set RANK), told without importing torch."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """How many processes were launched together (torchrun / accelerate set WORLD_SIZE), without importing torch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------------------------------------------------------
# where a run writes
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunPlan:
    """Where a run writes and how it starts. `work` is `output_dir` itself, or its staging sibling when the run
    replaces one that must stay intact until the new one has finished."""

    output_dir: Path
    work: Path
    mode: str  # 'new', 'restart' (a crashed run with nothing to resume), 'replace', or 'resume'
    checkpoint: Path | None = None  # resume from here

    @property
    def staged(self) -> bool:
        return self.work != self.output_dir


def plan_run(output_dir: str | Path, overwrite: bool, resume: bool) -> RunPlan:
    """Decide where a run writes (no side effects); UserError when the output dir may not be used."""
    final = Path(output_dir)
    status = output_dir_status(final)
    staged = staging_dir(final)
    if status == "link":
        raise UserError(f"{final} is a symbolic link (to {os.path.realpath(final)}): rlhf never writes, replaces or "
                        "deletes through a link; give the real directory")
    if status == "foreign":
        raise UserError(f"{final} exists and is not an rlhf run directory (no {MARKER_FILE}); refusing to write "
                        "into it or delete it. Choose another --output-dir or empty it.")
    if resume:
        checkpoint = resumable_checkpoint(staged) if overwrite else None
        if checkpoint is not None:
            return RunPlan(final, staged, "resume", checkpoint)
        checkpoint = resumable_checkpoint(final)
        if checkpoint is not None:
            return RunPlan(final, final, "resume", checkpoint)
        if resumable_checkpoint(staged) is not None:
            raise UserError(f"--resume: {final} is finished; the interrupted run that was to replace it is in "
                            f"{staged}: pass --resume --overwrite to continue that one")
        why = "it is finished" if status == "finished" else "it has no complete checkpoint"
        raise UserError(f"--resume: {final} holds no unfinished run to resume ({why}). Checkpoints are written "
                        "every training.save_steps steps (pretrain, sft, reward) or training.save_every updates "
                        "(ppo)")
    if status == "finished":
        if not overwrite:
            raise UserError(f"{final} holds a finished run ({METRICS_FILE} is there). Pass --overwrite to replace it "
                            "(the old run stays until the new one finishes), or choose another --output-dir.")
        if not is_ours(final):
            raise UserError(f"{final} holds a finished run without the {MARKER_FILE} marker this tool writes (made "
                            "by an older version?): it will not be deleted; move it away to run here")
        return RunPlan(final, staged, "replace")
    if status == "unfinished":
        checkpoint = latest_checkpoint(final)
        if checkpoint is None:
            return RunPlan(final, final, "restart")
        if not overwrite:
            raise UserError(f"{final} holds an unfinished run with checkpoint {checkpoint.name}: pass --resume to "
                            "continue it, or --overwrite to start over (it stays until the new run finishes)")
        return RunPlan(final, staged, "replace")
    return RunPlan(final, final, "new")


def recover(output_dir: str | Path) -> None:
    """Finish or undo a swap that was interrupted between its two renames, and drop a retired run left behind."""
    final, retired, staged = Path(output_dir), _retired_dir(output_dir), staging_dir(output_dir)
    if not is_ours(retired):
        return
    if not final.exists() and not final.is_symlink():
        os.replace(retired if not (is_ours(staged) and is_finished(staged)) else staged, final)
        fsync_dir(final.parent)
    if is_ours(retired):
        remove_run(retired)


def prepare_run(plan: RunPlan) -> None:
    """Before the stage sets up: clear what a crashed attempt with nothing to resume left (`restart`), or a stale
    staging dir (`replace`: an earlier replacement that never finished). Only runs of ours are ever removed."""
    if plan.mode in ("restart", "replace") and (plan.work.exists() or plan.work.is_symlink()):
        remove_run(plan.work)


def start_run(plan: RunPlan, stage: str, resolved_recipe_yaml: str) -> Path:
    """Write the run marker, then the resolved recipe (the work dir was cleared by `prepare_run`; a resumed run keeps
    everything)."""
    work = plan.work
    if plan.mode == "resume":
        return work
    work.mkdir(parents=True, exist_ok=True)
    marker = {"run_id": uuid.uuid4().hex, "stage": stage, "tool": "rlhf-pipeline",
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "output_dir": str(plan.output_dir)}
    atomic_write_text(work / MARKER_FILE, json.dumps(marker, indent=1) + "\n")
    atomic_write_text(work / RECIPE_FILE, resolved_recipe_yaml)
    return work


def finish_run(plan: RunPlan, metrics: dict[str, Any]) -> Path:
    """Write metrics.json last and atomically (its presence marks the run finished); a staged run then takes the
    output dir's place. Returns the finished run's metrics path."""
    ordinary_modes(plan.work)
    write_metrics(plan.work, metrics)
    if plan.staged:
        promote(plan.work, plan.output_dir)
    return plan.output_dir / METRICS_FILE


def ordinary_modes(run_dir: Path) -> None:
    """Give every file of a run the ordinary mode (0666 less the umask; execute bits kept): libraries that write
    through a temporary file (safetensors' save, for one) leave mkstemp's 0600, which hides a model from the other
    users of a shared machine."""
    for path in Path(run_dir).rglob("*"):
        if path.is_file() and not path.is_symlink():
            mode = path.stat().st_mode & 0o777
            wanted = (0o666 & ~_UMASK) | (mode & 0o111 & ~_UMASK)
            if mode != wanted:
                os.chmod(path, wanted)


def write_metrics(output_dir: str | Path, metrics: dict[str, Any]) -> Path:
    path = Path(output_dir) / METRICS_FILE
    atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True, default=_jsonable) + "\n")
    return path


def promote(staged: Path, final: Path) -> None:
    """Swap a finished staged run into place: the old run is renamed aside, the new one renamed in, the old one
    removed. Two renames on one filesystem; `recover` completes or undoes an interrupted swap."""
    retired = _retired_dir(final)
    if is_ours(retired):
        remove_run(retired)
    if final.exists():
        os.replace(final, retired)
    os.replace(staged, final)
    fsync_dir(final.parent)
    if is_ours(retired):
        remove_run(retired)


def abandon(plan: RunPlan) -> None:
    """A run stopped by bad input: remove what it wrote, unless it holds a checkpoint someone could resume."""
    if plan.mode != "resume" and is_ours(plan.work) and not is_finished(plan.work) \
            and latest_checkpoint(plan.work) is None:
        remove_run(plan.work)


def remove_run(path: str | Path) -> None:
    """Delete a run directory of ours, and only that: never through a link, never without the marker."""
    path = Path(path)
    if path.is_symlink() or not is_ours(path):
        raise UserError(f"refusing to delete {path}: it is not an rlhf run directory (no {MARKER_FILE}) or is a link")
    (path / METRICS_FILE).unlink(missing_ok=True)  # first, so that a half-deleted run never looks finished
    shutil.rmtree(path)  # rmtree does not follow links inside the tree


def prune_checkpoints(checkpoints: list[Path], keep: int | None) -> None:
    """Delete all but the last `keep` checkpoints (oldest first in the list)."""
    if keep is None:
        return
    for old in sorted(checkpoints, key=_checkpoint_step)[:-keep]:  # keep >= 1 (the schema says so)
        if not old.is_symlink():
            shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------------
def read_json(file: Path) -> Any:
    """A JSON file's data; None when it is missing or cannot be read."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(file: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file that are JSON objects, without a line torn by a kill mid-write (none when the
    file is missing)."""
    try:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return [row for row in rows if isinstance(row, dict)]


def read_metrics(output_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(output_dir) / METRICS_FILE).read_text())


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory, fsync it, rename it into place, fsync the directory.
    The file gets the ordinary mode (0666 less the umask), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise disk_full(exc, path) or exc from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_tree(path: Path) -> None:
    """fsync every file under `path` and the directories holding them."""
    for item in sorted(path.rglob("*")):
        if item.is_file() and not item.is_symlink():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
        fsync_dir(directory)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def disk_full(exc: BaseException, where: str | Path) -> DiskFull | None:
    """A DiskFull error naming `where` when `exc` says the disk is full (an OSError ENOSPC, or torch's "file write
    failed" from its zip writer); None otherwise."""
    text = str(exc)
    if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in text \
            or "file write failed" in text:
        target = getattr(exc, "filename", None) or where
        return DiskFull(f"no space left on device while writing {target}: free some space, then resume "
                        "(the run's last complete checkpoint, if any, is intact)")
    return None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------------------------
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
        "command": command_line(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "versions": versions,
        "git": git_commit(),
    }


def command_line(extra: tuple[str, ...] = ()) -> str:
    """The `rlhf ...` command this process runs (plus `extra` flags not already on it)."""
    args = list(sys.argv[1:]) if sys.argv else []
    args += [flag for flag in extra if flag not in args]
    return " ".join(["rlhf", *args])


def git_commit() -> dict[str, Any] | None:
    """The rlhf-pipeline commit this code was installed from, told by the installed package's metadata, never by the
    git repository around whatever folder the code sits in (a wheel installed into a virtualenv inside the user's own
    repo would otherwise record the user's commit):
    - installed from git (`pip install git+https://...@REV`): the commit pip recorded in the dist's direct_url.json;
    - an editable install, or the source tree itself on sys.path: HEAD of that tree, only when the tree is the root
      of its own git checkout of rlhf-pipeline (its pyproject.toml names the project);
    - installed from a wheel or sdist: None (`versions` has the release)."""
    source = Path(__file__).resolve().parents[1]  # the folder that holds the rlhf_pipeline package
    direct_url = _installed_direct_url(source)
    if direct_url is not None and not (direct_url.get("dir_info") or {}).get("editable"):
        vcs = direct_url.get("vcs_info") or {}
        return {"commit": str(vcs["commit_id"]), "dirty": False} if vcs.get("vcs") == "git" and vcs.get(
            "commit_id") else None
    return _checkout_commit(source)


def _installed_direct_url(source: Path) -> dict[str, Any] | None:
    """The installed rlhf-pipeline dist's direct_url.json (PEP 610; {} when it has none), when that dist is the code
    running now (its files, or for an editable install its source folder); None when the code runs from a source
    tree that is not the installed dist."""
    from importlib.metadata import distribution

    try:
        dist = distribution("rlhf-pipeline")
    except PackageNotFoundError:
        return None
    try:
        direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        direct_url = {}
    direct_url = direct_url if isinstance(direct_url, dict) else {}
    url = str(direct_url.get("url") or "")
    if (direct_url.get("dir_info") or {}).get("editable") and url.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        return direct_url if Path(unquote(urlsplit(url).path)).resolve() == source else None
    installed = Path(str(dist.locate_file("rlhf_pipeline/runs.py")))
    return direct_url if installed.is_file() and installed.resolve() == Path(__file__).resolve() else None


def _checkout_commit(source: Path) -> dict[str, Any] | None:
    """HEAD of `source` and whether it has uncommitted changes, when `source` is the top of a git checkout of
    rlhf-pipeline; None for any other folder (e.g. a package folder copied into another project's repo)."""
    import re

    try:
        pyproject = (source / "pyproject.toml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not re.search(r"""(?m)^name\s*=\s*["']rlhf-pipeline["']""", pyproject):
        return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != source:
        return None
    head = git("rev-parse", "HEAD")
    if not head:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "dirty": bool(dirty)}
