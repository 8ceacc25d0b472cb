"""`rlhf eval`: a reward model on held-out pairs, a policy against a baseline, the report and plots."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST_TRAINING, run_cli, stage_recipe, write_recipe

from rlhf_pipeline.stages.evaluation import distinct_n, win_rate

PNG = b"\x89PNG\r\n\x1a\n"


def eval_recipe(output_dir, policy, baseline, reward_dir, data_dir, **extra):
    recipe = {
        "stage": "eval", "seed": 0, "output_dir": str(output_dir),
        "policy": {"name_or_path": str(policy)}, "baseline": {"name_or_path": str(baseline)},
        "reward": {"model": str(reward_dir)},
        "gold": {"function": "rlhf_pipeline.tiny.annotator:gold_score"},
        "data": {"files": {"train": str(data_dir / "prompts.jsonl"), "test": str(data_dir / "prompts-test.jsonl")},
                 "eval_split": "test"},
        "preferences": {"files": {"train": str(data_dir / "prefs.jsonl"), "test": str(data_dir / "prefs-test.jsonl")},
                        "eval_split": "test"},
        "generation": {"response_length": 8}, "num_prompts": 12, "batch_size": 5, "num_samples": 3,
    }
    recipe.update(extra)
    return recipe


def test_win_rate_and_distinct_n_by_hand():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert distinct_n(["a b a", "a b"], 1) == pytest.approx(2 / 5)  # {a, b} over 5 words
    assert distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["", "x"], 2) == 0.0


def test_win_rate_interval_and_report_precision_by_hand():
    """A win rate with ties as half a win and its 95 % Wilson interval, worked by hand; the report's numbers at the
    precision they carry."""
    from rlhf_pipeline.stages.evaluation import comparison_table, seconds, share, significant, win_rate_figures

    # 8 prompts: 5 wins, 1 tie, 2 losses: p = 5.5 / 8 = 0.6875. z = 1.959964, z^2 / n = 0.480182:
    # centre = (p + z^2 / 2n) / (1 + z^2 / n) = (0.6875 + 0.240091) / 1.480182 = 0.626674
    # half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / 1.480182 = 1.959964 * sqrt(0.026855 + 0.015006) / 1.480182 = 0.270918
    figures = win_rate_figures("win_rate", [1, 1, 1, 1, 1, 0, 0, 0.5], [0, 0, 0, 0, 0, 1, 1, 0.5])
    assert figures == pytest.approx({"win_rate": 0.6875, "win_rate_low": 0.355755, "win_rate_high": 0.897592},
                                    abs=1e-6)
    assert win_rate_figures("r", [2.0] * 12, [2.0] * 12) == pytest.approx({"r": 0.5, "r_low": 0.253782,
                                                                          "r_high": 0.746218}, abs=1e-6)

    assert [significant(v) for v in (0.95123, 41.6, -0.0012345, 0.9996, 1234.5, 0.0, 3)] == \
        ["0.951", "41.6", "-0.00123", "1.00", "1234", "0", "3"]
    assert significant(-2.3e-7) == "-2.30e-07" and share(0.96125) == "0.961" and seconds(41.6) == "41.6 s"
    assert seconds(271.34) == "271 s"
    results = {"num_prompts": 8, "baseline_score": 0.12345, "policy_score": 0.45678, "baseline_kl": 0.0,
               "policy_kl": 4.2137, "policy_train_seconds": 41.6, "policy_episodes_per_second": 110.37,
               "baseline_eos_rate": 0.5, "policy_eos_rate": 0.875, **{f"policy_{k}": v for k, v in figures.items()}}
    table = "\n".join(comparison_table(results, ["policy"]))
    for row in ("| reward-model score (mean) | 0.123 | 0.457 |", "| KL to the reference (nats) | 0 | 4.21 |",
                "| win rate (reward model, 95% interval) | - | 0.688 [0.356, 0.898] |", "| EOS rate | 0.500 | 0.875 |",
                "| sqrt(KL) | 0 | 2.05 |", "| training time | - | 41.6 s |", "| episodes / s (training) | - | 110 |"):
        assert row in table, (row, table)


def test_policy_against_itself(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir):
    """The same model as policy and baseline, sampled with the same seeds: every comparison is a tie."""
    out = tmp_path / "eval"
    path = write_recipe(tmp_path / "eval.yaml", eval_recipe(out, tiny_model_dir, tiny_model_dir, tiny_reward_dir,
                                                            data_dir))
    result = run_cli("eval", path)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    metrics = report["metrics"]
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert metrics["num_prompts"] == 12
    assert metrics["win_rate"] == 0.5 and metrics["gold_win_rate"] == 0.5
    # 12 ties: 0.5 with its 95% Wilson interval over 12 prompts (worked by hand in the test above)
    assert (metrics["win_rate_low"], metrics["win_rate_high"]) == (pytest.approx(0.253782, abs=1e-6),
                                                                 pytest.approx(0.746218, abs=1e-6))
    assert metrics["policy_gold_win_rate_high"] == metrics["gold_win_rate_high"] == metrics["win_rate_high"]
    assert metrics["reward_accuracy_low"] < metrics["reward_accuracy"] < metrics["reward_accuracy_high"]
    assert metrics["policy_score"] == pytest.approx(metrics["baseline_score"])
    assert metrics["policy_kl"] == pytest.approx(0.0, abs=1e-5)  # computed: the policy is not the reference object
    assert 0 < metrics["policy_response_length"] <= 8 and 0 <= metrics["policy_distinct_2"] <= 1
    assert 0 <= metrics["reward_accuracy"] <= 1
    assert metrics["reward_num_pairs"] + metrics["reward_pairs_too_long"] == 16 and metrics["reward_num_pairs"] > 0
    assert len(report["samples"]) == 3 and report["samples"][0]["policy"] == report["samples"][0]["baseline"]
    for name in ("eval_score_distributions.png", "eval_gold_vs_sqrt_kl.png", "eval_reward_scores.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in (out / "eval.md").read_text()
    markdown = (out / "eval.md").read_text()
    assert "| reward-model score (mean) |" in markdown and "## Side by side" in markdown
    assert "| win rate (reward model, 95% interval) | - | 0.500 [0.254, 0.746] |" in markdown
    assert "judged by the reward model: **0.500** (95% Wilson interval 0.254-0.746 over 12 prompts" in markdown
    assert f"pairs, {metrics['reward_ties']} ties, counted as wrong)" in markdown


def test_kl_to_an_explicit_reference(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir):
    """With `reference` set, the baseline's KL is computed too: the policy and the baseline are the same model,
    sampled with the same seeds, so both KLs are the same, and not 0 (the reference is another model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other"
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    out = tmp_path / "eval"
    recipe = eval_recipe(out, tiny_model_dir, tiny_model_dir, tiny_reward_dir, data_dir,
                         reference={"name_or_path": str(other)})
    del recipe["preferences"]
    result = run_cli("eval", write_recipe(tmp_path / "eval.yaml", recipe))
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["baseline_kl"] == pytest.approx(metrics["policy_kl"], abs=1e-5)
    assert metrics["baseline_kl"] > 0.5


def test_reward_model_accuracy_matches_the_reward_stage(tmp_path, tiny_model_dir, data_dir):
    """Scoring held-out pairs in `rlhf eval` gives the accuracy and margin the reward stage reported."""
    reward_out = tmp_path / "reward"
    recipe = stage_recipe("reward", reward_out, tiny_model_dir,
                          {"files": {"train": str(data_dir / "prefs.jsonl"),
                                     "test": str(data_dir / "prefs-test.jsonl")}, "eval_split": "test"},
                          training=dict(FAST_TRAINING))
    assert run_cli("reward", write_recipe(tmp_path / "reward.yaml", recipe)).exit_code == 0
    trained = json.loads((reward_out / "metrics.json").read_text())
    only_reward = eval_recipe(tmp_path / "eval", tiny_model_dir, tiny_model_dir, reward_out, data_dir)
    for key in ("policy", "baseline", "data", "gold"):
        del only_reward[key]
    result = run_cli("eval", write_recipe(tmp_path / "eval.yaml", only_reward))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "policy_score" not in metrics
    # the same pairs fit (the tiny model reads 64 tokens) and get the same scores
    assert metrics["reward_num_pairs"] == trained["eval_num_pairs"] > 0
    assert metrics["reward_pairs_too_long"] == trained["eval_pairs_too_long"]
    pairs = [json.loads(line) for line in (reward_out / "eval_pairs.jsonl").read_text().splitlines()]
    assert metrics["reward_accuracy"] == pytest.approx(sum(p["margin"] > 0 for p in pairs) / len(pairs))
    assert metrics["reward_margin"] == pytest.approx(sum(p["margin"] for p in pairs) / len(pairs), abs=1e-5)


@pytest.mark.parametrize("drop, message", [
    (("policy", "baseline", "data", "preferences"), "nothing to evaluate"),
    (("baseline",), "a policy evaluation needs baseline"),
])
def test_bad_eval_recipes(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir, drop, message):
    recipe = eval_recipe(tmp_path / "eval", tiny_model_dir, tiny_model_dir, tiny_reward_dir, data_dir)
    for key in drop:
        del recipe[key]
    if "preferences" not in drop:
        del recipe["preferences"]
    result = run_cli("eval", write_recipe(tmp_path / "eval.yaml", recipe))
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "eval").exists()


def test_gold_peak_of_a_training_trajectory_by_hand(tmp_path):
    """Moving means over 5 updates, the peak of gold, the KL there, and gold at the end."""
    from rlhf_pipeline.stages.evaluation import gold_peak, smoothed

    gold = [0.1, 0.2, 0.3, 0.6, 0.8, 0.5, 0.2, 0.0, 0.0, 0.0]
    kl = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    rows = [{"objective/gold": g, "objective/kl": k, "train/update": i + 1} for i, (g, k) in enumerate(zip(gold, kl))]
    assert smoothed(rows, "objective/kl")[:3] == [0.0, 0.5, 1.0]  # the first means cover fewer updates
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    peak = gold_peak(tmp_path)
    # means ending at update 5: (.1+.2+.3+.6+.8)/5 = .40; at 6: (.2+.3+.6+.8+.5)/5 = .48, the peak (at 7 also .48:
    # the first is kept); the KL there: (1+2+3+4+5)/5 = 3; at the end, updates 6-10: (.5+.2+0+0+0)/5 = .14
    assert peak["train_gold_peak"] == pytest.approx(0.48)
    assert peak["train_gold_peak_kl"] == pytest.approx(3.0)
    assert peak["train_gold_end"] == pytest.approx(0.14)
    assert gold_peak(tmp_path / "missing") == {}
