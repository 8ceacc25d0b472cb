"""`rlhf pipeline`: the stages in order, each stage's output wired into the next, unchanged stages skipped.

A stage is skipped when its output is complete (metrics.json), its resolved recipe is the one recorded when the
pipeline last ran it, and its inputs (upstream outputs, data files) have the same fingerprints. Every decision is
printed. A reward model whose held-out accuracy is under the gate stops the pipeline before PPO.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_pipeline import runs
from rlhf_pipeline.errors import DiskFull, GateFailed, Interrupted, UserError
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
    key: str = ""  # its entry in the pipeline recipe: stages.NAME or stages.policies.NAME

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
        plans[name] = StagePlan(name, loaded, [f"{k} <- {v}" for k, v, _ in wiring[1:] if k != "seed"], key)
    _check_output_dirs(pipeline, list(plans.values()))
    return list(plans.values())


def _check_output_dirs(pipeline: LoadedRecipe, plans: list[StagePlan]) -> None:
    """Every stage writes a directory of its own: none the same as, inside, or holding another stage's (an
    --overwrite of one would replace or delete the other), nor the pipeline's own root or state file."""
    root = Path(os.path.realpath(pipeline.recipe.output_dir))
    seen: list[tuple[StagePlan, Path]] = []
    for plan in plans:
        where = Path(os.path.realpath(plan.output_dir))
        key = f"{plan.key}.set.output_dir" if "output_dir" in dict(_dotted(_entry_set(pipeline, plan))) \
            else "output_dir"
        if where in (root, root / STATE_FILE) or where in root.parents:
            raise pipeline.error(key, f"stage {plan.name} would write to {plan.output_dir}, which is the pipeline's "
                                      f"own output_dir (or holds it, or its {STATE_FILE}); give the stage a "
                                      "directory of its own")
        for other, other_where in seen:
            relation = ("the same as" if where == other_where else "inside" if other_where in where.parents
                        else "holding" if where in other_where.parents else None)
            if relation:
                raise pipeline.error(key, f"stage {plan.name} would write to {plan.output_dir}, {relation} stage "
                                          f"{other.name}'s output dir ({other.output_dir}): one would replace or "
                                          "delete the other; give every stage a directory of its own")
        seen.append((plan, where))


def _entry_set(pipeline: LoadedRecipe, plan: StagePlan) -> dict[str, Any]:
    """The `set:` of a stage's entry in the pipeline recipe."""
    stages = pipeline.recipe.stages
    entry = (stages.policies or {}).get(plan.name) if plan.key.startswith("stages.policies.") \
        else getattr(stages, plan.name)
    return entry.set if entry is not None else {}


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
    command: list[str] = field(default_factory=lambda: ["rlhf", "pipeline"])  # `rlhf pipeline RECIPE --set ...`

    def hint(self, *flags: str) -> str:
        """The pipeline's command line (recipe and --set values) with `flags`, quoted for a shell."""
        return shlex.join([*self.command, *flags])


@dataclass(frozen=True)
class Decision:
    action: str  # run, resume, adopt or skip
    reason: str
    staged: bool = False  # resume: the interrupted run is the replacement in `.NAME.next`
    discard: Path | None = None  # an interrupted run of this pipeline nothing will resume: removed first
    needs: runs.NeedsFlag | None = None  # a dry run only: the run refuses this stage without a flag


def run_pipeline(pipeline: LoadedRecipe, options: Options) -> str:
    """Run (or, dry, describe) the pipeline, holding its output dir's lock and every stage's once every stage recipe
    validated; returns the summary table."""
    plans = plan_stages(pipeline)
    if options.dry_run:
        return _run_pipeline(pipeline, plans, options)
    from rlhf_pipeline.stages.common import check_shared_dir

    with contextlib.ExitStack() as held:
        # launched as several processes, every one runs every stage; process 0 alone decides, writes the state,
        # pushes. Its locks keep a single-stage run out of the stage dirs while the pipeline decides and runs
        if runs.is_main_process():
            held.enter_context(runs.lock(pipeline.recipe.output_dir))
            for plan in plans:
                held.enter_context(runs.lock(plan.output_dir))
        check_shared_dir(pipeline.recipe.output_dir)
        return _run_pipeline(pipeline, plans, options)


def _run_pipeline(pipeline: LoadedRecipe, plans: list[StagePlan], options: Options) -> str:
    if options.dry_run:
        decisions = _decisions(pipeline, plans, options)
    else:
        from rlhf_pipeline.stages.common import decided_by_main

        decisions = decided_by_main(lambda: _decisions(pipeline, plans, options))
    root = Path(pipeline.recipe.output_dir)
    state_path = root / STATE_FILE
    main = runs.is_main_process()
    state = read_state(state_path) if main else {"stages": {}}
    rows: list[tuple[str, str, str, str]] = []
    for plan, decision in zip(plans, decisions):
        if options.dry_run:
            rows.append((plan.name, decision.action, decision.reason, str(plan.output_dir)))
            continue
        _say(f"{plan.name}: {decision.action} ({decision.reason})")
        started = time.perf_counter()
        if main and decision.discard is not None:
            runs.remove_run(decision.discard)
            _say(f"{plan.name}: removed the interrupted run in {decision.discard}: nothing will resume it")
        inputs = {path: fingerprint(path) for path in local_inputs(plan.loaded)} if main and \
            decision.action in ("run", "resume", "adopt") else {}
        if decision.action in ("run", "resume"):
            def on_start(run_plan: runs.RunPlan, plan: StagePlan = plan, inputs: dict[str, str] = inputs) -> None:
                _record(state, state_path, plan, inputs, run_plan.run_id)

            resume = options.hint(*(["--only", options.only] if options.only else []), "--resume")
            try:
                _run_stage(plan, decision, on_start)
            except Interrupted as exc:  # the stage's own hint would be `rlhf pipeline ... --resume --overwrite`
                raise Interrupted(str(exc), resume if exc.resume_command else None) from None
            except DiskFull as exc:
                kept = any(runs.resumable_checkpoint(d) for d in (plan.output_dir, runs.staging_dir(plan.output_dir)))
                raise runs.full_disk_then(exc, f"free some space, then resume with: {resume}" if kept else
                                          f"free some space, then run again: {options.hint()}") from None
        elif decision.action == "adopt" and main and runs.run_marker(plan.output_dir) is not None:
            _record(state, state_path, plan, inputs, runs.run_marker(plan.output_dir)["run_id"])
        elapsed = time.perf_counter() - started if decision.action in ("run", "resume") else None
        status = {"run": "ran", "resume": "resumed"}.get(decision.action, "skipped")
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
        notes = [f"the run needs {' '.join(d.needs.alternatives[0])} (stage {plan.name}): {d.needs}\n"
                 f"  {options.hint(*d.needs.alternatives[0])}"
                 for plan, d in zip(plans, decisions) if d.needs is not None]
        return "\n".join([_table(("stage", "would", "why", "output"), rows, "dry run: nothing was written"),
                          "wiring:", *wiring, *notes])
    return _table(("stage", "status", "time", "result"), rows, "pipeline summary")


def _decisions(pipeline: LoadedRecipe, plans: list[StagePlan], options: Options) -> list[Decision]:
    """What to do with each stage (run, resume, adopt, skip) and why, once every swap a crash interrupted is
    completed or undone (a dry run reads the dirs as that would leave them); a refusal stops the pipeline before
    anything runs."""
    if not options.dry_run:
        for plan in plans:
            runs.recover(plan.output_dir)
    names = [p.name for p in plans]
    for flag, stage in (("--from", options.from_stage), ("--only", options.only)):
        if stage is None:
            continue
        if stage not in names:
            raise UserError(f"{flag} {stage}: not a stage of this pipeline ({', '.join(names)})")
        for earlier in plans[: names.index(stage)]:  # checked before anything runs
            if not runs.is_finished(runs.recovered_dir(earlier.output_dir)):
                raise UserError(f"{flag} {stage}: the {earlier.name} output ({earlier.output_dir}) is missing or "
                                f"unfinished; run the pipeline without {flag} first: {options.hint()}")
    state = read_state(Path(pipeline.recipe.output_dir) / STATE_FILE)
    upstream_will_change = False
    decisions = []
    for plan in plans:
        try:
            decision = _decide(plan, state, options, names, upstream_will_change)
        except runs.NeedsFlag as exc:
            if not options.dry_run:
                raise
            # a dry run never refuses over a run: it shows what the run would do with the flag it needs, and names it
            flags = exc.alternatives[0]
            flagged = (dataclasses.replace(options, force=True) if flags == ("--force",)
                       else dataclasses.replace(options, from_stage=flags[1]))
            decisions = _decisions(pipeline, plans, flagged)
            at = plans.index(plan)
            decisions[at] = dataclasses.replace(decisions[at], needs=exc)
            return decisions
        decisions.append(decision)
        upstream_will_change |= decision.action in ("run", "resume")
    if options.resume and not any(d.action == "resume" for d in decisions):
        raise UserError("--resume: no stage of this pipeline holds an interrupted run to resume (one with a "
                        "checkpoint, its recipe and inputs unchanged)")
    return decisions


def _decide(plan: StagePlan, state: dict, options: Options, names: list[str], upstream_will_change: bool) -> Decision:
    """The truth rule: a stage is up to date only when its dir holds a finished run this pipeline recorded, whose
    own saved recipe and recorded inputs are what the pipeline would run now. An interrupted run of this pipeline
    (in the dir, or in `.NAME.next` when it was to replace a finished one) is resumed when its recipe and inputs
    are those of now, else started over; a run the pipeline did not make is adopted when its recipe is the same,
    and never replaced otherwise without being asked to."""
    name = plan.name
    if options.only is not None and options.only != name:
        return Decision("skip", "--only " + options.only)
    outer = runs.enclosing_run(plan.output_dir)
    if outer is not None:
        raise UserError(f"stage {name} would write to {plan.output_dir}, inside the run {outer}: a run may not "
                        "hold another; change the pipeline's output_dir")
    if options.force:
        return Decision("run", "--force")
    final = runs.recovered_dir(plan.output_dir)  # the output dir itself, unless a dry run meets a pending swap
    staged = runs.staging_dir(plan.output_dir)
    status = runs.output_dir_status(final)
    if status in ("foreign", "link"):
        raise UserError(f"{plan.output_dir} exists and is not an rlhf run directory (or is a link); the pipeline "
                        "will not write into it. Empty it or choose another output_dir.")
    current = recipe_data(plan.loaded)
    interrupted = [d for d in dict.fromkeys([staged, final]) if runs.resumable_checkpoint(d) is not None]
    ours = {d: _recorded_inputs(state, name, d) for d in interrupted}
    restart = ""
    for run_dir in interrupted:
        inputs = ours[run_dir]
        if inputs is None:
            continue
        why = "an earlier stage will change" if upstream_will_change else _difference(plan, run_dir, inputs, current)
        if not why:
            checkpoint = runs.resumable_checkpoint(run_dir)
            return Decision("resume", f"the last run stopped; resuming from {checkpoint.name}",
                            staged=run_dir == staged)
        restart = restart or f"the interrupted run in {run_dir} cannot resume: {why}"
    # the interrupted run in `.NAME.next` is this pipeline's and will not be resumed: drop it before anything else
    discard = staged if staged in ours and ours[staged] is not None else None

    asked = options.only == name or (options.from_stage is not None
                                      and names.index(name) >= names.index(options.from_stage))
    if options.only == name:
        decision = Decision("run", "--only", discard=discard)
    elif asked:
        decision = Decision("run", f"--from {options.from_stage}", discard=discard)
    elif upstream_will_change:
        decision = Decision("run", "an earlier stage will change", discard=discard)
    elif status == "finished":
        inputs = _recorded_inputs(state, name, final)
        differences = diff_keys(saved_recipe_data(final), current)
        if inputs is None:  # not made by this pipeline
            if differences:
                raise runs.NeedsFlag(f"{plan.output_dir} holds a finished run that this pipeline did not make, "
                                     f"with a different recipe (at {', '.join(differences[:5])}); replace it with "
                                     f"`{options.hint('--from', name)}`, or change the pipeline's output_dir",
                                     ("--from", name))
            return Decision("adopt", "finished earlier with the same recipe", discard=discard)
        if differences:
            decision = Decision("run", f"its recipe changed at {', '.join(differences[:5])}", discard=discard)
        else:
            changed = _changed_inputs(plan, inputs)
            if not changed:
                return Decision("skip", "up to date", discard=discard)
            decision = Decision("run", f"input changed: {', '.join(changed)}", discard=discard)
    elif restart:
        decision = Decision("run", f"{restart}; starting over", discard=discard)
    elif status == "unfinished":
        decision = Decision("run", "the last run did not finish and left no checkpoint", discard=discard)
    else:
        decision = Decision("run", "no finished output yet", discard=discard)
    # running replaces what the dir holds: never an interrupted run somebody else started, unless asked to
    for run_dir in interrupted:
        if ours[run_dir] is None and not asked:
            checkpoint = runs.resumable_checkpoint(run_dir)
            again = options.hint("--force") if upstream_will_change else options.hint("--from", name)
            resume = shlex.join(["rlhf", plan.kind, str(run_dir / runs.RECIPE_FILE), "--resume",
                                 *(["--overwrite"] if run_dir == staged else [])])
            raise runs.NeedsFlag(f"{run_dir} holds an interrupted run (checkpoint {checkpoint.name}) that this "
                                 f"pipeline did not start, which running the {name} stage would replace: finish it "
                                 f"with `{resume}`, or replace it with `{again}`",
                                 ("--force",) if upstream_will_change else ("--from", name))
    return decision


def _difference(plan: StagePlan, run_dir: Path, inputs: dict[str, str], current: dict[str, Any]) -> str:
    """Why the run in `run_dir` (recorded with `inputs`) is not what the pipeline would run now ('' when it is)."""
    differences = diff_keys(saved_recipe_data(run_dir), current)
    if differences:
        return f"its recipe differs at {', '.join(differences[:5])}"
    changed = _changed_inputs(plan, inputs)
    return f"input changed: {', '.join(changed)}" if changed else ""


def _changed_inputs(plan: StagePlan, recorded: dict[str, str]) -> list[str]:
    """The local inputs whose fingerprint differs from what the stage recorded."""
    return [path for path in local_inputs(plan.loaded) if recorded.get(path) != fingerprint(path)]


def _recorded_inputs(state: dict, name: str, run_dir: Path) -> dict[str, str] | None:
    """The inputs this pipeline recorded when it started the run in `run_dir` (found by its run id), or None: a
    run it did not start."""
    marker = runs.run_marker(run_dir)
    recorded = state["stages"].get(name)
    if marker is None or not isinstance(recorded, dict):
        return None
    if "runs" not in recorded:  # written before runs had ids: one entry, the last run, true once it finished
        if recorded.get("finished") is True and isinstance(recorded.get("inputs"), dict) and runs.is_finished(run_dir) \
                and not diff_keys(recorded.get("recipe"), saved_recipe_data(run_dir)):
            return recorded["inputs"]
        return None
    inputs = recorded["runs"].get(marker["run_id"]) if isinstance(recorded["runs"], dict) else None
    return inputs if isinstance(inputs, dict) else None


def read_state(state_path: Path) -> dict:
    """What pipeline.json records of each stage's runs (empty before the first)."""
    if not state_path.is_file():
        return {"stages": {}}
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{state_path} cannot be read ({exc}): delete it, and the pipeline adopts the finished "
                        "stages whose recipe is unchanged") from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
        raise UserError(f"{state_path} is not a pipeline record: delete it, and the pipeline adopts the finished "
                        "stages whose recipe is unchanged")
    return state


def _record(state: dict, state_path: Path, plan: StagePlan, inputs: dict[str, str], run_id: str) -> None:
    """Remember the inputs of this stage's run `run_id` (pipeline.json, next to the stage dirs), before the run
    writes anything. Only the runs still on disk (in the dir or its `.NAME.next`) stay recorded."""
    entry = state["stages"].get(plan.name)
    recorded = entry.get("runs") if isinstance(entry, dict) and isinstance(entry.get("runs"), dict) else {}
    present = {(runs.run_marker(d) or {}).get("run_id") for d in (plan.output_dir, runs.staging_dir(plan.output_dir))}
    kept = {rid: value for rid, value in recorded.items() if rid in present}
    kept[run_id] = inputs
    state["stages"][plan.name] = {"output_dir": str(plan.output_dir), "runs": kept}
    state_path.parent.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(state_path, json.dumps(state, indent=1))


def _run_stage(plan: StagePlan, decision: Decision, on_start) -> None:
    """The stage through `commands.execute_stage`: a finished or resumable output it replaces is built aside and
    swapped in only once the new run has finished; a resumed replacement continues in `.NAME.next`. The stage
    starts from a fresh Accelerate state, as it would run alone: the state is one per process, and an earlier
    stage's (a Trainer's mixed precision, from its recipe or `accelerate launch`) would make PPO's Accelerator
    refuse its own recipe's precision."""
    from rlhf_pipeline.commands import execute_stage

    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()  # the process group (PartialState) stays
        GradientState._reset_state()
    resume = decision.action == "resume"
    execute_stage(plan.loaded, overwrite=decision.staged or not resume, resume=resume, on_start=on_start)


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

