"""PNG plots of runs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from rlhf_pipeline import runs


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, png_path: Path) -> Path:
    """Lay out, write and close a figure."""
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    pyplot().close(figure)
    return png_path


def plot_ppo_curves(log_path: Path, png_path: Path) -> Path | None:
    """Score (and gold), KL, and response length / EOS rate per update, from a PPO log.jsonl."""
    rows = runs.read_jsonl(Path(log_path))
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
    return save(figure, png_path)


def plot_dpo_curves(log_history: list[dict], png_path: Path) -> Path | None:
    """DPO loss, and the implicit reward's accuracy and margin on the training pairs, per step (a Trainer's
    log_history); held-out evaluations, when there were any during or after training, as points."""
    train = [r for r in log_history if "loss" in r and "rewards/accuracies" in r]
    held_out = [r for r in log_history if "eval_loss" in r and "eval_rewards/accuracies" in r]
    if not train and not held_out:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for axis, key, title in ((axes[0], "loss", "DPO loss"),
                             (axes[1], "rewards/accuracies", "reward accuracy (chosen > rejected)"),
                             (axes[2], "rewards/margins", "reward margin (chosen - rejected)")):
        axis.plot([r["step"] for r in train], [r[key] for r in train], label="train")
        if held_out:
            axis.plot([r["step"] for r in held_out], [r[f"eval_{key}"] for r in held_out], "o", color="tab:orange",
                      label="held-out")
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(loc="best")
    axes[1].set_ylim(-0.05, 1.05)
    return save(figure, png_path)


def shared_bins(values: list[float], count: int = 30) -> list[float]:
    """Equal-width histogram bins spanning `values`, so that several histograms drawn over them compare."""
    low, high = min(values), max(values)
    if high == low:
        high = low + 1.0
    return [low + (high - low) * i / count for i in range(count + 1)]


def plot_reward_scores(chosen: list[float], rejected: list[float], png_path: Path) -> Path | None:
    """A reward model on its held-out pairs: the score distributions of chosen and rejected responses (over the same
    bins), and the distribution of the margin (chosen - rejected; right of 0 is a correctly ranked pair)."""
    if not chosen:
        return None
    plt = pyplot()
    margins = [c - r for c, r in zip(chosen, rejected)]
    accuracy = sum(m > 0 for m in margins) / len(margins)
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    bins = shared_bins(chosen + rejected)
    axes[0].hist(chosen, bins=bins, alpha=0.6, label="chosen")
    axes[0].hist(rejected, bins=bins, alpha=0.6, label="rejected")
    axes[0].set_title("Held-out pairs: chosen vs rejected scores")
    axes[0].set_xlabel("reward-model score")
    axes[0].legend(loc="best")
    axes[1].hist(margins, bins=shared_bins(margins), color="tab:green", alpha=0.8)
    axes[1].axvline(0.0, color="black", linewidth=1)
    axes[1].set_title(f"margin chosen - rejected (accuracy {accuracy:.3f}, {len(margins)} pairs)")
    axes[1].set_xlabel("score margin")
    axes[0].set_ylabel("responses")
    axes[1].set_ylabel("pairs")
    for axis in axes:
        axis.grid(alpha=0.3)
    return save(figure, png_path)
