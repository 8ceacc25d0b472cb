"""Rankings to preference pairs, agreement between labelers, and win rates with confidence intervals.

A label's `decision` is one of DECISIONS: `ranking` (response indices, best first: all of them, or the best few, the
rest sharing the next rank below), `tie` (all equally good), `bad` (all bad: no preference), `skip` (not judged).
In A/B mode a ranking is [winner] or [winner, loser] over the two responses as shown. Pure Python, no torch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable
from itertools import combinations
from typing import Any

DECISIONS = ("ranking", "tie", "bad", "skip")
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval


def complete_ranking(ranking: list[int], k: int) -> list[int]:
    """A ranking of k - 1 responses implies the last one."""
    if len(ranking) == k - 1:
        return [*ranking, *(i for i in range(k) if i not in ranking)]
    return list(ranking)


def pairs_from_ranking(ranking: list[int], k: int) -> list[tuple[int, int, int, int]]:
    """Every pair a ranking orders, as InstructGPT expanded its labelers' rankings of K responses into the K choose 2
    comparisons: (better, worse, better's rank, worse's rank), ranks from 1. Responses left out of a partial ranking
    share the rank below the last ranked one and are not compared with each other."""
    order = complete_ranking(ranking, k)
    ranks = {response: position + 1 for position, response in enumerate(order)}
    unranked = [i for i in range(k) if i not in ranks]
    pairs = []
    for position, better in enumerate(order):
        pairs += [(better, worse, ranks[better], ranks[worse]) for worse in order[position + 1:]]
        pairs += [(better, worse, ranks[better], len(order) + 1) for worse in unranked]
    return pairs


def check_ranking(ranking: Any, k: int) -> list[int]:
    """A ranking as given (response indices, best first), checked: distinct indices below k, at least one."""
    if not isinstance(ranking, list) or not ranking or not all(isinstance(i, int) and 0 <= i < k for i in ranking):
        raise ValueError(f"a ranking lists response numbers 0 to {k - 1}, best first; got {ranking!r}")
    if len(set(ranking)) < len(ranking):
        raise ValueError(f"a response is ranked twice in {ranking!r}")
    return list(ranking)


# ---------------------------------------------------------------------------------------------------------------
# agreement between labelers
# ---------------------------------------------------------------------------------------------------------------
def pair_judgements(label: dict[str, Any], k: int) -> dict[tuple[int, int], str]:
    """What a label says about each pair of responses (i < j): `first` (i preferred), `second` (j preferred) or
    `equal` (a tie, or all bad). A skip says nothing; nor does a partial ranking about two unranked responses."""
    decision = label["decision"]
    if decision in ("tie", "bad"):
        return {pair: "equal" for pair in combinations(range(k), 2)}
    if decision != "ranking":
        return {}
    return {(min(b, w), max(b, w)): "first" if b < w else "second"
            for b, w, _, _ in pairs_from_ranking(label["ranking"], k)}


def agreement(units: dict[Hashable, dict[str, str]]) -> dict[str, Any]:
    """Agreement on nominal judgements, `units` mapping each judged unit to {labeler: value}; units judged by fewer
    than two labelers do not count. Returns the units and labeler pairs compared, the pairwise agreement (the share
    of labeler pairs that gave the same value on a unit), Krippendorff's alpha (nominal: 1 - observed / expected
    disagreement, from the coincidence matrix; any number of labelers, missing judgements allowed) and Cohen's kappa
    for each pair of labelers (over the units both judged). A figure is None where it is undefined (no overlap; or
    every value the same, so that no disagreement was expected)."""
    shared = {unit: values for unit, values in units.items() if len(values) >= 2}
    same = compared = 0
    coincidences: Counter[tuple[str, str]] = Counter()
    for values in shared.values():
        judged = list(values.values())
        for a, b in combinations(judged, 2):
            compared += 1
            same += a == b
        for i, a in enumerate(judged):  # ordered pairs of different labelers' values, weighted 1 / (m - 1)
            for j, b in enumerate(judged):
                if i != j:
                    coincidences[(a, b)] += 1 / (len(judged) - 1)
    totals: Counter[str] = Counter()
    for (a, _), weight in coincidences.items():
        totals[a] += weight
    n = sum(totals.values())
    observed = sum(weight for (a, b), weight in coincidences.items() if a != b)
    expected = sum(totals[a] * totals[b] for a in totals for b in totals if a != b) / (n - 1) if n > 1 else 0.0
    alpha = 1 - observed / expected if expected > 0 else None
    labelers = sorted({name for values in shared.values() for name in values})
    kappas = {}
    for a, b in combinations(labelers, 2):
        both = [(values[a], values[b]) for values in shared.values() if a in values and b in values]
        if both:
            kappas[f"{a} vs {b}"] = {"units": len(both), "agreement": sum(x == y for x, y in both) / len(both),
                                    "kappa": cohen_kappa(both)}
    return {"units": len(shared), "comparisons": compared,
            "pairwise_agreement": same / compared if compared else None,
            "krippendorff_alpha": alpha, "cohen_kappa": kappas}


def cohen_kappa(pairs: list[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two labelers' values on the same units: (observed - chance agreement) / (1 - chance), chance
    from each labeler's own frequencies. None when chance agreement is 1 (both always gave one same value)."""
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    chance = sum(first[value] * second[value] for value in first) / (n * n)
    return (observed - chance) / (1 - chance) if chance < 1 else None


# ---------------------------------------------------------------------------------------------------------------
# win rates
# ---------------------------------------------------------------------------------------------------------------
def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion p observed over n trials (95 % by default): unlike p +- z SE, it
    stays inside [0, 1] and is sound for small n and p near 0 or 1."""
    if n <= 0:
        return math.nan, math.nan
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def candidate_score(label: dict[str, Any], models: list[str], candidate: str) -> float | None:
    """An A/B label as the candidate's score: 1 when its response won, 0 when the baseline's did, 1/2 for a tie or
    both bad; None for a skip. `models`: the model behind each response, as shown."""
    decision = label["decision"]
    if decision in ("tie", "bad"):
        return 0.5
    if decision != "ranking":
        return None
    return 1.0 if models[label["ranking"][0]] == candidate else 0.0


def win_rates(judged: Iterable[tuple[str, list[float], dict[str, int]]]) -> dict[str, dict[str, Any]]:
    """Per candidate, from (candidate, the scores its labelers gave one prompt, that prompt's decision counts): the
    human win rate over the prompts judged (each prompt's score the mean of its labelers', a tie counting half),
    its 95 % Wilson interval over that number of prompts, and the counts of wins, losses, ties and both-bad."""
    by_candidate: dict[str, dict[str, Any]] = {}
    for candidate, scores, counts in judged:
        entry = by_candidate.setdefault(candidate, {"scores": [], "wins": 0, "losses": 0, "ties": 0, "both_bad": 0})
        if scores:
            entry["scores"].append(sum(scores) / len(scores))
        for key, value in counts.items():
            entry[key] += value
    rates = {}
    for candidate, entry in by_candidate.items():
        scores = entry.pop("scores")
        n = len(scores)
        rate = sum(scores) / n if n else math.nan
        low, high = wilson_interval(rate, n)
        rates[candidate] = {"win_rate": rate, "low": low, "high": high, "prompts": n, **entry}
    return rates
