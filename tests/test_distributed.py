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
from conftest import REPO, launch_ran, ppo_recipe, run_cli, stage_recipe, write_pipeline_recipes, write_recipe

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


def test_fsdp2_policy_generates_and_saves_whole(tmp_path):
    """FSDP2 runs on CPU with gloo in torch (Accelerate selects FSDP only on GPUs): a fully_shard-ed policy, gathered
    by `ppo.modules.whole_weights`, generates token for token as the unsharded one, its gathered state dict saves the
    same weights, and it is sharded and trainable afterwards (tests/fsdp_whole_weights.py, in both processes)."""
    done = torchrun(REPO / "tests" / "fsdp_whole_weights.py", [str(tmp_path)], tmp_path, {}, timeout=300)
    assert launch_ran(done), done.stderr[-5000:]
    assert "rank 0: ok" in done.stdout and "rank 1: ok" in done.stdout


def test_ppo_under_deepspeed_zero2_equals_ddp_and_resumes(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir):
    """PPO under DeepSpeed ZeRO-2 (`accelerate launch --config_file recipes/accelerate/zero2.yaml`, 2 processes on
    DeepSpeed's CPU accelerator, over gloo): the engine steps at the boundary of the 2 accumulated micro-batches,
    clips, and shards the optimizer state, and the run ends with the weights of the same run under DDP; a checkpoint
    (the engine's own, through Accelerate's save_state) resumes to the uninterrupted run's weights bit for bit."""
    pytest.importorskip("deepspeed")
    import torch
    from safetensors.torch import load_file

    def run(name: str, *extra: str) -> Path:
        out = tmp_path / name
        recipe = ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)}, data_dir, save_every=1,
                            max_grad_norm=0.5)
        recipe = write_recipe(tmp_path / f"{name}.yaml", recipe)
        launcher = None if name == "ddp" else [
            sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
            str(REPO / "recipes" / "accelerate" / "zero2.yaml"), "--num_processes", "2", "--mixed_precision", "no"]
        done = torchrun(REPO / "rlhf_pipeline" / "__main__.py", ["ppo", str(recipe), *extra], tmp_path,
                        DEEPSPEED_CPU, timeout=300, launcher=launcher)
        assert launch_ran(done) and (out / "metrics.json").is_file(), done.stderr[-6000:]
        return out

    ddp, deepspeed = run("ddp"), run("zero2")
    expected, got = load_file(ddp / "model.safetensors"), load_file(deepspeed / "model.safetensors")
    assert all(torch.allclose(expected[k], got[k], atol=1e-5) for k in expected)
    assert not all(torch.equal(expected[k], load_file(tiny_model_dir / "model.safetensors").get(k, expected[k]))
                   for k in expected)  # it trained
    rows = [[json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] for out in (ddp, deepspeed)]
    for ddp_row, ds_row in zip(*rows):
        for key in ("loss/policy", "loss/value", "policy/grad_norm"):
            assert ds_row[key] == pytest.approx(ddp_row[key], rel=1e-4, abs=1e-6), key

    checkpoint = deepspeed / "checkpoints" / "update-000001"
    assert (checkpoint / "pytorch_model").is_dir()  # the engine's sharded optimizer state
    (deepspeed / "metrics.json").unlink()  # now an unfinished run whose last checkpoint is update 1
    run("zero2", "--resume")
    resumed = load_file(deepspeed / "model.safetensors")
    assert all(torch.equal(got[k], resumed[k]) for k in got), "a resumed run must equal the uninterrupted one"


def test_sft_under_deepspeed_zero2_and_zero3_through_accelerate_launch(tiny_model_dir, data_dir, tmp_path):
    """`accelerate launch --config_file recipes/accelerate/zero{2,3}.yaml` on DeepSpeed's CPU accelerator (2
    processes, gloo): the Trainer runs under DeepSpeed, data-parallel (half the steps of one process, different
    batches), process 1 writes nothing, and the saved model (under ZeRO-3 gathered from the shards) equals the same
    run under DDP."""
    pytest.importorskip("deepspeed")
    import torch
    from safetensors.torch import load_file

    recipe = stage_recipe("sft", tmp_path / "unused", tiny_model_dir, {"files": str(data_dir / "sft.jsonl")},
                          training={"num_train_epochs": 1, "per_device_train_batch_size": 4, "learning_rate": 1.0e-3,
                                    "logging_steps": 1, "bf16": False, "disable_tqdm": True})
    path = write_recipe(tmp_path / "sft.yaml", recipe)

    def run(name: str, config: str | None) -> tuple[dict, dict, Path]:
        probes, out = tmp_path / f"probes-{name}", tmp_path / name
        probes.mkdir()
        launcher = None if config is None else [
            sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
            str(REPO / "recipes" / "accelerate" / config), "--num_processes", "2", "--mixed_precision", "no"]
        env = {"RLHF_PROBE_DIR": str(probes), **DEEPSPEED_CPU}
        done = torchrun(REPO / "tests" / "distributed_probe.py", ["sft", str(path), "--output-dir", str(out)],
                        tmp_path, env, timeout=300, launcher=launcher)
        assert launch_ran(done) and (out / "metrics.json").is_file(), done.stderr[-6000:]
        main, other = (json.loads((probes / f"rank-{rank}.json").read_text()) for rank in (0, 1))
        return main["trainers"][name], other, out

    ddp, _, ddp_out = run("ddp", None)
    expected = load_file(ddp_out / "model.safetensors")
    for name in ("zero2", "zero3"):
        trainer, other, out = run(name, f"{name}.yaml")
        assert trainer["engine"] == "DistributedType.DEEPSPEED" and trainer["world_size"] == 2
        assert trainer["steps"] == ddp["steps"] == math.ceil(trainer["rows"] / 8) < math.ceil(trainer["rows"] / 4)
        assert trainer["first_batch"] != other["trainers"][name]["first_batch"]
        assert other["wrote"] == []
        got = load_file(out / "model.safetensors")
        # the Trainer's DeepSpeed save writes the tied output head as a key of its own (the same values)
        tied = got.pop("lm_head.weight", None)
        assert tied is None or torch.equal(tied, got["transformer.wte.weight"])
        assert set(got) == set(expected)
        assert all(torch.allclose(got[k], expected[k], atol=1e-5) for k in expected), name


@pytest.mark.parametrize("env, gpu, args, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, False, ["sft", "recipes/tiny/sft.yaml"],
     "which Accelerate runs only on GPUs"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, False,
     ["reward", "recipes/tiny/reward.yaml"], "DeepSpeed ZeRO-2 (the Accelerate config's distributed_type)"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, True,
     ["ppo", "recipes/tiny/ppo.yaml"], "not ZeRO-3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, False,
     ["ppo", "recipes/tiny/ppo.yaml"], "DeepSpeed also on DeepSpeed's CPU accelerator, DS_ACCELERATOR=cpu"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, True,
     ["ppo", "recipes/tiny/ppo.yaml", "--set", "training.save_every=4"], "under FSDP are not supported"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, True, ["ppo", "recipes/tiny/ppo.yaml"], "needs FSDP2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, True,
     ["ppo", "recipes/tiny/ppo.yaml", "--set", "training.save_every=4"], "training.save_every"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, True,
     ["sft", "recipes/tiny/sft.yaml", "--set", "peft.r=4"], "peft.save"),
])
def test_engines_a_stage_cannot_honour_are_refused_before_loading(monkeypatch, tmp_path, env, gpu, args, message):
    """A launch asking for FSDP or DeepSpeed on a machine without GPUs (Accelerate would silently run plain data
    parallel; PPO may use DeepSpeed's CPU accelerator), PPO under ZeRO-3 or FSDP1, PPO checkpoints under FSDP, and a
    merged LoRA save of sharded weights: exit 2 with the reason, before any model is loaded, nothing written."""
    import torch

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: gpu)
    out = tmp_path / "out"
    result = run_cli(*args, "--output-dir", str(out))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_dpo_under_two_processes(tiny_model_dir, data_dir, tmp_path):
    """rlhf dpo (TRL's DPOTrainer) under 2 processes: half the steps of one process, different batches, the same
    weights in both, one writer; its held-out generation evaluation runs sharded (7 prompts: 4 and 3)."""
    out = tmp_path / "dpo"
    recipe = write_recipe(tmp_path / "dpo.yaml", {
        "stage": "dpo", "seed": 0, "output_dir": str(out), "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"files": {"train": str(data_dir / "prefs.jsonl"), "test": str(data_dir / "prefs-test.jsonl")},
                 "eval_split": "test"},
        "gold": {"function": "rlhf_pipeline.tiny.annotator:gold_score"}, "generation": {"response_length": 8},
        "evaluation": {"prompts": 7, "batch_size": 2},
        "training": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                     "learning_rate": 1.0e-3, "beta": 0.5, "logging_steps": 1}})
    probes = tmp_path / "probes"
    probes.mkdir()
    done = launch(["dpo", str(recipe)], probes, tmp_path)
    assert launch_ran(done), done.stderr[-8000:]
    main, other = (json.loads((probes / f"rank-{rank}.json").read_text()) for rank in (0, 1))
    trainer, twin = main["trainers"]["dpo"], other["trainers"]["dpo"]
    assert trainer["steps"] == twin["steps"] == math.ceil(trainer["rows"] / 8) < math.ceil(trainer["rows"] / 4)
    assert trainer["first_batch"] != twin["first_batch"]
    assert main["weights"]["dpo"] == other["weights"]["dpo"]
    assert other["wrote"] == []
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == trainer["steps"]
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) >= 1 and "eval_gold_after" in metrics and metrics["eval_prompts"] == 7
