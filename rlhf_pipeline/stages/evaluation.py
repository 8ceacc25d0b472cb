"""`rlhf eval`: an honest look at what the pipeline produced.

- A reward model on held-out preference pairs: pairwise accuracy (a tie counts as wrong) with its 95 % Wilson
  interval, margin, score distributions.
- A policy against a baseline on held-out prompts, one sample each with the same sampling settings and seeds:
  reward-model score, win rate judged by the reward model (a tie counts half) with its 95 % Wilson interval over the
  prompts, KL to the reference, response length, EOS rate, distinct-n diversity, and the gold score and gold win rate
  when a gold scorer is configured; side-by-side samples.
- Beside those, the human win rate of an `rlhf label` A/B run of the same models (`human_labels`), with its 95 %
  Wilson interval.

Writes eval.json (every figure, unrounded), eval.md (a Markdown report, its numbers rounded to what they can tell)
and PNG plots, then metrics.json (last, as every stage).

Launched as several processes, each samples and scores its share of the prompt batches and of the preference pairs;
every batch is seeded by its position, so the report is the same as one process's, and only process 0 writes it.
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
from rlhf_pipeline.stages.common import (
    RunOptions,
    begin,
    context_length,
    distributed_state,
    finish_outputs,
    gather_lists,
    is_main_process,
    say,
    start_outputs,
)

EVAL_FILE = "eval.json"
REPORT_FILE = "eval.md"
SCORES_PNG = "eval_score_distributions.png"
OVEROPTIMISATION_PNG = "eval_gold_vs_sqrt_kl.png"
CURVES_PNG = "eval_ppo_curves.png"
REWARD_PNG = "eval_reward_scores.png"


def run(loaded: LoadedRecipe, options: RunOptions) -> dict[str, Any]:
    recipe = loaded.recipe
    begin(loaded)
    device = distributed_state().device  # this process's GPU (or the CPU)
    results: dict[str, Any] = {}
    plots: dict[str, str] = {}
    samples: list[dict] = []
    reward_scores = None

    # 1. data and models, checked before anything is written
    human = human_results(loaded) if recipe.human_labels else {}  # first: cheap, and a mismatch stops the run
    policy_setup = _policy_setup(loaded, device) if (recipe.policy or recipe.policies) else None
    reward_setup = _reward_setup(loaded, device) if recipe.preferences is not None else None
    start_outputs(loaded, options)
    output_dir = Path(recipe.output_dir)
    main = is_main_process()  # every process computes its share; process 0 writes

    # 2. the policies against the baseline
    if policy_setup is not None:
        policy_results, samples, policy_scores = evaluate_policies(loaded, *policy_setup)
        results.update(policy_results)
        results.update(human)
        names = list(policy_setup[2])
        run_dirs = runs_of(recipe, names)
        results.update(training_figures(run_dirs, results, names))
        if main:
            plots[SCORES_PNG] = _plot_score_distributions(policy_scores, names, output_dir / SCORES_PNG)
            log_path = _ppo_log(recipe)
            if recipe.policy is not None and log_path is not None:
                from rlhf_pipeline.plots import plot_ppo_curves

                if plot_ppo_curves(log_path, output_dir / CURVES_PNG):
                    plots[CURVES_PNG] = "PPO training curves per update: score, gold, KL, losses, optimisation"
            plots[OVEROPTIMISATION_PNG] = plot_overoptimisation(run_dirs, results, names,
                                                                output_dir / OVEROPTIMISATION_PNG)

    # 3. the reward model on held-out pairs
    if reward_setup is not None:
        reward_results, reward_scores = evaluate_reward_model(*reward_setup)
        results.update(reward_results)
        if main:
            from rlhf_pipeline.plots import plot_reward_scores

            if plot_reward_scores(reward_scores["chosen"], reward_scores["rejected"], output_dir / REWARD_PNG):
                plots[REWARD_PNG] = "held-out chosen vs rejected score distributions, and their margins"

    # 4. report
    if main:  # both texts made before either is written: a report that fails leaves no half of it
        report = json.dumps({"metrics": results, "samples": samples, "plots": plots}, indent=1)
        markdown = markdown_report(loaded, results, samples, plots)
        runs.atomic_write_text(output_dir / EVAL_FILE, report)
        runs.atomic_write_text(output_dir / REPORT_FILE, markdown)
        say("eval", summary_line(results))
    return finish_outputs(loaded, options, results)


# -------------------------------------------------------------------------------------------------------------
# set-up
# -------------------------------------------------------------------------------------------------------------
def policy_sections(recipe) -> dict[str, Any]:
    """The policies to evaluate, by name: `policy` is the one named "policy"."""
    return {"policy": recipe.policy} if recipe.policy is not None else dict(recipe.policies or {})


def _policy_setup(loaded: LoadedRecipe, device):
    from rlhf_pipeline.stages.ppo import build_scorer, load_prompts

    recipe = loaded.recipe
    sections = policy_sections(recipe)
    first_key = "policy" if recipe.policy is not None else f"policies.{next(iter(sections))}"
    tokenizer = models.load_tokenizer(loaded, recipe.tokenizer, next(iter(sections.values())),
                                      model_key=f"{first_key}.name_or_path")

    def causal_lm(section, key):
        model = models.load_pretrained(loaded, section, key=f"{key}.name_or_path").to(device).eval()
        models.align_special_tokens(model, tokenizer)
        return model

    candidates = {name: causal_lm(section, "policy" if recipe.policy is not None else f"policies.{name}")
                  for name, section in sections.items()}
    baseline = causal_lm(recipe.baseline, "baseline")
    scorer = build_scorer(loaded, recipe.reward, "reward", device)
    gold = build_scorer(loaded, recipe.gold, "gold", device) if recipe.gold else None
    context = min(context_length(m, cap=None) for m in [baseline, *candidates.values()])
    _, prompts = load_prompts(loaded, tokenizer, context, eval_limit=recipe.num_prompts, scorers=(scorer, gold))
    if recipe.reference.name_or_path:
        reference = causal_lm(models.section_for(recipe.baseline, recipe.reference.name_or_path, recipe.reference),
                              "reference")
    else:
        reference = baseline
    return tokenizer, prompts, candidates, baseline, reference, scorer, gold, device


def human_results(loaded: LoadedRecipe) -> dict[str, Any]:
    from rlhf_pipeline.label.judged import human_win_rates

    return human_win_rates(loaded)


def _reward_setup(loaded: LoadedRecipe, device):
    from rlhf_pipeline.stages.ppo import load_reward_model

    recipe = loaded.recipe
    reward_model = load_reward_model(loaded, recipe.reward, "reward", device, recipe.batch_size)
    _, pairs = data_io.load_splits(loaded, "preferences")
    pairs = data_io.select_columns(loaded, pairs, "held-out", ["chosen", "rejected"], ["prompt"], key="preferences")
    return reward_model, pairs


# -------------------------------------------------------------------------------------------------------------
# the policies against the baseline
# -------------------------------------------------------------------------------------------------------------
def evaluate_policies(loaded: LoadedRecipe, tokenizer, prompts, candidates, baseline, reference, scorer, gold,
                      device):
    """Every model (the baseline, then each policy) answers every held-out prompt once, batch by batch under the
    same seed, so that the models differ only by their weights; scored by the reward model (and gold), with the KL
    of each response to the reference. Returns (metrics, side-by-side samples, score lists for the plots)."""
    from tqdm.auto import tqdm

    from rlhf_pipeline.ppo.modules import sample_rollout, seeded, sequence_logprobs
    from rlhf_pipeline.ppo.trainer import score

    recipe = loaded.recipe
    generation, size = recipe.generation, recipe.batch_size
    models_by_name = {"baseline": baseline, **candidates}
    keys = ("score", "gold", "kl", "length", "eos", "texts")
    collected: dict[str, dict[str, list]] = {name: {key: [] for key in keys} for name in models_by_name}
    state = distributed_state()
    mine = list(range(0, len(prompts), size))[state.process_index::state.num_processes]  # this process's batches
    done: list[tuple[int, list[str], dict]] = []
    for begin_at in tqdm(mine, desc=f"Sampling {len(models_by_name)} models", leave=False,
                         disable=not state.is_main_process):
        batch = prompts.select(list(range(begin_at, min(begin_at + size, len(prompts)))))
        in_batch: dict[str, dict[str, list]] = {name: {key: [] for key in keys} for name in models_by_name}
        done.append((begin_at, batch.texts, in_batch))
        for name, model in models_by_name.items():
            with seeded(recipe.seed + begin_at, device):  # the same sampling noise for every model
                rollout = sample_rollout(model, tokenizer, batch, generation, device)
            out = in_batch[name]
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
    prompt_texts: list[str] = []
    for _, texts, in_batch in sorted(gather_lists(done), key=lambda item: item[0]):  # every batch, in prompt order
        prompt_texts.extend(texts)
        for name, lists in in_batch.items():
            for key, values in lists.items():
                collected[name][key].extend(values)

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
            results[f"{name}_gold_std"] = _std(out["gold"])
        if name != "baseline":
            results.update(win_rate_figures(f"{name}_win_rate", out["score"], collected["baseline"]["score"]))
            if gold is not None:
                results.update(win_rate_figures(f"{name}_gold_win_rate", out["gold"], collected["baseline"]["gold"]))
    if recipe.policy is not None:  # one policy: its win rates under their plain names too
        results.update({key.removeprefix("policy_"): value for key, value in list(results.items())
                        if key.startswith(("policy_win_rate", "policy_gold_win_rate"))})

    samples = []
    for i in range(min(recipe.num_samples, len(prompt_texts))):
        row: dict[str, Any] = {"prompt": prompt_texts[i]}
        for name, out in collected.items():
            row[name] = out["texts"][i]
            row[f"{name}_score"] = out["score"][i]
            if gold is not None:
                row[f"{name}_gold"] = out["gold"][i]
        samples.append(row)
    scores = {name: out["score"] for name, out in collected.items()}
    if gold is not None:
        scores.update({f"{name}_gold": out["gold"] for name, out in collected.items()})
    return results, samples, scores


def runs_of(recipe, names: list[str]) -> dict[str, Path]:
    """The run directories of the policies that are runs of this tool (their log.jsonl and metrics.json)."""
    if recipe.policy is not None:
        log = _ppo_log(recipe)
        directory = log.parent if log is not None else Path(recipe.policy.name_or_path or "")
        return {"policy": directory} if (directory / runs.METRICS_FILE).is_file() or log is not None else {}
    found = {}
    for name in names:
        directory = Path(recipe.policies[name].name_or_path or "")
        if (directory / runs.METRICS_FILE).is_file():
            found[name] = directory
    return found


def training_figures(run_dirs: dict[str, Path], results: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """From each policy's own run: training seconds, throughput (episodes or pairs per second), the method, and the
    gold gain over the baseline per training minute (when there is a gold score)."""
    figures: dict[str, Any] = {}
    for name in names:
        if name not in run_dirs:
            continue
        metrics = runs.read_metrics(run_dirs[name])
        seconds = metrics.get("train_runtime")
        if isinstance(seconds, (int, float)):
            figures[f"{name}_train_seconds"] = float(seconds)
            if f"{name}_gold" in results and seconds > 0:
                gain = results[f"{name}_gold"] - results["baseline_gold"]
                figures[f"{name}_gold_gain_per_minute"] = gain / (seconds / 60)
        for key in ("episodes_per_second", "pairs_per_second"):
            if isinstance(metrics.get(key), (int, float)):
                figures[f"{name}_{key}"] = float(metrics[key])
        method = _method_of(run_dirs[name])
        if method:
            figures[f"{name}_method"] = method
        figures.update({f"{name}_{k}": v for k, v in gold_peak(run_dirs[name]).items()})
    return figures


SMOOTHING = 5  # updates in the moving mean of a training trajectory (one update's 64 rollouts are noisy)


def smoothed(rows: list[dict], key: str, window: int = SMOOTHING) -> list[float]:
    """Trailing moving mean of `key` over the last `window` logged updates."""
    values = [r[key] for r in rows]
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def gold_peak(run_dir: Path) -> dict[str, float]:
    """Where gold peaked on a PPO-family run's training trajectory (moving means over SMOOTHING updates): the peak,
    the KL (nats) there, and gold at the end. Over-optimisation shows as an end well below the peak."""
    from rlhf_pipeline.ppo.trainer import read_log

    rows = [r for r in read_log(run_dir) if "objective/gold" in r and "objective/kl" in r]
    if not rows:
        return {}
    gold, kl = smoothed(rows, "objective/gold"), smoothed(rows, "objective/kl")
    best = max(range(len(gold)), key=gold.__getitem__)
    return {"train_gold_peak": gold[best], "train_gold_peak_kl": kl[best], "train_gold_end": gold[-1]}


def _method_of(run_dir: Path) -> str | None:
    """`ppo (gae)`, `ppo (rloo)`, `ppo (grpo)`, `dpo`...: what the run was, from its resolved recipe."""
    from rlhf_pipeline.recipe.load import resolved_data

    path = run_dir / runs.RECIPE_FILE
    if not path.is_file():
        return None
    try:  # what the report says of the run; a damaged file only leaves the method out
        data = resolved_data(path.read_text(encoding="utf-8", errors="replace"), path)
    except (UserError, OSError):
        return None
    stage, training = data.get("stage"), data.get("training")
    if stage == "ppo":
        estimator = training.get("advantage_estimator", "gae") if isinstance(training, dict) else "gae"
        return {"gae": "PPO", "rloo": "RLOO", "grpo": "GRPO"}.get(str(estimator), "PPO")
    return str(stage).upper() if stage else None


def win_rate(candidate: list[float], baseline: list[float]) -> float:
    """Share of prompts where the candidate scores higher; a tie counts half."""
    wins = sum(1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline))
    return wins / len(candidate) if candidate else float("nan")


def win_rate_figures(key: str, candidate: list[float], baseline: list[float]) -> dict[str, float]:
    """`key`: the win rate (a tie counts half); `key_low`, `key_high`: its 95 % Wilson interval over the prompts,
    as the human win rates of `rlhf label` (label.stats.wilson_interval, the rate with ties as half a win)."""
    from rlhf_pipeline.label.stats import wilson_interval

    rate = win_rate(candidate, baseline)
    low, high = wilson_interval(rate, len(candidate))
    return {key: rate, f"{key}_low": low, f"{key}_high": high}


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams over all n-grams of the responses (whitespace words): 1 is all different, near 0 is repetitive."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# -------------------------------------------------------------------------------------------------------------
# the reward model
# -------------------------------------------------------------------------------------------------------------
def evaluate_reward_model(reward_model, pairs):
    """Score every held-out pair as the reward stage trained on it (the sequences RewardTrainer builds); each process
    scores every world-th pair."""
    import torch

    from rlhf_pipeline.scoring import preference_metrics, score_sequences

    prompts = pairs["prompt"] if "prompt" in pairs.column_names else [None] * len(pairs)
    encoded = list(zip(reward_model.input_ids(prompts, pairs["chosen"]), reward_model.input_ids(prompts,
                                                                                                  pairs["rejected"])))
    context = reward_model.context
    kept = [(c, r) for c, r in encoded if max(len(c), len(r)) <= context]  # longer ones cannot be read whole
    if not kept:
        raise UserError(f"no held-out pair fits in the reward model's context of {context} tokens")
    model, pad, size = reward_model.model, reward_model.tokenizer.pad_token_id, reward_model.batch_size
    state = distributed_state()
    mine = list(range(state.process_index, len(kept), state.num_processes))  # this process's pairs
    chosen = score_sequences(model, [kept[i][0] for i in mine], pad, size, desc="Scoring chosen")
    rejected = score_sequences(model, [kept[i][1] for i in mine], pad, size, desc="Scoring rejected")
    scored = sorted(gather_lists(list(zip(mine, chosen.tolist(), rejected.tolist()))))
    chosen_scores = torch.tensor([c for _, c, _ in scored])
    rejected_scores = torch.tensor([r for _, _, r in scored])
    from rlhf_pipeline.label.stats import wilson_interval

    metrics = {f"reward_{k}": v for k, v in preference_metrics(chosen_scores, rejected_scores).items()}
    metrics["reward_accuracy_low"], metrics["reward_accuracy_high"] = wilson_interval(metrics["reward_accuracy"],
                                                                                      metrics["reward_num_pairs"])
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


def _plot_score_distributions(scores: dict[str, list[float]], names: list[str], path: Path) -> str:
    from rlhf_pipeline.plots import pyplot, save, shared_bins

    plt = pyplot()
    panels = [("", "reward-model score")] + ([("_gold", "gold score")] if "baseline_gold" in scores else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    for axis, (suffix, label) in zip(axes[0], panels):
        shown = ["baseline", *names]
        bins = shared_bins([v for name in shown for v in scores[f"{name}{suffix}"]])
        for name in shown:
            axis.hist(scores[f"{name}{suffix}"], bins=bins, alpha=0.5 if len(shown) <= 2 else 0.35, label=name)
        axis.set_xlabel(label)
        axis.set_ylabel("responses")
        axis.legend(fontsize=8)
        axis.set_title(f"{label}: {' vs '.join(shown)}" if len(shown) <= 3 else f"{label} per model")
    save(figure, path)
    return "score distributions of the baseline and " + ("the policy" if names == ["policy"] else "each policy")


def plot_overoptimisation(run_dirs: dict[str, Path], results: dict[str, Any], names: list[str], path: Path) -> str:
    """Gold score and reward-model score against sqrt(KL to the reference), the view of Gao et al. 2022: each
    policy's training trajectory (PPO-family runs log gold and KL every update; drawn as moving means over SMOOTHING
    updates) and its held-out point, beside the baseline. When the reward model is over-optimised, its score keeps
    rising with KL while gold turns down."""
    from rlhf_pipeline.plots import pyplot, save
    from rlhf_pipeline.ppo.trainer import read_log

    plt = pyplot()
    has_gold = "baseline_gold" in results
    panels = ([("gold", "objective/gold", "gold score")] if has_gold else []) + [
        ("score", "objective/score", "reward-model score")]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (key, logged, label) in zip(axes[0], panels):
        for index, name in enumerate(names):
            colour = colours[index % len(colours)]
            rows = [r for r in read_log(run_dirs[name]) if logged in r] if name in run_dirs else []
            if rows:  # the training trajectory, as moving means (one update's batch is noisy)
                axis.plot([math.sqrt(max(k, 0.0)) for k in smoothed(rows, "objective/kl")], smoothed(rows, logged),
                          "-", color=colour, alpha=0.6, lw=1.4)
            axis.plot([math.sqrt(max(results[f"{name}_kl"], 0.0))], [results[f"{name}_{key}"]], "*", ms=14,
                      color=colour, label=f"{name} (held-out)" + (", line: training" if rows else ""))
        axis.plot([math.sqrt(max(results["baseline_kl"], 0.0))], [results[f"baseline_{key}"]], "o", ms=9,
                  color="black", label="baseline (held-out)")
        axis.set_xlabel("sqrt(KL to the reference)  (nats^0.5 per response)")
        axis.set_ylabel(label)
        axis.set_title(f"{label} against sqrt(KL)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="best")
    figure.suptitle("Over-optimisation view (Gao et al. 2022)", fontsize=10)
    save(figure, path)
    return "gold and reward-model score against sqrt(KL): training trajectories and held-out points"


# -------------------------------------------------------------------------------------------------------------
# report
# -------------------------------------------------------------------------------------------------------------
def markdown_report(loaded: LoadedRecipe, results: dict[str, Any], samples: list[dict], plots: dict[str, str]) -> str:
    """The report, its numbers at the precision they carry (`significant`, `share`, `seconds`); eval.json keeps them
    whole."""
    recipe = loaded.recipe
    lines = ["# Evaluation report", ""]
    names = list(policy_sections(recipe))
    if "baseline_score" in results:
        described = (f"Policy `{recipe.policy.name_or_path}`" if recipe.policy is not None else
                     "Policies " + ", ".join(f"{n} (`{recipe.policies[n].name_or_path}`)" for n in names))
        lines += [f"{described} against baseline `{recipe.baseline.name_or_path}` on {results['num_prompts']} held-out "
                  f"prompts (one sample each, temperature {recipe.generation.temperature:g}, the same seeds for every "
                  "model).", ""]
        lines += comparison_table(results, names)
        if recipe.policy is not None:
            prompts = results["num_prompts"]
            lines += ["", f"Win rate of the policy over the baseline, judged by the reward model: "
                          f"{rate_sentence(results, 'win_rate', prompts, 'prompts')}."]
            if "gold_win_rate" in results:
                lines.append("Judged by the gold scorer: "
                             f"{rate_sentence(results, 'gold_win_rate', prompts, 'prompts')}.")
            if "human_win_rate" in results:
                lines.append(f"Judged by people (A/B labels of `{recipe.human_labels}`, "
                             f"{results['human_labelers']} labeler(s)): **{share(results['human_win_rate'])}** (95% "
                             f"Wilson interval {share(results['human_win_rate_low'])}-"
                             f"{share(results['human_win_rate_high'])} over {results['human_win_rate_prompts']} "
                             "prompts, a tie or both bad counting half).")
        else:
            lines += ["", "Win rates are over the baseline (a tie counts half), with their 95% Wilson intervals over "
                          "the prompts. Gold ± is the standard error of the mean over prompts. Training time and "
                          "throughput come from each policy's own run (`metrics.json`); gold gain per minute = (gold - "
                          "baseline gold) / training minutes. The training rows read a PPO-family run's log (rollout "
                          f"batches, {SMOOTHING}-update moving means): a gold score at the end well below its peak is "
                          "over-optimisation of the reward model."]
        lines.append("")
    if "reward_accuracy" in results:
        pairs, ties = results["reward_num_pairs"], results["reward_ties"]
        lines += [f"Reward model `{recipe.reward.model}` on {pairs} held-out pairs: accuracy "
                  f"{rate_sentence(results, 'reward_accuracy', pairs, 'pairs', f'{ties} ties, counted as wrong')}, "
                  f"mean margin {significant(results['reward_margin'])} (chosen "
                  f"{significant(results['reward_chosen_score_mean'])}, rejected "
                  f"{significant(results['reward_rejected_score_mean'])}).", ""]
    for name, caption in plots.items():
        lines += [f"![{caption}]({name})", ""]
    if samples:
        shown = ["baseline", *names]
        gold = "baseline_gold" in samples[0]
        lines += ["## Side by side", "", "| prompt | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for row in samples:
            cells = [f"{_cell(row[n])} ({significant(row[f'{n}_score'])}"
                     + (f", gold {significant(row[f'{n}_gold'])})" if gold else ")") for n in shown]
            lines.append(f"| {_cell(row['prompt'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def rate_sentence(results: dict[str, Any], key: str, n: int, over: str, tie: str = "a tie counting half") -> str:
    """`**0.961** (95% Wilson interval 0.912-0.985 over 128 prompts, a tie counting half)`."""
    return (f"**{share(results[key])}** (95% Wilson interval {share(results[f'{key}_low'])}-"
            f"{share(results[f'{key}_high'])} over {n} {over}, {tie})")


def comparison_table(results: dict[str, Any], names: list[str]) -> list[str]:
    """Markdown rows: one column per model (the baseline first), one row per measure, each number at its precision:
    scores, KL and lengths to 3 significant figures, shares to 3 decimals, times in seconds to 0.1 s."""
    shown = ["baseline", *names]
    n = results.get("num_prompts") or 1

    def gold_cell(name: str) -> str:
        return f"{significant(results[f'{name}_gold'])} ± {significant(results[f'{name}_gold_std'] / math.sqrt(n), 2)}"

    def rate_cell(key: str):
        def cell(name: str) -> str:
            if f"{name}_{key}" not in results:
                return ""
            return (f"{share(results[f'{name}_{key}'])} [{share(results[f'{name}_{key}_low'])}, "
                    f"{share(results[f'{name}_{key}_high'])}]")
        return cell

    rows: list[tuple[str, Any, Any]] = [  # (label, the figure's name or a cell function, how a figure is written)
        ("method", lambda m: results.get(f"{m}_method", ""), None),
        ("reward-model score (mean)", "score", significant),
        ("gold score (mean ± SE)", gold_cell if "baseline_gold" in results else None, None),
        ("win rate (reward model, 95% interval)", rate_cell("win_rate"), None),
        ("win rate (gold, 95% interval)", rate_cell("gold_win_rate"), None),
        ("win rate (human, 95% interval)", lambda m: human_cell(results, m), None),
        ("KL to the reference (nats)", "kl", significant),
        ("sqrt(KL)", lambda m: significant(math.sqrt(max(results[f'{m}_kl'], 0.0))), None),
        ("response length (tokens)", "response_length", significant),
        ("EOS rate", "eos_rate", share),
        ("distinct-1", "distinct_1", share),
        ("distinct-2", "distinct_2", share),
        ("training time", "train_seconds", seconds),
        ("episodes / s (training)", "episodes_per_second", significant),
        ("pairs / s (training)", "pairs_per_second", significant),
        ("gold gain per training minute", "gold_gain_per_minute", significant),
        (f"training: gold peak ({SMOOTHING}-update mean)", "train_gold_peak", significant),
        ("training: KL at the gold peak (nats)", "train_gold_peak_kl", significant),
        ("training: gold at the end", "train_gold_end", significant),
    ]
    lines = ["| | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for label, how, write in rows:
        if how is None:
            continue
        if callable(how):
            cells = [str(how(m)) if f"{m}_kl" in results else "" for m in shown]
        else:
            cells = [write(results[f"{m}_{how}"]) if f"{m}_{how}" in results else "" for m in shown]
        if any(cells[1:]) or (how in ("score", "kl") and any(cells)):
            lines.append(f"| {label} | " + " | ".join(c or "-" for c in cells) + " |")
    return lines


def human_cell(results: dict[str, Any], name: str) -> str:
    """`0.625 [0.306, 0.863], 8 prompts`: a human win rate with its 95 % Wilson interval (empty without one)."""
    if f"{name}_human_win_rate" not in results:
        return ""
    return (f"{share(results[f'{name}_human_win_rate'])} [{share(results[f'{name}_human_win_rate_low'])}, "
            f"{share(results[f'{name}_human_win_rate_high'])}], {results[f'{name}_human_win_rate_prompts']} prompts")


def significant(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant figures: 0.951, 41.6, -0.00123; 1234 keeps its whole digits, 2.30e-07 its
    exponent; an integer as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value) or value == 0:
        return f"{abs(value) if value == 0 else value:g}"
    if abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    if abs(value) < 1e-4:  # a rounding residue, or a tiny figure: an exponent reads better than zeros
        return f"{value:.{digits - 1}e}"
    rounded = float(f"{value:.{digits}g}")  # first: 0.9996 rounds to 1.00, not 1.000
    decimals = max(digits - 1 - math.floor(math.log10(abs(rounded))), 0)
    return f"{rounded:.{decimals}f}"


def share(value: float) -> str:
    """A share in [0, 1] (a win rate, an accuracy, an EOS rate) to 3 decimals: 0.961."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def seconds(value: float) -> str:
    """A duration: `41.6 s` (0.1 s; whole seconds from 100 s)."""
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def summary_line(results: dict[str, Any]) -> str:
    parts = []
    names = [k[: -len("_win_rate")] for k in results if k.endswith("_win_rate")
             and not k.endswith(("gold_win_rate", "human_win_rate")) and k != "win_rate"]
    for name in names:
        label = "" if names == ["policy"] else f"{name}: "
        text = (f"{label}score {results['baseline_score']:.3f} -> {results[f'{name}_score']:.3f}, win rate "
                f"{results[f'{name}_win_rate']:.3f}, KL {results[f'{name}_kl']:.2f}")
        if f"{name}_gold" in results:
            text += f", gold {results['baseline_gold']:.3f} -> {results[f'{name}_gold']:.3f}"
        if f"{name}_human_win_rate" in results:
            text += f", human win rate {results[f'{name}_human_win_rate']:.3f}"
        parts.append(text)
    if "reward_accuracy" in results:
        parts.append(f"reward accuracy {results['reward_accuracy']:.3f}")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
