"""`rlhf eval`: an honest look at what the pipeline produced.

- A reward model on held-out preference pairs: pairwise accuracy (a tie counts as wrong), margin, score distributions.
- A policy against a baseline on held-out prompts, one sample each with the same sampling settings and seeds:
  reward-model score, win rate judged by the reward model (a tie counts half), KL to the reference, response length,
  EOS rate, distinct-n diversity, and the gold score when a gold scorer is configured; side-by-side samples.

Writes eval.json, eval.md (a Markdown report) and PNG plots, then metrics.json (last, as every stage).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rlhf_pipeline import data as data_io
from rlhf_pipeline import models, runs
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.recipe.load import LoadedRecipe
from rlhf_pipeline.stages.common import RunOptions, begin, context_length, finish_outputs, say, start_outputs

EVAL_FILE = "eval.json"
REPORT_FILE = "eval.md"
SCORES_PNG = "eval_score_distributions.png"
OVEROPTIMISATION_PNG = "eval_gold_vs_sqrt_kl.png"
CURVES_PNG = "eval_ppo_curves.png"
REWARD_PNG = "eval_reward_scores.png"


def run(loaded: LoadedRecipe, options: RunOptions) -> dict[str, Any]:
    import torch

    recipe = loaded.recipe
    begin(loaded)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, Any] = {}
    plots: dict[str, str] = {}
    samples: list[dict] = []
    reward_scores = None

    # 1. data and models, checked before anything is written
    policy_setup = _policy_setup(loaded, device) if recipe.policy is not None else None
    reward_setup = _reward_setup(loaded, device) if recipe.preferences is not None else None
    start_outputs(loaded, options)
    output_dir = Path(recipe.output_dir)

    # 2. the policy against the baseline
    if policy_setup is not None:
        policy_results, samples, policy_scores = evaluate_policy(loaded, *policy_setup)
        results.update(policy_results)
        plots[SCORES_PNG] = _plot_score_distributions(policy_scores, output_dir / SCORES_PNG)
        log_path = _ppo_log(recipe)
        if log_path is not None:
            from rlhf_pipeline.plots import plot_ppo_curves

            if plot_ppo_curves(log_path, output_dir / CURVES_PNG):
                plots[CURVES_PNG] = "PPO: score, gold and KL per update"
        plots[OVEROPTIMISATION_PNG] = _plot_overoptimisation(log_path, results, output_dir / OVEROPTIMISATION_PNG)

    # 3. the reward model on held-out pairs
    if reward_setup is not None:
        reward_results, reward_scores = evaluate_reward_model(*reward_setup)
        results.update(reward_results)
        plots[REWARD_PNG] = _plot_reward_scores(reward_scores, output_dir / REWARD_PNG)

    # 4. report
    report = {"metrics": results, "samples": samples, "plots": plots}
    runs.atomic_write_text(output_dir / EVAL_FILE, json.dumps(report, indent=1))
    runs.atomic_write_text(output_dir / REPORT_FILE, markdown_report(loaded, results, samples, plots))
    say("eval", summary_line(results))
    return finish_outputs(loaded, options, results)


# -------------------------------------------------------------------------------------------------------------
# set-up
# -------------------------------------------------------------------------------------------------------------
def _policy_setup(loaded: LoadedRecipe, device):
    from rlhf_pipeline.stages.ppo import build_scorer, load_prompts

    recipe = loaded.recipe
    tokenizer = models.load_tokenizer(loaded, recipe.tokenizer, recipe.policy, model_key="policy.name_or_path")

    def causal_lm(section, key):
        model = models.load_pretrained(loaded, section, key=f"{key}.name_or_path").to(device).eval()
        models.align_special_tokens(model, tokenizer)
        return model

    policy = causal_lm(recipe.policy, "policy")
    baseline = causal_lm(recipe.baseline, "baseline")
    context = min(context_length(policy, cap=None), context_length(baseline, cap=None))
    _, prompts = load_prompts(loaded, tokenizer, context, eval_limit=recipe.num_prompts)
    if recipe.reference.name_or_path:
        reference = causal_lm(models.section_for(recipe.policy, recipe.reference.name_or_path, recipe.reference),
                              "reference")
    else:
        reference = baseline
    scorer = build_scorer(loaded, recipe.reward, "reward", device)
    gold = build_scorer(loaded, recipe.gold, "gold", device) if recipe.gold else None
    return tokenizer, prompts, policy, baseline, reference, scorer, gold, device


def _reward_setup(loaded: LoadedRecipe, device):
    from rlhf_pipeline.stages.ppo import load_reward_model

    recipe = loaded.recipe
    reward_model = load_reward_model(loaded, recipe.reward, "reward", device, recipe.batch_size)
    _, pairs = data_io.load_splits(loaded, "preferences")
    pairs = data_io.select_columns(loaded, pairs, "held-out", ["chosen", "rejected"], ["prompt"], key="preferences")
    return reward_model, pairs


# -------------------------------------------------------------------------------------------------------------
# the policy against the baseline
# -------------------------------------------------------------------------------------------------------------
def evaluate_policy(loaded: LoadedRecipe, tokenizer, prompts, policy, baseline, reference, scorer, gold, device):
    from tqdm.auto import tqdm

    from rlhf_pipeline.ppo.modules import sample_rollout, seeded, sequence_logprobs
    from rlhf_pipeline.ppo.trainer import score

    recipe = loaded.recipe
    generation, size = recipe.generation, recipe.batch_size
    collected: dict[str, dict[str, list]] = {name: {"score": [], "gold": [], "kl": [], "length": [], "eos": [],
                                                    "texts": []} for name in ("policy", "baseline")}
    prompt_texts: list[str] = []
    for begin_at in tqdm(range(0, len(prompts), size), desc="Sampling policy and baseline", leave=False):
        batch = prompts.select(list(range(begin_at, min(begin_at + size, len(prompts)))))
        prompt_texts.extend(batch.texts)
        for name, model in (("policy", policy), ("baseline", baseline)):
            with seeded(recipe.seed + begin_at, device):  # the same sampling noise for both models
                rollout = sample_rollout(model, tokenizer, batch, generation, device)
            out = collected[name]
            where = f"{name} responses to held-out prompts {begin_at}-{begin_at + len(batch) - 1}"
            out["score"].extend(score(scorer, rollout, where).tolist())
            if gold is not None:
                out["gold"].extend(score(gold, rollout, where).tolist())
            if reference is model:  # the baseline is its own reference
                out["kl"].extend([0.0] * len(batch))
            else:
                kl = (sequence_logprobs(model, rollout, generation.temperature)
                      - sequence_logprobs(reference, rollout, generation.temperature))
                out["kl"].extend(kl.tolist())
            out["length"].extend(rollout.response_mask.sum(1).tolist())
            out["eos"].extend(rollout.finished.float().tolist())
            out["texts"].extend(rollout.responses)

    results: dict[str, Any] = {"num_prompts": len(prompt_texts)}
    for name, out in collected.items():
        results[f"{name}_score"] = _mean(out["score"])
        results[f"{name}_score_std"] = _std(out["score"])
        results[f"{name}_kl"] = _mean(out["kl"])
        results[f"{name}_response_length"] = _mean(out["length"])
        results[f"{name}_eos_rate"] = _mean(out["eos"])
        results[f"{name}_distinct_1"] = distinct_n(out["texts"], 1)
        results[f"{name}_distinct_2"] = distinct_n(out["texts"], 2)
        if gold is not None:
            results[f"{name}_gold"] = _mean(out["gold"])
    results["win_rate"] = win_rate(collected["policy"]["score"], collected["baseline"]["score"])
    if gold is not None:
        results["gold_win_rate"] = win_rate(collected["policy"]["gold"], collected["baseline"]["gold"])

    samples = []
    for i in range(min(recipe.num_samples, len(prompt_texts))):
        row = {"prompt": prompt_texts[i], "baseline": collected["baseline"]["texts"][i],
               "policy": collected["policy"]["texts"][i], "baseline_score": collected["baseline"]["score"][i],
               "policy_score": collected["policy"]["score"][i]}
        if gold is not None:
            row.update(baseline_gold=collected["baseline"]["gold"][i], policy_gold=collected["policy"]["gold"][i])
        samples.append(row)
    scores = {name: out["score"] for name, out in collected.items()}
    if gold is not None:
        scores.update({f"{name}_gold": out["gold"] for name, out in collected.items()})
    return results, samples, scores


def win_rate(candidate: list[float], baseline: list[float]) -> float:
    """Share of prompts where the candidate scores higher; a tie counts half."""
    wins = sum(1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline))
    return wins / len(candidate) if candidate else float("nan")


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams over all n-grams of the responses (whitespace words): 1 is all different, near 0 is repetitive."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# -------------------------------------------------------------------------------------------------------------
# the reward model
# -------------------------------------------------------------------------------------------------------------
def evaluate_reward_model(reward_model, pairs):
    """Score every held-out pair as the reward stage trained on it (the sequences RewardTrainer builds)."""
    from rlhf_pipeline.scoring import preference_metrics, score_sequences

    prompts = pairs["prompt"] if "prompt" in pairs.column_names else [None] * len(pairs)
    encoded = list(zip(reward_model.input_ids(prompts, pairs["chosen"]), reward_model.input_ids(prompts,
                                                                                                  pairs["rejected"])))
    context = reward_model.context
    kept = [(c, r) for c, r in encoded if max(len(c), len(r)) <= context]  # longer ones cannot be read whole
    if not kept:
        raise UserError(f"no held-out pair fits in the reward model's context of {context} tokens")
    model, pad, size = reward_model.model, reward_model.tokenizer.pad_token_id, reward_model.batch_size
    chosen_scores = score_sequences(model, [c for c, _ in kept], pad, size, desc="Scoring chosen")
    rejected_scores = score_sequences(model, [r for _, r in kept], pad, size, desc="Scoring rejected")
    metrics = {f"reward_{k}": v for k, v in preference_metrics(chosen_scores, rejected_scores).items()}
    metrics["reward_pairs_too_long"] = len(encoded) - len(kept)
    return metrics, {"chosen": chosen_scores.tolist(), "rejected": rejected_scores.tolist()}


# -------------------------------------------------------------------------------------------------------------
# plots
# -------------------------------------------------------------------------------------------------------------
def _ppo_log(recipe) -> Path | None:
    candidates = [recipe.ppo_run] if recipe.ppo_run else []
    if recipe.policy is not None and recipe.policy.name_or_path:
        candidates.append(recipe.policy.name_or_path)
    for candidate in candidates:
        path = Path(candidate) / "log.jsonl"
        if path.is_file():
            return path
    return None


def _plot_score_distributions(scores: dict[str, list[float]], path: Path) -> str:
    from rlhf_pipeline.plots import pyplot

    plt = pyplot()
    panels = [("score", "reward-model score")] + ([("gold", "gold score")] if "policy_gold" in scores else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    for axis, (kind, label) in zip(axes[0], panels):
        suffix = "" if kind == "score" else "_gold"
        values = scores[f"baseline{suffix}"] + scores[f"policy{suffix}"]
        bins = _bins(values)
        axis.hist(scores[f"baseline{suffix}"], bins=bins, alpha=0.6, label="baseline")
        axis.hist(scores[f"policy{suffix}"], bins=bins, alpha=0.6, label="policy")
        axis.set_xlabel(label)
        axis.set_ylabel("responses")
        axis.legend()
        axis.set_title(f"{label}: baseline vs policy")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return "score distributions of baseline vs policy"


def _plot_overoptimisation(log_path: Path | None, results: dict[str, Any], path: Path) -> str:
    """Gold (and proxy reward) score against sqrt(KL): the over-optimisation view of Gao et al. 2022."""
    from rlhf_pipeline.plots import pyplot

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    gold_key = "objective/gold"
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path else []
    has_gold = "policy_gold" in results
    proxy_axis = axis.twinx() if has_gold else axis
    if rows:
        root_kl = [math.sqrt(max(r["objective/kl"], 0.0)) for r in rows]
        if has_gold and gold_key in rows[0]:
            axis.plot(root_kl, [r[gold_key] for r in rows], "o-", ms=3, color="tab:orange", label="gold (training)")
        proxy_axis.plot(root_kl, [r["objective/score"] for r in rows], "s-", ms=3, color="tab:blue", alpha=0.6,
                        label="reward model (training)")
    points = [("baseline", "o"), ("policy", "*")]
    for name, marker in points:
        x = math.sqrt(max(results[f"{name}_kl"], 0.0))
        if has_gold:
            axis.plot([x], [results[f"{name}_gold"]], marker, ms=12, color="tab:red", label=f"gold ({name}, eval)")
        proxy_axis.plot([x], [results[f"{name}_score"]], marker, ms=12, color="tab:green",
                        label=f"reward model ({name}, eval)")
    axis.set_xlabel("sqrt(KL to the reference)  (nats^0.5)")
    axis.set_ylabel("gold score" if has_gold else "reward-model score")
    if has_gold:
        proxy_axis.set_ylabel("reward-model score")
    handles = axis.get_lines() + (proxy_axis.get_lines() if proxy_axis is not axis else [])
    axis.legend(handles=handles, fontsize=7, loc="lower right")
    axis.set_title("Over-optimisation view (Gao et al. 2022)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return "gold and reward-model score against sqrt(KL)"


def _plot_reward_scores(scores: dict[str, list[float]], path: Path) -> str:
    from rlhf_pipeline.plots import pyplot

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    bins = _bins(scores["chosen"] + scores["rejected"])
    axis.hist(scores["chosen"], bins=bins, alpha=0.6, label="chosen")
    axis.hist(scores["rejected"], bins=bins, alpha=0.6, label="rejected")
    axis.set_xlabel("reward-model score")
    axis.set_ylabel("responses")
    axis.set_title("Held-out pairs: chosen vs rejected scores")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return "held-out chosen vs rejected score distributions"


def _bins(values: list[float], count: int = 30) -> list[float]:
    low, high = min(values), max(values)
    if high == low:
        high = low + 1.0
    return [low + (high - low) * i / count for i in range(count + 1)]


# -------------------------------------------------------------------------------------------------------------
# report
# -------------------------------------------------------------------------------------------------------------
def markdown_report(loaded: LoadedRecipe, results: dict[str, Any], samples: list[dict], plots: dict[str, str]) -> str:
    recipe = loaded.recipe
    lines = ["# Evaluation report", ""]
    if "policy_score" in results:
        lines += [f"Policy `{recipe.policy.name_or_path}` against baseline `{recipe.baseline.name_or_path}` on "
                  f"{results['num_prompts']} held-out prompts (one sample each, temperature "
                  f"{recipe.generation.temperature:g}, the same seeds for both).", "",
                  "| | baseline | policy |", "|---|---|---|"]
        rows = [("reward-model score (mean)", "score"), ("gold score (mean)", "gold"), ("KL to the reference", "kl"),
                ("response length (tokens)", "response_length"), ("EOS rate", "eos_rate"),
                ("distinct-1", "distinct_1"), ("distinct-2", "distinct_2")]
        for label, key in rows:
            if f"policy_{key}" in results:
                lines.append(f"| {label} | {_fmt(results[f'baseline_{key}'])} | {_fmt(results[f'policy_{key}'])} |")
        lines += ["", f"Win rate of the policy over the baseline, judged by the reward model: "
                      f"**{results['win_rate']:.3f}** (a tie counts half)."]
        if "gold_win_rate" in results:
            lines.append(f"Judged by the gold scorer: **{results['gold_win_rate']:.3f}**.")
        lines.append("")
    if "reward_accuracy" in results:
        lines += [f"Reward model `{recipe.reward.model}` on {results['reward_num_pairs']} held-out pairs: accuracy "
                  f"**{results['reward_accuracy']:.3f}** (a tie counts as wrong; {results['reward_ties']} ties), mean "
                  f"margin {results['reward_margin']:.3f} (chosen {results['reward_chosen_score_mean']:.3f}, rejected "
                  f"{results['reward_rejected_score_mean']:.3f}).", ""]
    for name, caption in plots.items():
        lines += [f"![{caption}]({name})", ""]
    if samples:
        gold = "policy_gold" in samples[0]
        lines += ["## Side by side", "", "| prompt | baseline | policy |", "|---|---|---|"]
        for row in samples:
            base = f"{_cell(row['baseline'])} ({row['baseline_score']:.2f}" + (
                f", gold {row['baseline_gold']:.2f})" if gold else ")")
            pol = f"{_cell(row['policy'])} ({row['policy_score']:.2f}" + (
                f", gold {row['policy_gold']:.2f})" if gold else ")")
            lines.append(f"| {_cell(row['prompt'])} | {base} | {pol} |")
        lines.append("")
    return "\n".join(lines)


def summary_line(results: dict[str, Any]) -> str:
    parts = []
    if "policy_score" in results:
        parts.append(f"score {results['baseline_score']:.3f} -> {results['policy_score']:.3f}, win rate "
                     f"{results['win_rate']:.3f}, KL {results['policy_kl']:.2f}")
        if "policy_gold" in results:
            parts.append(f"gold {results['baseline_gold']:.3f} -> {results['policy_gold']:.3f}")
    if "reward_accuracy" in results:
        parts.append(f"reward accuracy {results['reward_accuracy']:.3f}")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def _fmt(value: float) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
