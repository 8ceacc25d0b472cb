"""Several processes (torchrun, gloo on CPU): the whole pipeline (pretrain, sft, reward, ppo, eval) under 2 processes.
Both processes take part (each trains on its own shard of the data: a TRL stage takes half the optimizer steps of one
process for the same per-device batch and epochs; PPO samples half of every rollout batch in each), only process 0
writes the run directories and the pipeline state, both end every stage with bit-identical weights, and the sharded
evaluation reports what one process reports.

What each process did is recorded by tests/distributed_probe.py, which runs the CLI inside the launch."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import (
    REPO,
    launch_ran,
    ppo_recipe,
    run_cli,
    stage_recipe,
    weights,
    write_pipeline_recipes,
    write_recipe,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
TRL_STAGES = ("pretrain", "sft", "reward")


def torchrun(script: Path, args: list[str], cwd: Path, env: dict[str, str], processes: int = 2,
             timeout: float = 600, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`script` under torchrun (or the `launcher` command) with 2 CPU processes; on a timeout the whole process
    group is killed (torchrun's workers too, which would otherwise hang on in a barrier) and the test fails."""
    launcher = launcher or [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            str(processes)]
    command = [*launcher, str(script), *args]
    with subprocess.Popen(command, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"torchrun {script.name} {' '.join(args)} ran past {timeout} s:\n{stderr[-5000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


DEEPSPEED_CPU = {"DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore::FutureWarning"}  # torch's c10d deprecations


def launch(args: list[str], probe_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI under torchrun, each process recording what it did (tests/distributed_probe.py)."""
    return torchrun(REPO / "tests" / "distributed_probe.py", args, cwd, {"RLHF_PROBE_DIR": str(probe_dir)})


@pytest.fixture(scope="module")
def epoch_pipeline(tmp_path_factory, data_dir) -> Path:
    """A pipeline over the tiny fixtures whose TRL stages train one epoch (not max_steps), so that their step count
    tells how the data was split."""
    training = {"num_train_epochs": 1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                "learning_rate": 1.0e-3, "logging_steps": 1}
    root = write_pipeline_recipes(tmp_path_factory.mktemp("distributed"), data_dir, training, ppo_episodes=16)
    pipeline = root / "recipes" / "pipeline.yaml"  # PPO's tracker is closed without ending the process group
    recipe = yaml.safe_load(pipeline.read_text())
    recipe["stages"]["ppo"]["set"] = {"training.report_to": "tensorboard"}
    write_recipe(pipeline, recipe)
    return root


def test_the_pipeline_under_two_processes(epoch_pipeline, tmp_path):
    probes = tmp_path / "probes"
    probes.mkdir()
    done = launch(["pipeline", str(epoch_pipeline / "recipes" / "pipeline.yaml")], probes, epoch_pipeline)
    assert launch_ran(done), done.stdout[-3000:] + done.stderr[-20000:]
    main, other = (json.loads((probes / f"rank-{rank}.json").read_text()) for rank in (0, 1))
    runs_dir = epoch_pipeline / "runs"

    # every stage finished, and the pipeline's summary was printed once
    for stage in (*TRL_STAGES, "ppo", "eval"):
        assert (runs_dir / stage / "metrics.json").is_file(), stage
    assert done.stdout.count("pipeline summary") == 1

    # the TRL stages: data-parallel over both processes
    for stage in TRL_STAGES:
        trainer, twin = main["trainers"][stage], other["trainers"][stage]
        assert trainer["world_size"] == 2 and twin["world_size"] == 2
        one_process = math.ceil(trainer["rows"] / trainer["per_device_batch"])
        assert trainer["steps"] == twin["steps"] == math.ceil(trainer["rows"] / (2 * trainer["per_device_batch"]))
        assert trainer["steps"] < one_process, stage
        assert trainer["first_batch"] != twin["first_batch"], f"{stage}: both processes saw the same batch"
        metrics = json.loads((runs_dir / stage / "metrics.json").read_text())
        assert metrics["train_steps"] == trainer["steps"]
        logged = [json.loads(line) for line in (runs_dir / stage / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logged if "loss" in r] == list(range(1, trainer["steps"] + 1)), stage  # once each

    # PPO: each process samples half of every rollout batch
    assert main["trainers"]["ppo"]["local_rollout_batch_size"] == 4
    assert main["trainers"]["ppo"]["episodes"] == 16
    assert (json.loads((runs_dir / "ppo" / "metrics.json").read_text())["episodes"]) == 16
    assert list((runs_dir / "ppo" / "runs" / "rlhf-pipeline").glob("events.out.tfevents.*"))  # and eval ran after

    # the same weights in both processes at the end of every stage
    assert set(main["weights"]) == {*TRL_STAGES, "ppo"}
    assert main["weights"] == other["weights"]

    # only process 0 wrote: run markers, metrics, recipes, models, the pipeline state
    assert other["wrote"] == [], other["wrote"][:5]
    written = {path for _, path in main["wrote"]}
    assert any(path.endswith("pipeline.json") for path in written)
    assert sum(what == "finish_run" for what, _ in main["wrote"]) == 5

    # the sharded evaluation reports what one process reports on the same models
    report = json.loads((runs_dir / "eval" / "eval.json").read_text())["metrics"]
    eval_dir = tmp_path / "eval-one-process"
    one = run_cli("eval", runs_dir / "eval" / "recipe.resolved.yaml", "--set", f"output_dir={eval_dir}")
    assert one.exit_code == 0, one.output
    single = json.loads((eval_dir / "eval.json").read_text())["metrics"]
    assert report["num_prompts"] == single["num_prompts"] > 0
    for key in ("policy_score", "baseline_score", "policy_kl", "policy_gold", "reward_accuracy"):
        assert report[key] == pytest.approx(single[key], abs=1e-4), key


def test_a_refused_run_stops_every_process_with_one_message(epoch_pipeline, tiny_model_dir, tmp_path):
    """Process 0 decides (here: the output dir holds a finished run, and no --overwrite); the other process exits
    with the same code, without printing the message again and without hanging."""
    args = ["sft", str(epoch_pipeline / "recipes" / "sft.yaml"), "--set", f"model.name_or_path={tiny_model_dir}",
            "--set", "training.max_steps=1", "--output-dir", str(tmp_path / "sft")]
    first = launch(args, tmp_path, epoch_pipeline)
    assert launch_ran(first), first.stderr[-3000:]
    second = launch(args, tmp_path, epoch_pipeline)
    assert second.returncode != 0
    assert second.stderr.count("holds a finished run") == 1, second.stderr[-3000:]


def test_every_process_must_see_the_same_run_dir(tmp_path, tiny_model_dir, data_dir):
    """Processes that share no filesystem (here each runs in a directory of its own, and the output dir is relative:
    each sees a run dir of its own) stop before any work, with one message, printed once: otherwise each would read
    its own copy of what process 0 wrote (a gate's metrics.json, a checkpoint)."""
    recipe = write_recipe(tmp_path / "sft.yaml", stage_recipe("sft", Path("out") / "sft", tiny_model_dir,
                                                              {"files": str(data_dir / "sft.jsonl")}))
    machines = [tmp_path / "machine-0", tmp_path / "machine-1"]
    for machine in machines:
        machine.mkdir()
    env = {f"RLHF_RANK_CWD_{rank}": str(machine) for rank, machine in enumerate(machines)}
    done = torchrun(REPO / "tests" / "rank_cwd.py", ["sft", str(recipe)], tmp_path, env, timeout=300)
    assert done.returncode != 0
    message = (f"error: the processes of this launch do not see the same {Path('out') / 'sft'}: process 1 (on ")
    assert done.stderr.count(message) == 1, done.stderr[-3000:]
    assert f"cannot read {machines[1] / 'out' / '.sft.probe'}, which process 0 wrote beside it" in done.stderr
    assert "Loading weights" not in done.stderr  # stopped before any work (torchrun then reports the exit codes)
    assert [list(machine.iterdir()) for machine in machines] == [[], []]  # nothing written, nothing left


# ---------------------------------------------------------------------------------------------------------------
# the sharded engines, launched with recipes/accelerate/*.yaml: FSDP through tests/fsdp_on_cpu.py (Accelerate selects
# FSDP only on GPUs; the shim changes that selection and nothing else), DeepSpeed on its CPU accelerator. Each run is
# compared with the same run under DDP (torchrun).
# ---------------------------------------------------------------------------------------------------------------
ENGINE_TYPES = {"ddp": "DistributedType.MULTI_CPU", "fsdp": "DistributedType.FSDP",
                "zero2": "DistributedType.DEEPSPEED", "zero3": "DistributedType.DEEPSPEED"}


def launch_under(engine: str, args: list[str], probe_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI under 2 processes and `engine` ("ddp": torchrun; "fsdp", "zero2", "zero3": `accelerate launch` with
    that config of recipes/accelerate/), each process recording what it did (tests/distributed_probe.py)."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    env = {"RLHF_PROBE_DIR": str(probe_dir), **(DEEPSPEED_CPU if engine.startswith("zero") else {})}
    script = REPO / "tests" / ("fsdp_on_cpu.py" if engine == "fsdp" else "distributed_probe.py")
    launcher = None if engine == "ddp" else [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
        str(REPO / "recipes" / "accelerate" / f"{engine}.yaml"), "--num_processes", "2", "--mixed_precision", "no"]
    probe_dir.mkdir(parents=True, exist_ok=True)
    return torchrun(script, args, cwd, env, timeout=300, launcher=launcher)


def same_weights(expected: Path, got: Path, atol: float = 1e-5) -> None:
    import torch

    expected, got = weights(expected), weights(got)
    # the Trainer's sharded save (FSDP, DeepSpeed) writes GPT-2's tied output head as a key of its own (same values)
    for tensors in (expected, got):
        tied = tensors.pop("lm_head.weight", None)
        assert tied is None or torch.equal(tied, tensors["transformer.wte.weight"])
    assert set(got) == set(expected)
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst <= atol, f"largest difference {worst:g}"


def trl_stage_recipe(stage: str, root: Path, model: Path, data_dir: Path) -> Path:
    """One epoch of `stage` at 4 rows per process, so that its step count tells how the data was split."""
    training = {"num_train_epochs": 1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                "learning_rate": 1.0e-3, "logging_steps": 1, "disable_tqdm": True}
    pairs = {"files": {"train": str(data_dir / "prefs.jsonl"), "test": str(data_dir / "prefs-test.jsonl")},
             "eval_split": "test"}
    if stage == "sft":
        recipe = stage_recipe("sft", root / "unused", model, {"files": str(data_dir / "sft.jsonl")}, training=training)
    elif stage == "reward":
        recipe = stage_recipe("reward", root / "unused", model, pairs, training=training)
    else:  # 5 evaluation prompts, 2 at a time: 3 and 2 per process, so the processes run 2 and 1 batches
        recipe = stage_recipe("dpo", root / "unused", model, pairs, training={**training, "beta": 0.5},
                              gold={"function": "rlhf_pipeline.tiny.annotator:gold_score"},
                              generation={"response_length": 8}, evaluation={"prompts": 5, "batch_size": 2})
    return write_recipe(root / f"{stage}.yaml", recipe)


@pytest.fixture(scope="module")
def trl_stage_runs(tmp_path_factory, tiny_model_dir, data_dir):
    """Each (stage, engine) run once for the module: (process 0's record, process 1's record, output dir)."""
    root = tmp_path_factory.mktemp("trl-stages")
    runs: dict[tuple[str, str], tuple[dict, dict, Path]] = {}

    def run(stage: str, engine: str) -> tuple[dict, dict, Path]:
        if (stage, engine) not in runs:
            recipe = trl_stage_recipe(stage, root, tiny_model_dir, data_dir)
            out, probes = root / f"{stage}-{engine}", root / f"probes-{stage}-{engine}"
            done = launch_under(engine, [stage, str(recipe), "--output-dir", str(out)], probes, root)
            assert launch_ran(done) and (out / "metrics.json").is_file(), done.stderr[-6000:]
            records = [json.loads((probes / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
            runs[stage, engine] = (*records, out)
        return runs[stage, engine]

    return run


@pytest.mark.parametrize("stage, engine", [("sft", "fsdp"), ("sft", "zero2"), ("sft", "zero3"), ("reward", "fsdp"),
                                           ("reward", "zero3"), ("dpo", "fsdp"), ("dpo", "zero3")])
def test_trl_stages_under_each_engine_equal_ddp(trl_stage_runs, stage, engine):
    """sft, reward and dpo launched with recipes/accelerate/{fsdp,zero2,zero3}.yaml (2 processes): the Trainer runs
    under that engine, data-parallel (half the optimizer steps of one process, different batches in each), with the
    same weights in both processes, process 1 writes nothing, and the saved model (gathered from the shards) and the
    held-out numbers equal the same run under DDP. DPO's generation evaluation runs on uneven shards (3 and 2
    prompts), its sharded models held whole."""
    for name in ("ddp", engine):
        main, other, out = trl_stage_runs(stage, name)
        trainer, twin = main["trainers"][out.name], other["trainers"][out.name]
        assert trainer["engine"] == ENGINE_TYPES[name] and trainer["world_size"] == 2
        assert trainer["steps"] == twin["steps"] == math.ceil(trainer["rows"] / 8) < math.ceil(trainer["rows"] / 4)
        assert trainer["first_batch"] != twin["first_batch"], "both processes saw the same batch"
        assert main["weights"][stage] == other["weights"][stage]
        assert other["wrote"] == [], other["wrote"][:5]
        assert json.loads((out / "metrics.json").read_text())["train_steps"] == trainer["steps"]

    (*_, ddp), (*_, sharded) = trl_stage_runs(stage, "ddp"), trl_stage_runs(stage, engine)
    same_weights(ddp, sharded)
    expected, got = (json.loads((out / "metrics.json").read_text()) for out in (ddp, sharded))
    keys = {"sft": [], "reward": ["eval_loss", "eval_accuracy", "eval_margin", "eval_ties"],
            "dpo": ["eval_loss", "eval_kl", "eval_kl_before", "eval_response_length_after"]}[stage]
    for key in ["train_loss", *keys]:
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key
    if stage == "dpo":
        assert got["eval_prompts"] == 5 and "eval_gold_after" in got
        assert (sharded / "eval_samples.jsonl").read_text().strip()


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory, tiny_model_dir, tiny_reward_dir, data_dir):
    """A PPO run (checkpoint after each update) by engine, made once for the module: its output dir."""
    root = tmp_path_factory.mktemp("ppo-engines")
    runs: dict[str, Path] = {}

    def run(engine: str, *extra: str) -> Path:
        out = root / engine
        if engine not in runs or extra:
            # 2 accumulated micro-batches, clipping; 5 held-out prompts, 2 at a time: 2 and 1 batches per process
            recipe = ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)}, data_dir, save_every=1,
                                max_grad_norm=0.5, eval_prompts=5, eval_batch_size=2)
            path = write_recipe(root / f"{engine}.yaml", recipe)
            done = launch_under(engine, ["ppo", str(path), *extra], root / f"probes-{engine}", root)
            assert launch_ran(done) and (out / "metrics.json").is_file(), done.stderr[-6000:]
            runs[engine] = out
        return runs[engine]

    return run


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2"])
def test_ppo_under_each_engine_equals_ddp_and_resumes(ppo_runs, tiny_model_dir, engine):
    """PPO under 2 processes: DDP (torchrun: each process samples half of every rollout batch), and launched with
    recipes/accelerate/fsdp.yaml (FSDP2: the trained models sharded; the reference and reward models sharded by
    trl's prepare_fsdp and held whole while they compute) or zero2.yaml (DeepSpeed: the engine steps at the boundary
    of the 2 accumulated micro-batches, clips, and shards the optimizer state). Each ends with the weights, losses,
    grad norms and held-out numbers of the DDP run; the held-out evaluation runs on uneven shards; and a checkpoint
    (Accelerate's save_state, with one RNG file per process: FSDP's gathered state dicts, DeepSpeed's engine files)
    resumes to the uninterrupted run's weights bit for bit."""
    import torch

    ddp, run = ppo_runs("ddp"), ppo_runs(engine)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 8 and metrics["episodes"] == 16
    assert not all(torch.equal(v, weights(tiny_model_dir).get(k, v)) for k, v in weights(ddp).items())  # it trained
    if engine != "ddp":
        same_weights(ddp, run)
        rows = [[json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] for out in (ddp, run)]
        assert len(rows[0]) == len(rows[1]) == 2
        for ddp_row, row in zip(*rows):
            for key in ("loss/policy", "loss/value", "policy/grad_norm", "objective/kl"):
                assert row[key] == pytest.approx(ddp_row[key], rel=1e-4, abs=1e-6), key
        expected = json.loads((ddp / "metrics.json").read_text())
        for key in ("eval_score_before", "eval_score_after", "eval_kl"):
            assert metrics[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key

    checkpoint = run / "checkpoints" / "update-000001"
    engine_files = {"ddp": "model.safetensors", "fsdp": "pytorch_model_fsdp.bin", "zero2": "pytorch_model"}[engine]
    assert (checkpoint / engine_files).exists()
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= {p.name for p in
                                                                                    checkpoint.iterdir()}
    finished = weights(run)
    (run / "metrics.json").unlink()  # now an unfinished run whose last checkpoint is update 1
    ppo_runs(engine, "--resume")
    resumed = weights(run)
    assert all(torch.equal(finished[k], resumed[k]) for k in finished), "a resumed run must equal the uninterrupted one"
    assert [json.loads(line)["train/update"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("env, gpu, args, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, False, ["sft", "recipes/tiny/sft.yaml"],
     "which Accelerate runs only on GPUs"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, False,
     ["reward", "recipes/tiny/reward.yaml"], "DeepSpeed ZeRO-2 (the Accelerate config's distributed_type)"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, True,
     ["ppo", "recipes/tiny/ppo.yaml"], "not ZeRO-3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, False,
     ["ppo", "recipes/tiny/ppo.yaml"], "DeepSpeed also on DeepSpeed's CPU accelerator, DS_ACCELERATOR=cpu"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, True, ["ppo", "recipes/tiny/ppo.yaml"], "needs FSDP2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, True,
     ["sft", "recipes/tiny/sft.yaml", "--set", "peft.r=4"], "peft.save"),
])
def test_engines_a_stage_cannot_honour_are_refused_before_loading(monkeypatch, tmp_path, env, gpu, args, message):
    """A launch asking for FSDP or DeepSpeed on a machine without GPUs (Accelerate would silently run plain data
    parallel; PPO may use DeepSpeed's CPU accelerator), PPO under ZeRO-3 or FSDP1, and a merged LoRA save of sharded
    weights: exit 2 with the reason, before any model is loaded, nothing written."""
    import torch

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: gpu)
    out = tmp_path / "out"
    result = run_cli(*args, "--output-dir", str(out))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()
