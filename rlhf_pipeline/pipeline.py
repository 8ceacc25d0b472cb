"""`rlhf pipeline`: the stages in order, each stage's output wired into the next, unchanged stages skipped.

A stage is skipped when its output is complete (metrics.json), its resolved recipe is the one recorded when the
pipeline last ran it, and its inputs (upstream outputs, data files) have the same fingerprints. Every decision is
printed. A reward model whose held-out accuracy is under the gate stops the pipeline before PPO.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_pipeline import runs
from rlhf_pipeline.errors import GateFailed, UserError
from rlhf_pipeline.recipe.load import (
    Assignment,
    LoadedRecipe,
    diff_keys,
    load_recipe,
    merged_recipe_data,
    recipe_from_data,
    resolved_data,
)
from rlhf_pipeline.recipe.schema import PIPELINE_ORDER, POLICY_STAGES

STATE_FILE = "pipeline.json"


@dataclass
class StagePlan:
    name: str  # the stage's name in the pipeline: a fixed stage, or a policy stage's own name
    loaded: LoadedRecipe
    wiring: list[str] = field(default_factory=list)  # human-readable "key <- value" lines

    @property
    def output_dir(self) -> Path:
        return Path(self.loaded.recipe.output_dir)

    @property
    def kind(self) -> str:
        """What runs: pretrain, sft, reward, ppo, dpo or eval."""
        return self.loaded.stage

    @property
    def is_policy(self) -> bool:
        """A policy-optimisation stage (`ppo`, or an entry of `policies`)."""
        return self.kind in POLICY_STAGES


# -------------------------------------------------------------------------------------------------------------
# planning: load every stage recipe with its wiring (validates everything before anything runs)
# -------------------------------------------------------------------------------------------------------------
def plan_stages(pipeline: LoadedRecipe) -> list[StagePlan]:
    recipe = pipeline.recipe
    listed = [name for name, entry in (pipeline.data.get("stages") or {}).items() if entry is not None]
    canonical = [name for name in PIPELINE_ORDER if name in listed]
    if listed != canonical:
        raise pipeline.error("stages", f"stages run in the order {', '.join(PIPELINE_ORDER)}; list them in that order "
                                       f"(got {', '.join(listed)})")
    root = Path(recipe.output_dir)
    plans: dict[str, StagePlan] = {}
    entries = [(name, f"stages.{name}", getattr(recipe.stages, name), name) for name in canonical if name != "policies"]
    if recipe.stages.policies:
        at = next((i for i, (name, *_rest) in enumerate(entries) if name == "eval"), len(entries))
        entries[at:at] = [(name, f"stages.policies.{name}", entry, None)
                          for name, entry in recipe.stages.policies.items()]
    for name, key, entry, expected in entries:
        wiring: list[Assignment] = [("output_dir", str(root / name), f"{pipeline.path}: <output_dir>/{name}")]
        if recipe.seed is not None:
            wiring.append(("seed", recipe.seed, f"{pipeline.path}: seed"))
        kind = expected or _policy_kind(pipeline, key, entry)
        wiring += _wire(pipeline, kind, entry, plans)
        user_set = [(k, value, f"{pipeline.path}: {key}.set.{k}") for k, value in _dotted(entry.set)]
        if name == "eval" and entry.recipe is None:
            loaded = recipe_from_data(_generated_eval(pipeline, plans), f"{pipeline.path} (stages.eval, generated)",
                                      wiring + user_set, expected_stage="eval")
        else:
            path = pipeline.path.parent / entry.recipe
            if not path.is_file():
                raise pipeline.error(f"{key}.recipe", f"no such file: {path}")
            loaded = load_recipe(path, expected_stage=kind, assignments=wiring + user_set)
        plans[name] = StagePlan(name, loaded, [f"{k} <- {v}" for k, v, _ in wiring[1:] if k != "seed"])
    return list(plans.values())


def _policy_kind(pipeline: LoadedRecipe, key: str, entry) -> str:
    """The stage a `policies` entry's recipe is for: ppo or dpo."""
    path = pipeline.path.parent / entry.recipe
    if not path.is_file():
        raise pipeline.error(f"{key}.recipe", f"no such file: {path}")
    stage = merged_recipe_data(path).get("stage")
    if stage not in POLICY_STAGES:
        raise pipeline.error(f"{key}.recipe", f"{path} is a `{stage}` recipe; a policy stage runs a "
                                              f"{' or '.join(POLICY_STAGES)} recipe")
    return stage


def _dotted(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """`{training: {learning_rate: 1}}` and `{training.learning_rate: 1}` both mean the key training.learning_rate."""
    items = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            items.extend(_dotted(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _wire(pipeline: LoadedRecipe, name: str, entry, plans: dict[str, StagePlan]) -> list[Assignment]:
    """Upstream outputs as this stage's inputs."""
    out = {n: str(p.output_dir) for n, p in plans.items()}
    src = f"{pipeline.path}: wired"
    if name == "sft" and "pretrain" in out:
        return [("model.name_or_path", out["pretrain"], f"{src} from pretrain")]
    if name == "reward" and entry.init_from != "recipe":
        if entry.init_from not in out:
            raise pipeline.error("stages.reward.init_from", f"`{entry.init_from}` is not a stage of this pipeline; "
                                                            "use `recipe` to keep the reward recipe's model")
        return [("model.name_or_path", out[entry.init_from], f"{src} from {entry.init_from}")]
    if name in POLICY_STAGES:
        wiring = []
        policy = out.get("sft") or out.get("pretrain")
        key = "policy.name_or_path" if name == "ppo" else "model.name_or_path"
        if policy:
            wiring.append((key, policy, f"{src} from {'sft' if 'sft' in out else 'pretrain'}"))
        if "reward" in out:
            # dpo: the reward model scores its before/after evaluation only
            wiring.append(("reward", {"model": out["reward"]}, f"{src} from reward"))
            if name == "ppo" and _has_critic(pipeline, entry):
                wiring.append(("value.name_or_path", out["reward"], f"{src} from reward (used by a separate value)"))
        return wiring
    if name == "eval" and entry.recipe is not None:
        wiring = []
        policies = [p for p in plans.values() if p.is_policy]
        if len(policies) == 1:
            wiring.append(("policy.name_or_path", str(policies[0].output_dir), f"{src} from {policies[0].name}"))
        elif policies:
            wiring.append(("policies", {p.name: {"name_or_path": str(p.output_dir)} for p in policies},
                           f"{src} from {', '.join(p.name for p in policies)}"))
        if policies:
            wiring.append(("baseline.name_or_path", _start_of(policies[0]), f"{src} from {policies[0].name}'s start"))
        if "reward" in out:
            wiring.append(("reward.model", out["reward"], f"{src} from reward"))
        return wiring
    return []


def _start_of(plan: StagePlan) -> str:
    """The model a policy stage starts from (the SFT output in a full pipeline)."""
    recipe = plan.loaded.recipe
    return recipe.policy.name_or_path if plan.kind == "ppo" else recipe.model.name_or_path


def _has_critic(pipeline: LoadedRecipe, entry) -> bool:
    """Whether a PPO stage's recipe (with the pipeline's `set:`) uses a value function: rloo and grpo have none, and
    refuse a `value:` section."""
    path = pipeline.path.parent / entry.recipe
    if not path.is_file():
        return True  # reported as a missing file when the stage recipe loads
    data = merged_recipe_data(path)
    estimator = dict(_dotted(entry.set)).get("training.advantage_estimator",
                                             (data.get("training") or {}).get("advantage_estimator", "gae"))
    return estimator == "gae"


def _generated_eval(pipeline: LoadedRecipe, plans: dict[str, StagePlan]) -> dict[str, Any]:
    """An eval recipe built from this pipeline's other stages: every policy (ppo, and each of `policies`) against the
    model they start from (the SFT output), on the held-out prompts, reward and gold scorer and sampling settings of
    the first PPO-family stage (else of the DPO stage); the reward model on the reward stage's held-out pairs."""
    recipe = pipeline.recipe
    data: dict[str, Any] = {"stage": "eval", "output_dir": str(Path(recipe.output_dir) / "eval")}
    policies = [p for p in plans.values() if p.is_policy]
    if policies:
        source = next((p for p in policies if p.kind == "ppo"), policies[0])
        first = source.loaded.recipe
        data.update(seed=first.seed, baseline={"name_or_path": _start_of(source)},
                    tokenizer=first.tokenizer.model_dump(mode="json"),
                    generation=first.generation.model_dump(mode="json", exclude={"samples_per_prompt"}))
        if len(policies) == 1:
            data["policy"] = {"name_or_path": str(policies[0].output_dir)}
        else:
            data["policies"] = {p.name: {"name_or_path": str(p.output_dir)} for p in policies}
        if first.reward is not None:
            data["reward"] = first.reward.model_dump(mode="json", exclude_none=True)
        if first.gold is not None:
            data["gold"] = first.gold.model_dump(mode="json", exclude_none=True)
        if source.kind == "ppo":
            data.update(data=first.data.model_dump(mode="json"), num_prompts=first.training.eval_prompts)
        else:  # the held-out pairs' prompts, as `rlhf dpo` evaluates them
            from rlhf_pipeline.recipe.schema import PromptData

            pairs = first.data.model_dump(mode="json")
            data.update(data={k: v for k, v in pairs.items() if k in PromptData.model_fields and k != "columns"},
                        num_prompts=first.evaluation.prompts or 128)
    if "reward" in plans:
        data["preferences"] = plans["reward"].loaded.recipe.data.model_dump(mode="json")
        data.setdefault("reward", {"model": str(plans["reward"].output_dir)})
        data.setdefault("seed", plans["reward"].loaded.recipe.seed)
    if not policies and "reward" not in plans:
        raise pipeline.error("stages.eval", "nothing to evaluate without a policy or reward stage: give "
                                            "`stages.eval.recipe`")
    return data


# -------------------------------------------------------------------------------------------------------------
# fingerprints: what a stage read, so that a changed input re-runs it
# -------------------------------------------------------------------------------------------------------------
def recipe_data(loaded: LoadedRecipe) -> dict[str, Any]:
    return resolved_data(loaded.resolved_yaml())


def local_inputs(loaded: LoadedRecipe) -> list[str]:
    """Every existing local path a recipe names (models, data files, templates, reward code), except its output."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in ("output_dir", "provenance"):
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value and "\n" not in value:
            candidate = value.rsplit(":", 1)[0] if ".py:" in value else value  # a reward function's file
            if Path(candidate).exists():
                found.add(candidate)

    walk(loaded.recipe.model_dump(mode="json"))
    return sorted(found)


def fingerprint(path: str) -> str:
    """A finished run: its metrics and resolved recipe; a file: its bytes; a directory: its files' sizes and times."""
    target = Path(path)
    digest = hashlib.sha256()
    if target.is_dir() and runs.is_finished(target):
        for name in (runs.METRICS_FILE, runs.RECIPE_FILE):
            if (target / name).is_file():
                digest.update((target / name).read_bytes())
    elif target.is_dir():
        for item in sorted(p for p in target.rglob("*") if p.is_file()):
            stat = item.stat()
            digest.update(f"{item.relative_to(target)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    elif target.is_file():
        with open(target, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def saved_recipe_data(output_dir: Path) -> dict[str, Any] | None:
    """The recipe a finished run recorded (its provenance left out)."""
    path = output_dir / runs.RECIPE_FILE
    return resolved_data(path.read_text()) if path.is_file() else None


# -------------------------------------------------------------------------------------------------------------
# running
# -------------------------------------------------------------------------------------------------------------
@dataclass
class Options:
    force: bool = False
    from_stage: str | None = None
    only: str | None = None
    dry_run: bool = False
    resume: bool = False  # insist that an interrupted stage is resumed (it is anyway when nothing changed)


def run_pipeline(pipeline: LoadedRecipe, options: Options) -> str:
    """Run (or, dry, describe) the pipeline, holding its output dir's lock once every stage recipe validated;
    returns the summary table."""
    plans = plan_stages(pipeline)
    if options.dry_run:
        return _run_pipeline(pipeline, plans, options)
    # launched as several processes, every one runs every stage; process 0 alone decides, writes the state, pushes
    with runs.lock(pipeline.recipe.output_dir) if runs.is_main_process() else contextlib.nullcontext():
        return _run_pipeline(pipeline, plans, options)


def _run_pipeline(pipeline: LoadedRecipe, plans: list[StagePlan], options: Options) -> str:
    if options.dry_run:
        decisions = _decisions(pipeline, plans, options)
    else:
        from rlhf_pipeline.stages.common import decided_by_main

        decisions = decided_by_main(lambda: _decisions(pipeline, plans, options))
    root = Path(pipeline.recipe.output_dir)
    state_path = root / STATE_FILE
    state = read_state(state_path)
    main = runs.is_main_process()
    rows: list[tuple[str, str, str, str]] = []
    for plan, (decision, reason) in zip(plans, decisions):
        if options.dry_run:
            rows.append((plan.name, decision, reason, str(plan.output_dir)))
            continue
        _say(f"{plan.name}: {decision} ({reason})")
        started = time.perf_counter()
        records = main and decision in ("run", "resume", "adopt")  # process 0 remembers what the output is made of
        inputs = {path: fingerprint(path) for path in local_inputs(plan.loaded)} if records else {}
        if decision in ("run", "resume"):
            if main:
                _record(state, state_path, plan, inputs, finished=False)
            _run_stage(plan, resume=decision == "resume")
            if main:
                _record(state, state_path, plan, inputs)
        elif decision == "adopt" and records:
            _record(state, state_path, plan, inputs)
        elapsed = time.perf_counter() - started if decision in ("run", "resume") else None
        status = {"run": "ran", "resume": "resumed"}.get(decision, "skipped")
        rows.append((plan.name, status, f"{elapsed:.0f} s" if elapsed is not None else "-", _result(plan)))
        if plan.name == "reward" and any(p.kind == "ppo" for p in plans[plans.index(plan):]):
            _gate(pipeline, plan)
    hub = pipeline.recipe.hub
    if hub.push and not options.dry_run and main:
        rows += _push_stages(hub, plans, options.only)
    if options.dry_run:
        wiring = [f"  {plan.name}: {line}" for plan in plans for line in plan.wiring]
        if hub.push:
            wiring.append(f"  then push {', '.join(hub.stages)} to {hub.repo_prefix}-<stage>")
        return "\n".join([_table(("stage", "would", "why", "output"), rows, "dry run: nothing was written"),
                          "wiring:", *wiring])
    return _table(("stage", "status", "time", "result"), rows, "pipeline summary")


def _decisions(pipeline: LoadedRecipe, plans: list[StagePlan], options: Options) -> list[tuple[str, str]]:
    """What to do with each stage (run, resume, adopt, skip) and why; a refusal stops the pipeline before anything
    runs."""
    names = [p.name for p in plans]
    for flag, stage in (("--from", options.from_stage), ("--only", options.only)):
        if stage is None:
            continue
        if stage not in names:
            raise UserError(f"{flag} {stage}: not a stage of this pipeline ({', '.join(names)})")
        for earlier in plans[: names.index(stage)]:  # checked before anything runs
            if not runs.is_finished(earlier.output_dir):
                raise UserError(f"{flag} {stage}: the {earlier.name} output ({earlier.output_dir}) is missing or "
                                f"unfinished; run the pipeline without {flag} first")
    state = read_state(Path(pipeline.recipe.output_dir) / STATE_FILE)
    upstream_will_change = False
    decisions = []
    for plan in plans:
        decision, reason = _decide(plan, state, options, names, upstream_will_change)
        decisions.append((decision, reason))
        upstream_will_change |= decision in ("run", "resume")
    if options.resume and not any(d == "resume" for d, _ in decisions):
        raise UserError("--resume: no stage of this pipeline holds an interrupted run to resume (one with a "
                        "checkpoint, its recipe and inputs unchanged)")
    return decisions


def _decide(plan: StagePlan, state: dict, options: Options, names: list[str],
            upstream_will_change: bool) -> tuple[str, str]:
    name = plan.name
    index = names.index(name)
    finished = runs.is_finished(plan.output_dir)
    if options.only is not None and options.only != name:
        return "skip", "--only " + options.only
    if options.force:
        return "run", "--force"
    if options.only == name:
        return "run", "--only"
    if options.from_stage is not None and index >= names.index(options.from_stage):
        return "run", f"--from {options.from_stage}"
    if not finished:
        status = runs.output_dir_status(plan.output_dir)
        if status in ("foreign", "link"):
            raise UserError(f"{plan.output_dir} exists and is not an rlhf run directory (or is a link); the pipeline "
                            "will not write into it. Empty it or choose another output_dir.")
        if status == "new":
            return "run", "no finished output yet"
        checkpoint = runs.latest_checkpoint(plan.output_dir)
        if checkpoint is None:
            return "run", "the last run did not finish and left no checkpoint"
        changed = _changes_since_started(plan, state, upstream_will_change)
        if not changed:
            return "resume", f"the last run stopped; resuming from {checkpoint.name}"
        raise UserError(f"{plan.output_dir} holds an interrupted run (checkpoint {checkpoint.name}) but {changed}: "
                        f"pass --force to start the {name} stage over (the interrupted run stays until the new one "
                        "finishes), or undo the change to resume it")
    if upstream_will_change:
        return "run", "an earlier stage will change"
    recorded = state["stages"].get(name)
    current_recipe = recipe_data(plan.loaded)
    if recorded is None:
        differences = diff_keys(saved_recipe_data(plan.output_dir), current_recipe)
        if not differences:
            return "adopt", "finished earlier with the same recipe"
        raise UserError(f"{plan.output_dir} holds a finished run that this pipeline did not make, with a different "
                        f"recipe (at {', '.join(differences[:5])}); pass --force to replace it, or change the "
                        "pipeline's output_dir")
    differences = diff_keys(recorded["recipe"], current_recipe)
    if differences:
        return "run", f"its recipe changed at {', '.join(differences[:5])}"
    changed = _changed_inputs(plan, recorded)
    if changed:
        return "run", f"input changed: {', '.join(changed)}"
    return "skip", "up to date"


def _changes_since_started(plan: StagePlan, state: dict, upstream_will_change: bool) -> str:
    """Why an interrupted stage cannot be resumed as it is ('' when it can): its recipe or inputs changed since the
    run started, or an earlier stage will change."""
    if upstream_will_change:
        return "an earlier stage will change"
    differences = diff_keys(saved_recipe_data(plan.output_dir), recipe_data(plan.loaded))
    if differences:
        return f"its recipe changed at {', '.join(differences[:5])}"
    recorded = state["stages"].get(plan.name)
    if recorded is None:
        return "this pipeline did not start it"
    changed = _changed_inputs(plan, recorded)
    return f"input changed: {', '.join(changed)}" if changed else ""


def _changed_inputs(plan: StagePlan, recorded: dict) -> list[str]:
    """The local inputs whose fingerprint differs from what the stage recorded."""
    return [path for path in local_inputs(plan.loaded) if recorded["inputs"].get(path) != fingerprint(path)]


def read_state(state_path: Path) -> dict:
    """What pipeline.json records of each stage's last run (empty before the first)."""
    return json.loads(state_path.read_text()) if state_path.is_file() else {"stages": {}}


def _record(state: dict, state_path: Path, plan: StagePlan, inputs: dict[str, str], finished: bool = True) -> None:
    """Remember what this stage's output is made from (pipeline.json, next to the stage dirs), when it starts and
    when it finishes."""
    state["stages"][plan.name] = {"recipe": recipe_data(plan.loaded), "inputs": inputs,
                                  "output_dir": str(plan.output_dir), "finished": finished}
    state_path.parent.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(state_path, json.dumps(state, indent=1))


def _run_stage(plan: StagePlan, resume: bool) -> None:
    """The stage through `commands.execute_stage`: a finished or resumable output it replaces is built aside and
    swapped in only once the new run has finished."""
    from rlhf_pipeline.commands import execute_stage

    execute_stage(plan.loaded, overwrite=not resume, resume=resume)


def _push_stages(hub, plans: list[StagePlan], only: str | None) -> list[tuple[str, str, str, str]]:
    """Push the chosen stage outputs upstream first, so that each model card links the repos it came from."""
    from rlhf_pipeline.hub import push_run

    rows = []
    for plan in plans:
        if plan.name not in hub.stages or (only is not None and plan.name != only):
            continue
        repo_id = f"{hub.repo_prefix}-{plan.name}"
        result = push_run(plan.output_dir, repo_id, private=hub.private, license=hub.license,
                          include_samples=hub.include_samples)
        rows.append((f"push {plan.name}", "pushed", "-", result.url))
    return rows


def _gate(pipeline: LoadedRecipe, reward: StagePlan) -> None:
    threshold = pipeline.recipe.gate.min_reward_accuracy
    if threshold is None:
        return
    accuracy = runs.read_metrics(reward.output_dir).get("eval_accuracy")
    if accuracy is None or accuracy < threshold:
        shown = "missing" if accuracy is None else f"{accuracy:.3f}"
        raise GateFailed(
            f"quality gate: the reward model's held-out accuracy is {shown}, below gate.min_reward_accuracy = "
            f"{threshold:g} ({reward.output_dir}/metrics.json). PPO was not run: improve the reward model (more data "
            "or training), or lower the gate (null disables it).")


def _result(plan: StagePlan) -> str:
    metrics = runs.read_metrics(plan.output_dir) if runs.is_finished(plan.output_dir) else {}

    def get(key: str, fmt: str = ".3f") -> str:
        value = metrics.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "?"

    if plan.kind in ("pretrain", "sft"):
        return f"held-out loss {get('eval_loss')} (perplexity {get('eval_perplexity', '.2f')})"
    if plan.kind == "reward":
        return f"held-out accuracy {get('eval_accuracy')}, margin {get('eval_margin')}"
    if plan.kind in POLICY_STAGES:
        text = f"score {get('eval_score_before')} -> {get('eval_score_after')}, KL {get('eval_kl', '.2f')}"
        if "eval_gold_before" in metrics:
            text += f", gold {get('eval_gold_before')} -> {get('eval_gold_after')}"
        if plan.kind == "dpo":
            return text + f", {get('pairs_per_second', '.1f')} pairs/s"
        return text + f", {get('episodes_per_second', '.1f')} episodes/s"
    if plan.name == "eval":
        parts = []
        if "win_rate" in metrics:
            parts.append(f"win rate {get('win_rate')}")
            if "policy_gold" in metrics:
                parts.append(f"gold {get('baseline_gold')} -> {get('policy_gold')}")
        elif "baseline_gold" in metrics:  # several policies
            golds = [f"{k[:-5]} {get(k)}" for k in metrics if k.endswith("_gold") and k != "baseline_gold"]
            parts.append(f"gold: baseline {get('baseline_gold')}, " + ", ".join(golds))
        if "reward_accuracy" in metrics:
            parts.append(f"reward accuracy {get('reward_accuracy')}")
        return ", ".join(parts) + f" (report: {plan.output_dir}/eval.md)"
    return ""


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], title: str) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


def _say(message: str) -> None:
    if runs.is_main_process():
        print(f"[rlhf pipeline] {message}", file=sys.stderr, flush=True)

