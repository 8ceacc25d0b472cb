"""PNG plots of runs (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppo_curves(log_path: Path, png_path: Path) -> Path | None:
    """Score (and gold), KL, and response length / EOS rate per update, from a PPO log.jsonl."""
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()] \
        if Path(log_path).exists() else []
    if not rows:
        return None
    plt = pyplot()
    updates = [r["train/update"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(updates, [r["objective/score"] for r in rows], label="reward score")
    if "objective/gold" in rows[0]:
        gold_axis = axes[0].twinx()
        gold_axis.plot(updates, [r["objective/gold"] for r in rows], color="tab:orange", label="gold")
        gold_axis.set_ylabel("gold score")
        axes[0].legend(handles=axes[0].get_lines() + gold_axis.get_lines(), loc="lower right")
    axes[0].set_title("score per update")
    axes[0].set_ylabel("reward score")
    axes[1].plot(updates, [r["objective/kl"] for r in rows], color="tab:red")
    axes[1].set_title("KL to the reference (nats per response)")
    axes[2].plot(updates, [r["rollout/response_length"] for r in rows], color="tab:green", label="length")
    eos_axis = axes[2].twinx()
    eos_axis.plot(updates, [r["rollout/eos_rate"] for r in rows], color="tab:purple", label="EOS rate")
    eos_axis.set_ylim(0, 1.05)
    axes[2].set_title("response length and EOS rate")
    axes[2].legend(handles=axes[2].get_lines() + eos_axis.get_lines(), loc="lower right")
    for axis in axes:
        axis.set_xlabel("update")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
    return png_path
