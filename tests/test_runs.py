"""Never lose a run: what counts as ours, where a run writes, a lock per run dir, a replaced run kept until its
successor finishes, interrupted swaps recovered, and every stage resumable after a kill -9 or a Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST_TRAINING,
    REPO,
    hold_lock,
    interrupt,
    ppo_recipe,
    run_cli,
    snapshot,
    stage_recipe,
    weights,
    write_recipe,
)

from rlhf_pipeline import runs
from rlhf_pipeline.errors import DiskFull, UserError


# ---------------------------------------------------------------------------------------------------------------
# run dirs, by hand
# ---------------------------------------------------------------------------------------------------------------
def make_run(path: Path, finished: bool = True, checkpoint: str | None = None, marker: bool = True) -> Path:
    path.mkdir(parents=True)
    if marker:
        (path / runs.MARKER_FILE).write_text(json.dumps({"run_id": "test-run", "stage": "sft"}))
    (path / runs.RECIPE_FILE).write_text("stage: sft\n")
    (path / "model.safetensors").write_bytes(b"weights")
    if checkpoint:
        (path / checkpoint).mkdir(parents=True)
        if checkpoint.startswith("checkpoint-"):
            (path / checkpoint / runs.CHECKPOINT_COMPLETE).write_text("")
    if finished:
        (path / runs.METRICS_FILE).write_text('{"train_loss": 1.0}')
    return path


def test_status_of_directories(tmp_path):
    assert runs.output_dir_status(tmp_path / "missing") == "new"
    (tmp_path / "empty").mkdir()
    assert runs.output_dir_status(tmp_path / "empty") == "new"
    assert runs.output_dir_status(make_run(tmp_path / "done")) == "finished"
    assert runs.output_dir_status(make_run(tmp_path / "crashed", finished=False)) == "unfinished"
    # a directory of papers that happens to hold a metrics.json is not a run
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "metrics.json").write_text("{}")
    (papers / "thesis.tex").write_text("precious")
    assert runs.output_dir_status(papers) == "foreign" and not runs.is_ours(papers)
    # an older version's finished run (no marker): finished, to read, but not ours to delete
    legacy = make_run(tmp_path / "legacy", marker=False)
    assert runs.output_dir_status(legacy) == "finished" and not runs.is_ours(legacy)
    (tmp_path / "link").symlink_to(tmp_path / "done")
    assert runs.output_dir_status(tmp_path / "link") == "link" and not runs.is_ours(tmp_path / "link")


def test_plan_run(tmp_path):
    plan = runs.plan_run(tmp_path / "new", overwrite=False, resume=False)
    assert (plan.mode, plan.work) == ("new", tmp_path / "new")
    crashed = make_run(tmp_path / "crashed", finished=False)
    assert runs.plan_run(crashed, False, False).mode == "restart"  # nothing to resume: cleared in place

    done = make_run(tmp_path / "done")
    with pytest.raises(UserError, match="holds a finished run.*--overwrite"):
        runs.plan_run(done, False, False)
    plan = runs.plan_run(done, True, False)
    assert plan.mode == "replace" and plan.work == tmp_path / ".done.next" and plan.staged

    resumable = make_run(tmp_path / "resumable", finished=False, checkpoint="checkpoint-4")
    with pytest.raises(UserError, match="unfinished run with checkpoint checkpoint-4: pass --resume"):
        runs.plan_run(resumable, False, False)
    assert runs.plan_run(resumable, True, False).work == tmp_path / ".resumable.next"  # kept until replaced
    plan = runs.plan_run(resumable, False, True)
    assert (plan.mode, plan.work, plan.checkpoint) == ("resume", resumable, resumable / "checkpoint-4")
    with pytest.raises(UserError, match="--resume: .* holds no unfinished run to resume \\(it is finished\\)"):
        runs.plan_run(done, False, True)

    # an interrupted --overwrite: the finished run stays, the staged one resumes with --resume --overwrite
    make_run(tmp_path / ".done.next", finished=False, checkpoint="checkpoints/update-000002")
    with pytest.raises(UserError, match="pass --resume --overwrite"):
        runs.plan_run(done, False, True)
    plan = runs.plan_run(done, True, True)
    assert plan.work == tmp_path / ".done.next" and plan.checkpoint.name == "update-000002"

    legacy = make_run(tmp_path / "legacy", marker=False)
    with pytest.raises(UserError, match="without the .rlhf-run.json marker"):
        runs.plan_run(legacy, True, False)
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match="not an rlhf run directory"):
        runs.plan_run(papers, True, False)
    (tmp_path / "link").symlink_to(done)
    with pytest.raises(UserError, match="is a symbolic link"):
        runs.plan_run(tmp_path / "link", True, False)


def test_promote_and_recover_an_interrupted_swap(tmp_path):
    final = make_run(tmp_path / "run")
    staged = make_run(tmp_path / ".run.next")
    (staged / "new.txt").write_text("new")
    runs.promote(staged, final)
    assert (final / "new.txt").is_file() and not staged.exists() and not (tmp_path / ".run.old").exists()

    # killed between the two renames, the new run finished: recover completes the swap
    os.replace(final, tmp_path / ".run.old")
    make_run(tmp_path / ".run.next")
    (tmp_path / ".run.next" / "newer.txt").write_text("newer")
    runs.recover(final)
    assert (final / "newer.txt").is_file() and not (tmp_path / ".run.old").exists()

    # the old run renamed away and the new one unfinished: recover puts the old one back
    os.replace(final, tmp_path / ".run.old")
    make_run(tmp_path / ".run.next", finished=False)
    runs.recover(final)
    assert (final / "newer.txt").is_file() and runs.is_finished(final)


def test_remove_run_deletes_only_our_runs_and_never_through_a_link(tmp_path):
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="refusing to delete"):
        runs.remove_run(papers)
    run = make_run(tmp_path / "run")
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(UserError, match="refusing to delete"):
        runs.remove_run(tmp_path / "link")
    (run / "papers-link").symlink_to(papers)  # a link inside a run: removed, its target untouched
    runs.remove_run(run)
    assert not run.exists() and (papers / "thesis.tex").read_text() == "precious"


def test_written_files_get_the_ordinary_mode(tmp_path):
    old = os.umask(0o022)
    try:
        runs.atomic_write_text(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_command_line_is_quoted_as_a_shell_reads_it(monkeypatch):
    """provenance.command and the resume hints paste back as the same arguments: a path with a space stays one."""
    import shlex

    monkeypatch.setattr(sys, "argv", ["/venv/bin/rlhf", "sft", "my recipes/sft.yaml", "--set", "data.files=a b.jsonl"])
    line = runs.command_line(("--resume",))
    assert line == "rlhf sft 'my recipes/sft.yaml' --set 'data.files=a b.jsonl' --resume"
    assert shlex.split(line)[1:] == [*sys.argv[1:], "--resume"]
    assert runs.provenance()["command"] == "rlhf sft 'my recipes/sft.yaml' --set 'data.files=a b.jsonl'"


def test_lock_creates_the_missing_parents_and_removes_them_if_left_empty(tmp_path):
    with runs.lock(tmp_path / "a" / "b" / "out"):
        assert (tmp_path / "a" / "b" / ".out.lock").is_file()
    assert list(tmp_path.iterdir()) == []  # nothing was written under them: no empty a/b left behind
    with runs.lock(tmp_path / "a" / "b" / "out"):
        (tmp_path / "a" / "b" / "out").mkdir()  # a run wrote its output: the parents stay
    assert (tmp_path / "a" / "b" / "out").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="file is a file, not a directory"), runs.lock(tmp_path / "file" / "x" / "y"):
        pass


def test_disk_full_is_named(monkeypatch):
    import errno

    from safetensors import SafetensorError

    error = runs.disk_full(OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors"), "/runs/x")
    assert isinstance(error, DiskFull) and "no space left on device while writing /runs/x/model.safetensors" in \
        str(error)
    # safetensors' own error for a full disk (its exact words, from a run on a full tmpfs)
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(runs.disk_full(full, "/runs/x")).startswith("no space left on device while writing /runs/x: ")
    # torch's zip writer says only that a write failed ("unexpected pos", on a full tmpfs): a full disk when the
    # filesystem is nearly full, else a failed write that says what torch said
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 176384 vs 176272")
    monkeypatch.setattr(runs, "_low_on_space", lambda path: True)
    assert "no space left on device while writing /runs/x/checkpoints" in str(runs.disk_full(torch_error,
                                                                                             "/runs/x/checkpoints"))
    monkeypatch.setattr(runs, "_low_on_space", lambda path: False)
    assert str(runs.disk_full(torch_error, "/runs/x")).startswith("writing /runs/x failed (torch: [enforce fail at "
                                                                  "inline_container.cc:672] . unexpected pos")
    assert runs.disk_full(RuntimeError("shapes do not match"), "/x") is None
    assert runs.disk_full(SafetensorError("invalid header"), "/x") is None


# ---------------------------------------------------------------------------------------------------------------
# the lock
# ---------------------------------------------------------------------------------------------------------------
def test_a_second_run_on_a_locked_dir_is_refused(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "sft.yaml", stage_recipe("sft", out, tiny_model_dir,
                                                              {"files": str(data_dir / "sft.jsonl")}))
    holder = hold_lock(out)
    try:
        result = run_cli("sft", recipe)
        assert result.exit_code == 2, result.output
        assert f"{out} is in use by another rlhf run (pid {holder.pid}" in result.output
        assert "Traceback" not in result.output and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_cli("sft", recipe).exit_code == 0  # the OS released the lock with the process
    assert not runs.lock_path(out).exists()  # and the run that took it over removed the file when it ended


def test_two_runs_started_together_leave_one_coherent_run(tmp_path, tiny_model_dir, data_dir):
    """Two `rlhf sft` on one output dir at once: one runs, the other is refused (in use, or finished by then), and
    the directory holds one run's recipe, marker and metrics, not a mix."""
    out = tmp_path / "out"
    training = {**FAST_TRAINING, "max_steps": 20}
    recipe = write_recipe(tmp_path / "sft.yaml", stage_recipe("sft", out, tiny_model_dir,
                                                              {"files": str(data_dir / "sft.jsonl")},
                                                              training=training))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "rlhf_pipeline", "sft", str(recipe)]
    processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 2], outputs
    refused = outputs[[p.returncode for p in processes].index(2)]
    assert "is in use by another rlhf run" in refused or "holds a finished run" in refused
    assert "Traceback" not in refused
    marker = runs.run_marker(out)
    assert marker is not None and runs.is_finished(out)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".out.")) == []  # lock and staging gone


# ---------------------------------------------------------------------------------------------------------------
# replacing a run keeps the old one until the new one has finished
# ---------------------------------------------------------------------------------------------------------------
def sft_recipe(tmp_path, out, model, data_dir, **training):
    return write_recipe(tmp_path / "sft.yaml", stage_recipe("sft", out, model, {"files": str(data_dir / "sft.jsonl")},
                                                            training={**FAST_TRAINING, **training}))


def test_a_failed_overwrite_leaves_the_finished_run_as_it_was(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    out = tmp_path / "out"
    recipe = sft_recipe(tmp_path, out, tiny_model_dir, data_dir)
    assert run_cli("sft", recipe).exit_code == 0
    before = snapshot(out)

    from transformers import Trainer

    def crash(self, *args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(Trainer, "train", crash)
    dry = run_cli("sft", recipe, "--overwrite", "--dry-run")
    assert f"the new one is built in {tmp_path / '.out.next'}" in dry.output
    result = run_cli("sft", recipe, "--overwrite", "--set", "training.learning_rate=0.002")
    assert result.exit_code != 0
    assert snapshot(out) == before, "a failed rerun must not touch the finished run"
    assert runs.output_dir_status(tmp_path / ".out.next") == "unfinished"  # the failed attempt, aside

    monkeypatch.undo()
    result = run_cli("sft", recipe, "--overwrite", "--set", "training.learning_rate=0.002")
    assert result.exit_code == 0, result.output
    assert "replacing the run that was there" in result.output
    assert snapshot(out) != before and runs.is_finished(out)
    assert "learning_rate: 0.002" in (out / runs.RECIPE_FILE).read_text()
    assert runs.run_marker(out)["output_dir"] == str(out)
    assert f"output_dir: {out}\n" in (out / runs.RECIPE_FILE).read_text()  # the real one, not the staging dir
    assert not (tmp_path / ".out.next").exists() and not (tmp_path / ".out.old").exists()


def test_a_killed_overwrite_leaves_the_finished_run_as_it_was(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    recipe = sft_recipe(tmp_path, out, tiny_model_dir, data_dir, max_steps=6, save_steps=2, logging_steps=1)
    assert run_cli("sft", recipe).exit_code == 0
    before = snapshot(out)
    killed = interrupt("kill-after-checkpoint", 2, "sft", recipe, "--overwrite")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    assert snapshot(out) == before
    staged = tmp_path / ".out.next"
    assert runs.resumable_checkpoint(staged) == staged / "checkpoint-2"
    # the interrupted replacement resumes with --resume --overwrite; plain --resume says how
    assert "pass --resume --overwrite" in run_cli("sft", recipe, "--resume").output
    result = run_cli("sft", recipe, "--resume", "--overwrite")
    assert result.exit_code == 0, result.output
    assert snapshot(out) != before and not staged.exists()
    assert json.loads((out / runs.METRICS_FILE).read_text())["train_steps"] == 6


def test_foreign_and_linked_output_dirs_are_never_written_or_deleted(tmp_path, tiny_model_dir, data_dir):
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "metrics.json").write_text("{}")
    (papers / "recipe.resolved.yaml").write_text("mine\n")
    (papers / "thesis.tex").write_text("precious")
    before = snapshot(papers)
    link = tmp_path / "link"
    link.symlink_to(make_run(tmp_path / "real"))
    real = snapshot(tmp_path / "real")
    for out, message in ((papers, "without the .rlhf-run.json marker"), (link, "is a symbolic link")):
        recipe = sft_recipe(tmp_path, out, tiny_model_dir, data_dir)
        for flags in (("--overwrite",), ("--overwrite", "--dry-run"), ()):
            result = run_cli("sft", recipe, *flags)
            assert result.exit_code == 2 and "Traceback" not in result.output, result.output
            assert message in result.output or "--overwrite" not in flags, result.output
    assert snapshot(papers) == before and snapshot(tmp_path / "real") == real


def test_no_stage_clears_another_stages_resumable_run(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir):
    """A PPO run interrupted after a checkpoint; `rlhf sft` pointed at its dir refuses without --overwrite."""
    out = tmp_path / "ppo"
    recipe = write_recipe(tmp_path / "ppo.yaml", ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)},
                                                            data_dir, total_episodes=24, save_every=1))
    assert interrupt("kill-after-checkpoint", 1, "ppo", recipe).returncode == -signal.SIGKILL
    assert_ordinary_modes(out / "checkpoints" / "update-000001")  # readable by others before the run finishes
    before = snapshot(out)
    result = run_cli("sft", sft_recipe(tmp_path, out, tiny_model_dir, data_dir))
    assert result.exit_code == 2 and "pass --resume to continue it, or --overwrite" in result.output
    assert snapshot(out) == before


def test_recipe_resume_from_checkpoint_keeps_the_checkpoint(tmp_path, tiny_model_dir, data_dir):
    """`training.resume_from_checkpoint` naming a checkpoint of the run resumes from it (the stage used to clear the
    output dir first, deleting the very checkpoint)."""
    out = tmp_path / "out"
    recipe = sft_recipe(tmp_path, out, tiny_model_dir, data_dir, max_steps=6, save_steps=2, logging_steps=1)
    assert interrupt("kill-after-checkpoint", 4, "sft", recipe).returncode == -signal.SIGKILL
    assert_ordinary_modes(out / "checkpoint-4")  # safetensors' mkstemp 0600 is not left until the run finishes
    assert_damaged_checkpoint_refused(tmp_path, "sft", recipe, out / "checkpoint-4",
                                      {"optimizer.pt": "optimizer or scheduler state", "trainer_state.json":
                                       "trainer_state.json cannot be read (JSONDecodeError"})
    missing = run_cli("sft", recipe, "--set", f"training.resume_from_checkpoint={out / 'checkpoint-3'}")
    assert missing.exit_code == 2 and "is not a complete checkpoint of this run" in missing.output
    result = run_cli("sft", recipe, "--set", f"training.resume_from_checkpoint={out / 'checkpoint-2'}")
    assert result.exit_code == 0, result.output
    assert f"resuming {out} from checkpoint-2" in result.output
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 6


# ---------------------------------------------------------------------------------------------------------------
# kill -9 or Ctrl-C, then --resume: the same run as an uninterrupted one
# ---------------------------------------------------------------------------------------------------------------
def trainer_stage_recipe(stage, tmp_path, name, model, data_dir):
    out = tmp_path / name
    data = {"pretrain": {"files": str(data_dir / "text.jsonl"), "eval_size": 40, "block_size": 32},
            "sft": {"files": str(data_dir / "sft.jsonl"), "eval_size": 8},
            "reward": {"files": str(data_dir / "prefs.jsonl"), "eval_size": 8}}[stage]
    training = {**FAST_TRAINING, "max_steps": 6, "save_steps": 2, "logging_steps": 1}
    recipe = stage_recipe(stage, out, model, data, training=training)
    if stage == "pretrain":
        recipe["model"] = {"init": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}}
        recipe["tokenizer"] = {"train": {"vocab_size": 350}}
    return write_recipe(tmp_path / f"{name}.yaml", recipe), out


def assert_ordinary_modes(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}
    assert modes and all(mode == 0o666 & ~umask for mode in modes.values()), modes


def assert_damaged_checkpoint_refused(tmp_path: Path, stage: str, recipe: Path, checkpoint: Path,
                                      damage: dict[str, str]) -> None:
    """Each file of `damage` replaced in turn by a pickle that would run code (JSON files: by garbage): --resume
    is one line naming the checkpoint and what cannot be read (`damage[file]`), exit 2, the code never runs, and the
    run is left as it was (then the file is put back)."""
    proof = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    for name, expected in damage.items():
        file = checkpoint / name
        original = file.read_bytes()
        if name.endswith(".json"):
            file.write_text("{ not json")
        else:
            torch.save({"state": Payload()}, file)
        before = snapshot(checkpoint.parent)
        result = run_cli(stage, recipe, "--resume")
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert f"error: cannot resume from {checkpoint}" in result.output and expected in result.output, result.output
        assert "nothing in it was run" in result.output and not proof.exists()
        assert snapshot(checkpoint.parent) == before
        file.write_bytes(original)


def same_log(a: Path, b: Path) -> bool:
    """Two runs' log.jsonl hold the same rows, timings apart (a resumed run's against an uninterrupted one's)."""
    def rows(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith(("_runtime", "_per_second"))}
                for line in (run / "log.jsonl").read_text().splitlines()]

    return rows(a) == rows(b)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward"])
@pytest.mark.parametrize("how", ["kill-after-checkpoint", "ctrl-c-at"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_model_dir, data_dir, stage, how):
    """6 steps, a checkpoint every 2. kill -9 once checkpoint-4 is on disk (or Ctrl-C during step 3, which saves
    checkpoint-3 and exits 130 naming the resume command), then --resume: the same weights, bit for bit, the same
    held-out loss and the same whole-run train_loss (to rounding) as a run never interrupted."""
    straight, straight_out = trainer_stage_recipe(stage, tmp_path, "straight", tiny_model_dir, data_dir)
    assert run_cli(stage, straight).exit_code == 0
    recipe, out = trainer_stage_recipe(stage, tmp_path, "interrupted", tiny_model_dir, data_dir)
    at = 4 if how == "kill-after-checkpoint" else 3
    stopped = interrupt(how, at, stage, recipe)
    if how == "kill-after-checkpoint":
        assert stopped.returncode == -signal.SIGKILL, stopped.stderr[-3000:]
        with open(out / "log.jsonl", "a") as log:  # as if the run had logged past its checkpoint, then torn a line
            log.write('{"step": 5, "epoch": 1.0, "loss": 9.0}\n{"step": 6, "lo')
    else:
        assert stopped.returncode == 130, stopped.stderr[-3000:]
        assert f"checkpoint saved: {out / 'checkpoint-3'}" in stopped.stderr
        assert f"resume with: rlhf {stage} {recipe} --resume" in stopped.stderr
    assert not runs.is_finished(out) and runs.resumable_checkpoint(out) == out / f"checkpoint-{at}"

    # the same dir, spelt otherwise than the recipe spells it: still the run to resume
    result = run_cli(stage, recipe, "--resume", "--output-dir", f"{out.parent}/./{out.name}")
    assert result.exit_code == 0, result.output
    assert f"resuming {out} from checkpoint-{at}" in result.output
    assert same_weights(straight_out, out)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight_out, out))
    assert b["eval_loss"] == a["eval_loss"] and b["train_steps"] == a["train_steps"] == 6
    assert b.get("eval_num_tokens") == a.get("eval_num_tokens")  # TRL's token count: the whole run's
    assert b["final_train_loss"] == a["final_train_loss"]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # save_total_limit 2
    # log.jsonl: the rows up to the checkpoint kept, the later ones (and the torn line) replaced by the resumed run's
    assert same_log(straight_out, out)
    assert [r["step"] for r in runs.read_jsonl(out / "log.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("how", ["kill-after-checkpoint", "ctrl-c-at"])
def test_ppo_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir, how):
    """PPO, 4 updates, a checkpoint every update: killed after checkpoint 2 (a torn line then appended to log.jsonl,
    as a kill mid-write leaves), or Ctrl-C during update 2; --resume gives the uninterrupted run, bit for bit."""
    def recipe_for(name):
        out = tmp_path / name
        return write_recipe(tmp_path / f"{name}.yaml", ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)},
                                                                  data_dir, total_episodes=32, save_every=1)), out

    straight, straight_out = recipe_for("straight")
    assert run_cli("ppo", straight).exit_code == 0
    recipe, out = recipe_for("interrupted")
    stopped = interrupt(how, 2, "ppo", recipe)
    if how == "kill-after-checkpoint":
        assert stopped.returncode == -signal.SIGKILL, stopped.stderr[-3000:]
        with open(out / "log.jsonl", "a") as log:
            log.write('{"train/update": 3, "objective/sc')
    else:
        assert stopped.returncode == 130, stopped.stderr[-3000:]
        assert "resume with: rlhf ppo" in stopped.stderr
    assert runs.resumable_checkpoint(out).name == "update-000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["update-000001", "update-000002"]

    result = run_cli("ppo", recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert same_weights(straight_out, out)
    rows = lambda d: [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["train/update"] for r in rows(out)] == [1, 2, 3, 4]
    assert [r["objective/score"] for r in rows(out)] == [r["objective/score"] for r in rows(straight_out)]
    # save_total_limit (2): the oldest checkpoints were deleted as new ones were written
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["update-000002", "update-000003"]


def test_a_crafted_rng_file_is_not_unpickled(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir):
    """Accelerate's random_states_N.pkl is read with weights_only=True: a checkpoint crafted to run code on --resume
    is refused with a message (Accelerate alone would pass over it with a log line and resume with other random
    streams), and the code never runs. A checkpoint without the file is refused too."""
    out = tmp_path / "ppo"
    recipe = write_recipe(tmp_path / "ppo.yaml", ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)},
                                                            data_dir, total_episodes=24, save_every=1))
    assert interrupt("kill-after-checkpoint", 1, "ppo", recipe).returncode == -signal.SIGKILL
    proof = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    checkpoint = out / "checkpoints" / "update-000001"
    assert_damaged_checkpoint_refused(tmp_path, "ppo", recipe, checkpoint, {"optimizer.bin": "weights_only=True"})
    rng_file = checkpoint / "random_states_0.pkl"
    torch.save({"torch_manual_seed": torch.get_rng_state(), "random_state": Payload()}, rng_file)
    result = run_cli("ppo", recipe, "--resume")
    assert result.exit_code == 2, result.output
    assert f"{rng_file} is not a plain tensor file" in result.output and "Traceback" not in result.output
    assert not proof.exists()
    rng_file.unlink()
    result = run_cli("ppo", recipe, "--resume")
    assert result.exit_code == 2 and f"{rng_file} is missing" in result.output, result.output


def test_full_disk_names_where(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir, monkeypatch):
    """A full disk while writing a PPO checkpoint: 'no space left on device' and the path, exit 1."""
    out = tmp_path / "ppo"
    recipe = write_recipe(tmp_path / "ppo.yaml", ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)},
                                                            data_dir, save_every=1))

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(runs, "_low_on_space", lambda path: True, raising=False)  # as on a full disk
    result = run_cli("ppo", recipe)
    assert result.exit_code == 1, result.output
    assert f"no space left on device while writing {out / 'checkpoints' / 'update-000001.tmp'}" in result.output
    assert "enforce fail" not in result.output and "Traceback" not in result.output
    assert not out.exists()  # no complete checkpoint was written: nothing of the run is left (its half neither)


# ---------------------------------------------------------------------------------------------------------------
# no run inside another run (issue 19, item 3)
# ---------------------------------------------------------------------------------------------------------------
def error_line(result, alone: bool = True) -> str:
    """The one error line a command printed, no traceback; `alone`: refused before it printed anything else."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 or not alone, result.output
    return errors[0]


def test_a_run_inside_another_run_is_refused(tmp_path, tiny_model_dir, data_dir):
    outer = make_run(tmp_path / "w" / "s")
    (tmp_path / "alias").symlink_to(outer)
    recipe = sft_recipe(tmp_path, outer / "variant", tiny_model_dir, data_dir)
    before = snapshot(tmp_path / "w")
    for flags in ((), ("--dry-run",), ("--output-dir", tmp_path / "alias" / "variant")):
        result = run_cli("sft", recipe, *flags)
        assert result.exit_code == 2
        assert f"is inside the run {outer}: a run may not hold another" in error_line(result)
    assert snapshot(tmp_path / "w") == before and not (outer / "variant").exists()


def test_an_overwrite_never_deletes_a_run_nested_in_it(tmp_path, tiny_model_dir, data_dir):
    """A run that holds another (made by hand, or by an older version): its --overwrite is refused before anything
    runs, and the nested run stays; nothing deletes it through its parent."""
    outer = make_run(tmp_path / "w" / "s")
    make_run(outer / "variant")
    recipe = sft_recipe(tmp_path, outer, tiny_model_dir, data_dir)
    before = snapshot(tmp_path / "w")
    for flags in (("--overwrite",), ("--overwrite", "--dry-run")):
        result = run_cli("sft", recipe, *flags)
        assert result.exit_code == 2
        assert f"{outer} holds another run ({outer / 'variant'})" in error_line(result)
    with pytest.raises(UserError, match="holds another run"):
        runs.remove_run(outer)
    assert snapshot(tmp_path / "w") == before
    assert not (tmp_path / "w" / ".s.next").exists()


# ---------------------------------------------------------------------------------------------------------------
# the swap's edge cases (issue 19, item 6): no finished run lost, no dir stuck
# ---------------------------------------------------------------------------------------------------------------
def test_a_leftover_old_dir_that_is_not_ours_is_refused_before_training(tmp_path, tiny_model_dir, data_dir):
    """`.NAME.old` without a marker used to let --overwrite train fully, then fail the swap (ENOTEMPTY) and leave
    the finished replacement for the next --overwrite to delete."""
    out = make_run(tmp_path / "out")
    leftover = tmp_path / ".out.old"
    leftover.mkdir()
    (leftover / "notes.txt").write_text("mine")
    recipe = sft_recipe(tmp_path, out, tiny_model_dir, data_dir)
    before = snapshot(tmp_path)
    result = run_cli("sft", recipe, "--overwrite")
    assert result.exit_code == 2
    assert f"{leftover} is in the way of replacing {out}" in error_line(result)
    assert snapshot(tmp_path) == before and not (tmp_path / ".out.next").exists()


def test_swap_edge_cases_lose_no_run(tmp_path, monkeypatch, capsys):
    final = make_run(tmp_path / "run")
    # a replacement killed after its metrics.json, before the first rename: the next command swaps it in
    staged = make_run(tmp_path / ".run.next")
    (staged / "new.txt").write_text("new")
    runs.recover(final)
    assert (final / "new.txt").is_file() and not staged.exists() and not (tmp_path / ".run.old").exists()

    # ... unless something that is not ours is in the way: refused (by every command), the replacement kept
    staged = make_run(tmp_path / ".run.next")
    (staged / "newer.txt").write_text("newer")
    foreign = tmp_path / ".run.old"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"\.run\.old is in the way of the swap .* the finished run in .*\.run\.next"):
        runs.recover(final)
    assert runs.is_finished(staged) and (final / "new.txt").is_file() and (foreign / "notes.txt").is_file()
    with pytest.raises(UserError, match="holds a finished run waiting to replace"):
        runs.prepare_run(runs.RunPlan(final, staged, "replace"))
    (foreign / "notes.txt").unlink()
    foreign.rmdir()
    runs.recover(final)
    assert (final / "newer.txt").is_file() and not staged.exists()

    # a retired run that cannot be deleted (a file the user may not remove): moved aside with a warning, and the
    # commands after it are not stuck
    real_rmtree = runs.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if ".run.old" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(runs.shutil, "rmtree", rmtree)
    make_run(tmp_path / ".run.old", checkpoint="checkpoint-2")
    runs.recover(final)  # the swap had finished; only the retired run was left
    assert "could not delete the replaced run" in capsys.readouterr().err
    assert not (tmp_path / ".run.old").exists() and runs.is_finished(final)
    aside = [p.name for p in tmp_path.glob(".run.old-*")]
    assert len(aside) == 1
    runs.recover(final)  # nothing left to do
    staged = make_run(tmp_path / ".run.next")
    (staged / "newest.txt").write_text("newest")
    (final / "logs").mkdir()  # a folder, which the retired run's deletion cannot remove
    runs.promote(staged, final)  # and the next swap, whose retired run cannot be deleted either
    assert (final / "newest.txt").is_file() and not (tmp_path / ".run.old").exists()
    assert len(list(tmp_path.glob(".run.old-*"))) == 2


def test_a_kill_between_a_finished_replacement_and_its_swap_loses_nothing(tmp_path, tiny_model_dir, data_dir):
    """kill -9 after the replacement's metrics.json, before the first rename: the next command (any: here one that
    is then refused) swaps the finished replacement in; it used to stay aside for the next --overwrite to delete."""
    out = tmp_path / "out"
    recipe = sft_recipe(tmp_path, out, tiny_model_dir, data_dir)
    assert run_cli("sft", recipe).exit_code == 0
    killed = interrupt("kill-before-swap", 0, "sft", recipe, "--overwrite", "--set", "training.learning_rate=0.002")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    staged = tmp_path / ".out.next"
    assert runs.is_finished(staged) and "learning_rate: 0.001" in (out / runs.RECIPE_FILE).read_text()
    replacement = runs.run_marker(staged)["run_id"]
    result = run_cli("sft", recipe, "--set", "training.learning_rate=0.002")
    assert result.exit_code == 2 and "holds a finished run" in result.output
    assert runs.run_marker(out)["run_id"] == replacement and not staged.exists()
    assert "learning_rate: 0.002" in (out / runs.RECIPE_FILE).read_text()


# ---------------------------------------------------------------------------------------------------------------
# a full disk (issue 19, item 5): one line, the run it was to replace intact, nothing half-written left
# ---------------------------------------------------------------------------------------------------------------
def test_a_full_disk_at_a_trainer_checkpoint(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """torch's zip writer fails writing checkpoint-2's optimizer, as on a full tmpfs ('unexpected pos'): one line
    naming where and the command that resumes, the finished run untouched, checkpoint-2's half removed, and the
    replacement resumes from checkpoint-1 once there is room."""
    out = make_run(tmp_path / "out")
    recipe = sft_recipe(tmp_path, out, tiny_model_dir, data_dir, save_steps=1)
    before = snapshot(out)
    real_save = torch.save

    def full_at_checkpoint_2(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-2", "optimizer.pt")):
            Path(f).write_bytes(b"PK\x03\x04 half")  # what the short write left
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 176384 vs 176272")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_checkpoint_2)
    monkeypatch.setattr(runs, "_low_on_space", lambda path: True, raising=False)  # as on a full disk
    result = run_cli("sft", recipe, "--overwrite")
    assert result.exit_code == 1
    staged = tmp_path / ".out.next"
    line = error_line(result, alone=False)
    assert line.startswith(f"error: no space left on device while writing {staged}: free some space, then resume "
                           "from checkpoint-1 with: rlhf ") and line.endswith(" --resume --overwrite"), line
    assert snapshot(out) == before
    assert runs.latest_checkpoint(staged) == staged / "checkpoint-1" and not (staged / "checkpoint-2").exists()

    monkeypatch.setattr(torch, "save", real_save)
    result = run_cli("sft", recipe, "--overwrite", "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / runs.METRICS_FILE).read_text())["train_steps"] == 3 and not staged.exists()


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_a_full_disk_at_the_final_save(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir, monkeypatch, stage):
    """safetensors fails writing the trained model (SafetensorError, 'os error 28', its words on a full tmpfs):
    one line, exit 1, the finished run the new one was to replace untouched. Without a checkpoint nothing of the
    new run is left; PPO's checkpoint of update 1 is kept, and the run resumes from it."""
    import transformers
    from safetensors import SafetensorError

    out = make_run(tmp_path / "out")
    if stage == "sft":
        recipe = sft_recipe(tmp_path, out, tiny_model_dir, data_dir)
    else:
        recipe = write_recipe(tmp_path / "ppo.yaml", ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)},
                                                                data_dir, save_every=1))
    before = snapshot(out)
    real = transformers.modeling_utils.safe_save_file

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    result = run_cli(stage, recipe, "--overwrite")
    assert result.exit_code == 1
    line = error_line(result, alone=False)
    staged = tmp_path / ".out.next"
    assert line.startswith(f"error: no space left on device while writing {staged}: free some space"), line
    assert snapshot(out) == before
    if stage == "sft":
        assert line.endswith(f"and run again ({out} is as it was)") and not staged.exists()
        return
    assert "then resume from update-000001 with: rlhf " in line and line.endswith(" --resume --overwrite")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)
    result = run_cli(stage, recipe, "--overwrite", "--resume")
    assert result.exit_code == 0, result.output
    assert runs.is_finished(out) and not staged.exists()


# ---------------------------------------------------------------------------------------------------------------
# a filesystem without locks (issue 19, item 11)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["ENOLCK", "EOPNOTSUPP"])
def test_a_filesystem_without_locks_is_one_line(tmp_path, tiny_model_dir, data_dir, monkeypatch, code):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "runs" / "out"
    recipe = sft_recipe(tmp_path, out, tiny_model_dir, data_dir)
    result = run_cli("sft", recipe)
    assert result.exit_code == 2
    assert error_line(result) == (f"error: cannot lock {out} ({tmp_path / 'runs' / '.out.lock'}): "
                                  f"{os.strerror(getattr(errno, code))}: its filesystem does not support file locks "
                                  "(as some network filesystems do not); use an output dir on one that does")
    assert not (tmp_path / "runs").exists()  # nothing left behind, not even the folder the lock file was to be in
