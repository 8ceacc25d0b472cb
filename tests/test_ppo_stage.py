"""`rlhf ppo` end to end on tiny models: outputs, metrics, batch arithmetic, LoRA, resume, errors, two processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, ppo_recipe, run_cli, write_recipe
from safetensors.torch import load_file

LOGGED_EVERY_UPDATE = {
    "objective/score", "objective/score_used", "objective/kl", "objective/kl_k3", "objective/non_score_reward",
    "objective/rlhf_reward", "objective/kl_coef", "objective/gold", "policy/entropy", "policy/approx_kl",
    "policy/clipfrac", "policy/ratio", "policy/grad_norm", "value/clipfrac", "value/explained_variance",
    "loss/policy", "loss/value", "loss/total", "rollout/response_length", "rollout/eos_rate",
    "train/learning_rate", "train/episodes", "train/update", "train/optimizer_steps", "train/early_stopped",
    "time/generation", "time/scoring", "time/training", "time/update", "time/episodes_per_second",
}


def log_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def run_ppo(tmp_path: Path, recipe: dict, *flags: str):
    path = write_recipe(tmp_path / "ppo.yaml", recipe)
    return run_cli("ppo", path, *flags)


def test_ppo_trains_and_reports(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir):
    out = tmp_path / "ppo"
    result = run_ppo(tmp_path, ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)}, data_dir))
    assert result.exit_code == 0, result.output

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("eval_score_before", "eval_score_after", "eval_gold_before", "eval_gold_after", "eval_kl",
                "episodes_per_second", "train_runtime", "final_policy_loss", "final_value_loss"):
        assert math.isfinite(metrics[key]), key
    assert metrics["eval_kl_before"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    # 2 updates x 2 epochs x 2 mini-batches, gradient accumulation or not
    assert metrics["optimizer_steps"] == metrics["planned_optimizer_steps"] == 8
    assert metrics["episodes"] == 16 and metrics["num_updates"] == 2

    rows = log_rows(out)
    assert [r["train/update"] for r in rows] == [1, 2]
    assert LOGGED_EVERY_UPDATE <= set(rows[0]), LOGGED_EVERY_UPDATE - set(rows[0])
    assert rows[-1]["train/optimizer_steps"] == 8 and rows[-1]["train/episodes"] == 16
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    assert 0 < rows[0]["rollout/response_length"] <= 8 and 0 <= rows[0]["rollout/eos_rate"] <= 1
    # averaged metrics are means, not sums halved or doubled by accumulation
    assert 0.5 < rows[0]["policy/ratio"] < 2.0 and 0 <= rows[0]["policy/clipfrac"] <= 1

    for name in ("model.safetensors", "config.json", "tokenizer.json", "recipe.resolved.yaml", "samples.jsonl",
                 "eval_samples.jsonl", "ppo_curves.png"):
        assert (out / name).is_file(), name
    assert (out / "ppo_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert {"update", "prompt", "response", "score", "gold"} <= set(sample)

    documented = (REPO / "docs" / "ppo.md").read_text()
    undocumented = [k for k in {*rows[0], *metrics} if f"`{k}`" not in documented and not k.startswith("eval_")]
    undocumented += [k for k in metrics if k.startswith("eval_") and f"`{k}`" not in documented
                     and f"`{k.rsplit('_', 1)[0]}_*`" not in documented]
    assert not undocumented, f"docs/ppo.md does not define {undocumented}"

    before, after = weights(tiny_model_dir), weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    resolved = (out / "recipe.resolved.yaml").read_text()
    assert "provenance:" in resolved and "transformers:" in resolved


def test_ppo_shared_value_reward_function_k3_adaptive_kl(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "ppo"
    recipe = ppo_recipe(out, tiny_model_dir, {"function": "rlhf_pipeline.tiny.annotator:gold_score"}, data_dir,
                        kl_estimator="k3", adaptive_kl={"target": 0.01, "horizon": 100}, kl_coef=0.1,
                        score_normalization="initial", total_episodes=24)
    recipe["value"] = {"mode": "shared"}
    result = run_ppo(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    rows = log_rows(out)
    coefs = [r["objective/kl_coef"] for r in rows]
    assert coefs[0] == pytest.approx(0.1) and coefs[1] != coefs[0]  # the controller moved beta
    metrics = json.loads((out / "metrics.json").read_text())
    # the reward function is the gold scorer here, so both report the same thing
    assert metrics["eval_score_before"] == pytest.approx(metrics["eval_gold_before"], abs=1e-6)


@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_ppo_lora_reference_is_the_adapter_disabled(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir, save):
    out = tmp_path / "ppo"
    recipe = ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)}, data_dir)
    recipe["peft"] = {"r": 4, "alpha": 8, "dropout": 0.0, "save": save}
    recipe["value"] = {"mode": "shared"}
    result = run_ppo(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_kl_before"] == pytest.approx(0.0, abs=1e-5) and metrics["saved"] == save
    from transformers import AutoModelForCausalLM

    if save == "adapter":
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    else:
        assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)  # merged, or base + adapter through peft
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] > 0


def test_ppo_early_stop_on_target_kl(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir):
    out = tmp_path / "ppo"
    recipe = ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)}, data_dir, target_kl=1e-9,
                        learning_rate=1e-2)
    result = run_ppo(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    rows = log_rows(out)
    assert all(r["train/early_stopped"] == 1.0 for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    # per update: the first mini-batch still sees the rollout policy (approx KL 0) and steps; the second sees the
    # updated policy, steps, and stops the update
    assert metrics["optimizer_steps"] == 4 < metrics["planned_optimizer_steps"] == 8


def test_ppo_resume_continues_exactly(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir, monkeypatch):
    base = dict(total_episodes=24, save_every=1)
    straight = tmp_path / "straight"
    result = run_ppo(tmp_path / "a", ppo_recipe(straight, tiny_model_dir, {"model": str(tiny_reward_dir)}, data_dir,
                                                **base))
    assert result.exit_code == 0, result.output

    resumed = tmp_path / "resumed"
    recipe = ppo_recipe(resumed, tiny_model_dir, {"model": str(tiny_reward_dir)}, data_dir, **base)
    from rlhf_pipeline.ppo.trainer import PPOTrainer

    original = PPOTrainer._optimise

    def crash_in_update_2(self, *args, **kwargs):
        if self.state.update == 1:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PPOTrainer, "_optimise", crash_in_update_2)
    interrupted = run_ppo(tmp_path / "b", recipe)
    assert interrupted.exit_code == 130 and not (resumed / "metrics.json").exists()
    monkeypatch.setattr(PPOTrainer, "_optimise", original)

    refused = run_ppo(tmp_path / "b", recipe)  # an unfinished run with a checkpoint is not silently restarted
    assert refused.exit_code == 2 and "--resume" in refused.output
    changed = run_cli("ppo", tmp_path / "b" / "ppo.yaml", "--resume", "--set", "training.learning_rate=0.5")
    assert changed.exit_code == 2 and "training.learning_rate" in changed.output

    result = run_cli("ppo", tmp_path / "b" / "ppo.yaml", "--resume")
    assert result.exit_code == 0, result.output
    assert [r["train/update"] for r in log_rows(resumed)] == [1, 2, 3]
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must equal the uninterrupted one"
    scores = lambda d: [r["objective/score"] for r in log_rows(d)]  # noqa: E731
    assert scores(straight) == scores(resumed)


@pytest.mark.parametrize("change, key", [
    ({"data": {"files": "PLACEHOLDER"}}, "data"),
    ({"reward": {"function": "rlhf_pipeline.tiny.annotator:no_such_function"}}, "reward.function"),
    ({"reward": {"function": "no_such_module_xyz:f"}}, "reward.function"),
    ({"reward": {"model": "x", "function": "a:b"}}, "reward"),
    ({"training": {"total_episodes": 20}}, "training"),
    ({"training": {"kl_estimator": "k2"}}, "training.kl_estimator"),
    ({"value": {"mode": "sharde"}}, "value.mode"),
])
def test_ppo_bad_recipes(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir, change, key):
    out = tmp_path / "ppo"
    recipe = ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)}, data_dir)
    for section, values in change.items():
        if values.get("files") == "PLACEHOLDER":  # no held-out split
            recipe["data"] = {"files": str(data_dir / "prompts.jsonl")}
        elif section == "reward":
            recipe["reward"] = values
        else:
            recipe[section] = {**recipe.get(section, {}), **values}
    result = run_ppo(tmp_path, recipe)
    assert result.exit_code == 2, result.output
    assert key in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_ppo_two_processes_gloo(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir):
    """Two CPU processes under torchrun + Accelerate (gloo): each samples half of every rollout batch."""
    out = tmp_path / "ppo"
    path = write_recipe(tmp_path / "ppo.yaml", ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)},
                                                          data_dir, gradient_accumulation_steps=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rlhf_pipeline", "ppo", str(path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "micro-batch 2 per process" in done.stderr and "2 process(es)" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 8 and metrics["episodes"] == 16
    assert len(log_rows(out)) == 2


def test_ppo_reports_to_tensorboard(tmp_path, tiny_model_dir, data_dir):
    """training.report_to passes the per-update metrics to a tracker (TensorBoard here: it runs offline)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "ppo"
    recipe = ppo_recipe(out, tiny_model_dir, {"function": "rlhf_pipeline.tiny.annotator:gold_score"}, data_dir,
                        report_to="tensorboard")
    recipe["value"] = {"mode": "shared"}
    result = run_ppo(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    scores = events.Scalars("objective/score")
    assert [s.step for s in scores] == [1, 2]
    assert scores[0].value == pytest.approx(log_rows(out)[0]["objective/score"], rel=1e-5)
