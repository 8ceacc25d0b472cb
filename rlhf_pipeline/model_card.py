"""The model card (README.md) of a finished run dir: huggingface_hub's `ModelCard`, made from the template
model_card.md (Jinja) with its metadata.

The metadata (`ModelCardData`, the held-out numbers as `EvalResult`s, i.e. model-index) is what the Hub indexes: the
base model and how the run derives from it, datasets, license, tags, evaluation results. The text says what the model
is, its lineage (each model it was made from, linked where it is on the Hub: a local run by the repo its hub.json
records), how to load it, its metrics and samples, the resolved recipe and its provenance. The Hub counts parameters
itself, from the safetensors headers.

Importing this module imports neither torch, transformers nor huggingface_hub.
"""

from __future__ import annotations

import json
import math
import re
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, NamedTuple

from rlhf_pipeline import runs
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.models import ADAPTER_CONFIG
from rlhf_pipeline.recipe.schema import BUILDERS

TEMPLATE = Path(__file__).with_name("model_card.md")
HUB_FILE = "hub.json"  # written by a push: the repo, commit and revision the run went to
EVAL_FILE = "eval.json"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"
SAMPLES_FILE = "samples.jsonl"
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


class Source(NamedTuple):
    """One model a run was made from (its policy, reward model, ...), described for the lineage."""

    role: str
    text: str
    repo_id: str | None = None  # the Hub repo it is on (a local run: the one it was pushed to)


def model_card(run_dir: str | Path, *, repo_id: str | None = None, endpoint: str | None = None,
               license: str | None = None, adapter_config: dict[str, Any] | None = None) -> str:
    """The README.md of a finished run. `endpoint` (default: huggingface_hub's, i.e. HF_ENDPOINT) makes the links;
    `repo_id` is the title and goes into the loading snippet (default: the run dir); `adapter_config` is the adapter
    config as pushed (default: the run's)."""
    from huggingface_hub import ModelCard, constants

    path = Path(run_dir)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    recipe = read_recipe(path)
    stage = str(recipe.get("stage") or "unknown")
    metrics = runs.read_json(path / runs.METRICS_FILE) or {}
    evaluation = runs.read_json(path / EVAL_FILE)
    adapter = adapter_config or runs.read_json(path / ADAPTER_CONFIG)
    adapter = adapter if isinstance(adapter, dict) else None
    lineage = _lineage(recipe, endpoint)
    has_model = any(path.glob("*.safetensors"))  # an eval run, say, holds reports only
    data = _card_data(recipe, stage, lineage, adapter, metrics, evaluation, has_model, repo_id or path.name, license)
    estimator = (recipe.get("training") or {}).get("advantage_estimator", "gae") if stage == "ppo" else "gae"
    card = ModelCard.from_template(
        data, template_path=str(TEMPLATE), title=repo_id or path.name, stage=stage, adapter=adapter,
        what=STAGE_TEXT.get(f"{stage}/{estimator}") or STAGE_TEXT.get(stage, f"the output of the `{stage}` stage"),
        architecture=_architecture(path), saved=metrics.get("saved"), lineage=lineage,
        data=_data_text(recipe, endpoint), generation=recipe.get("generation"),
        usage=_usage(path, recipe, stage, adapter, repo_id) if has_model else None,
        tables=_metric_tables(metrics, evaluation), samples=_samples(path),
        recipe_text=(path / runs.RECIPE_FILE).read_text(encoding="utf-8").rstrip("\n"),
        provenance=recipe.get("provenance") if isinstance(recipe.get("provenance"), dict) else None,
        code=code, fence=fence)
    return str(card).rstrip("\n") + "\n"  # Jinja drops the template's last newline


# ---------------------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------------------
def _card_data(recipe: dict[str, Any], stage: str, lineage: list[Source], adapter: dict | None,
               metrics: dict[str, Any], evaluation: Any, has_model: bool, name: str, license: str | None):
    """What the model derives from and how, what it is for, how it scored."""
    from huggingface_hub import ModelCardData

    base = str((adapter or {}).get("base_model_name_or_path") or "")
    if not base or Path(base).expanduser().is_dir() or not is_hub_id(base):  # not an adapter on a Hub model
        base = next((s.repo_id for s in lineage if s.role in ("model", "policy") and s.repo_id), None)
    task = PIPELINE_TAGS.get(stage, "text-generation") if has_model else None
    results = _eval_results(recipe, task, metrics, evaluation) if task else []
    tags = ["rlhf-pipeline", "trl", "rlhf", stage, *(["reward-model"] if stage == "reward" else []),
            *(["lora"] if adapter is not None else [])]
    # "merge" on the Hub means several models merged into one; LoRA weights merged into their base are a fine-tune
    relation = ("adapter" if adapter is not None else "finetune") if base else None
    return ModelCardData(base_model=base, base_model_relation=relation, license=license, tags=tags, pipeline_tag=task,
                         datasets=hub_datasets(recipe.get("data") or {}) or None,
                         library_name=("peft" if adapter is not None else "transformers") if has_model else None,
                         model_name=name if results else None, eval_results=results or None)


def _eval_results(recipe: dict[str, Any], task: str, metrics: dict[str, Any], evaluation: Any) -> list:
    """The held-out numbers (metrics.json's eval_*, eval.json's metrics) as model-index entries."""
    from huggingface_hub import EvalResult

    numbers = {k: v for k, v in metrics.items() if k.startswith("eval_") and _is_number(v)
               and not any(fnmatch(k, p) for p in HELD_OUT_COUNTS)}
    if isinstance(evaluation, dict):  # `rlhf eval` writes {"metrics": ..., "samples": ..., "plots": ...}
        numbers.update(_numbers(evaluation.get("metrics", evaluation)))
    data = recipe.get("data") or {}
    split, files = data.get("eval_split") or None, data.get("files")
    if data.get("dataset") and is_hub_id(str(data["dataset"])):
        dataset = {"dataset_type": str(data["dataset"]), "dataset_name": str(data["dataset"]),
                   "dataset_config": data.get("subset"), "dataset_revision": data.get("revision")}
    else:
        held_out = _as_list(files.get(split) if isinstance(files, dict) else None)
        dataset = {"dataset_type": "local", "dataset_name": "local files " + ", ".join(Path(f).name for f in held_out)
                   if held_out else "held-out part of the training data (local files)"}
    return [EvalResult(task_type=task, metric_type=key, metric_value=value, dataset_split=split, **dataset)
            for key, value in numbers.items()]


# ---------------------------------------------------------------------------------------------------------------
# lineage
# ---------------------------------------------------------------------------------------------------------------
def _lineage(recipe: dict[str, Any], endpoint: str) -> list[Source]:
    """The models a run was made from, by role, as its resolved recipe names them."""
    sources: list[Source] = []

    def add(role: str, section: Any, key: str = "name_or_path") -> None:
        if isinstance(section, dict) and section.get(key):
            sources.append(_source(role, str(section[key]), section.get("revision"), endpoint))

    def add_scorers(note: str = "") -> None:
        for key, extra in (("reward", note), ("gold", " (reported, not optimised)")):
            section = recipe.get(key)
            if isinstance(section, dict) and section.get("function"):
                sources.append(Source(key + extra, f"the Python function {code(section['function'])} (code, not a "
                                                   "model)"))
            else:
                add(f"{key} model{extra}", section, "model")

    stage, model, tokenizer = recipe.get("stage"), recipe.get("model") or {}, recipe.get("tokenizer") or {}
    if stage == "ppo":
        add("policy", recipe.get("policy"))
        add_scorers()
        add("reference", recipe.get("reference"))
        if (recipe.get("value") or {}).get("mode") == "separate":
            add("value", recipe.get("value"))
    elif model.get("init"):
        init = model["init"]
        sources.append(Source("model", f"new {init.get('model_type', 'gpt2')} initialised from scratch ("
                                       f"{init.get('n_layer')} layers, width {init.get('n_embd')}, context "
                                       f"{init.get('n_positions')})"))
    else:
        add("model", model)
    if stage == "dpo":
        add_scorers(" (scored the evaluation only; DPO trains on the pairs)")
        add("reference", recipe.get("reference"))
    if tokenizer.get("train"):
        sources.append(Source("tokenizer", f"byte-level BPE trained on the training text (vocabulary "
                                           f"{tokenizer['train'].get('vocab_size')})"))
    else:
        add("tokenizer", tokenizer)
    return sources


def _source(role: str, name: str, revision: str | None, endpoint: str) -> Source:
    local = Path(name).expanduser()
    if local.is_dir():
        stage = read_recipe(local, missing_ok=True).get("stage")
        pushed = pushed_to(local)
        if pushed is None:
            what = f"local run, not pushed ({stage} run)" if stage else "local model directory, not pushed"
            return Source(role, f"{code(name)}: {what}")
        repo, branch, commit = pushed["repo_id"], pushed.get("revision"), pushed.get("commit_sha")
        details = [f"the {stage} run {code(name)}" if stage else code(name)]
        details += [f"branch {code(branch)}"] if branch not in (None, "main") else []
        details += [f"commit {code(commit[:12])}"] if commit else []
        return Source(role, f"[{repo}]({endpoint}/{repo}), pushed from {', '.join(details)}", repo)
    if is_hub_id(name):
        return Source(role, f"[{name}]({endpoint}/{name}) on the Hub" + (f" (revision {code(revision)})" if revision
                                                                         else ""), name)
    return Source(role, f"{code(name)}: local path, not found where this card was written (not pushed)")


def _data_text(recipe: dict[str, Any], endpoint: str) -> str:
    data = recipe.get("data") or {}
    dataset, files, mixture = data.get("dataset"), data.get("files"), data.get("datasets")
    if dataset:
        extras = [f"{key.replace('_', ' ')} {code(data[key])}" for key in ("subset", "data_dir", "revision",
                                                                              "train_split") if data.get(key)]
        return _dataset_link(str(dataset), endpoint) + (f" ({', '.join(extras)})" if extras else "")
    if isinstance(files, dict) and files:
        parts = [f"{split}: {', '.join(code(p) for p in _as_list(paths))}" for split, paths in files.items()]
        return "local files, not published (" + "; ".join(parts) + ")"
    if isinstance(mixture, list) and mixture:  # TRL's `datasets:` shape: one line per entry
        entries = []
        for entry in mixture:
            source = (_dataset_link(str(entry["path"]), endpoint) if entry.get("path") not in (None, *BUILDERS)
                      else "local files " + ", ".join(code(p) for p in _as_list(entry.get("data_files"))))
            extras = [f"{key.replace('_', ' ')} {code(entry[key])}"
                      for key in ("name", "data_dir", "revision", "split", "fraction") if entry.get(key)]
            entries.append(source + (f" ({', '.join(extras)})" if extras else ""))
        return "a mixture of " + "; ".join(entries)
    return "not recorded"


def _dataset_link(name: str, endpoint: str) -> str:
    return f"[{name}]({endpoint}/datasets/{name}) on the Hub" if _is_hub_dataset(name) else f"the dataset {code(name)}"


def _is_hub_dataset(name: str) -> bool:
    return name not in BUILDERS and not Path(name).expanduser().exists() and is_hub_id(name)


def hub_datasets(data: dict[str, Any]) -> list[str]:
    """The Hub datasets a recipe's `data:` reads: `dataset`, or the `path` of each mixture entry (for the card's
    `datasets` metadata; local files and builders such as `json` are left out)."""
    mixture = [entry.get("path") for entry in data.get("datasets") or [] if isinstance(entry, dict)]
    names = [data.get("dataset"), *mixture]
    return list(dict.fromkeys(str(n) for n in names if n and _is_hub_dataset(str(n))))


def pushed_to(run_dir: Path) -> dict[str, Any] | None:
    """The record of the last push of a run dir (its hub.json), when it names a repo."""
    record = runs.read_json(run_dir / HUB_FILE)
    return record if isinstance(record, dict) and record.get("repo_id") else None


def is_hub_id(name: str) -> bool:
    """`name` (a model or dataset as a recipe names it) is a valid Hub repo id: `gpt2`, `org/name`, but not
    `./runs/sft`, `/abs/path` or `~/x`. A relative path like `runs/sft` is one too: ask the disk first."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# what the model is, how to use it, how it did
# ---------------------------------------------------------------------------------------------------------------
def _architecture(path: Path) -> str | None:
    """From config.json."""
    config = runs.read_json(path / "config.json")
    if not isinstance(config, dict):
        return None
    facts = (("layers", config.get("n_layer") or config.get("num_hidden_layers")),
             ("width", config.get("n_embd") or config.get("hidden_size")),
             ("context", config.get("n_positions") or config.get("max_position_embeddings")),
             ("vocabulary", config.get("vocab_size")))
    parts = [code(config["model_type"])] if config.get("model_type") else []
    return ", ".join(parts + [f"{label} {value}" for label, value in facts if value]) or None


def _usage(path: Path, recipe: dict[str, Any], stage: str, adapter: dict | None, repo_id: str | None) -> dict:
    """The loading snippet's values: the Auto class, the repo (or run dir), a prompt it saw and how it sampled."""
    generation = recipe.get("generation") or {}
    sampling = ["do_sample=True"]
    if generation:
        sampling.append(f"temperature={generation.get('temperature', 1.0)}")
        sampling += [f"top_k={generation['top_k']}"] if generation.get("top_k") else []
        sampling += [f"top_p={generation['top_p']}"] if generation.get("top_p") not in (None, 1.0) else []
    rows = runs.read_jsonl(path / EVAL_SAMPLES_FILE) or runs.read_jsonl(path / SAMPLES_FILE)
    prompt = rows[0]["prompt"][:200] if rows and isinstance(rows[0].get("prompt"), str) else "Once upon a time"
    prompt = json.dumps(prompt)
    auto = f"Auto{'Peft' if adapter else ''}ModelFor{'SequenceClassification' if stage == 'reward' else 'CausalLM'}"
    return {"auto": auto, "repo": json.dumps(repo_id or str(path)), "prompt": prompt, "sampling": ", ".join(sampling),
            "new_tokens": generation.get("response_length") or 64, "fence": fence(prompt)}


def _metric_tables(metrics: dict[str, Any], evaluation: Any) -> list[dict[str, Any]]:
    """The numbers, rounded for reading (the model-index has them exact)."""
    tables = [{"title": title, "source": source, "rows": [(k, _number(v)) for k, v in _numbers(data).items()]}
              for title, source, data in (("Metrics", f"`{runs.METRICS_FILE}` (written when the stage finished)",
                                           metrics), ("Evaluation", f"`{EVAL_FILE}`", evaluation))]
    return [table for table in tables if table["rows"]]


def _samples(path: Path) -> dict[str, str] | None:
    """A few samples as JSON (which quotes whatever the model wrote) for a code block (which Markdown leaves be):
    held-out prompts before and after training side by side, else the last ones sampled during training."""
    evaluation = runs.read_jsonl(path / EVAL_SAMPLES_FILE)
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
                for r in runs.read_jsonl(path / SAMPLES_FILE)[-5:]]
    return {"intro": intro, "json": json.dumps(rows, indent=2, ensure_ascii=False)} if rows else None


def _sample(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The row's `keys` that it has: long texts cut, numbers rounded to 4 digits."""
    def short(value: Any) -> Any:
        if isinstance(value, str) and len(value) > 400:
            return value[:400] + "…"
        return float(_number(value)) if isinstance(value, float) and math.isfinite(value) else value

    return {key: short(row[key]) for key in keys if key in row}


def _numbers(data: Any, prefix: str = "") -> dict[str, float]:
    """The finite numbers in nested dicts, by dotted key."""
    found: dict[str, float] = {}
    for key, value in (data.items() if isinstance(data, dict) else ()):
        if isinstance(value, dict):
            found.update(_numbers(value, f"{prefix}{key}."))
        elif _is_number(value):
            found[f"{prefix}{key}"] = value
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: float) -> str:
    """Rounded for reading: 4 significant digits (integers as they are)."""
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value or []]


# ---------------------------------------------------------------------------------------------------------------
# Markdown and the run dir
# ---------------------------------------------------------------------------------------------------------------
def fence(text: str, least: int = 3) -> str:
    """A code fence longer than any run of backticks in `text`, so that nothing in it ends the block early."""
    return "`" * max(least, max((len(run) for run in re.findall("`+", text)), default=0) + 1)


def code(value: Any) -> str:
    """Inline code, likewise fenced."""
    text = str(value).replace("\n", " ")
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence(text, 1)}{pad}{text}{pad}{fence(text, 1)}"


def read_recipe(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    """A run dir's recipe.resolved.yaml, provenance included ({} when `missing_ok` and it cannot be read)."""
    import yaml

    from rlhf_pipeline.recipe.yaml_io import YamlLimitError, load_text

    file = path / runs.RECIPE_FILE
    try:  # within the recipe limits: a run dir's file may be anyone's (an alias bomb would hang the push)
        data = load_text(file.read_text(encoding="utf-8"))[0]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, YamlLimitError) as exc:
        if missing_ok:
            return {}
        if isinstance(exc, FileNotFoundError):
            raise UserError(f"{path} has no {runs.RECIPE_FILE}: not a run dir written by an rlhf stage") from None
        raise UserError(f"cannot read {file}: {exc}") from None
    return data if isinstance(data, dict) else {}
