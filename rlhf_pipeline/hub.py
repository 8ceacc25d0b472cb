"""Publish a finished run dir to the Hugging Face Hub, with a generated model card.

`push_run` makes a branch of a Hub model repo mirror the run, in one commit: it uploads what a user of the model needs
(safetensors weights, config, tokenizer, adapter files) and what documents the run (recipe.resolved.yaml with
provenance, metrics.json, logs, samples, plots), plus a README.md model card (`model_card`, a huggingface_hub
`ModelCard`), and deletes the repo files the run does not have (a merged model's weights when an adapter run replaces
it). It never uploads pickles (*.bin, *.pt, *.pkl, ...), checkpoints, tracker logs, hidden or temporary files; the
repo's own hidden files (.gitattributes) stay.

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
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Protocol

from rlhf_pipeline import runs
from rlhf_pipeline.errors import UserError

HUB_FILE = "hub.json"
CARD_FILE = "README.md"
EVAL_FILE = "eval.json"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"
SAMPLES_FILE = "samples.jsonl"
ADAPTER_CONFIG = "adapter_config.json"

# What is uploaded: weights, configs, tokenizer files, the recipe, metrics, logs, samples, plots, reports.
UPLOAD_PATTERNS = ("*.safetensors", "*.json", "*.jsonl", "*.yaml", "*.yml", "*.txt", "*.model", "*.jinja",
                   "*.tiktoken", "*.png", "*.md")
# Never uploaded, whatever their name says they are: formats that may run code when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".h5", ".msgpack")
# Directories left out with everything below them: checkpoints and experiment trackers.
CHECKPOINT_DIRS = ("checkpoints", "checkpoint-*")
TRACKER_DIRS = ("runs", "wandb", "trackio", "tensorboard", "mlruns", "__pycache__")
TEMP_PATTERNS = ("*.tmp", "*.temp", "*.lock", "*.swp", "*~", "tmp*")
# Held-out entries of metrics.json that count examples rather than measure the model: not evaluation results.
HELD_OUT_COUNTS = ("eval_prompts", "eval_*_too_long")

PIPELINE_TAGS = {"pretrain": "text-generation", "sft": "text-generation", "ppo": "text-generation",
                 "dpo": "text-generation", "reward": "text-classification"}
STAGE_TEXT = {
    "pretrain": "a causal language model pre-trained on plain text (next-token prediction)",
    "sft": "a causal language model fine-tuned on demonstrations (supervised fine-tuning, SFT)",
    "reward": "a reward model: a sequence classifier with one output, trained on preference pairs (chosen vs "
              "rejected) so that it scores a prompt plus response, higher for preferred responses",
    "ppo": "a policy optimised with PPO (reinforcement learning from human feedback) to maximise a reward, with a "
           "KL penalty that keeps it close to a frozen reference policy",
    "ppo/rloo": "a policy optimised with RLOO (REINFORCE Leave-One-Out, reinforcement learning from human feedback "
                "without a critic: each of k responses to a prompt is judged against the others) to maximise a reward, "
                "with a KL penalty that keeps it close to a frozen reference policy",
    "ppo/grpo": "a policy optimised with GRPO (Group Relative Policy Optimization: rewards normalised within each "
                "prompt's group of k responses, no critic) to maximise a reward, with a KL term in the loss that keeps "
                "it close to a frozen reference policy",
    "dpo": "a policy fine-tuned with DPO (direct preference optimisation) on preference pairs: it raises the "
           "likelihood of chosen over rejected responses relative to a frozen reference policy, with no reward model "
           "in training",
}
NOT_PUSHED = "local run, not pushed"


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


class HubSettings(Protocol):
    """The recipe's `hub:` section (rlhf_pipeline.recipe.schema.HubSection)."""

    repo_id: str | None
    push: bool
    private: bool
    revision: str | None


# ---------------------------------------------------------------------------------------------------------------
# pushing
# ---------------------------------------------------------------------------------------------------------------
def push_run(run_dir: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
             commit_message: str | None = None, token: str | None = None, base_repo_id: str | None = None,
             license: str | None = None) -> PushResult:
    """Make the branch `revision` (default main; created from main when missing) of the Hub model repo `repo_id`
    (created when missing, private unless `private=False`; an existing repo keeps its visibility) mirror a finished
    run dir, with its model card. `base_repo_id` names an adapter's base on the Hub (default: from the base run's
    hub.json); `license` goes into the card's metadata. Records the push in `<run_dir>/hub.json`."""
    path = Path(run_dir)
    check_finished(path)
    check_repo_id(repo_id)
    if base_repo_id is not None:
        check_repo_id(base_repo_id, what="base repo id")
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    if constants.is_offline_mode():
        raise UserError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE)")
    branch = revision or constants.DEFAULT_REVISION
    files, skipped = select_files(path)
    if base_repo_id is not None and ADAPTER_CONFIG not in files:
        raise UserError(f"--base-repo-id names an adapter's base model, but {path} holds no {ADAPTER_CONFIG}")
    adapter = hub_adapter_config(path, base_repo_id) if ADAPTER_CONFIG in files else None
    api = HfApi(token=token)
    card = model_card(path, repo_id=repo_id, endpoint=api.endpoint, license=license, adapter_config=adapter)
    generated = {CARD_FILE: card.encode("utf-8")}  # written for the repo, in place of the run's own file (if any)
    if adapter is not None:
        generated[ADAPTER_CONFIG] = (json.dumps(adapter, indent=2, sort_keys=True) + "\n").encode("utf-8")
    copied = [name for name in files if name not in generated]
    check_no_token(path, copied, generated, token)
    stage = _recipe(path).get("stage", "rlhf")
    message = commit_message or f"Upload {stage} run {path.name} (rlhf-pipeline)"
    operations: list[Any] = [CommitOperationAdd(name, data) for name, data in generated.items()]
    operations += [CommitOperationAdd(name, str(path / name)) for name in copied]
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = api.model_info(repo_id, revision=branch)
        deleted = stale_files([s.rfilename for s in head.siblings or []], [*generated, *copied])
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
    result = PushResult(repo_id=repo_id, url=url, commit_sha=info.oid, files=[*generated, *copied], revision=branch,
                        commit_url=info.commit_url, skipped=skipped, deleted=deleted)
    record = {"repo_id": repo_id, "url": url, "commit_sha": info.oid, "revision": branch,
              "pushed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    runs.atomic_write_text(path / HUB_FILE, json.dumps(record, indent=2) + "\n")
    return result


def push_if_configured(run_dir: str | Path, hub_section: HubSettings | None) -> PushResult | None:
    """Push a finished run at the end of a stage when the recipe's `hub:` section says so (push: true)."""
    if hub_section is None or not hub_section.push:
        return None
    if not hub_section.repo_id:
        raise UserError("hub.push is true but hub.repo_id is not set: name the repo (namespace/name)")
    license = getattr(hub_section, "license", None)
    try:
        result = push_run(run_dir, hub_section.repo_id, private=hub_section.private, revision=hub_section.revision,
                          license=license)
    except UserError as exc:
        command = f"rlhf push {run_dir} --repo-id {hub_section.repo_id}"
        command += "" if hub_section.private else " --public"
        command += f" --revision {hub_section.revision}" if hub_section.revision else ""
        command += f" --license {license}" if license else ""
        raise UserError(f"{exc}\nThe run itself finished; push it again with `{command}`") from None
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
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problem = None
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        problem = "expected `namespace/name`, e.g. `my-org/tiny-ppo`"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            problem = str(exc)
    if problem:
        raise UserError(f"invalid {what} {repo_id!r}: {problem}")


def select_files(run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The run-dir files to upload (POSIX paths relative to the run dir), and those left out with the reason."""
    upload: list[str] = []
    skipped: dict[str, str] = {}
    root = run_dir.resolve()
    for current, dirs, names in os.walk(run_dir):
        here = Path(current)
        for name in sorted(dirs):
            reason = _dir_reason(name)
            if reason:
                skipped[(here / name).relative_to(run_dir).as_posix() + "/"] = reason
                dirs.remove(name)
        dirs.sort()
        for name in sorted(names):
            file = here / name
            rel = file.relative_to(run_dir).as_posix()
            reason = _file_reason(name)
            if reason is None and file.is_symlink() and not file.resolve().is_relative_to(root):
                reason = "a link to outside the run dir"
            if reason is None and not file.is_file():
                reason = "not a regular file"
            if reason:
                skipped[rel] = reason
            else:
                upload.append(rel)
    return upload, skipped


def _dir_reason(name: str) -> str | None:
    if name.startswith("."):
        return "hidden"
    if any(fnmatch(name, p) for p in CHECKPOINT_DIRS):
        return "training checkpoints"
    if name in TRACKER_DIRS:
        return "experiment-tracker logs"
    if any(fnmatch(name, p) for p in TEMP_PATTERNS):
        return "temporary"
    return None


def _file_reason(name: str) -> str | None:
    lower = name.lower()
    if name.startswith("."):
        return "hidden"
    if lower.endswith(PICKLE_SUFFIXES):
        return "pickle (may run code when loaded)"
    if any(fnmatch(lower, p) for p in TEMP_PATTERNS):
        return "temporary"
    if name == HUB_FILE:
        return "local record of earlier pushes"
    if name == CARD_FILE:
        return "replaced by the generated model card"
    if not any(fnmatch(lower, p) for p in UPLOAD_PATTERNS):
        return "not a model, tokenizer, recipe or report file"
    return None


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
    config = _read_json(file)
    if not isinstance(config, dict):
        raise UserError(f"{file} is not a JSON object: expected the adapter config PEFT writes")
    base = str(config.get("base_model_name_or_path") or "")
    repo, revision = base_repo_id, None
    if repo is None:
        local = Path(base).expanduser()
        if not local.is_dir() and _looks_like_hub_id(base):
            return None
        pushed = _read_json(local / HUB_FILE) if local.is_dir() else None
        if not isinstance(pushed, dict) or not pushed.get("repo_id"):
            raise UserError(
                f"{file} names its base model by a local path ({base or 'none'}), which nobody else can load. Push "
                f"the base run first (`rlhf push {base or 'BASE_RUN_DIR'} --repo-id ORG/NAME`, which records it in "
                f"its {HUB_FILE}), or name the base's Hub repo with --base-repo-id ORG/NAME")
        repo, revision = str(pushed["repo_id"]), pushed.get("revision")
    return {**config, "base_model_name_or_path": repo,
            "revision": None if revision in (None, "main") else str(revision)}


def check_no_token(run_dir: Path, files: Iterable[str], generated: dict[str, bytes], token: str) -> None:
    """Refuse to upload anything that contains the token (weights: their safetensors header only)."""
    needle = token.encode("utf-8")
    for name, data in generated.items():
        if needle in data:
            raise UserError(f"the generated {name} contains your Hub token; refusing to push")
    for name in files:
        file = run_dir / name
        data = _safetensors_header_bytes(file) if name.endswith(".safetensors") else file.read_bytes()
        if needle in data:
            raise UserError(f"{file} contains your Hub token; refusing to push it. Remove the token from the file")


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


# ---------------------------------------------------------------------------------------------------------------
# model card
# ---------------------------------------------------------------------------------------------------------------
def model_card(run_dir: str | Path, *, repo_id: str | None = None, endpoint: str | None = None,
               license: str | None = None, adapter_config: dict[str, Any] | None = None) -> str:
    """The README.md model card of a finished run: Hub metadata (base model and relation, datasets, license, tags,
    evaluation results as model-index), then what the model is, lineage, how to load it, metrics, samples, the
    resolved recipe and its provenance. `endpoint` (default: huggingface_hub's, i.e. HF_ENDPOINT) makes the links;
    `repo_id` goes into the loading snippet (default: the run dir's path); `adapter_config` is the adapter config as
    pushed (default: the run's)."""
    from huggingface_hub import ModelCard, constants

    path = Path(run_dir)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    recipe = _recipe(path)
    stage = str(recipe.get("stage") or "unknown")
    metrics = _read_json(path / runs.METRICS_FILE) or {}
    evaluation = _read_json(path / EVAL_FILE)
    adapter = adapter_config or _read_json(path / ADAPTER_CONFIG)
    adapter = adapter if isinstance(adapter, dict) else None
    sources = input_sources(recipe, endpoint)
    has_model = any(path.glob("*.safetensors"))  # an eval run, say, holds reports only
    load_id = repo_id or str(path)

    data = _card_data(recipe, stage, sources, adapter, metrics, evaluation, has_model, repo_id or path.name, license)
    body = [f"# {repo_id or path.name}\n",
            _summary(path, recipe, stage, adapter, metrics),
            _lineage(sources, recipe, endpoint),
            _usage(stage, load_id, adapter, recipe, path) if has_model else "",
            _metrics_section(metrics, evaluation),
            _samples_section(path),
            _recipe_section(path, recipe)]
    text = "\n".join(s for s in body if s).rstrip() + "\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}"))


def _card_data(recipe: dict[str, Any], stage: str, sources: list[Source], adapter: dict | None,
               metrics: dict[str, Any], evaluation: Any, has_model: bool, name: str, license: str | None):
    """The card's metadata, which the Hub indexes: what the model derives from, how, and how it scored."""
    from huggingface_hub import ModelCardData

    base = _base_model(sources, adapter)
    task = PIPELINE_TAGS.get(stage, "text-generation") if has_model else None
    results = _eval_results(recipe, task, metrics, evaluation) if task else []
    tags = ["rlhf-pipeline", "trl", "rlhf", stage]
    tags += ["reward-model"] if stage == "reward" else []
    tags += ["lora"] if adapter is not None else []
    # "merge" on the Hub means several models merged into one; LoRA weights merged into their base are a fine-tune
    relation = ("adapter" if adapter is not None else "finetune") if base else None
    return ModelCardData(base_model=base, base_model_relation=relation, datasets=_hub_datasets(recipe) or None,
                         license=license, library_name=("peft" if adapter is not None else "transformers")
                         if has_model else None, pipeline_tag=task, tags=tags,
                         model_name=name if results else None, eval_results=results or None)


def _base_model(sources: list[Source], adapter: dict | None) -> str | None:
    """The Hub repo the model derives from: an adapter's base (as pushed), else the model or policy it started
    from when that is on the Hub. None for a model initialised from scratch or from a local run not pushed."""
    base = str((adapter or {}).get("base_model_name_or_path") or "")
    if base and not Path(base).expanduser().is_dir() and _looks_like_hub_id(base):
        return base
    return next((s.repo_id for s in sources if s.role in ("model", "policy") and s.repo_id), None)


def _eval_results(recipe: dict[str, Any], task: str, metrics: dict[str, Any], evaluation: Any) -> list:
    """The held-out numbers (metrics.json's eval_*, eval.json's metrics) as model-index entries."""
    from huggingface_hub import EvalResult

    numbers = {k: v for k, v in metrics.items() if k.startswith("eval_") and _is_number(v)
               and not any(fnmatch(k, p) for p in HELD_OUT_COUNTS)}
    if isinstance(evaluation, dict):  # `rlhf eval` writes {"metrics": ..., "samples": ..., "plots": ...}
        report = evaluation.get("metrics", evaluation)
        numbers.update((k, v) for k, v in _flatten(report if isinstance(report, dict) else {}) if _is_number(v))
    dataset = _eval_dataset(recipe)
    return [EvalResult(task_type=task, metric_type=key, metric_value=value, **dataset)
            for key, value in numbers.items()]


def _eval_dataset(recipe: dict[str, Any]) -> dict[str, Any]:
    """What the held-out numbers were measured on, as model-index names it."""
    data = recipe.get("data") or {}
    split = data.get("eval_split") or None
    dataset = data.get("dataset")
    if dataset and _looks_like_hub_id(str(dataset)):
        return {"dataset_type": str(dataset), "dataset_name": str(dataset), "dataset_config": data.get("subset"),
                "dataset_split": split, "dataset_revision": data.get("revision")}
    files = data.get("files")
    held_out = files.get(split) if isinstance(files, dict) and split else None
    held_out = [held_out] if isinstance(held_out, str) else held_out
    name = ("local files " + ", ".join(Path(str(f)).name for f in held_out) if held_out
            else "held-out part of the training data (local files)")
    return {"dataset_type": "local", "dataset_name": name, "dataset_split": split}


@dataclass(frozen=True)
class Source:
    """One model a run was made from (its policy, reward model, ...): where it is and whether it was pushed."""

    role: str
    name: str  # as the recipe names it
    kind: str  # "hub", "pushed", "local" (not pushed), "missing" (a local path not found here), "function", "new"
    url: str | None = None
    repo_id: str | None = None  # a Hub id, or the repo a local run was pushed to
    stage: str | None = None  # a local run's stage
    commit: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        name = _code(self.name)
        if self.kind == "hub":
            rev = f" (revision {_code(self.revision)})" if self.revision else ""
            return f"[{self.repo_id}]({self.url}) on the Hub{rev}"
        if self.kind == "pushed":
            details = [f"the {self.stage} run {name}" if self.stage else name]
            if self.revision and self.revision != "main":
                details.append(f"branch {_code(self.revision)}")
            if self.commit:
                details.append(f"commit {_code(self.commit[:12])}")
            return f"[{self.repo_id}]({self.url}), pushed from {', '.join(details)}"
        if self.kind == "local":
            what = f"{self.stage} run" if self.stage else "model directory (not an rlhf run)"
            return f"{name}: {NOT_PUSHED} ({what})" if self.stage else f"{name}: local {what}, not pushed"
        if self.kind == "missing":
            return f"{name}: local path, not found where this card was written (not pushed)"
        if self.kind == "function":
            return f"the Python function {name} (code, not a model)"
        return self.name


def input_sources(recipe: dict[str, Any], endpoint: str) -> list[Source]:
    """The models a run was made from, by role, as the resolved recipe names them."""
    stage = recipe.get("stage")
    sources: list[Source] = []

    def add(role: str, section: Any, key: str = "name_or_path") -> None:
        if isinstance(section, dict) and section.get(key):
            sources.append(_source(role, str(section[key]), section.get("revision"), endpoint))

    def add_scorers(reward_note: str = "") -> None:
        for key, note in (("reward", reward_note), ("gold", " (reported, not optimised)")):
            section = recipe.get(key)
            if isinstance(section, dict) and section.get("function"):
                sources.append(Source(key + note, str(section["function"]), "function"))
            else:
                add(f"{key} model{note}", section, "model")

    if stage == "ppo":
        add("policy", recipe.get("policy"))
        add_scorers()
        add("reference", recipe.get("reference"))
        value = recipe.get("value") or {}
        if value.get("mode") == "separate":
            add("value", value)
    else:
        model = recipe.get("model") or {}
        if model.get("init"):
            init = model["init"]
            sources.append(Source("model", f"new {init.get('model_type', 'gpt2')} initialised from scratch "
                                           f"({init.get('n_layer')} layers, width {init.get('n_embd')}, context "
                                           f"{init.get('n_positions')})", "new"))
        else:
            add("model", model)
        if stage == "dpo":
            add_scorers(" (scored the evaluation only; DPO trains on the pairs)")
            add("reference", recipe.get("reference"))
    tokenizer = recipe.get("tokenizer") or {}
    if tokenizer.get("train"):
        sources.append(Source("tokenizer", f"byte-level BPE trained on the training text (vocabulary "
                                           f"{tokenizer['train'].get('vocab_size')})", "new"))
    else:
        add("tokenizer", tokenizer)
    return sources


def _source(role: str, name: str, revision: str | None, endpoint: str) -> Source:
    local = Path(name).expanduser()
    if local.is_dir():
        stage = (_recipe(local, missing_ok=True) or {}).get("stage")
        pushed = _read_json(local / HUB_FILE) if (local / HUB_FILE).is_file() else None
        if isinstance(pushed, dict) and pushed.get("repo_id"):
            repo = str(pushed["repo_id"])
            return Source(role, name, "pushed", f"{endpoint}/{repo}", repo, stage, pushed.get("commit_sha"),
                          pushed.get("revision"))
        return Source(role, name, "local", stage=stage)
    if _looks_like_hub_id(name):
        return Source(role, name, "hub", f"{endpoint}/{name}", name, revision=revision)
    return Source(role, name, "missing")


def _looks_like_hub_id(name: str) -> bool:
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_datasets(recipe: dict[str, Any]) -> list[str]:
    data = recipe.get("data") or {}
    dataset = data.get("dataset")
    return [str(dataset)] if dataset and _looks_like_hub_id(str(dataset)) else []


def _summary(path: Path, recipe: dict[str, Any], stage: str, adapter: dict | None, metrics: dict[str, Any]) -> str:
    estimator = (recipe.get("training") or {}).get("advantage_estimator", "gae") if stage == "ppo" else "gae"
    what = STAGE_TEXT.get(f"{stage}/{estimator}") or STAGE_TEXT.get(stage, f"the output of the `{stage}` stage")
    lines = [f"This is {what}, trained with rlhf-pipeline (the `{stage}` stage: `rlhf {stage}`).", ""]
    architecture = _architecture(path)
    if architecture:
        lines.append(f"- **Architecture:** {architecture}")
    if adapter is not None:
        lines.append(f"- **Weights:** a LoRA adapter (r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}) on "
                     f"{_code(adapter.get('base_model_name_or_path') or 'its base model')}")
    elif metrics.get("saved") == "merged":
        lines.append("- **Weights:** full model (LoRA adapters merged into the weights)")
    return "\n".join(lines) + "\n"


def _data_text(recipe: dict[str, Any]) -> str:
    data = recipe.get("data") or {}
    if data.get("dataset"):
        extras = [f"{k} {_code(data[k])}" for k in ("subset", "data_dir", "revision") if data.get(k)]
        extras += [f"split {_code(data['train_split'])}"] if data.get("train_split") else []
        return f"the Hub dataset {_code(data['dataset'])}" + (f" ({', '.join(extras)})" if extras else "")
    files = data.get("files")
    if isinstance(files, dict) and files:
        parts = [f"{split}: {', '.join(_code(p) for p in paths)}" for split, paths in files.items()]
        return "local files, not published (" + "; ".join(parts) + ")"
    return "not recorded"


def _architecture(path: Path) -> str | None:
    """From config.json (the Hub counts the parameters itself, from the safetensors headers)."""
    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        return None
    parts = [_code(config["model_type"])] if config.get("model_type") else []
    facts = (("layers", config.get("n_layer") or config.get("num_hidden_layers")),
             ("width", config.get("n_embd") or config.get("hidden_size")),
             ("context", config.get("n_positions") or config.get("max_position_embeddings")),
             ("vocabulary", config.get("vocab_size")))
    parts += [f"{label} {value}" for label, value in facts if value]
    return ", ".join(parts) or None


def _lineage(sources: list[Source], recipe: dict[str, Any], endpoint: str) -> str:
    lines = ["## Lineage", ""]
    lines += [f"- **{source.role}:** {source.describe()}" for source in sources]
    datasets = _hub_datasets(recipe)
    if datasets:
        lines.append(f"- **data:** [{datasets[0]}]({endpoint}/datasets/{datasets[0]}) on the Hub")
    else:
        lines.append(f"- **data:** {_data_text(recipe)}")
    return "\n".join(lines) + "\n"


def _usage(stage: str, load_id: str, adapter: dict | None, recipe: dict[str, Any], path: Path) -> str:
    ident = json.dumps(load_id)
    module = "peft" if adapter is not None else "transformers"
    if stage == "reward":
        auto = "AutoPeftModelForSequenceClassification" if adapter is not None else "AutoModelForSequenceClassification"
        text = "A reward model scores the whole text (prompt followed by response) with one number:"
        use = ["inputs = tokenizer(prompt + response, return_tensors=\"pt\")",
               "score = model(**inputs).logits[0, 0].item()  # higher: more preferred"]
    else:
        auto = "AutoPeftModelForCausalLM" if adapter is not None else "AutoModelForCausalLM"
        generation = recipe.get("generation") or {}
        sampling = "do_sample=True"
        if generation:
            sampling += f", temperature={generation.get('temperature', 1.0)}"
            if generation.get("top_k"):
                sampling += f", top_k={generation['top_k']}"
            if generation.get("top_p") not in (None, 1.0):
                sampling += f", top_p={generation['top_p']}"
        new_tokens = generation.get("response_length") or 64
        prompt = _first_prompt(path) or "Once upon a time"
        text = "Load it with transformers and sample" + (
            (" as in its held-out evaluation:" if stage == "dpo" else " as during PPO training:") if generation
            else ":")
        use = [f"inputs = tokenizer({json.dumps(prompt)}, return_tensors=\"pt\")",
               f"output = model.generate(**inputs, max_new_tokens={new_tokens}, {sampling})",
               "print(tokenizer.decode(output[0][inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"]
    code = [f"from {module} import {auto}", "from transformers import AutoTokenizer", "",
            f"model = {auto}.from_pretrained({ident})", f"tokenizer = AutoTokenizer.from_pretrained({ident})", *use]
    lines = ["## How to use", "", text, "", _fenced("\n".join(code), "python")]
    if adapter is not None:
        lines += ["", (f"This repo holds a LoRA adapter (`pip install peft`); loading it fetches the base model "
                       f"named in `{ADAPTER_CONFIG}` ({_code(adapter.get('base_model_name_or_path'))}).")]
    return "\n".join(lines) + "\n"


def _first_prompt(path: Path) -> str | None:
    for name in (EVAL_SAMPLES_FILE, SAMPLES_FILE):
        rows = _read_jsonl(path / name)
        if rows and isinstance(rows[0].get("prompt"), str):
            return rows[0]["prompt"][:200]
    return None


def _metrics_section(metrics: dict[str, Any], evaluation: Any) -> str:
    """The numbers as tables; the held-out ones are also the card's model-index."""
    lines = []
    for title, source, data in (("Metrics", f"`{runs.METRICS_FILE}` (written when the stage finished)", metrics),
                                ("Evaluation", f"`{EVAL_FILE}`", evaluation)):
        rows = [(k, v) for k, v in _flatten(data) if _is_number(v)] if isinstance(data, dict) else []
        if rows:
            lines += [f"## {title}", "", f"From {source}:", "", "| metric | value |", "| --- | --- |",
                      *(f"| {key} | {_number(value)} |" for key, value in rows), ""]
    return "\n".join(lines)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: float) -> str:
    """Rounded for reading: 4 significant digits (integers as they are)."""
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _samples_section(path: Path) -> str:
    """A few samples, as JSON (which quotes whatever the model wrote) in a code block (which Markdown leaves be)."""
    evaluation = _read_jsonl(path / EVAL_SAMPLES_FILE)
    if evaluation:
        intro = f"Held-out prompts, sampled before and after training (`{EVAL_SAMPLES_FILE}`):"
        after = {r.get("prompt"): r for r in evaluation if r.get("phase") == "after"}
        rows = [{"prompt": r["prompt"], "before": _sample(r, ("response", "score", "gold")),
                 "after": _sample(after[r["prompt"]], ("response", "score", "gold"))}
                for r in evaluation if r.get("phase") == "before" and r.get("prompt") in after][:5]
        rows = rows or [_sample(r, ("phase", "prompt", "response", "score", "gold")) for r in evaluation[:6]]
    else:
        intro = f"The last rows of `{SAMPLES_FILE}` (sampled during training):"
        rows = [_sample(r, ("update", "prompt", "response", "completion", "chosen", "rejected", "score", "gold"))
                for r in _read_jsonl(path / SAMPLES_FILE)[-5:]]
    if not rows:
        return ""
    text = json.dumps(rows, indent=2, ensure_ascii=False)
    return "\n".join(["## Samples", "", intro, "", _fenced(text, "json")]) + "\n"


def _sample(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The row's `keys` that it has: long texts cut, numbers rounded to 4 digits."""
    def short(value: Any) -> Any:
        if isinstance(value, str) and len(value) > 400:
            return value[:400] + "…"
        return float(_number(value)) if isinstance(value, float) and math.isfinite(value) else value

    return {key: short(row[key]) for key in keys if key in row}


def _recipe_section(path: Path, recipe: dict[str, Any]) -> str:
    text = (path / runs.RECIPE_FILE).read_text(encoding="utf-8")
    rerun = f"rlhf {recipe.get('stage', '<stage>')} {runs.RECIPE_FILE}"
    lines = ["## Training recipe", "",
             (f"The resolved recipe (`{runs.RECIPE_FILE}`): re-run with `{rerun}` (paths are relative to the "
              "directory it was run from)."), "", _fenced(text, "yaml"), ""]
    provenance = recipe.get("provenance")
    if isinstance(provenance, dict):
        lines += ["## Provenance", ""]
        git = provenance.get("git")
        if isinstance(git, dict) and git.get("commit"):
            dirty = " (with uncommitted changes)" if git.get("dirty") else ""
            lines.append(f"- **rlhf-pipeline commit:** {_code(git['commit'])}{dirty}")
        else:
            lines.append("- **rlhf-pipeline commit:** not recorded (not run from a git checkout)")
        lines += [f"- **{key}:** {_code(provenance[key])}" for key in ("created", "command", "python", "platform")
                  if provenance.get(key)]
        versions = provenance.get("versions")
        if isinstance(versions, dict) and versions:
            lines += ["", "| library | version |", "| --- | --- |"]
            lines += [f"| {name} | {version} |" for name, version in versions.items()]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Markdown and file helpers
# ---------------------------------------------------------------------------------------------------------------
def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall("`+", text)), default=0)


def _fenced(text: str, language: str) -> str:
    """A code block whose fence is longer than any run of backticks inside, so that nothing in it ends it early."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{language}\n{text.rstrip(chr(10))}\n{fence}"


def _code(value: Any) -> str:
    """Inline code, likewise fenced."""
    text = str(value).replace("\n", " ")
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _recipe(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    import yaml

    from rlhf_pipeline.recipe.yaml_io import RecipeYamlLoader

    file = path / runs.RECIPE_FILE
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=RecipeYamlLoader)
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise UserError(f"{path} has no {runs.RECIPE_FILE}: not a run dir written by an rlhf stage") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        if missing_ok:
            return {}
        raise UserError(f"cannot read {file}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(file: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file that are JSON objects (none when it cannot be read)."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
