"""Publish a labelling run (`rlhf label`) to the Hugging Face Hub as a dataset repo, with its dataset card.

`rlhf push LABEL_DIR --repo-id ORG/NAME` makes a branch of a Hub *dataset* repo mirror the run's labels, in one
commit:
- preferences.jsonl: the preference pairs in TRL's format, rebuilt from the stored samples and labels;
- summary.json: counts, agreement between labelers, human win rates;
- README.md: the dataset card (`dataset_card.md`), with its metadata (license, tags, the split's file).

Private by the same rules as a model push (rlhf_pipeline.hub): nothing uploaded names a local path, the user or the
machine. Labeler names become `labeler-1`, `labeler-2`, ... (in the order they first labelled); a model or dataset is
named by its Hub id (a local model by the repo its run was pushed to, from its hub.json), else described as local;
the recipe, its provenance (command line, host, versions) and the raw samples stay on the machine. The token is
huggingface_hub's (HF_TOKEN or `hf auth login`), sent in the Authorization header only, never written; a push refuses
files that contain it. Importing this module imports neither torch nor huggingface_hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhf_pipeline import runs
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.model_card import hub_datasets
from rlhf_pipeline.publish import is_hub_id, pushed_to

TEMPLATE = Path(__file__).with_name("dataset_card.md")
CARD_FILE = "README.md"
DATA_FILE = "preferences.jsonl"
SUMMARY_FILE = "summary.json"
HUB_FILE = "hub.json"


@dataclass(frozen=True)
class DatasetPushResult:
    repo_id: str
    url: str
    commit_sha: str
    files: list[str]
    revision: str = "main"
    commit_url: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # nothing of the run dir is skipped: its files are rebuilt
    deleted: list[str] = field(default_factory=list)


def is_label_run(run_dir: str | Path) -> bool:
    marker = runs.run_marker(Path(run_dir))
    return marker is not None and marker.get("stage") == "label"


def push_labels(run_dir: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
                license: str | None = None, token: str | None = None) -> DatasetPushResult:
    """Make the branch `revision` (default main; created from main when missing) of the Hub dataset repo `repo_id`
    (created when missing, private unless `private=False`) hold the run's preference pairs, summary and card, and
    nothing else (but its hidden files). Records the push in `<run_dir>/hub.json`."""
    from rlhf_pipeline.hub import check_can_push, check_no_token, check_repo_id, stale_files
    from rlhf_pipeline.publish import find_local, local_markers, read_recipe

    path = Path(run_dir)
    if not is_label_run(path):
        raise UserError(f"{path} is not the output dir of an `rlhf label` run")
    check_repo_id(repo_id)
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = check_can_push(token)
    api = HfApi(token=token)
    generated = dataset_files(path, repo_id, api.endpoint, license)
    check_no_token(path, [], generated, token)
    markers = local_markers(path, read_recipe(path))  # the last look, as for a model push: nothing local leaves
    for name, data in generated.items():
        if found := find_local(data, markers):
            raise UserError(f"the {name} made for the dataset repo would hold {found!r}, a local path or platform "
                            "string; refusing to push (if a prompt or response holds it, remove that row)")
    branch = revision or constants.DEFAULT_REVISION
    operations: list[Any] = [CommitOperationAdd(name, data) for name, data in generated.items()]
    try:
        repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if branch != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, repo_type="dataset", exist_ok=True)
        head = api.dataset_info(repo_id, revision=branch)
        deleted = stale_files([s.rfilename for s in head.siblings or []], list(generated))
        operations += [CommitOperationDelete(name) for name in deleted]
        info = api.create_commit(repo_id, operations, commit_message="Upload human preference labels (rlhf-pipeline)",
                                 revision=branch, parent_commit=head.sha, repo_type="dataset")
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset HF_HUB_OFFLINE") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"pushing {path} to the dataset repo {repo_id} failed (HTTP {status}): {first}") from None
    except Exception as exc:  # the network: OSError, or the HTTP client's own errors
        if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore"):
            raise UserError(f"pushing {path} to {repo_id} ({api.endpoint}) failed: {exc}") from None
        raise
    url = str(repo_url).rstrip("/") or f"{api.endpoint}/datasets/{repo_id}"
    record = {"repo_id": repo_id, "repo_type": "dataset", "url": url, "commit_sha": info.oid, "revision": branch,
              "pushed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    runs.atomic_write_text(path / HUB_FILE, json.dumps(record, indent=2) + "\n")
    return DatasetPushResult(repo_id=repo_id, url=url, commit_sha=info.oid, files=list(generated), revision=branch,
                             commit_url=info.commit_url, deleted=deleted)


def dataset_files(run_dir: Path, repo_id: str, endpoint: str, license: str | None = None) -> dict[str, bytes]:
    """What a push uploads (repo path -> bytes), built from the run's samples and labels."""
    from rlhf_pipeline.label.store import preference_rows, read_run, summarise
    from rlhf_pipeline.recipe.load import resolved_data

    recipe = resolved_data((run_dir / runs.RECIPE_FILE).read_text())
    items, labels = read_run(run_dir)
    if not labels:
        raise UserError(f"{run_dir} holds no labels yet: nothing to publish")
    alias: dict[str, str] = {}
    for label in labels:
        alias.setdefault(label["labeler"], f"labeler-{len(alias) + 1}")
    labels = [{**label, "labeler": alias[label["labeler"]]} for label in labels]
    rows = [row for label in labels if label["item"] in items for row in preference_rows(items[label["item"]], label)]
    if not rows:
        raise UserError(f"{run_dir}: no label orders two different responses yet (ties, all bad and skips give no "
                        "pairs): nothing to publish")
    summary = summarise(str(recipe.get("mode")), items, labels, pairs=len(rows))
    last_session = runs.read_json(run_dir / SUMMARY_FILE) or {}  # knows the prompts planned but not sampled yet
    summary["prompts"] = max(summary["prompts"], int(last_session.get("prompts") or 0))
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    card = dataset_card(recipe, summary, rows, repo_id, endpoint, license)
    return {CARD_FILE: card.encode("utf-8"), DATA_FILE: data,
            SUMMARY_FILE: (json.dumps(summary, indent=1) + "\n").encode("utf-8")}


def dataset_card(recipe: dict[str, Any], summary: dict[str, Any], rows: list[dict[str, Any]], repo_id: str,
                 endpoint: str, license: str | None) -> str:
    from huggingface_hub import DatasetCard, DatasetCardData

    endpoint = endpoint.rstrip("/")
    mode = str(recipe.get("mode"))
    sources = hub_datasets(recipe.get("data") or {})
    card_data = DatasetCardData(
        license=license, pretty_name=f"Human preferences: {repo_id.split('/')[-1]}",
        size_categories=size_category(len(rows)), task_categories=["text-generation"],
        tags=["rlhf", "preference", "human-feedback", "trl", "rlhf-pipeline"], source_datasets=sources or None,
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILE}]}])
    generation = recipe.get("generation") or {}
    models = []
    for name, section in model_sections(recipe).items():
        own = {**generation, **(section.get("generation") or {})}
        models.append({"name": name, "source": model_text(section, endpoint), "length": own.get("response_length"),
                       "temperature": own.get("temperature"), "top_k": own.get("top_k"), "top_p": own.get("top_p")})
    k = rows[0]["num_responses"]
    responses = (f"{k} per prompt, ranked by the labeler (or only the best picked); each ranking expanded into the "
                 "pairs it orders, as InstructGPT did (K ranked responses give K choose 2 pairs)"
                 if mode == "rank" else "2 per prompt, a candidate's and the baseline's, judged side by side")
    rates = [{"name": name, "rate": f"{r['win_rate']:.3f}", "interval": f"{r['low']:.3f} - {r['high']:.3f}",
              "prompts": r["prompts"], "wins": r["wins"], "losses": r["losses"], "ties": r["ties"],
              "both_bad": r["both_bad"]} for name, r in (summary.get("win_rates") or {}).items()]
    return DatasetCard.from_template(
        card_data, template_str=TEMPLATE.read_text(encoding="utf-8"), title=card_data.pretty_name,
        mode_text="ranking mode" if mode == "rank" else "A/B mode: two models side by side",
        conversational=isinstance(rows[0]["prompt"], list), prompts=summary["prompts"],
        prompts_labelled=summary["prompts_labelled"], data_source=data_text(recipe.get("data") or {}, endpoint),
        responses_text=responses, labels=summary["labels"], labelers=len(summary["labelers"]),
        decisions=", ".join(f"{DECISION_TEXT.get(d, d)}: {count}" for d, count in sorted(summary["decisions"].items())),
        pairs=len(rows), pairs_text="Ties, all bad and skips give no pair; nor do two identical responses.",
        agreement=agreement_text(summary["agreement"]), win_rates=rates, repo_id=repo_id, models=models,
        seed=recipe.get("seed")).content


DECISION_TEXT = {"ranking": "rankings", "tie": "ties", "bad": "all (or both) bad", "skip": "skipped"}


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def model_sections(recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    named = {"policy": recipe["policy"]} if recipe.get("policy") else dict(recipe.get("policies") or {})
    if recipe.get("baseline"):
        named["baseline"] = recipe["baseline"]
    return named


def model_text(section: dict[str, Any], endpoint: str) -> str:
    """A model as the card names it: its Hub id (linked), the repo a local run was pushed to, or "a local model"."""
    name = str(section.get("name_or_path") or "")
    local = Path(name).expanduser()
    if local.is_dir():
        pushed = pushed_to(local)
        if pushed is None:
            return "a local model (not on the Hub)"
        name = str(pushed["repo_id"])
    elif not is_hub_id(name):
        return "a local model (not on the Hub)"
    revision = section.get("revision")
    return f"[{name}]({endpoint}/{name})" + (f" (revision `{revision}`)" if revision else "")


def data_text(data: dict[str, Any], endpoint: str) -> str:
    """Where the prompts came from: the Hub datasets (linked), or local files (never their paths)."""
    names = hub_datasets(data)
    local = bool(data.get("files")) or any(
        isinstance(entry, dict) and entry.get("data_files") for entry in data.get("datasets") or [])
    parts = [f"[{name}]({endpoint}/datasets/{name})" for name in names] + (["local files"] if local else [])
    return " and ".join(parts) or "local data"


def agreement_text(agreement: dict[str, Any]) -> str:
    if not agreement.get("units"):
        return ""

    def figure(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.3f}"

    lines = [f"On the {agreement['units']} judgements that two or more labelers made (each pair of responses in "
             f"ranking mode; each prompt in A/B mode): pairwise agreement {figure(agreement['pairwise_agreement'])}, "
             f"Krippendorff's alpha (nominal) {figure(agreement['krippendorff_alpha'])}.", ""]
    if agreement["cohen_kappa"]:
        lines += ["| labelers | shared judgements | agreement | Cohen's kappa |", "|---|---|---|---|"]
        lines += [f"| {pair} | {v['units']} | {v['agreement']:.3f} | {figure(v['kappa'])} |"
                  for pair, v in agreement["cohen_kappa"].items()]
    return "\n".join(lines)
