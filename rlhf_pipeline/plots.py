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


# A panel: its title and the series drawn in it, as (log key, legend label).
Panel = tuple[str, tuple[tuple[str, str], ...]]

# PPO, RLOO, GRPO: what log.jsonl holds per update (docs/ppo.md defines every key). A panel whose keys were not
# logged (the value panels of a critic-free estimator, gold without a gold scorer) is left out.
PPO_PANELS: tuple[Panel, ...] = (
    ("reward-model score", (("objective/score", "score"),)),
    ("gold score", (("objective/gold", "gold"),)),
    ("KL to the reference (nats / response)", (("objective/kl", "k1"), ("objective/kl_k3", "k3"))),
    ("KL coefficient (beta)", (("objective/kl_coef", "beta"),)),
    ("policy loss", (("loss/policy", "policy"),)),
    ("value loss", (("loss/value", "value"),)),
    ("total loss", (("loss/total", "total"), ("loss/kl", "KL term"), ("loss/entropy", "entropy term"))),
    ("clip fraction", (("policy/clipfrac", "policy"), ("value/clipfrac", "value"))),
    ("approx. KL of one update (old -> new)", (("policy/approx_kl", "approx_kl"),)),
    ("entropy (nats / token)", (("policy/entropy", "entropy"),)),
    ("explained variance of the value", (("value/explained_variance", "explained variance"),)),
    ("gradient norm (before clipping)", (("policy/grad_norm", "grad norm"),)),
    ("learning rate", (("train/learning_rate", "learning rate"),)),
    ("response length (tokens)", (("rollout/response_length", "length"),)),
    ("EOS rate", (("rollout/eos_rate", "EOS rate"),)),
    ("groups whose scores are all equal", (("objective/frac_zero_std_groups", "share"),)),
)
# The Trainer stages (pretrain, SFT, reward, DPO): what their log.jsonl holds per logging step, under the Trainer's
# and TRL's names; held-out evaluations (`eval_<key>`) are drawn as points on their training key's panel.
TRAINER_PANELS: tuple[Panel, ...] = (
    ("loss", (("loss", "loss"),)),
    ("pairwise accuracy (chosen > rejected)", (("accuracy", "accuracy"),)),
    ("score margin (chosen - rejected)", (("margin", "margin"),)),
    ("reward-model scores", (("mean_reward", "mean"), ("min_reward", "min"), ("max_reward", "max"))),
    ("implicit-reward accuracy", (("rewards/accuracies", "accuracy"),)),
    ("implicit-reward margin (chosen - rejected)", (("rewards/margins", "margin"),)),
    ("implicit rewards", (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"))),
    ("log-probability of the responses", (("logps/chosen", "chosen"), ("logps/rejected", "rejected"))),
    ("token accuracy", (("mean_token_accuracy", "token accuracy"),)),
    ("entropy (nats / token)", (("entropy", "entropy"),)),
    ("gradient norm (before clipping)", (("grad_norm", "grad norm"),)),
    ("learning rate", (("learning_rate", "learning rate"),)),
)
# The panels of a share, drawn over [0, 1].
SHARE_PANELS = {"clip fraction", "EOS rate", "groups whose scores are all equal",
                "pairwise accuracy (chosen > rejected)", "implicit-reward accuracy", "token accuracy"}


def plot_ppo_curves(log_path: Path, png_path: Path) -> Path | None:
    """A PPO-family log.jsonl drawn per update: score and gold (each on its own axes), KL and its coefficient, the
    losses, clip fractions, approx_kl, entropy, explained variance, grad norm, learning rate, response length and
    EOS rate. None when the log has no rows."""
    rows = [r for r in runs.read_jsonl(Path(log_path)) if "train/update" in r]
    return draw_panels(rows, "train/update", "update", PPO_PANELS, "PPO training curves, per update", png_path)


def plot_training_curves(log_path: Path, png_path: Path, stage: str) -> Path | None:
    """A Trainer stage's log.jsonl (pretrain, SFT, reward, DPO) drawn per optimizer step: the loss, the stage's own
    metrics, grad norm and learning rate; held-out evaluations as points. None when the log has no rows."""
    rows = [r for r in runs.read_jsonl(Path(log_path)) if "step" in r]
    return draw_panels(rows, "step", "step", TRAINER_PANELS, f"{stage}: training curves, per step "
                       "(held-out evaluations as points)", png_path, held_out_prefix="eval_")


def draw_panels(rows: list[dict], x_key: str, x_label: str, panels: tuple[Panel, ...], title: str, png_path: Path,
                held_out_prefix: str | None = None) -> Path | None:
    """One small plot per panel whose keys the rows hold, four to a line. With `held_out_prefix`, the rows'
    `<prefix><key>` values are drawn as points in the colour of `key`'s line."""
    import math

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(r[x_key], r[key]) for r in rows if isinstance(r.get(key), (int, float))
                  and math.isfinite(r[key])]
        return [x for x, _ in points], [y for _, y in points]

    shown = []
    for panel_title, keys in panels:
        drawn = [(label, series(key), series(f"{held_out_prefix}{key}") if held_out_prefix else ([], []))
                 for key, label in keys]
        drawn = [entry for entry in drawn if entry[1][0] or entry[2][0]]
        if drawn:
            shown.append((panel_title, drawn))
    if not shown:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    columns = min(4, len(shown))
    lines = -(-len(shown) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.9 * columns, 2.7 * lines + 0.4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    first, last = min(r[x_key] for r in rows), max(r[x_key] for r in rows)
    margin = 0.03 * (last - first) or 0.5  # every panel over the whole run, so that they read side by side
    for axis, (panel_title, drawn) in zip(axes.flat, shown):
        for index, (label, (xs, ys), (held_x, held_y)) in enumerate(drawn):
            colour = colours[index % len(colours)]
            several = len(drawn) > 1
            if xs:
                axis.plot(xs, ys, color=colour, lw=1.3, marker="o" if len(xs) <= 25 else None, ms=2.5,
                          label=label if several else "train" if held_x else None)
            if held_x:
                axis.plot(held_x, held_y, "D", color=colour, ms=5, markeredgecolor="black", markeredgewidth=0.6,
                          label=f"{label} (held-out)" if several else "held-out")
        if panel_title in SHARE_PANELS:
            axis.set_ylim(-0.05, 1.05)
        axis.set_title(panel_title, fontsize=9)
        axis.set_xlabel(x_label, fontsize=8)
        axis.set_xlim(first - margin, last + margin)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and updates are whole
        axis.tick_params(labelsize=7)
        axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        axis.yaxis.get_offset_text().set_fontsize(7)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="best")
    for axis in list(axes.flat)[len(shown):]:
        axis.set_visible(False)
    figure.suptitle(title, fontsize=10)
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
