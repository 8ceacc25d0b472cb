"""The human win rates of an A/B labelling run, for `rlhf eval` (its `human_labels` key). No torch.

The run's policies and baseline are matched with the evaluation's by `name_or_path` (and revision): a label run that
compared `runs/x/ppo` with `runs/x/sft` reports its human win rate beside the evaluation of `runs/x/ppo` against
`runs/x/sft`, whatever the two recipes call them. The rates are computed from labels.jsonl and samples.jsonl as they
are (a run still being labelled gives the rate over the prompts labelled so far, and says how many).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_pipeline import runs
from rlhf_pipeline.recipe.load import LoadedRecipe


def same_model(a: dict[str, Any] | None, b: Any) -> bool:
    """Whether a label run's model section (resolved YAML data) and an evaluation's (a ModelSection) name the same
    model: the same Hub id and revision, or the same local directory."""
    if not a or b is None:
        return False
    first, second = str(a.get("name_or_path") or ""), str(b.name_or_path or "")
    if a.get("revision") != b.revision:
        return False
    if first == second:
        return True
    return Path(first).exists() and Path(second).exists() and Path(first).resolve() == Path(second).resolve()


def human_win_rates(loaded: LoadedRecipe) -> dict[str, Any]:
    """`<policy>_human_win_rate` (with `_low`, `_high`: the 95 % Wilson interval, and `_prompts`) for each of the
    evaluation's policies that the label run compared with the evaluation's baseline; the plain names
    (`human_win_rate`, ...) for a single `policy`; `human_labelers`. Raises a RecipeError at `human_labels` when the
    run is not an A/B labelling run of these models."""
    from rlhf_pipeline.label.store import read_run, summarise
    from rlhf_pipeline.recipe.load import resolved_data

    recipe = loaded.recipe
    key = "human_labels"
    directory = Path(recipe.human_labels)
    marker = runs.run_marker(directory)
    saved = directory / runs.RECIPE_FILE
    if marker is None or marker.get("stage") != "label" or not saved.is_file():
        raise loaded.error(key, f"{directory} is not the output dir of an `rlhf label` run")
    label_recipe = resolved_data(saved.read_text())
    if label_recipe.get("mode") != "ab":
        raise loaded.error(key, f"{directory} is a `{label_recipe.get('mode')}` labelling run: a human win rate comes "
                                "from `mode: ab`")
    if not same_model(label_recipe.get("baseline"), recipe.baseline):
        raise loaded.error(key, f"{directory} compared with the baseline "
                                f"{(label_recipe.get('baseline') or {}).get('name_or_path')}, this evaluation's is "
                                f"{recipe.baseline.name_or_path}")
    labelled = ({"policy": label_recipe["policy"]} if label_recipe.get("policy")
                else dict(label_recipe.get("policies") or {}))
    evaluated = {"policy": recipe.policy} if recipe.policy is not None else dict(recipe.policies or {})
    items, labels = read_run(directory)
    summary = summarise("ab", items, labels)
    results: dict[str, Any] = {}
    for name, section in evaluated.items():
        match = next((label_name for label_name, data in labelled.items() if same_model(data, section)), None)
        rate = summary["win_rates"].get(match) if match else None
        if rate is None or not rate["prompts"]:
            continue
        for field, value in (("", rate["win_rate"]), ("_low", rate["low"]), ("_high", rate["high"]),
                             ("_prompts", rate["prompts"])):
            results[f"{name}_human_win_rate{field}"] = value
    if not results:
        labelled_paths = ", ".join(str(data.get("name_or_path")) for data in labelled.values())
        raise loaded.error(key, f"{directory} holds no A/B label of this evaluation's policies (it compared "
                                f"{labelled_paths} with the baseline; labels so far: {len(labels)})")
    if recipe.policy is not None:
        results.update({key.removeprefix("policy_"): value for key, value in list(results.items())})
    results["human_labelers"] = len(summary["labelers"])
    return results
