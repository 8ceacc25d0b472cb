"""The `rlhf` command line: parses arguments and dispatches. Imports neither torch nor transformers at start-up."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from rlhf_pipeline import __version__, commands, runs
from rlhf_pipeline.errors import (
    EXIT_ENVIRONMENT,
    EXIT_GATE_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    DiskFull,
    GateFailed,
    Interrupted,
    UserError,
)
from rlhf_pipeline.recipe.schema import STAGE_RECIPES

HELP = ("The whole RLHF recipe for GPT-2-class models: pretrain, sft, reward, ppo (or dpo). Recipes are YAML files; "
        "recipe sets ship with the package (`rlhf recipes list`): `rlhf pipeline tiny` runs the tiny default, "
        "offline, on a CPU.")
app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
recipe_app = typer.Typer(help="Check and inspect recipes (fast: no torch).", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
recipes_app = typer.Typer(help="The recipe sets shipped with rlhf-pipeline: the tiny default (offline, CPU), GPT-2 "
                               "and Qwen recipes, Accelerate configs. List them, or copy one to edit.",
                          no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

RecipeArg = Annotated[Path, typer.Argument(
    help="Recipe YAML file. When no such file or folder is here, a shipped recipe by name: a set (`tiny`: its recipe "
         "for this command) or one of its recipes (`tiny/sft`); see `rlhf recipes list`. A folder: its recipe for "
         "this command.", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE",
                 help="Override a recipe key, e.g. --set training.learning_rate=1e-4 (repeatable; values typed as "
                      "in YAML)."),
]
OutputDirOpt = Annotated[
    Optional[Path], typer.Option("--output-dir", help="Write here instead of the recipe's output_dir.")
]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace the finished (or resumable) run in the output dir: the new run is built beside it "
                        "and takes its place only once finished.")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue the unfinished run in the output dir from its last complete checkpoint (with "
                     "--overwrite: the interrupted run that was to replace a finished one).")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Resolve and validate the recipe, print the plan, write nothing. Over a finished or interrupted "
                      "run too: it plans as the run would with the flag it needs (--overwrite, --resume) and says so.")]
PushToHubOpt = Annotated[Optional[str], typer.Option(
    "--push-to-hub", metavar="ORG/NAME", help="When the run finishes, push it to this Hub model repo, as `rlhf push` "
                                              "does (overrides the recipe's hub.repo_id and implies hub.push).")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input becomes a message on stderr and exit code 2, never a traceback."""
    try:
        yield
    except DiskFull as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ENVIRONMENT) from None
    except UserError as exc:
        typer.echo(commands.format_errors(exc), err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except GateFailed as exc:
        typer.echo(f"stopped: {exc}", err=True)
        raise typer.Exit(EXIT_GATE_FAILED) from None
    except Interrupted as exc:
        typer.echo(str(exc) + (f"\nresume with: {exc.resume_command}" if exc.resume_command else ""), err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the run did not finish (no metrics.json); work since its last checkpoint, if any, "
                   "is lost. Resume from a checkpoint with --resume.", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _stage(stage: str, recipe: Path, set_: list[str] | None, output_dir: Path | None, overwrite: bool,
           dry_run: bool, resume: bool = False, push_to_hub: str | None = None) -> None:
    with user_errors():
        plan = commands.run_stage(stage, recipe, commands.stage_overrides(set_, output_dir, push_to_hub), overwrite,
                                  dry_run, resume)
    if plan:
        typer.echo(plan)


@app.command()
def pretrain(recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False,
             resume: ResumeOpt = False, dry_run: DryRunOpt = False, push_to_hub: PushToHubOpt = None) -> None:
    """Pre-train a causal LM on plain text (optionally training a new tokenizer and initialising a new model)."""
    _stage("pretrain", recipe, set_, output_dir, overwrite, dry_run, resume, push_to_hub)


@app.command()
def sft(recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False,
        resume: ResumeOpt = False, dry_run: DryRunOpt = False, push_to_hub: PushToHubOpt = None) -> None:
    """Supervised fine-tuning (TRL SFTTrainer) on text, prompt/completion or conversational data."""
    _stage("sft", recipe, set_, output_dir, overwrite, dry_run, resume, push_to_hub)


@app.command()
def reward(recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False,
           resume: ResumeOpt = False, dry_run: DryRunOpt = False, push_to_hub: PushToHubOpt = None) -> None:
    """Train a reward model on preference pairs (TRL RewardTrainer); reports held-out accuracy and margin."""
    _stage("reward", recipe, set_, output_dir, overwrite, dry_run, resume, push_to_hub)


@app.command()
def ppo(recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False,
        resume: ResumeOpt = False, dry_run: DryRunOpt = False, push_to_hub: PushToHubOpt = None) -> None:
    """PPO against a reward model or function, with a KL penalty to a frozen reference (our own trainer)."""
    _stage("ppo", recipe, set_, output_dir, overwrite, dry_run, resume, push_to_hub)


@app.command()
def dpo(recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False,
        resume: ResumeOpt = False, dry_run: DryRunOpt = False, push_to_hub: PushToHubOpt = None) -> None:
    """Direct preference optimisation (TRL DPOTrainer) of a policy on preference pairs; reports held-out reward
    accuracy and before/after scores of sampled responses."""
    _stage("dpo", recipe, set_, output_dir, overwrite, dry_run, resume, push_to_hub)


@app.command("eval")
def evaluate(recipe: RecipeArg, set_: SetOpt = None, output_dir: OutputDirOpt = None,
             overwrite: OverwriteOpt = False, dry_run: DryRunOpt = False) -> None:
    """Evaluate a reward model on held-out pairs and/or a policy against a baseline; writes eval.json, a Markdown
    report and plots."""
    _stage("eval", recipe, set_, output_dir, overwrite, dry_run)


@app.command()
def label(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
    host: Annotated[Optional[str], typer.Option(
        "--host", help="Serve on this address instead of the recipe's server.host (default 127.0.0.1: this machine "
                       "only; another address needs a password: RLHF_LABEL_PASSWORD or typed).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", min=1, max=65535,
                                                help="Serve on this port (default: the recipe's, else from 7860).")]
    = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Serve a local labelling page: rank sampled responses (a preference dataset for `rlhf reward` / `rlhf dpo`) or
    judge two models side by side (a human win rate for `rlhf eval`). Every label is saved as it is given; a
    restart goes on where it stopped. Needs `pip install 'rlhf-pipeline[label]'`."""
    with user_errors():
        plan = commands.run_label(recipe, commands.stage_overrides(set_, output_dir), host, port, dry_run)
    if plan:
        typer.echo(plan)


@app.command()
def pipeline(
    recipe: RecipeArg,
    set_: SetOpt = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", metavar="STAGE",
                                                      help="Re-run this stage and every later one.")] = None,
    only: Annotated[Optional[str], typer.Option("--only", metavar="STAGE",
                                                help="Run this stage only (earlier outputs must exist).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-run every stage, up to date or not.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Resume the interrupted stage from its last checkpoint (done anyway when its recipe and "
                         "inputs are unchanged; with --resume, having nothing to resume is an error).")] = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Run the stages of a pipeline recipe in order, wiring each output into the next stage and skipping the
    stages that are up to date; stops before PPO when the reward model fails the quality gate (exit code 3).
    `rlhf pipeline tiny` runs the tiny default that ships with the package, writing runs/tiny/ here."""
    with user_errors():
        summary = commands.run_pipeline(recipe, set_ or [], from_stage, only, force, dry_run, resume)
    if runs.is_main_process():  # once, in a multi-process launch
        typer.echo(summary)


@app.command()
def plan(
    recipe: RecipeArg,
    set_: SetOpt = None,
    processes: Annotated[Optional[int], typer.Option(
        "--processes", metavar="N", help="Processes (GPUs) the run is spread over; overrides the Accelerate config's "
                                         "num_processes. Default: the config's, else 1.")] = None,
    device_memory: Annotated[Optional[str], typer.Option(
        "--device-memory", metavar="SIZE", help="Memory of one device, e.g. 24GiB, 80GB, 512MiB: warn, with the knobs "
                                                "to turn, when the estimated peak exceeds it.")] = None,
    accelerate_config: Annotated[Optional[Path], typer.Option(
        "--accelerate-config", metavar="FILE", help="An Accelerate config YAML (e.g. recipes/accelerate/fsdp.yaml): "
                                                    "DDP, FSDP or DeepSpeed ZeRO, processes, mixed precision.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Plan a run without loading weights: examples per optimizer step, rollouts per PPO update, steps or updates,
    tokens per step, FLOPs (PPO: generation, scoring, training) and the peak memory per device of every model the
    stage holds. A pipeline recipe is planned stage by stage."""
    with user_errors():
        typer.echo(commands.plan(recipe, set_ or [], processes, device_memory, accelerate_config, as_json))


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="A finished run dir (it has metrics.json).", show_default=False)],
    repo_id: Annotated[str, typer.Option("--repo-id", metavar="ORG/NAME", show_default=False,
                                         help="Hub model repo to push to (a dataset repo for an `rlhf label` run); "
                                              "created when missing.")],
    private: Annotated[bool, typer.Option("--private/--public",
                                          help="Visibility of a repo this push creates (an existing repo keeps its "
                                               "own).")] = True,
    revision: Annotated[Optional[str], typer.Option("--revision", metavar="BRANCH",
                                                    help="Branch to push to, created from main when missing; "
                                                         "default main.")] = None,
    base_repo_id: Annotated[Optional[str], typer.Option(
        "--base-repo-id", metavar="ORG/NAME",
        help="The model this one was trained from, on the Hub: the card's base_model, and for an adapter the base "
             "written into the pushed adapter_config.json. Default: the repo the parent run was pushed to (its "
             "hub.json), else the nearest published ancestor.")] = None,
    license: Annotated[Optional[str], typer.Option("--license", metavar="ID",
                                                   help="License id for the model card, e.g. mit.")] = None,
    include_samples: Annotated[Optional[bool], typer.Option(
        "--include-samples/--no-samples",
        help="Publish the generated samples and the reports that quote prompts of the data (samples.jsonl, "
             "eval_samples.jsonl, eval.md, the samples in eval_before.json). Default: the recipe's "
             "hub.include_samples (false unless set).", show_default=False)] = None,
    preview: Annotated[Optional[Path], typer.Option(
        "--preview", metavar="DIR",
        help="Write to DIR (new or empty) exactly the files the push would upload, card included, and say what it "
             "leaves out; contacts nothing, needs no token.")] = None,
) -> None:
    """Make the repo mirror a finished run dir: weights, tokenizer, metrics, the recipe as published and a model
    card with its lineage; repo files the run does not have are deleted. Nothing local is published: no path, command
    line or platform (models and data are named by Hub id or as `local file NAME`), and samples only when asked. An
    `rlhf label` run goes to a dataset repo: its preference pairs, summary and a dataset card (labeler names
    pseudonymised). The token comes from HF_TOKEN or `hf auth login` and is never written anywhere."""
    from rlhf_pipeline.hub import preview_run, push_run
    from rlhf_pipeline.hub_dataset import is_label_run, push_labels

    notes: list[str] = []
    with user_errors():
        if is_label_run(run_dir):  # human labels: a dataset repo
            if base_repo_id is not None:
                raise UserError("--base-repo-id names an adapter's base model; a labelling run has none")
            if preview is not None:
                raise UserError("--preview shows a model push; a labelling run's dataset repo holds only what its "
                                "card lists (preferences.jsonl, summary.json, README.md), rebuilt at the push")
            result = push_labels(run_dir, repo_id, private=private, revision=revision, license=license)
            skipped = result.skipped
        elif preview is not None:
            upload = preview_run(run_dir, repo_id, preview, base_repo_id=base_repo_id, license=license,
                                 include_samples=include_samples)
            skipped, notes = upload.skipped, upload.notes
        else:
            result = push_run(run_dir, repo_id, private=private, revision=revision, base_repo_id=base_repo_id,
                              license=license, include_samples=include_samples)
            skipped, notes = result.skipped, result.notes
    for path, reason in skipped.items():
        typer.echo(f"left out {path}: {reason}", err=True)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    if preview is not None:
        typer.echo(f"preview: {len(upload.files)} files in {preview}, as a push to {repo_id} would upload them "
                   "(it would also delete the repo files the run does not have); nothing was sent")
        return
    for path in result.deleted:
        typer.echo(f"deleted {path} from the repo: the run does not have it", err=True)
    typer.echo(f"pushed {len(result.files)} files to {result.url} (revision {result.revision}, "
               f"commit {result.commit_sha[:12]})")


@recipe_app.command("validate")
def recipe_validate(
    paths: Annotated[list[Path], typer.Argument(
        help="Recipe files, or directories to search for *.yaml; a shipped set or recipe by name (`tiny`, "
             "`tiny/sft`) when no such file or folder is here.")],
) -> None:
    """Validate recipes (and Accelerate configs) against their schema; exit code 2 if any is invalid."""
    with user_errors():
        valid, errors = commands.validate_paths(paths)
    for path, stage in valid:
        typer.echo(f"ok  {path}  ({stage})")
    for error in errors:
        typer.echo(commands.format_errors(error), err=True)
    if errors:
        raise typer.Exit(EXIT_USER_ERROR)


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Print the fully resolved recipe: extends merged, --set applied, defaults filled in."""
    with user_errors():
        typer.echo(commands.show_recipe(recipe, set_ or []), nl=False)


@recipe_app.command("keys")
def recipe_keys(
    stage: Annotated[str, typer.Argument(help=f"The stage: {', '.join(STAGE_RECIPES)}.")],
    section: Annotated[Optional[str], typer.Argument(
        help="Only this top-level key of the recipe, e.g. `data` or `training`.")] = None,
) -> None:
    """List every key a stage's recipe accepts, with its default and help text."""
    from rlhf_pipeline.recipe.reference import stage_reference

    with user_errors():
        typer.echo(stage_reference(stage, section))


@recipes_app.command("list")
def recipes_list() -> None:
    """List the shipped recipe sets: name, what each is, its recipes (and a pipeline's stages)."""
    with user_errors():
        typer.echo(commands.list_recipe_sets())


@recipes_app.command("copy")
def recipes_copy(
    name: Annotated[str, typer.Argument(help="The set, as `rlhf recipes list` names it (e.g. tiny, gpt2-hh, "
                                             "accelerate).", show_default=False)],
    directory: Annotated[Path, typer.Argument(help="A new or empty folder to copy it into.", show_default=False)],
) -> None:
    """Copy a shipped recipe set, data included, into a new or empty folder to edit it; prints the commands that run
    the copy. Its data paths ({recipe_dir}/...) name the copy's own files."""
    with user_errors():
        typer.echo(commands.copy_recipe_set(name, directory))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rlhf-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """The whole RLHF recipe for GPT-2-class models: pretrain, sft, reward, ppo (or dpo). Recipes are YAML files;
    recipe sets ship with the package (`rlhf recipes list`): `rlhf pipeline tiny` runs the tiny default, offline, on
    a CPU."""


def main() -> None:
    try:
        app(prog_name="rlhf")
    finally:
        commands.end_process_group()


if __name__ == "__main__":
    sys.exit(main())
