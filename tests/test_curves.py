"""The curves every stage draws from its log.jsonl: which panels, on which axes, with which points (no training)."""

from __future__ import annotations

import json

import pytest

from rlhf_pipeline import plots

GAE_UPDATE = {"objective/score": 0.2, "objective/gold": 0.6, "objective/kl": 0.5, "objective/kl_k3": 0.4,
              "objective/kl_coef": 0.05, "loss/policy": -0.01, "loss/value": 0.3, "loss/total": 0.14,
              "policy/clipfrac": 0.1, "value/clipfrac": 0.2, "policy/approx_kl": 0.002, "policy/entropy": 2.5,
              "value/explained_variance": 0.4, "policy/grad_norm": 1.5, "train/learning_rate": 1e-5,
              "rollout/response_length": 12.0, "rollout/eos_rate": 0.9, "time/update": 1.0}


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plots module would save, kept open for inspection (nothing is written)."""
    figures = []

    def keep(figure, png_path):
        figures.append(figure)
        return png_path

    monkeypatch.setattr(plots, "save", keep)
    yield figures
    for figure in figures:
        plots.pyplot().close(figure)


def panels(figure) -> dict[str, list]:
    """Each visible axes' title and its lines' (x, y) data."""
    return {axis.get_title(): [(list(line.get_xdata()), list(line.get_ydata())) for line in axis.get_lines()]
            for axis in figure.axes if axis.get_visible()}


def write_log(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_ppo_curves_cover_the_optimisation_with_score_and_gold_apart(tmp_path, drawn):
    rows = [{**GAE_UPDATE, "train/update": u, "objective/score": 0.1 * u, "objective/gold": 0.5 + 0.1 * u}
            for u in (1, 2, 3)]
    plots.plot_ppo_curves(write_log(tmp_path / "log.jsonl", rows), tmp_path / "ppo_curves.png")
    shown = panels(drawn[0])
    assert list(shown) == ["reward-model score", "gold score", "KL to the reference (nats / response)",
                           "KL coefficient (beta)", "policy loss", "value loss", "total loss", "clip fraction",
                           "approx. KL of one update (old -> new)", "entropy (nats / token)",
                           "explained variance of the value", "gradient norm (before clipping)", "learning rate",
                           "response length (tokens)", "EOS rate"]
    assert len([a for a in drawn[0].axes if a.get_visible()]) == len(shown)  # no twin axes: one y-axis per panel
    assert shown["reward-model score"] == [([1, 2, 3], pytest.approx([0.1, 0.2, 0.3]))]
    assert shown["gold score"] == [([1, 2, 3], pytest.approx([0.6, 0.7, 0.8]))]
    assert len(shown["clip fraction"]) == 2 and len(shown["KL to the reference (nats / response)"]) == 2

    # GRPO: no critic (no value panels), the KL term in the loss, groups of equal scores
    grpo = [{k: v for k, v in row.items() if not k.startswith("value") and k != "loss/value"}
            | {"loss/kl": 0.01, "objective/frac_zero_std_groups": 0.25} for row in rows]
    plots.plot_ppo_curves(write_log(tmp_path / "grpo.jsonl", grpo), tmp_path / "grpo.png")
    shown = panels(drawn[1])
    assert "value loss" not in shown and "explained variance of the value" not in shown
    assert len(shown["total loss"]) == 2 and len(shown["clip fraction"]) == 1
    assert "groups whose scores are all equal" in shown
    assert plots.plot_ppo_curves(write_log(tmp_path / "empty.jsonl", []), tmp_path / "x.png") is None


def test_trainer_curves_draw_the_stage_figures_and_held_out_points(tmp_path, drawn):
    rows = [{"step": s, "epoch": s / 4, "loss": 1.0 / s, "grad_norm": 2.0, "learning_rate": 1e-4, "num_tokens": 100 * s,
             "accuracy": 0.5 + 0.1 * s, "margin": 0.1 * s, "mean_reward": 0.0, "min_reward": -1.0, "max_reward": 1.0}
            for s in (1, 2, 3, 4)]
    rows.append({"step": 4, "epoch": 1.0, "eval_loss": 0.3, "eval_accuracy": 0.75, "eval_runtime": 0.1})
    plots.plot_training_curves(write_log(tmp_path / "log.jsonl", rows), tmp_path / "reward_curves.png", "reward")
    shown = panels(drawn[0])
    assert list(shown) == ["loss", "pairwise accuracy (chosen > rejected)", "score margin (chosen - rejected)",
                           "reward-model scores", "gradient norm (before clipping)", "learning rate"]
    train, held_out = shown["loss"]
    assert train == ([1, 2, 3, 4], pytest.approx([1.0, 0.5, 1 / 3, 0.25])) and held_out == ([4], [0.3])
    assert shown["pairwise accuracy (chosen > rejected)"][1] == ([4], [0.75])
    assert len(shown["score margin (chosen - rejected)"]) == 1  # no held-out margin logged: no points
    assert len(shown["reward-model scores"]) == 3
    assert drawn[0].texts[0].get_text().startswith("reward: training curves")  # the suptitle names the stage
