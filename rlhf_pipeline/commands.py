"""What the CLI commands do, kept apart from argument parsing. Importing this module imports no torch."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhf_pipeline import runs
from rlhf_pipeline.errors import DiskFull, Problem, RecipeError, UserError, unreadable
from rlhf_pipeline.recipe.load import LoadedRecipe, load_recipe

STAGE_MODULES = {
    "pretrain": "rlhf_pipeline.stages.pretrain",
    "sft": "rlhf_pipeline.stages.sft",
    "reward": "rlhf_pipeline.stages.reward",
    "ppo": "rlhf_pipeline.stages.ppo",
    "dpo": "rlhf_pipeline.stages.dpo",
    "eval": "rlhf_pipeline.stages.evaluation",
}


def stage_overrides(overrides: Sequence[str] | None, output_dir: Path | None,
                    push_to_hub: str | None = None) -> list[str]:
    """`--set` values plus `--output-dir` (which is `--set output_dir=...`) and `--push-to-hub ORG/NAME` (which is
    `--set hub.repo_id=ORG/NAME --set hub.push=true`, its repo id checked now, before anything is trained)."""
    values = list(overrides or [])
    if output_dir is not None:  # JSON quoting: a path, never YAML's null (`~`), a number or a mapping (`a: b`)
        values.append(f"output_dir={json.dumps(str(output_dir))}")
    if push_to_hub is not None:
        from rlhf_pipeline.hub import check_repo_id

        check_repo_id(push_to_hub, what="--push-to-hub repo id")
        values += [f"hub.repo_id={json.dumps(push_to_hub)}", "hub.push=true"]  # JSON quoting: a YAML string
    return values


def end_process_group() -> None:
    """A multi-process launch ends its process group once, when the command is done: a pipeline's stages share it
    (a command that never imported torch.distributed has none)."""
    import sys

    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def recipe_argument(path: Path, command: str | None) -> Path:
    """The recipe a command's recipe argument names (recipe/sets.py: a folder, or a set or recipe shipped with the
    package, stands for one of its recipes); says on stderr which file it took when it is not the argument itself.
    `command`: the stage whose recipe a set stands for; None (`recipe validate`): a set is its folder."""
    import sys

    from rlhf_pipeline.recipe import sets

    found, note = sets.resolve(path, command)
    if note is not None and runs.is_main_process():
        print(f"note: {note}", file=sys.stderr, flush=True)
    return found


def show_recipe(recipe_path: Path, overrides: Sequence[str]) -> str:
    """`rlhf recipe show`: the fully resolved recipe as YAML."""
    return load_recipe(recipe_argument(recipe_path, "pipeline"), overrides).resolved_yaml()


def list_recipe_sets() -> str:
    """`rlhf recipes list`: every shipped set, its description (its README's heading) and its recipes."""
    import textwrap

    from rlhf_pipeline.recipe import sets

    names = sets.names()
    width = max(map(len, names))
    lines = [f"Recipe sets shipped with rlhf-pipeline, in {sets.root()}:", ""]
    for name in names:
        chosen = sets.recipe_set(name)
        listing = ", ".join(_recipe_entry(recipe, what) for recipe, what in chosen.recipes)
        label = "configs (accelerate launch --config_file)" if chosen.is_accelerate else "recipes"
        lines.append(f"  {name.ljust(width)}  {chosen.description}")
        lines += [f"  {' ' * width}  {line}" for line in textwrap.wrap(
            f"{label}: {listing}", 110 - width, break_on_hyphens=False, break_long_words=False)]
    lines += ["", *textwrap.wrap(
        "A set's name goes where a recipe path does, when no such file or folder is here: `rlhf pipeline tiny` runs "
        "tiny/pipeline.yaml, `rlhf sft tiny` tiny/sft.yaml, `rlhf dpo tiny/compare/dpo` that recipe. Outputs go "
        "under the current folder (each recipe's output_dir, e.g. runs/tiny/sft).", 118),
        "To edit one: rlhf recipes copy NAME DIR"]
    return "\n".join(lines)


def _recipe_entry(name: str, what: str) -> str:
    """`sft`, `label-ab (label)`, `pipeline (pretrain, sft, ...)` for a recipe's listing."""
    last = name.rsplit("/", 1)[-1]
    if what in (last, "accelerate"):
        return name
    return f"{name} ({what.removeprefix(last + ': ')})"


def copy_recipe_set(name: str, destination: Path) -> str:
    """`rlhf recipes copy NAME DIR`: the set copied to edit, and the commands that run the copy."""
    import shlex

    from rlhf_pipeline.recipe import sets

    chosen, copy = sets.copy(name, destination)
    files = [p for p in copy.rglob("*") if p.is_file()]
    data = [p for p in files if p.suffix not in (".yaml", ".yml", ".md")]
    size = sum(p.stat().st_size for p in data)
    recipes = [recipe for recipe, _ in chosen.recipes]
    head = (f"copied the recipe set {chosen.name} to {copy}: {len(recipes)} "
            f"{'Accelerate configs' if chosen.is_accelerate else 'recipes'}"
            + (f" and {len(data)} data files ({size / 2 ** 20:.1f} MiB)" if data else ""))
    where = shlex.quote(str(copy))
    if chosen.is_accelerate:
        return "\n".join([head, "check them, then launch a stage with one:", f"  rlhf recipe validate {where}",
                          f"  accelerate launch --config_file {shlex.quote(str(copy / 'ddp.yaml'))} -m rlhf_pipeline "
                          "sft RECIPE"])
    data_paths = " Its data paths (\"{recipe_dir}/...\") name the copy's own files." if data else ""
    lines = [f"{head}.{data_paths} Each recipe's output_dir is under the folder you run from.", "Edit them, then:",
             f"  rlhf recipe validate {where}"]
    for recipe, what in chosen.recipes:
        if "/" not in recipe:  # a folder's recipes (tiny/compare) are run by the set's pipeline that names them
            command = what.split(":")[0]
            lines.append(f"  rlhf {command} {shlex.quote(str(copy / (recipe + '.yaml')))}")
    return "\n".join(lines)


def run_stage(stage: str, recipe_path: Path, overrides: Sequence[str], overwrite: bool, dry_run: bool,
              resume: bool = False) -> str | None:
    """Load and validate the recipe; print the plan (dry run) or run the stage. Returns the plan text on dry runs."""
    loaded = load_recipe(recipe_argument(recipe_path, stage), overrides, expected_stage=stage)
    if dry_run:
        return describe_plan(loaded, overwrite, resume)
    execute_stage(loaded, overwrite=overwrite, resume=resume)
    return None


def run_label(recipe_path: Path, overrides: Sequence[str], host: str | None, port: int | None,
              dry_run: bool) -> str | None:
    """`rlhf label`: serve the labelling page (rlhf_pipeline/label/), or describe what it would do."""
    from rlhf_pipeline.label import serve

    loaded = load_recipe(recipe_argument(recipe_path, "label"), overrides, expected_stage="label")
    check_local_files(loaded)
    if dry_run:
        return serve.describe(loaded, host, port)
    serve.run(loaded, host, port)
    return None


def execute_stage(loaded: LoadedRecipe, overwrite: bool = False, resume: bool = False,
                  on_start: Callable[[runs.RunPlan], None] | None = None) -> dict[str, Any]:
    """Run a stage so that no run is lost: hold the output dir's lock (process 0), check that every process sees
    it, complete or undo a swap a crash interrupted, plan where the run writes (a staging sibling when it replaces a
    finished or resumable run), check a resumed run's recipe, and on bad input or a full disk remove what this run
    wrote (but a checkpoint). Ctrl-C saves a checkpoint (exit 130). `on_start(plan)` is called (process 0) once the
    run is planned, before it writes anything: `rlhf pipeline` records the run's id and inputs.

    Launched as several processes, only process 0 plans and prepares the output dir; the others take its plan (or
    its refusal), so that every process writes to the same place and none races process 0's preparation."""
    from rlhf_pipeline.stages.common import RunOptions, check_shared_dir, decided_by_main, graceful_interrupt, say

    output_dir = loaded.recipe.output_dir
    main = runs.is_main_process()
    with runs.lock(output_dir) if main else contextlib.nullcontext():
        check_shared_dir(output_dir)
        plan = decided_by_main(lambda: _plan_and_prepare(loaded, overwrite, resume))
        if main and on_start is not None:
            on_start(plan)
        if plan.staged:
            say(loaded.stage, f"building the new run in {plan.work}; {output_dir} stays as it is until it finishes")
        if plan.mode == "resume":
            say(loaded.stage, f"resuming {plan.work} from {plan.checkpoint.name}")
        if plan.mode == "restart":  # killed, or exited from inside (os._exit), before its first checkpoint
            say(loaded.stage, f"{output_dir} holds an unfinished run that stopped before its first checkpoint: "
                              "starting it over")
        module = importlib.import_module(STAGE_MODULES[loaded.stage])
        try:
            with graceful_interrupt(loaded.stage):
                return module.run(loaded.working_in(plan.work), RunOptions(plan))
        except Exception as exc:  # a full disk: OSError, torch's RuntimeError, safetensors' SafetensorError
            error = exc if isinstance(exc, UserError) else (chat_template_error(loaded, exc)
                                                            or runs.disk_full(exc, plan.work))
            if error is None:
                raise
            if main:
                if isinstance(error, DiskFull):
                    runs.remove_partial_checkpoints(plan.work)
                runs.abandon(plan)
            if isinstance(error, DiskFull):
                raise _after_full_disk(error, plan) from None
            if error is exc:
                raise
            raise error from None


def _after_full_disk(error: DiskFull, plan: runs.RunPlan) -> DiskFull:
    """What to do after a full disk stopped a run: resume from the checkpoint that was kept, or run again (a run it
    was to replace is as it was)."""
    kept = runs.latest_checkpoint(plan.work) if plan.work.is_dir() else None
    if kept is not None:
        flags = ("--resume", "--overwrite") if plan.staged else ("--resume",)
        return runs.full_disk_then(error, f"free some space, then resume from {kept.name} with: "
                                          f"{runs.command_line(flags)}")
    return runs.full_disk_then(error, "free some space and run again" + (
        f" ({plan.output_dir} is as it was)" if plan.staged else ""))


def chat_template_error(loaded: LoadedRecipe, exc: BaseException) -> UserError | None:
    """A chat template that fails as it is applied (a syntax error, a sandbox violation such as reading
    `__class__`, its own raise_exception) becomes an error about `tokenizer.chat_template`, the key that replaces it;
    None for any other exception."""
    import sys

    jinja2 = sys.modules.get("jinja2")
    if jinja2 is None or not isinstance(exc, jinja2.TemplateError):
        return None
    section = getattr(loaded.recipe, "tokenizer", None)
    whose = "" if section is not None and section.chat_template else " (the tokenizer's own: this key replaces it)"
    return loaded.error("tokenizer.chat_template", f"the chat template{whose} failed as it was applied: "
                                                   f"{unreadable(exc)}")


def _plan_and_prepare(loaded: LoadedRecipe, overwrite: bool, resume: bool) -> runs.RunPlan:
    """Process 0's part, under the lock: refuse an engine the stage cannot run under, recover from an interrupted
    swap, plan, check a resumed run's recipe, and clear what an earlier attempt left."""
    from rlhf_pipeline.stages.common import check_engine

    check_engine(loaded)
    check_tracker_packages(loaded)
    check_push(loaded)
    output_dir = loaded.recipe.output_dir
    runs.recover(output_dir)
    named = recipe_checkpoint(loaded)
    plan = runs.plan_run(output_dir, overwrite, resume or named is not None)
    if named is not None:
        plan = dataclasses.replace(plan, checkpoint=named)
    if plan.mode == "resume":
        check_same_recipe(loaded, plan.work / runs.RECIPE_FILE)
    else:
        runs.prepare_run(plan)
    return plan


def recipe_checkpoint(loaded: LoadedRecipe) -> Path | None:
    """A checkpoint inside the output dir named by `training.resume_from_checkpoint` (TRL stages): the run resumes
    from it (the output dir is kept). A checkpoint elsewhere is the Trainer's business: a new run from its state."""
    training = getattr(loaded.recipe, "training", None)
    value = training.get("resume_from_checkpoint") if isinstance(training, dict) else None
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    if Path(loaded.recipe.output_dir).resolve() not in path.resolve().parents:
        return None
    if not (path / runs.CHECKPOINT_COMPLETE).is_file():
        raise loaded.error("training.resume_from_checkpoint", f"{value} is not a complete checkpoint of this run "
                                                              f"(last complete: {runs.latest_checkpoint(path.parent)})")
    return path


def check_same_recipe(loaded: LoadedRecipe, saved_path: Path) -> None:
    """A run resumes only with the recipe it started with (apart from where it is published, which checkpoint
    `training.resume_from_checkpoint` names, and how the output dir is spelt: the run being resumed is the one found
    there, whether --output-dir names it relatively, absolutely or with `~`)."""
    from rlhf_pipeline.recipe.load import diff_keys, resolved_data

    saved = resolved_data(saved_path.read_text(encoding="utf-8", errors="replace"), saved_path)
    differences = [key for key in diff_keys(saved, resolved_data(loaded.resolved_yaml()))
                   if key not in ("training.resume_from_checkpoint", "output_dir")]
    if differences:
        raise UserError(f"--resume: the recipe differs from the one the run started with ({saved_path}) at: "
                        f"{', '.join(differences)}. Resume with the same recipe, or start over with --overwrite.")


def run_pipeline(recipe_path: Path, overrides: Sequence[str], from_stage: str | None, only: str | None,
                 force: bool, dry_run: bool, resume: bool = False) -> str:
    from rlhf_pipeline.pipeline import Options, plan_stages
    from rlhf_pipeline.pipeline import run_pipeline as run

    if from_stage is not None and only is not None:
        raise UserError("--from and --only do not go together")
    if resume and (force or from_stage):
        raise UserError("--resume continues an interrupted stage; it does not go with --force or --from")
    loaded = load_recipe(recipe_argument(recipe_path, "pipeline"), overrides, expected_stage="pipeline")
    check_push(loaded)
    for plan in plan_stages(loaded):  # every stage's trackers, before the first stage runs for hours
        if dry_run:
            check_local_files(plan.loaded)
        check_tracker_packages(plan.loaded)
        check_push(plan.loaded)
    command = ["rlhf", "pipeline", str(recipe_path), *(part for value in overrides for part in ("--set", value))]
    return run(loaded, Options(force=force, from_stage=from_stage, only=only, dry_run=dry_run, resume=resume,
                               command=command))


def plan(recipe_path: Path, overrides: Sequence[str], processes: int | None, device_memory: str | None,
         accelerate_config: Path | None, as_json: bool) -> str:
    """`rlhf plan`: the derived numbers, FLOPs and peak memory per device of a stage recipe, or of each stage of a
    pipeline recipe, without loading a weight (rlhf_pipeline/planning.py, plan_recipe.py)."""
    from rlhf_pipeline import planning
    from rlhf_pipeline.plan_recipe import Registry, plan_recipe, render
    from rlhf_pipeline.plan_recipe import as_json as plan_json

    if processes is not None and processes < 1:
        raise UserError(f"--processes: expected 1 or more, got {processes}")
    memory = planning.parse_size(device_memory) if device_memory is not None else None
    dist = (planning.read_accelerate_config(accelerate_config, processes) if accelerate_config is not None
            else planning.default_distribution(processes))
    loaded = load_recipe(recipe_argument(recipe_path, "pipeline"), overrides)
    if loaded.stage != "pipeline":
        check_local_files(loaded)
        result = plan_recipe(loaded, dist, memory)
        return json.dumps(plan_json(result), indent=1) if as_json else render(result)
    from rlhf_pipeline.pipeline import plan_stages

    stages = [stage for stage in plan_stages(loaded) if stage.kind != "eval"]
    for stage in stages:
        check_local_files(stage.loaded)
    registry = Registry([stage.loaded for stage in stages])
    plans = [(stage.name, plan_recipe(stage.loaded, dist, memory, registry)) for stage in stages]
    if as_json:
        return json.dumps({"pipeline": str(recipe_path), "stages": {name: plan_json(p) for name, p in plans}},
                          indent=1)
    summary = ", ".join(f"{name} {planning.format_bytes(p.memory.peak)}" for name, p in plans)
    worst = max(plans, key=lambda item: item[1].memory.peak)
    head = (f"pipeline {recipe_path}: {len(plans)} stages planned as the pipeline wires them (the eval stage is not "
            f"planned); peak per device: {summary}; the largest: {worst[0]}")
    if memory is not None:
        misfits = [name for name, p in plans if p.fits is False]
        margin = f" (under {100 * planning.FIT_FRACTION:.0f} % of it)"
        head += (f"; does NOT fit in {planning.format_bytes(memory)}{margin}: {', '.join(misfits)}" if misfits
                 else f"; every stage fits in {planning.format_bytes(memory)}{margin}")
    return "\n\n".join([head] + [f"== {name} ==\n{render(p)}" for name, p in plans])


def validate_paths(paths: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[RecipeError]]:
    """Validate recipe files (directories: every .yaml/.yml below them) and the Accelerate config files among them.
    Returns (valid (path, its stage or what the Accelerate config runs), errors)."""
    from rlhf_pipeline.recipe import accelerate_config

    files: list[Path] = []
    for path in (recipe_argument(path, None) for path in paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()))
        else:
            files.append(path)
    if not files:
        raise UserError(f"no recipe files in {', '.join(map(str, paths))}")
    valid, errors = [], []
    for file in files:
        try:
            described = accelerate_config.check_file(file)
            if described is not None:
                valid.append((file, described))
                continue
            loaded = load_recipe(file)
            check_local_files(loaded)
            if loaded.stage == "pipeline":  # its stage recipes, as the pipeline wires them, must validate too
                from rlhf_pipeline.pipeline import plan_stages

                for plan in plan_stages(loaded):
                    check_local_files(plan.loaded)
            valid.append((file, loaded.stage))
        except RecipeError as exc:
            errors.append(exc)
    return valid, errors


def check_tracker_packages(loaded: LoadedRecipe) -> None:
    """The trackers `training.report_to` names must be installed (checked at --dry-run and before a run loads its
    models, not by `rlhf recipe validate`: a recipe may be checked on another machine than the one that runs it)."""
    from rlhf_pipeline.recipe.trackers import missing_packages

    training = getattr(loaded.recipe, "training", None)
    report_to = training.get("report_to") if isinstance(training, dict) else getattr(training, "report_to", None)
    missing = missing_packages(report_to)
    if missing:
        names = ", ".join(name for name, _ in missing)
        pip = " ".join(dict.fromkeys(p for _, p in missing))
        extra = {"tensorboard", "trackio", "wandb"} >= {name for name, _ in missing}  # pyproject's [tracking]
        raise loaded.error("training.report_to", f"{names}: the package is not installed here: pip install {pip}"
                                                 + (" (or pip install 'rlhf-pipeline[tracking]')" if extra else ""))


def check_push(loaded: LoadedRecipe) -> None:
    """A run that is to push itself when it finishes (`--push-to-hub`, `hub.push`) is refused before it trains when
    it could not: no token, or offline."""
    hub = getattr(loaded.recipe, "hub", None)
    if hub is not None and getattr(hub, "push", False):
        from rlhf_pipeline.hub import check_can_push

        try:
            check_can_push()
        except UserError as exc:
            raise loaded.error("hub.push", f"{exc} (or push later with `rlhf push`)") from None


def check_local_files(loaded: LoadedRecipe) -> None:
    """Local data files, chat templates and reward-function files must exist, as the run will check (model paths
    need not: they may be written by an earlier stage); a LoRA adapter the stage starts from must be one its own
    adapter can be folded with (`models.check_adapter_chain`)."""
    from rlhf_pipeline.data import check_data_files
    from rlhf_pipeline.models import check_adapter_chain, check_chat_template
    from rlhf_pipeline.rewards import check_spec

    for key in ("data", "preferences"):
        section = getattr(loaded.recipe, key, None)
        if section is not None and (getattr(section, "files", None) or getattr(section, "datasets", None)):
            check_data_files(loaded, key)
    for key in ("model", "policy"):
        section = getattr(loaded.recipe, key, None)
        if getattr(section, "name_or_path", None):
            check_adapter_chain(loaded, getattr(loaded.recipe, "peft", None), section.name_or_path,
                                f"{key}.name_or_path")
    check_chat_template(loaded)
    for key in ("reward", "gold"):
        source = getattr(loaded.recipe, key, None)
        if getattr(source, "function", None):
            try:
                check_spec(source.function)
            except UserError as exc:
                raise loaded.error(f"{key}.function", str(exc)) from None


def describe_plan(loaded: LoadedRecipe, overwrite: bool, resume: bool = False) -> str:
    """What a run of this recipe would do, without doing any of it."""
    recipe = loaded.recipe
    check_local_files(loaded)
    check_tracker_packages(loaded)
    check_push(loaded)
    plan, flags, needs = _dry_run_plan(loaded, overwrite, resume)
    status_text = {
        "new": "new",
        "restart": "holds an unfinished run with nothing to resume: it will be cleared",
        "replace": f"holds a run: the new one is built in {plan.work} and replaces it once finished",
        "resume": f"resumes from {plan.checkpoint}",
    }[plan.mode]
    if flags:
        status_text = f"with {' '.join(flags)}: {status_text}"
    rows: list[tuple[str, str]] = [
        ("stage", recipe.stage),
        ("recipe", str(loaded.path)),
        ("seed", str(recipe.seed)),
        ("output_dir", f"{recipe.output_dir} ({status_text})"),
    ]
    if recipe.stage == "ppo":
        rows.extend(_ppo_rows(loaded))
    else:
        rows.extend({"dpo": _dpo_rows, "eval": _eval_rows}.get(recipe.stage, _model_rows)(recipe))
    for key in ("data", "preferences"):
        if getattr(recipe, key, None) is not None:
            rows.extend(_data_rows(getattr(recipe, key), key, recipe.seed))
    training = getattr(recipe, "training", None)
    if isinstance(training, dict):
        rows.append(("training", ", ".join(f"{k}={v}" for k, v in training.items()) or "library defaults"))
        rows.append(("batches", _trl_batches(recipe)))
    peft = getattr(recipe, "peft", None)
    if peft is not None:
        rows.append(("peft", f"LoRA r={peft.r} alpha={peft.alpha:g} dropout={peft.dropout:g} on "
                             f"{peft.target_modules}; saved {peft.save}"))
    hub = getattr(recipe, "hub", None)
    if hub is not None and getattr(hub, "push", False) and recipe.stage != "pipeline":
        rows.append(("hub", f"push to {hub.repo_id} ({'private' if hub.private else 'public'}"
                            f"{', branch ' + hub.revision if hub.revision else ''}) when finished"))
    history = f"log.jsonl, {recipe.stage}_curves.png"
    writes = {"eval": "eval.json, eval.md, PNG plots",
              "dpo": f"model + tokenizer (safetensors), eval_before.json, eval_samples.jsonl, {history}",
              "ppo": f"model + tokenizer (safetensors), eval_before.json, samples.jsonl, eval_samples.jsonl, {history}",
              }.get(recipe.stage, f"model + tokenizer (safetensors), {history}") + \
        ", recipe.resolved.yaml, metrics.json (last)"
    rows.append(("writes", writes))
    width = max(len(k) for k, _ in rows)
    return "dry run: nothing was written\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows) + needs


def _dry_run_plan(loaded: LoadedRecipe, overwrite: bool, resume: bool) -> tuple[runs.RunPlan, tuple[str, ...], str]:
    """The plan a dry run shows, made and checked as the run will make it (a resumed run: the same recipe). A dry
    run never refuses over a run: where the run would refuse only for want of --overwrite or --resume, the plan it
    would make with the first flag that works, that flag, and a note saying what the run needs, with its command
    lines; else (plan, (), ''). A refusal that no flag lifts (a run of an older version that --overwrite will not
    delete) is raised."""
    output_dir = loaded.recipe.output_dir
    resume = resume or recipe_checkpoint(loaded) is not None

    def checked_plan(overwrite: bool, resume: bool) -> runs.RunPlan:
        plan = runs.plan_run(output_dir, overwrite, resume)
        if plan.mode == "resume":  # as the run will: the same recipe, or nothing
            check_same_recipe(loaded, plan.work / runs.RECIPE_FILE)
        return plan

    try:
        return checked_plan(overwrite, resume), (), ""
    except runs.NeedsFlag as exc:
        refusal = exc
    works: list[tuple[tuple[str, ...], runs.RunPlan]] = []
    refused: list[tuple[tuple[str, ...], UserError]] = []
    for flags in refusal.alternatives:
        try:
            works.append((flags, checked_plan(overwrite or "--overwrite" in flags, resume or "--resume" in flags)))
        except UserError as exc:
            refused.append((flags, exc))
    if not works:
        raise refused[0][1]
    lines = [f"the run needs {' or '.join(' '.join(flags) for flags, _ in works)}: {refusal}"]
    lines += [f"  {' '.join(flags)} would be refused: {exc}" for flags, exc in refused]
    lines += [f"  {runs.command_line(flags, without=('--dry-run',))}" for flags, _ in works]
    return works[0][1], works[0][0], "\n" + "\n".join(lines)


def _model_rows(recipe: Any) -> list[tuple[str, str]]:
    model = recipe.model
    init = getattr(model, "init", None)
    if init is not None:
        source = (f"new GPT-2: {init.n_layer} layers, {init.n_head} heads, width {init.n_embd}, "
                  f"context {init.n_positions}")
    else:
        source = f"{model.name_or_path} ({model.dtype}{', remote code' if model.trust_remote_code else ''})"
    tokenizer = recipe.tokenizer
    train = getattr(tokenizer, "train", None)
    if train is not None:
        tok = f"train byte-level BPE, vocabulary {train.vocab_size}"
    else:
        tok = tokenizer.name_or_path or "the model's"
    if tokenizer.chat_template:
        tok += " + chat template"
    return [("model", source), ("tokenizer", tok)]


def _ppo_rows(loaded: LoadedRecipe) -> list[tuple[str, str]]:
    from rlhf_pipeline.ppo.plan import plan_of

    recipe = loaded.recipe
    cfg, gen = recipe.training, recipe.generation
    processes = runs.world_size()
    plan = plan_of(loaded, processes)  # does it divide across the processes of this launch?
    reference = recipe.reference.name_or_path or (
        "the policy with its LoRA adapter disabled" if recipe.peft else f"frozen copy of {recipe.policy.name_or_path}")
    kl = f"beta={cfg.kl_coef:g} " + ("(k3, in the loss)" if cfg.advantage_estimator == "grpo" else
                                     f"({cfg.kl_estimator}, in the reward)") + (
        f", adaptive to {cfg.adaptive_kl.target:g} nats over {cfg.adaptive_kl.horizon:g} episodes"
        if cfg.adaptive_kl else ", fixed")
    estimator = {"gae": "gae (PPO with a critic)", "rloo": "rloo (REINFORCE leave-one-out, no critic)",
                 "grpo": "grpo (group-normalised scores, no critic)"}[cfg.advantage_estimator]
    rows = [
        ("advantages", f"{estimator}; whitened" if cfg.whiten_advantages else estimator),
        ("policy", f"{recipe.policy.name_or_path} ({recipe.policy.dtype})"),
        ("reference", reference),
        ("reward", recipe.reward.model or f"function {recipe.reward.function}"),
        ("value", _value_row(recipe)),
    ]
    if recipe.gold:
        rows.append(("gold", recipe.gold.model or f"function {recipe.gold.function}"))
    rows += [
        ("sampling", f"up to {gen.response_length} tokens, temperature {gen.temperature:g}, top_k {gen.top_k}, "
                     f"top_p {gen.top_p:g}, {gen.samples_per_prompt} response(s) per prompt"),
        ("batches", plan.describe("WORLD_SIZE" if processes > 1 else "")),
        ("kl", kl),
    ]
    return rows


def _trl_setting(recipe: Any, key: str) -> Any:
    """A `training:` value of a TRL-backed stage: the recipe's, else its config class's default (from the snapshot:
    no torch)."""
    from rlhf_pipeline.recipe.training_fields import fields_for

    return recipe.training.get(key, fields_for(recipe.stage)[key]["default"])


# what one row of a TRL-backed stage's batch is
BATCH_UNITS = {"pretrain": "blocks", "sft": "examples", "reward": "pairs", "dpo": "pairs"}


def _trl_batches(recipe: Any) -> str:
    """TRL's per-device batch and the global one it makes on the processes of this launch (WORLD_SIZE)."""
    batch, accumulation = (_trl_setting(recipe, "per_device_train_batch_size"),
                           _trl_setting(recipe, "gradient_accumulation_steps"))
    processes, unit = runs.world_size(), BATCH_UNITS[recipe.stage]
    steps, epochs = _trl_setting(recipe, "max_steps"), _trl_setting(recipe, "num_train_epochs")
    length = f"{steps} optimizer steps" if steps > 0 else f"{epochs:g} epoch{'' if epochs == 1 else 's'}"
    return (f"{batch} {unit} per device (per_device_train_batch_size) x {_processes(processes)} x {accumulation} "
            f"gradient accumulation step{'' if accumulation == 1 else 's'} = {batch * processes * accumulation} {unit} "
            f"per optimizer step; {length}")


def _processes(n: int) -> str:
    """The process count of this launch, and where it comes from."""
    return f"{n} processes (WORLD_SIZE)" if n > 1 else "1 process"


def _dpo_rows(recipe: Any) -> list[tuple[str, str]]:
    def setting(key: str) -> Any:
        return _trl_setting(recipe, key)

    gen, evaluation = recipe.generation, recipe.evaluation
    reference = recipe.reference.name_or_path or (
        "the policy with its LoRA adapter disabled" if recipe.peft else f"frozen copy of {recipe.model.name_or_path}")
    loss_type = recipe.training.get("loss_type", ["sigmoid"])
    rows = _model_rows(recipe)
    rows[0] = ("policy", rows[0][1])
    rows += [
        ("reference", reference),
        ("dpo", f"beta={setting('beta'):g}, loss {'+'.join(loss_type) if isinstance(loss_type, list) else loss_type}"
                f", max_length {recipe.training.get('max_length', 'the model context (at most 1024)')}"),
    ]
    if evaluation.prompts:
        rows.append(("evaluation", f"{evaluation.prompts} held-out prompts at most, sampled before and after: up to "
                                   f"{gen.response_length} tokens, temperature {gen.temperature:g}"))
        for key in ("reward", "gold"):
            scorer = getattr(recipe, key)
            if scorer is not None:
                rows.append((key, (scorer.model or f"function {scorer.function}") + " (evaluation only)"))
    else:
        rows.append(("evaluation", "held-out pairs only (evaluation.prompts is 0)"))
    return rows


def _value_row(recipe: Any) -> str:
    """Where PPO's value function starts (the rule of stages.ppo.value_start, told from the files on disk)."""
    from rlhf_pipeline.models import vocabulary_on_disk

    if recipe.training.advantage_estimator != "gae":
        return f"none: {recipe.training.advantage_estimator} needs no critic (no value model is loaded)"
    if recipe.value.mode == "shared":
        return "a head on the policy's trunk (shared)"
    if recipe.value.name_or_path:
        return f"separate, from {recipe.value.name_or_path}"
    policy = recipe.policy.name_or_path
    if not recipe.reward.model:
        return f"separate, from the policy {policy}"
    reward_vocab = vocabulary_on_disk(recipe.reward.model)
    policy_vocab = vocabulary_on_disk(recipe.tokenizer.name_or_path or policy)
    if reward_vocab is None or policy_vocab is None:
        return (f"separate, from the reward model {recipe.reward.model} if its vocabulary is the policy's "
                f"(checked when they load), else from the policy {policy}")
    if reward_vocab == policy_vocab:
        return f"separate, from the reward model {recipe.reward.model} (same vocabulary as the policy)"
    return (f"separate, from the policy {policy}: the reward model's vocabulary differs from the policy's "
            "(value.name_or_path chooses another start)")


def _eval_rows(recipe: Any) -> list[tuple[str, str]]:
    def source(scorer):
        return scorer.model or f"function {scorer.function}"

    rows = []
    if recipe.policy is not None:
        rows += [("policy", recipe.policy.name_or_path), ("baseline", recipe.baseline.name_or_path),
                 ("reference", recipe.reference.name_or_path or "the baseline"),
                 ("sampling", f"{recipe.num_prompts} held-out prompts at most, up to "
                              f"{recipe.generation.response_length} tokens, temperature "
                              f"{recipe.generation.temperature:g}"),
                 ("batches", f"{recipe.batch_size} prompts per generation batch on each process x "
                             f"{_processes(runs.world_size())} = {recipe.batch_size * runs.world_size()} prompts "
                             "sampled at once")]
    if recipe.reward is not None:
        rows.append(("reward", source(recipe.reward)))
    if recipe.gold is not None:
        rows.append(("gold", source(recipe.gold)))
    return rows


def _data_rows(data: Any, key: str, seed: int) -> list[tuple[str, str]]:
    if data.files:
        source = "; ".join(f"{split}: {', '.join(paths)}" for split, paths in data.files.items())
    elif data.datasets:
        return _mixture_rows(data, key, seed)
    else:
        source = data.dataset + (f" [{data.subset}]" if data.subset else "") + (
            f" ({data.data_dir})" if data.data_dir else "")
    if data.eval_split:
        held_out = f"split {data.eval_split!r}"
    elif data.eval_size:
        held_out = f"{data.eval_size:g}{' of' if data.eval_size < 1 else ' rows of'} the train split (seed {seed})"
    else:
        held_out = "none"
    rows = [(key, source), ("splits", f"train {data.train_split!r}; held-out {held_out}")]
    mapped = {k: v for k, v in data.columns.model_dump().items() if v}
    if mapped:
        rows.append(("columns", ", ".join(f"{role} <- {col}" for role, col in mapped.items())))
    return rows


def _mixture_rows(data: Any, key: str, seed: int) -> list[tuple[str, str]]:
    rows = []
    for index, entry in enumerate(data.datasets):
        files = ", ".join(path for paths in (entry.data_files or {}).values() for path in paths)
        source = " ".join(part for part in (entry.path, f"[{entry.name}]" if entry.name else "", files) if part)
        columns = {k: v for k, v in (entry.columns or data.columns).model_dump().items() if v}
        rows.append((f"{key}.datasets.{index}", f"{source}, split {entry.split!r}"
                     + (f", fraction {entry.fraction:g}" if entry.fraction is not None else "")
                     + (f", columns {', '.join(f'{r} <- {c}' for r, c in columns.items())}" if columns else "")))
    held_out = (f"{data.eval_size:g}{' of' if data.eval_size < 1 else ' rows of'} the mixture (seed {seed})"
                if data.eval_size else "none")
    return [*rows, ("splits", f"train: the mixture; held-out {held_out}")]


def format_errors(exc: UserError) -> str:
    if isinstance(exc, RecipeError):
        problems: list[Problem] = exc.problems
        head = "error: " if len(problems) == 1 else f"error: {len(problems)} problems in the recipe:\n  "
        return head + "\n  ".join(str(p) for p in problems)
    return f"error: {exc}"
