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
import shlex
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
LOG_FILE = "log.jsonl"  # every stage's per-step history: one JSON object of numbers per logged step or update
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
    return max(found, key=checkpoint_step) if found else None


def checkpoint_step(path: Path) -> int:
    """The step (Trainer) or update (PPO) a checkpoint was saved at, from its name; -1 when the name has none."""
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


_HELD_LOCKS: set[Path] = set()  # lock files this process holds (`rlhf pipeline` holds its stages' for the run)

# flock errors that mean the filesystem has no locks (some network filesystems), not that another run holds one
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


@contextlib.contextmanager
def lock(output_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` for the block (fcntl.flock: released by the OS if the process dies).
    Another holder gets a UserError naming the directory and the holder's pid; a lock this process already holds is
    held on (re-entrant). The lock file is removed on release (while still held; an acquirer checks that the file it
    locked is still the one at the path, so two processes never both hold a lock)."""
    import fcntl

    path = lock_path(output_dir)
    if path in _HELD_LOCKS:
        yield
        return
    created = make_dirs(path.parent)  # removed again on release when nothing was written into them
    while True:
        try:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the whole block)
        except OSError as exc:
            raise disk_full(exc, path) or UserError(f"cannot write the lock file {path} (for {output_dir}): "
                                                    f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UserError(f"{output_dir} is in use by another rlhf run (pid {holder}; lock {path}): wait for it "
                            "to finish, or stop it") from None
        except OSError as exc:
            handle.close()
            with contextlib.suppress(OSError):
                if path.stat().st_size == 0:  # the empty file this call created
                    path.unlink()
            remove_empty_dirs(created)
            why = ("its filesystem does not support file locks (as some network filesystems do not); use an output "
                   "dir on one that does" if exc.errno in _NO_LOCKS else "")
            raise UserError(f"cannot lock {output_dir} ({path}): {exc.strerror or exc}"
                            + (f": {why}" if why else "")) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # the previous holder removed this file as we locked it: lock the new one
    _HELD_LOCKS.add(path)
    try:
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        except OSError as exc:
            raise disk_full(exc, path) or UserError(f"cannot write the lock file {path}: {exc.strerror}") from None
        yield
    finally:
        _HELD_LOCKS.discard(path)
        with contextlib.suppress(OSError):
            path.unlink()
        with contextlib.suppress(OSError):
            handle.close()  # closing releases the lock
        remove_empty_dirs(created)


def make_dirs(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; return the ones created, outermost first. UserError naming the
    directory when it cannot be: a parent is a file (`--output-dir run/config.json/x`), no permission, a read-only
    or special file system."""
    missing: list[Path] = []
    existing = Path(directory)
    while not existing.exists() and not existing.is_symlink():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create {directory}: {existing} is a file, not a directory" if missing
                        else f"{directory} is a file, not a directory")
    created: list[Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # made meanwhile by another process: not ours to remove
        except OSError as exc:
            remove_empty_dirs(created)
            raise disk_full(exc, folder) or UserError(f"cannot create {folder}: {exc.strerror or exc}") from None
        created.append(folder)
    return created


def remove_empty_dirs(created: list[Path]) -> None:
    """Remove directories `make_dirs` created, innermost first, as long as they are still empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return  # something was written into it (a run), or it is gone


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
    run_id: str = ""  # the id its marker carries: new, or the resumed run's

    @property
    def staged(self) -> bool:
        return self.work != self.output_dir


class NeedsFlag(UserError):
    """A refusal that a flag lifts: the output dir holds a run that a command replaces or continues only when told
    to. `alternatives`: the flags that would lift it (each a tuple; the first is the one a dry run plans with). A run
    refuses (exit code 2); a dry run shows what the run would do with the flag, and says it needs it."""

    def __init__(self, message: str, *alternatives: tuple[str, ...]):
        super().__init__(message)
        self.alternatives = alternatives

    def __reduce__(self):  # pickled whole: process 0 shares its refusal with the other processes
        return type(self), (str(self), *self.alternatives)


def plan_run(output_dir: str | Path, overwrite: bool, resume: bool) -> RunPlan:
    """Decide where a run writes (no side effects); UserError when the output dir may not be used (NeedsFlag when
    it may, given --overwrite or --resume)."""
    final = Path(output_dir)
    check_ancestors(final)
    status = output_dir_status(final)
    staged = staging_dir(final)
    if status == "link":
        raise UserError(f"{final} is a symbolic link (to {os.path.realpath(final)}): rlhf never writes, replaces or "
                        "deletes through a link; give the real directory")
    if status == "foreign":
        raise UserError(f"{final} exists and is not an rlhf run directory (no {MARKER_FILE}); refusing to write "
                        "into it or delete it. Choose another --output-dir or empty it.")
    outer = enclosing_run(final)
    if outer is not None:
        raise UserError(f"{final} is inside the run {outer}: a run may not hold another (replacing {outer} would "
                        "delete it); choose an output dir outside it")
    if resume:
        checkpoint = resumable_checkpoint(staged) if overwrite else None
        if checkpoint is not None:
            _check_swap_path(final)
            return RunPlan(final, staged, "resume", checkpoint, _run_id(staged))
        checkpoint = resumable_checkpoint(final)
        if checkpoint is not None:
            return RunPlan(final, final, "resume", checkpoint, _run_id(final))
        if resumable_checkpoint(staged) is not None:
            raise NeedsFlag(f"--resume: {final} is finished; the interrupted run that was to replace it is in "
                            f"{staged}: pass --resume --overwrite to continue that one", ("--overwrite",))
        why = "it is finished" if status == "finished" else "it has no complete checkpoint"
        raise UserError(f"--resume: {final} holds no unfinished run to resume ({why}). Checkpoints are written "
                        "every training.save_steps steps (pretrain, sft, reward) or training.save_every updates "
                        "(ppo)")
    if status == "finished":
        if not overwrite:
            raise NeedsFlag(f"{final} holds a finished run ({METRICS_FILE} is there). Pass --overwrite to replace it "
                            "(the old run stays until the new one finishes), or choose another --output-dir.",
                            ("--overwrite",))
        if not is_ours(final):
            raise UserError(f"{final} holds a finished run without the {MARKER_FILE} marker this tool writes (made "
                            "by an older version?): it will not be deleted; move it away to run here")
        _check_nothing_inside(final)
        _check_swap_path(final)
        return RunPlan(final, staged, "replace", run_id=_new_run_id())
    if status == "unfinished":
        _check_nothing_inside(final)
        checkpoint = latest_checkpoint(final)
        if checkpoint is None:
            return RunPlan(final, final, "restart", run_id=_new_run_id())
        if not overwrite:
            raise NeedsFlag(f"{final} holds an unfinished run with checkpoint {checkpoint.name}: pass --resume to "
                            "continue it, or --overwrite to start over (it stays until the new run finishes)",
                            ("--resume",), ("--overwrite",))
        _check_swap_path(final)
        return RunPlan(final, staged, "replace", run_id=_new_run_id())
    return RunPlan(final, final, "new", run_id=_new_run_id())


def _new_run_id() -> str:
    return uuid.uuid4().hex


def _run_id(run_dir: Path) -> str:
    return (run_marker(run_dir) or {}).get("run_id", "")


def _is_run(path: Path) -> bool:
    """A directory holding a run: this tool's marker, or an older version's finished run (metrics and recipe).
    Never raises (a parent the user may not list is simply not a run)."""
    return os.path.isfile(path / MARKER_FILE) or (os.path.isfile(path / METRICS_FILE)
                                                    and os.path.isfile(path / RECIPE_FILE))


def enclosing_run(path: str | Path) -> Path | None:
    """The run directory `path` lies inside (links resolved: where it really is), or None."""
    for parent in Path(os.path.realpath(path)).parents:
        if _is_run(parent):
            return parent
    return None


def runs_inside(run_dir: str | Path) -> list[Path]:
    """The runs nested inside `run_dir` (not following links), which deleting it would delete too."""
    root = Path(run_dir)
    found = []
    for folder, subdirs, _files in os.walk(root):
        for name in subdirs:
            if _is_run(Path(folder) / name):
                found.append(Path(folder) / name)
    return sorted(found)


def _check_nothing_inside(run_dir: Path) -> None:
    """A run about to be replaced or cleared must not hold another run (its deletion would take that one too)."""
    inside = runs_inside(run_dir)
    if inside:
        raise UserError(f"{run_dir} holds another run ({inside[0]}), which replacing or clearing {run_dir} would "
                        "delete: move that run out of it first")


def _check_swap_path(final: Path) -> None:
    """A replacement swaps the old run to `.NAME.old` once it finishes: refuse before training when something that
    is not a run of ours is in the way there (it is never deleted, and the swap would fail)."""
    retired = _retired_dir(final)
    if (retired.exists() or retired.is_symlink()) and not is_ours(retired):
        raise UserError(f"{retired} is in the way of replacing {final} (it is not an rlhf run, so it is never "
                        "deleted): move it away or delete it, then run again")


def check_ancestors(output_dir: Path) -> None:
    """UserError when a directory above the output dir is a file (`--output-dir run/config.json/x`): nothing
    could be written there."""
    for parent in Path(output_dir).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write to {output_dir}: {parent} is a file, not a directory")
            return


def recover(output_dir: str | Path) -> None:
    """Finish or undo a swap that was interrupted: between its two renames (the old run is `.NAME.old`), or before
    the first (the new run in `.NAME.next` has its metrics.json); then drop the retired run."""
    final, retired, staged = Path(output_dir), _retired_dir(output_dir), staging_dir(output_dir)
    if is_ours(retired):
        if not final.exists() and not final.is_symlink():
            os.replace(staged if is_ours(staged) and is_finished(staged) else retired, final)
            fsync_dir(final.parent)
        if is_ours(retired):
            _discard(retired)
    if is_ours(staged) and is_finished(staged) and (is_ours(final) or not (final.exists() or final.is_symlink())):
        promote(staged, final)


def recovered_dir(output_dir: str | Path) -> Path:
    """Where the run `recover` would leave at `output_dir` is now (`output_dir` itself unless a swap is pending):
    what a dry run reads, as it recovers nothing."""
    final, retired, staged = Path(output_dir), _retired_dir(output_dir), staging_dir(output_dir)
    finished_staged = is_ours(staged) and is_finished(staged)
    if is_ours(retired) and not final.exists() and not final.is_symlink():
        return staged if finished_staged else retired
    if finished_staged and (is_ours(final) or not (final.exists() or final.is_symlink())):
        return staged
    return final


def prepare_run(plan: RunPlan) -> None:
    """Before the stage sets up: clear what a crashed attempt with nothing to resume left (`restart`), or a stale
    staging dir (`replace`: an earlier replacement that never finished). Only runs of ours are ever removed, and
    never a finished one."""
    if plan.mode in ("restart", "replace") and (plan.work.exists() or plan.work.is_symlink()):
        if is_finished(plan.work):  # `recover` swaps a finished staged run in: here only if that was refused
            raise UserError(f"{plan.work} holds a finished run waiting to replace {plan.output_dir}; it is not "
                            "deleted: run the command again once what stopped the swap is fixed")
        remove_run(plan.work)


def start_run(plan: RunPlan, stage: str, resolved_recipe_yaml: str) -> Path:
    """Write the run marker, then the resolved recipe (the work dir was cleared by `prepare_run`; a resumed run keeps
    everything)."""
    work = plan.work
    if plan.mode == "resume":
        return work
    work.mkdir(parents=True, exist_ok=True)
    marker = {"run_id": plan.run_id or _new_run_id(), "stage": stage, "tool": "rlhf-pipeline",
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
        _discard(retired)
    if retired.exists() or retired.is_symlink():
        raise UserError(f"{retired} is in the way of the swap (it is not an rlhf run, so it is never deleted): move "
                        f"it away; the finished run in {staged} then takes the place of {final} at the next command")
    if final.exists():
        os.replace(final, retired)
    os.replace(staged, final)
    fsync_dir(final.parent)
    if is_ours(retired):
        _discard(retired)


def _discard(retired: Path) -> None:
    """Delete a replaced run. One that cannot be deleted (a file the user may not remove, a run nested in it) is
    moved aside with a warning instead, so that it never blocks the next command on this output dir."""
    reason = _undeletable(retired)
    if not reason:
        try:
            _delete(retired)
            return
        except OSError as exc:
            reason = _os_reason(exc)
    aside = retired.with_name(f"{retired.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(retired, aside)
    except OSError as error:
        raise UserError(f"cannot delete the replaced run {retired} ({reason}) nor move it aside ({error.strerror}): "
                        "remove it by hand") from None
    print(f"warning: could not delete the replaced run {retired} ({reason}); it was moved to {aside}: delete it by "
          "hand", file=sys.stderr, flush=True)


def abandon(plan: RunPlan) -> None:
    """A run stopped by bad input: remove what it wrote, unless it holds a checkpoint someone could resume."""
    if plan.mode != "resume" and is_ours(plan.work) and not is_finished(plan.work) \
            and latest_checkpoint(plan.work) is None:
        remove_run(plan.work)


def remove_run(path: str | Path) -> None:
    """Delete a run directory of ours, and only that: never through a link, never without the marker, never one
    holding another run. The metrics go first (a half-deleted run never looks finished) and the marker last (it
    stays ours, for the next command to finish deleting)."""
    path = Path(path)
    why = _undeletable(path)
    if why:
        raise UserError(f"refusing to delete {path}: {why}")
    try:
        _delete(path)
    except OSError as exc:
        raise UserError(f"cannot delete the run {path}: {_os_reason(exc)}; remove it by hand") from None


def _undeletable(path: Path) -> str:
    """Why `path` is not a run this tool may delete ('' when it is)."""
    if path.is_symlink() or not is_ours(path):
        return f"it is not an rlhf run directory (no {MARKER_FILE}) or is a link"
    inside = runs_inside(path)
    return f"it holds another run ({inside[0]})" if inside else ""


def _delete(path: Path) -> None:
    (path / METRICS_FILE).unlink(missing_ok=True)
    for item in path.iterdir():
        if item.name == MARKER_FILE:
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)  # rmtree does not follow links inside the tree
        else:
            item.unlink()
    (path / MARKER_FILE).unlink()
    path.rmdir()


def _os_reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)) + (f": {exc.filename}" if exc.filename else "")


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete what a failed checkpoint save left half-written (a Trainer's `checkpoint-N` never marked complete, a
    PPO `update-N.tmp`): nothing resumes from it, and it holds space a full disk needs."""
    path = Path(run_dir)
    partial = [p for p in path.glob("checkpoint-*") if not (p / CHECKPOINT_COMPLETE).is_file()]
    partial += list((path / PPO_CHECKPOINTS).glob("update-*.tmp"))
    for item in partial:
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)


def prune_checkpoints(checkpoints: list[Path], keep: int | None) -> None:
    """Delete all but the last `keep` checkpoints (oldest first in the list)."""
    if keep is None:
        return
    for old in sorted(checkpoints, key=checkpoint_step)[:-keep]:  # keep >= 1 (the schema says so)
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


def keep_rows_through(file: Path, key: str, last: int) -> None:
    """Keep the rows of a JSON-lines log whose `key` is at most `last`, and drop a line torn by a kill: a run resumed
    from its checkpoint at `last` writes the later rows again."""
    if file.exists():
        kept = [row for row in read_jsonl(file) if row.get(key, 0) <= last]
        atomic_write_text(file, "".join(json.dumps(row) + "\n" for row in kept))


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


# torch's zip writer (torch.save) reports a short write, a full disk's usual symptom, in these words
_TORCH_WRITE_FAILED = ("file write failed", "unexpected pos")


def disk_full(exc: BaseException, where: str | Path, then: str = "free some space and run again") -> DiskFull | None:
    """A DiskFull error naming `where` when `exc` says the disk is full: an OSError ENOSPC or EDQUOT, safetensors'
    SafetensorError ("... (os error 28)"), or torch's zip writer failing a write ("[enforce fail at
    inline_container.cc] ... file write failed" or "unexpected pos N vs M", which do not say why: named a full disk
    when the filesystem has less than 1 % or 64 MiB free, else a failed write); None otherwise. `then`: what to do
    next (`full_disk_then` rewords it once the caller knows what was kept)."""
    text = str(exc)
    target = getattr(exc, "filename", None) or where
    if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in text \
            or f"(os error {errno.ENOSPC})" in text or f"(os error {errno.EDQUOT})" in text:
        head = f"no space left on device while writing {target}"
    elif "inline_container" in text and any(words in text for words in _TORCH_WRITE_FAILED):
        head = (f"no space left on device while writing {target}" if _low_on_space(Path(where)) else
                f"writing {target} failed (torch: {text.strip().splitlines()[0][:200]}; is the disk full or a quota "
                "exceeded?)")
    else:
        return None
    error = DiskFull(f"{head}: {then}")
    error.head = head
    return error


def full_disk_then(error: DiskFull, then: str) -> DiskFull:
    """The same full disk, with what to do next."""
    head = getattr(error, "head", None) or str(error)
    reworded = DiskFull(f"{head}: {then}")
    reworded.head = head
    return reworded


def _low_on_space(path: Path) -> bool:
    """Whether the filesystem holding `path` (or its nearest existing parent) has less than 1 % or 64 MiB free."""
    for folder in (path, *path.parents):
        try:
            usage = shutil.disk_usage(folder)
        except OSError:
            continue
        return usage.free < max(64 << 20, usage.total // 100)
    return False


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


def command_line(extra: tuple[str, ...] = (), without: tuple[str, ...] = ()) -> str:
    """The `rlhf ...` command this process runs (less the flags `without`, plus `extra` flags not already on it)."""
    args = [arg for arg in sys.argv[1:] if arg not in without] if sys.argv else []
    args += [flag for flag in extra if flag not in args]
    return shlex.join(["rlhf", *args])  # quoted as a shell reads it: a path with spaces pastes back as one argument


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
