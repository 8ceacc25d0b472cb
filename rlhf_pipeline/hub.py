"""Publish a finished run dir to the Hugging Face Hub, with its model card (rlhf_pipeline.model_card).

`push_run` makes a branch of a Hub model repo mirror the run, in one commit: it uploads what a user of the model needs
(safetensors weights, config, tokenizer, adapter files) and what documents the run (the recipe and provenance as
published, metrics.json, logs, plots), plus the generated README.md, and deletes the repo files the run does not have
(a merged model's weights when an adapter run replaces it). It never uploads pickles (*.bin, *.pt, *.pkl, ...),
checkpoints, tracker logs, hidden or temporary files; the repo's own hidden files (.gitattributes) stay.
`preview_run` writes the same files to a local folder instead, contacting nothing.

Nothing local leaves the machine (rlhf_pipeline.publish): the pushed recipe.resolved.yaml is a rendering that names
local models and data by what they are, never by path, without the command line or platform; samples and the
reports that quote the data go only with `include_samples`; and a last look refuses any file that would carry an
absolute path around the run or the platform string.

An adapter must load on other machines: the pushed copy of adapter_config.json names its base model by Hub repo id
(the repo the base run was pushed to, from its hub.json, or `base_repo_id`), never by a local path. The run dir itself
is left as it is, except for `hub.json`, written after a successful push: the repo, commit and revision it went to
(never the token), so that later pushes can name and link to it.

The token comes from the `token` argument, else from huggingface_hub's own lookup (HF_TOKEN, then the login saved by
`hf auth login`). It is handed to the client and nothing else: it is never printed, logged or written, and a push
refuses files that contain it. `HF_ENDPOINT` redirects every request (huggingface_hub reads it).

Importing this module imports neither torch, transformers nor huggingface_hub.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Protocol

from rlhf_pipeline import runs
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.model_card import ADAPTER_CONFIG, card_base, model_card
from rlhf_pipeline.publish import (
    HUB_FILE,
    REPORTS_WITH_SAMPLES,
    PublicRecipe,
    find_local,
    is_hub_id,
    json_bytes,
    local_markers,
    local_path,
    made_from,
    pushed_to,
    read_recipe,
    sample_reason,
    without_samples,
)

CARD_FILE = "README.md"
EVAL_REPORT = "eval.md"  # `rlhf eval`'s report: it names the models it compared by path
# What is uploaded: weights, configs, tokenizer files, the recipe, metrics, logs, samples, plots, reports.
UPLOAD_PATTERNS = ("*.safetensors", "*.json", "*.jsonl", "*.yaml", "*.yml", "*.txt", "*.model", "*.jinja",
                   "*.tiktoken", "*.png", "*.md")
# What is never uploaded, whatever else its name says: files and directories (with all below them) by lower-case name.
SKIPPED = (
    ("hidden", (".*",)),
    ("pickle (may run code when loaded)", ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib",
                                           "*.npy", "*.npz", "*.h5", "*.msgpack")),
    ("training checkpoints", ("checkpoints", "checkpoint-*")),
    ("experiment-tracker logs", ("runs", "wandb", "trackio", "tensorboard", "mlruns", "__pycache__")),
    ("temporary", ("*.tmp", "*.temp", "*.lock", "*.swp", "*~", "tmp*")),
    ("local record of earlier pushes", (HUB_FILE,)),
    ("replaced by the generated model card", (CARD_FILE.lower(),)),
)
SAMPLES_HINT = "published only with --include-samples (or the recipe's hub.include_samples: true)"


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str  # the repo's page
    commit_sha: str
    files: list[str]  # paths in the repo written by this push, README.md included
    revision: str = "main"
    commit_url: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # run-dir path -> why it was left out
    deleted: list[str] = field(default_factory=list)  # repo files the run no longer has, deleted by this push
    notes: list[str] = field(default_factory=list)  # what the user should know about the card (its base_model)


@dataclass(frozen=True)
class Upload:
    """What a push of a run writes to its repo: files made for the repo (the card, the recipe as published, reports
    without their samples, the adapter config naming its base by repo id), run-dir files copied as they are, and
    what is left out, with why. A preview writes exactly these."""

    run_dir: Path
    generated: dict[str, bytes]
    copied: list[str]
    skipped: dict[str, str]
    notes: list[str]

    @property
    def files(self) -> list[str]:
        return [*self.generated, *self.copied]


class HubSettings(Protocol):
    """The recipe's `hub:` section (rlhf_pipeline.recipe.schema.HubSection)."""

    repo_id: str | None
    push: bool
    private: bool
    revision: str | None


def push_run(run_dir: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
             commit_message: str | None = None, token: str | None = None, base_repo_id: str | None = None,
             license: str | None = None, include_samples: bool | None = None) -> PushResult:
    """Make the branch `revision` (default main; created from main when missing) of the Hub model repo `repo_id`
    (created when missing, private unless `private=False`; an existing repo keeps its visibility) mirror a finished
    run dir, with its model card. `base_repo_id` names the base model on the Hub (an adapter's, written into its
    pushed config; default: found through the run's lineage); `license` goes into the card's metadata;
    `include_samples` publishes samples and the reports that quote the data (default: the recipe's
    hub.include_samples). Records the push in `<run_dir>/hub.json`."""
    path = Path(run_dir)
    check_finished(path)
    check_repo_id(repo_id)
    if base_repo_id is not None:
        check_repo_id(base_repo_id, what="base repo id")
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = check_can_push(token)
    branch = revision or constants.DEFAULT_REVISION
    api = HfApi(token=token)
    upload = prepare_upload(path, repo_id, endpoint=api.endpoint, base_repo_id=base_repo_id, license=license,
                            include_samples=include_samples)
    check_no_token(path, upload.copied, upload.generated, token)
    message = commit_message or f"Upload {read_recipe(path).get('stage', 'rlhf')} run (rlhf-pipeline)"
    operations: list[Any] = [CommitOperationAdd(name, data) for name, data in upload.generated.items()]
    operations += [CommitOperationAdd(name, str(path / name)) for name in upload.copied]
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = api.model_info(repo_id, revision=branch)
        deleted = stale_files([s.rfilename for s in head.siblings or []], upload.files)
        operations += [CommitOperationDelete(name) for name in deleted]
        # parent_commit: the deletions were chosen against this head; a commit pushed meanwhile makes this one fail
        info = api.create_commit(repo_id, operations, commit_message=message, revision=branch,
                                 parent_commit=head.sha)
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset HF_HUB_OFFLINE") from None
    except HfHubHTTPError as exc:
        raise UserError(f"pushing {path} to {repo_id} failed: {_http_reason(exc)}") from None
    except Exception as exc:  # the network: OSError (connection refused, Xet), or the HTTP client's own errors
        if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore"):
            raise UserError(f"pushing {path} to {repo_id} ({api.endpoint}) failed: {exc}") from None
        raise
    url = str(repo_url).rstrip("/") or f"{api.endpoint}/{repo_id}"
    record = {"repo_id": repo_id, "url": url, "commit_sha": info.oid, "revision": branch,
              "pushed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    runs.atomic_write_text(path / HUB_FILE, json.dumps(record, indent=2) + "\n")
    return PushResult(repo_id=repo_id, url=url, commit_sha=info.oid, files=upload.files, revision=branch,
                      commit_url=info.commit_url, skipped=upload.skipped, deleted=deleted, notes=upload.notes)


def preview_run(run_dir: str | Path, repo_id: str, out_dir: str | Path, *, base_repo_id: str | None = None,
                license: str | None = None, include_samples: bool | None = None) -> Upload:
    """Write to `out_dir` (new or empty; never inside the run) exactly the files `push_run` would upload with the same
    arguments, contacting nothing and needing no token. Repo files the run lacks, which a push deletes, are not known
    without the Hub."""
    path, target = Path(run_dir), Path(out_dir)
    check_finished(path)
    check_repo_id(repo_id)
    if base_repo_id is not None:
        check_repo_id(base_repo_id, what="base repo id")
    if target.is_symlink() or (target.exists() and (not target.is_dir() or any(target.iterdir()))):
        raise UserError(f"--preview {target}: it exists and is not an empty directory; preview into a new (or empty) "
                        "one: nothing is overwritten")
    if target.resolve().is_relative_to(path.resolve()):
        raise UserError(f"--preview {target} is inside the run dir {path}: a later push would upload it; choose a "
                        "directory outside the run")
    from huggingface_hub import constants

    upload = prepare_upload(path, repo_id, endpoint=constants.ENDPOINT, base_repo_id=base_repo_id, license=license,
                            include_samples=include_samples)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.preview-{os.getpid()}.tmp"
    try:
        for name, data in upload.generated.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        for name in upload.copied:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path / name, staging / name)
        staging.mkdir(parents=True, exist_ok=True)  # a run with nothing to upload still previews as a folder
        os.replace(staging, target)  # whole or not at all (an empty target dir is replaced)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return upload


def prepare_upload(run_dir: Path, repo_id: str, *, endpoint: str, base_repo_id: str | None = None,
                   license: str | None = None, include_samples: bool | None = None) -> Upload:
    """The files a push of `run_dir` to `repo_id` writes, made and checked here, on this machine only."""
    recipe = read_recipe(run_dir)
    if include_samples is None:
        include_samples = bool((recipe.get("hub") or {}).get("include_samples"))
    files, skipped = select_files(run_dir)
    quoting = [name for name in files if sample_reason(name)]
    if not include_samples:
        skipped.update({name: f"{sample_reason(name)}: {SAMPLES_HINT}" for name in quoting})
        files = [name for name in files if name not in quoting]
    adapter = hub_adapter_config(run_dir, base_repo_id) if ADAPTER_CONFIG in files else None
    public = PublicRecipe(run_dir, recipe)
    # made for the repo, in place of the run's own file (if any)
    card = model_card(run_dir, repo_id=repo_id, endpoint=endpoint, license=license, adapter_config=adapter,
                      include_samples=include_samples, quoted=quoting, base_repo_id=base_repo_id)
    generated = {CARD_FILE: card.encode("utf-8")}
    if runs.RECIPE_FILE in files:
        generated[runs.RECIPE_FILE] = public.text().encode("utf-8")
    if adapter is not None:
        generated[ADAPTER_CONFIG] = (json.dumps(adapter, indent=2, sort_keys=True) + "\n").encode("utf-8")
    for name in REPORTS_WITH_SAMPLES:
        report = runs.read_json(run_dir / name) if name in files and not include_samples else None
        if isinstance(report, dict) and "samples" in report:
            generated[name] = json_bytes(without_samples(report))
    if EVAL_REPORT in files:  # only with samples: it quotes them
        generated[EVAL_REPORT] = public.rewrite((run_dir / EVAL_REPORT).read_text(encoding="utf-8")).encode("utf-8")
    upload = Upload(run_dir, generated, [name for name in files if name not in generated], skipped,
                    _base_notes(run_dir, recipe, adapter, base_repo_id))
    check_nothing_local(upload, local_markers(run_dir, recipe))
    return upload


def _base_notes(run_dir: Path, recipe: dict[str, Any], adapter: dict | None, base_repo_id: str | None) -> list[str]:
    """What a push says (locally) about the card's base_model when the run came from local runs never pushed."""
    base = card_base(run_dir, recipe, adapter, base_repo_id)
    if not base.unpushed:
        return []
    chain = ", ".join(f"{stage} run {path}" if stage != "model" else f"model directory {path}"
                      for stage, path in base.unpushed)
    advice = (f"Push them first, upstream first (`rlhf push {base.unpushed[-1][1]} --repo-id ORG/NAME`), then this "
              "run again, or name the base with --base-repo-id ORG/NAME")
    if base.repo_id:
        return [f"the card's base_model is {base.repo_id}, the nearest model on the Hub this one descends from, "
                f"through local runs that were not pushed ({chain}). {advice}"]
    start = ", which started from scratch" if base.root == "scratch" else ""
    return [f"the card names no base_model: this model descends from local runs that were not pushed ({chain}"
            f"{start}). {advice}"]


def check_can_push(token: str | None = None) -> str:
    """A push needs a token and the Hub: UserError when there is no token (HF_TOKEN, `hf auth login`) or offline mode
    is on. Asked before a stage trains when it is to push its run (`--push-to-hub`, `hub.push`), not hours later.
    Returns the token."""
    from huggingface_hub import constants, get_token

    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    if constants.is_offline_mode():
        raise UserError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE)")
    return token


def push_if_configured(run_dir: str | Path, hub_section: HubSettings | None) -> PushResult | None:
    """Push a finished run at the end of a stage when the recipe's `hub:` section says so (push: true)."""
    if hub_section is None or not hub_section.push:
        return None
    if not hub_section.repo_id:
        raise UserError("hub.push is true but hub.repo_id is not set: name the repo (namespace/name)")
    license = getattr(hub_section, "license", None)
    include_samples = bool(getattr(hub_section, "include_samples", False))
    try:
        result = push_run(run_dir, hub_section.repo_id, private=hub_section.private, revision=hub_section.revision,
                          license=license, include_samples=include_samples)
    except UserError as exc:
        command = f"rlhf push {shlex.quote(str(run_dir))} --repo-id {hub_section.repo_id}"
        command += "" if hub_section.private else " --public"
        command += f" --revision {hub_section.revision}" if hub_section.revision else ""
        command += f" --license {license}" if license else ""
        command += " --include-samples" if include_samples else ""
        raise UserError(f"{exc}\nThe run itself finished; push it again with `{command}`") from None
    for note in result.notes:
        print(f"[rlhf hub] note: {note}", file=sys.stderr, flush=True)
    print(f"[rlhf hub] pushed {run_dir} to {result.url} (commit {result.commit_sha[:12]})", file=sys.stderr,
          flush=True)
    return result


def check_finished(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory: expected a run dir written by an rlhf stage")
    if not runs.is_finished(run_dir):
        reason = ("the stage has not finished (it is still running, or was interrupted)"
                  if (run_dir / runs.RECIPE_FILE).is_file() else "it is not an rlhf run dir")
        raise UserError(f"{run_dir} has no {runs.METRICS_FILE}: {reason}; only finished runs are pushed")


def check_repo_id(repo_id: str, what: str = "repo id") -> None:
    """A repo to push to is `namespace/name`; huggingface_hub checks the rest."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("expected `namespace/name`, e.g. `my-org/tiny-ppo`")
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"invalid {what} {repo_id!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# what is pushed
# ---------------------------------------------------------------------------------------------------------------
def select_files(run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The run-dir files to upload (POSIX paths relative to the run dir), and those left out with the reason."""
    upload: list[str] = []
    skipped: dict[str, str] = {}
    root = run_dir.resolve()
    for current, dirs, names in os.walk(run_dir):
        here = Path(current).relative_to(run_dir)
        for name in sorted(dirs):
            if reason := skip_reason(name):
                skipped[(here / name).as_posix() + "/"] = reason
                dirs.remove(name)
        dirs.sort()
        for name in sorted(names):
            file = Path(current) / name
            reason = skip_reason(name)
            if reason is None and not any(fnmatch(name.lower(), p) for p in UPLOAD_PATTERNS):
                reason = "not a model, tokenizer, recipe or report file"
            if reason is None and not file.resolve().is_relative_to(root):
                reason = "a link to outside the run dir"
            if reason is None and not file.is_file():
                reason = "not a regular file"
            if reason:
                skipped[(here / name).as_posix()] = reason
            else:
                upload.append((here / name).as_posix())
    return upload, skipped


def skip_reason(name: str) -> str | None:
    """Why a file or directory of this name is never uploaded (None: it may be)."""
    return next((reason for reason, patterns in SKIPPED if any(fnmatch(name.lower(), p) for p in patterns)), None)


def stale_files(repo_files: Iterable[str], pushed: Iterable[str]) -> list[str]:
    """The repo files this push deletes: every one the push does not write, but the repo's own hidden files
    (.gitattributes, which tells git what is LFS), which a run never holds."""
    keep = set(pushed)
    return sorted(p for p in repo_files if p not in keep and not any(part.startswith(".") for part in p.split("/")))


def hub_adapter_config(run_dir: Path, base_repo_id: str | None) -> dict[str, Any] | None:
    """The adapter_config.json to push when its base must be renamed: `base_model_name_or_path` set to the base's Hub
    repo (`base_repo_id`, else the one the base run's hub.json records, with its branch as PEFT's `revision`). None
    when the run's own file can go as it is (its base is a Hub id). Refuses a local base it cannot name."""
    file = run_dir / ADAPTER_CONFIG
    config = runs.read_json(file)
    if not isinstance(config, dict):
        raise UserError(f"{file} is not a JSON object: expected the adapter config PEFT writes")
    base = str(config.get("base_model_name_or_path") or "")
    local = local_path(base, made_from(run_dir, read_recipe(run_dir))) if base else None
    if base_repo_id is None and (local is None or not local.is_dir()) and is_hub_id(base):
        return None
    pushed = {"repo_id": base_repo_id} if base_repo_id else pushed_to(local) if local and local.is_dir() else None
    if pushed is None:
        raise UserError(
            f"{file} names its base model by a local path ({base or 'none'}), which nobody else can load. Push "
            f"the base run first (`rlhf push {base or 'BASE_RUN_DIR'} --repo-id ORG/NAME`, which records it in "
            f"its {HUB_FILE}), or name the base's Hub repo with --base-repo-id ORG/NAME")
    revision = pushed.get("revision")
    return {**config, "base_model_name_or_path": str(pushed["repo_id"]),
            "revision": None if revision in (None, "main") else str(revision)}


def check_nothing_local(upload: Upload, markers: list[str]) -> None:
    """Refuse to upload anything that holds a local path around the run or the platform string (weights: their
    safetensors header, where metadata lives)."""
    for name, data in upload.generated.items():
        if found := find_local(data, markers):
            raise UserError(f"the {name} made for the repo would hold {found!r}, a local detail; refusing to push "
                            "(a bug in rlhf-pipeline: please report it)")
    for name in upload.copied:
        file = upload.run_dir / name
        if found := find_local(_upload_bytes(file), markers):
            raise UserError(f"{file} holds {found!r}, a local path or platform string; refusing to push it (nothing "
                            "local leaves the machine). Remove it from the file, or move the file out of the run dir")


def check_no_token(run_dir: Path, files: Iterable[str], generated: dict[str, bytes], token: str) -> None:
    """Refuse to upload anything that contains the token (weights: their safetensors header only)."""
    needle = token.encode("utf-8")
    for name, data in generated.items():
        if needle in data:
            raise UserError(f"the generated {name} contains your Hub token; refusing to push")
    for name in files:
        file = run_dir / name
        if needle in _upload_bytes(file):
            raise UserError(f"{file} contains your Hub token; refusing to push it. Remove the token from the file")


def _upload_bytes(file: Path) -> bytes:
    """What a check reads of a file to upload: all of it, but only the header (metadata) of safetensors weights."""
    return _safetensors_header_bytes(file) if file.name.endswith(".safetensors") else file.read_bytes()


def _safetensors_header_bytes(file: Path) -> bytes:
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return head
        size = int.from_bytes(head, "little")
        return handle.read(min(size, 100_000_000))


def _http_reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    hint = {401: "the Hub rejected the token (set HF_TOKEN or run `hf auth login` with a valid token)",
            403: "the token may not write to this namespace (it needs write access to the repo's user or org)",
            404: "repo or revision not found",
            412: "the branch moved while pushing (another push?); push again"}.get(status or 0)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{hint}: {first}" if hint else first
