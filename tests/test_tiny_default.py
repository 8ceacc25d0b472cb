"""The tiny default end to end, as the README's main command runs it: `rlhf pipeline recipes/tiny/pipeline.yaml`.

The slow test of the suite (a few minutes on 2 CPU cores). It holds the tiny default to its targets: a reward model
at least 0.85 accurate against the simulated annotator's held-out labels, and PPO raising the held-out gold score
from the SFT policy's level (near the middle of [0, 1]) to at least 0.8.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


def metrics(path):
    return json.loads((path / "metrics.json").read_text())


@pytest.mark.slow
def test_tiny_default_meets_its_targets(tmp_path):
    out = tmp_path / "tiny"
    result = run_cli("pipeline", "recipes/tiny/pipeline.yaml", "--set", f"output_dir={out}")
    assert result.exit_code == 0, result.output[-3000:]
    assert "pipeline summary" in result.output

    assert metrics(out / "pretrain")["eval_loss"] < 2.6
    reward = metrics(out / "reward")
    assert reward["eval_accuracy"] >= 0.85, reward
    ppo = metrics(out / "ppo")
    assert 0.35 <= ppo["eval_gold_before"] <= 0.65, ppo
    assert ppo["eval_gold_after"] >= 0.8, ppo
    assert ppo["eval_score_after"] > ppo["eval_score_before"] and 0 < ppo["eval_kl"] < 20
    assert ppo["optimizer_steps"] == ppo["planned_optimizer_steps"]
    evaluation = metrics(out / "eval")
    assert evaluation["win_rate"] > 0.8 and evaluation["policy_gold"] >= 0.8
    pairs = [json.loads(line) for line in (out / "reward" / "eval_pairs.jsonl").read_text().splitlines()]
    assert evaluation["reward_accuracy"] == pytest.approx(sum(p["margin"] > 0 for p in pairs) / len(pairs))
    assert reward["eval_scoring_agrees"] is True
    for name in ("ppo/ppo_curves.png", "eval/eval.md", "eval/eval_gold_vs_sqrt_kl.png", "pipeline.json"):
        assert (out / name).is_file(), name
