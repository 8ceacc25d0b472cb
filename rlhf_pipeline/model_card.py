"""The model card (README.md) of a finished run dir: huggingface_hub's `ModelCard`, made from the template
model_card.md (Jinja) with its metadata.

The metadata (`ModelCardData`) is what the Hub indexes: the base model and how the run derives from it, the Hub
datasets, license, tags (what trained it), and as model-index this model's own held-out results after training on a
Hub dataset. The text says what the model is, its lineage (each model it was made from, linked where it is on the
Hub: a local run by the repo its hub.json records), how to load and sample it as training did, its metrics (before
training too), samples when they are published, the method's paper and citation, the resolved recipe and its
provenance as published (rlhf_pipeline.publish: no local path, command line or platform).

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
from rlhf_pipeline.models import ADAPTER_CONFIG
from rlhf_pipeline.publish import (
    REPORTS_WITH_SAMPLES,
    PublicRecipe,
    ancestry,
    data_file,
    dataset_ref,
    function_ref,
    is_hub_id,
    local_path,
    made_from,
    model_ref,
    parent_model,
    quoting_files,
    read_recipe,
    without_samples,
)
from rlhf_pipeline.recipe.schema import BUILDERS, GenerationSection

TEMPLATE = Path(__file__).with_name("model_card.md")
EVAL_FILE = "eval.json"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"
SAMPLES_FILE = "samples.jsonl"
# Held-out entries of metrics.json that count examples rather than measure the model, or measure it before training:
# the card's text shows them, its model-index (this model's results) does not.
HELD_OUT_COUNTS = ("eval_prompts", "eval_pairs", "eval_num_*", "eval_ties", "eval_*_too_long")
BEFORE_TRAINING = ("*_before", "*_before_*")
USAGE_PROMPT = "Once upon a time"  # when no sample is published: a prompt of the data would quote it
USAGE_RESPONSE = " there was a tiny language model."

PIPELINE_TAGS = {"pretrain": "text-generation", "sft": "text-generation", "ppo": "text-generation",
                 "dpo": "text-generation", "reward": "text-classification"}
# Whose trainer made the model: TRL's (SFT, reward, DPO), transformers' Trainer (pre-training); PPO/RLOO/GRPO are ours.
TRAINED_WITH = {"pretrain": "transformers", "sft": "trl", "reward": "trl", "dpo": "trl"}
METHOD_TAGS = {"ppo/gae": "ppo", "ppo/rloo": "rloo", "ppo/grpo": "grpo"}
STAGE_TEXT = {
    "pretrain": "a causal language model pre-trained on plain text (next-token prediction)",
    "sft": "a causal language model fine-tuned on demonstrations (supervised fine-tuning, SFT)",
    "reward": "a reward model: a sequence classifier with one output, trained on preference pairs (chosen vs "
              "rejected) so that it scores a prompt plus response, higher for preferred responses",
    "ppo/gae": "a policy optimised with PPO (reinforcement learning from human feedback) to maximise a reward, with "
               "a KL penalty that keeps it close to a frozen reference policy",
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


def bibtex(kind: str, key: str, **fields: str | tuple[str, ...]) -> str:
    """A BibTeX entry; `author` given as a tuple of "Last, First" names; long values wrapped (BibTeX reads on)."""
    import textwrap

    lines = [f"@{kind}{{{key},"]
    for name, value in fields.items():
        text = " and ".join(value) if isinstance(value, tuple) else value
        wrapped = textwrap.fill(text, width=100, initial_indent=" " * 15, subsequent_indent=" " * 15).strip()
        lines.append(f"  {name:<9} = {{{wrapped}}},")
    return "\n".join(lines) + "\n}"


class Paper(NamedTuple):
    what: str  # what the card cites it for
    arxiv: str
    bibtex: str


PAPERS = {
    "ppo": Paper("PPO, the policy-gradient algorithm", "1707.06347", bibtex(
        "article", "schulman2017proximal", title="Proximal Policy Optimization Algorithms",
        author=("Schulman, John", "Wolski, Filip", "Dhariwal, Prafulla", "Radford, Alec", "Klimov, Oleg"),
        journal="arXiv preprint arXiv:1707.06347", year="2017")),
    "instructgpt": Paper(
        "RLHF: a reward model trained on human preference comparisons, then PPO against it with a KL penalty "
        "(InstructGPT)", "2203.02155", bibtex(
            "inproceedings", "ouyang2022training",
            title="Training language models to follow instructions with human feedback",
            author=("Ouyang, Long", "Wu, Jeff", "Jiang, Xu", "Almeida, Diogo", "Wainwright, Carroll L.",
                    "Mishkin, Pamela", "Zhang, Chong", "Agarwal, Sandhini", "Slama, Katarina", "Ray, Alex",
                    "Schulman, John", "Hilton, Jacob", "Kelton, Fraser", "Miller, Luke", "Simens, Maddie",
                    "Askell, Amanda", "Welinder, Peter", "Christiano, Paul", "Leike, Jan", "Lowe, Ryan"),
            booktitle="Advances in Neural Information Processing Systems", volume="35", year="2022",
            eprint="2203.02155", archivePrefix="arXiv")),
    "rloo": Paper("RLOO (REINFORCE Leave-One-Out)", "2402.14740", bibtex(
        "inproceedings", "ahmadian2024back",
        title="Back to Basics: Revisiting {REINFORCE}-Style Optimization for Learning from Human Feedback in {LLMs}",
        author=("Ahmadian, Arash", "Cremer, Chris", "Gall{\\'e}, Matthias", "Fadaee, Marzieh", "Kreutzer, Julia",
                "Pietquin, Olivier", "{\\\"U}st{\\\"u}n, Ahmet", "Hooker, Sara"),
        booktitle="Proceedings of the 62nd Annual Meeting of the Association for Computational Linguistics "
                  "(Volume 1: Long Papers)", year="2024", eprint="2402.14740", archivePrefix="arXiv")),
    "grpo": Paper("GRPO (Group Relative Policy Optimization), introduced with DeepSeekMath", "2402.03300", bibtex(
        "article", "shao2024deepseekmath",
        title="{DeepSeekMath}: Pushing the Limits of Mathematical Reasoning in Open Language Models",
        author=("Shao, Zhihong", "Wang, Peiyi", "Zhu, Qihao", "Xu, Runxin", "Song, Junxiao", "Bi, Xiao",
                "Zhang, Haowei", "Zhang, Mingchuan", "Li, Y. K.", "Wu, Y.", "Guo, Daya"),
        journal="arXiv preprint arXiv:2402.03300", year="2024")),
    "dpo": Paper("DPO (Direct Preference Optimization)", "2305.18290", bibtex(
        "inproceedings", "rafailov2023direct",
        title="Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
        author=("Rafailov, Rafael", "Sharma, Archit", "Mitchell, Eric", "Manning, Christopher D.", "Ermon, Stefano",
                "Finn, Chelsea"),
        booktitle="Advances in Neural Information Processing Systems", volume="36", year="2023",
        eprint="2305.18290", archivePrefix="arXiv")),
}
METHOD_PAPERS = {"ppo/gae": ("ppo", "instructgpt"), "ppo/rloo": ("rloo",), "ppo/grpo": ("grpo",), "dpo": ("dpo",),
                 "reward": ("instructgpt",)}
TRL_CITATION = bibtex(
    "software", "vonwerra2020trl", title="{TRL: Transformer Reinforcement Learning}",
    author=("von Werra, Leandro", "Belkada, Younes", "Tunstall, Lewis", "Beeching, Edward", "Thrush, Tristan",
            "Lambert, Nathan", "Huang, Shengyi", "Rasul, Kashif", "Gallou{\\'e}dec, Quentin"),
    license="Apache-2.0", url="https://github.com/huggingface/trl", year="2020")


class Source(NamedTuple):
    """One model a run was made from (its policy, reward model, ...), described for the lineage."""

    role: str
    text: str
    repo_id: str | None = None  # the Hub repo it is on (a local run: the one it was pushed to)


class Base(NamedTuple):
    """The card's base_model: the model this one was trained from, on the Hub."""

    repo_id: str | None
    relation: str | None  # "adapter" (a LoRA adapter on it) or "finetune"
    unpushed: list[tuple[str, str]]  # local runs between this model and base_model, nearest first: (stage, path)
    root: str  # how the line of local runs ends: "hub", "scratch", "unknown" or "none" (nothing it came from)


def model_card(run_dir: str | Path, *, repo_id: str | None = None, endpoint: str | None = None,
               license: str | None = None, adapter_config: dict[str, Any] | None = None,
               include_samples: bool = False, quoted: list[str] | None = None, base_repo_id: str | None = None) -> str:
    """The README.md of a finished run. `endpoint` (default: huggingface_hub's, i.e. HF_ENDPOINT) makes the links;
    `repo_id` is the title and goes into the loading snippet (default: the run dir); `adapter_config` is the adapter
    config as pushed (default: the run's); `include_samples`: the samples are published too (the card quotes them);
    `quoted`: the run's files that quote samples or data (default: those this tool writes); `base_repo_id` names the
    base model on the Hub (default: found through the run's lineage)."""
    from huggingface_hub import ModelCard, constants

    path = Path(run_dir)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    recipe = read_recipe(path)
    public = PublicRecipe(path, recipe)
    stage = str(recipe.get("stage") or "unknown")
    method = f"ppo/{(recipe.get('training') or {}).get('advantage_estimator', 'gae')}" if stage == "ppo" else stage
    metrics = runs.read_json(path / runs.METRICS_FILE) or {}
    evaluation = without_samples(runs.read_json(path / EVAL_FILE))
    adapter = adapter_config or runs.read_json(path / ADAPTER_CONFIG)
    adapter = adapter if isinstance(adapter, dict) else None
    lineage = _lineage(recipe, endpoint)
    has_model = any(path.glob("*.safetensors"))  # an eval run, say, holds reports only
    base = card_base(path, recipe, adapter, base_repo_id)
    data = _card_data(recipe, stage, method, base, adapter, metrics, has_model, repo_id or path.name, license)
    samples = _samples(path) if include_samples else None
    quoted_text = _quoted_text(path, quoted if quoted is not None else quoting_files(path))
    papers, trl = [PAPERS[key] for key in METHOD_PAPERS.get(method, ())], TRAINED_WITH.get(stage) == "trl"
    card = ModelCard.from_template(
        data, template_path=str(TEMPLATE), title=repo_id or path.name, stage=stage, adapter=adapter,
        what=STAGE_TEXT.get(method, f"the output of the `{stage}` stage"),
        architecture=_architecture(path), saved=metrics.get("saved"), lineage=lineage,
        base=base if base.repo_id and base.unpushed else None, link=lambda repo: _link(repo, endpoint),
        data=_data_text(recipe, endpoint, include_samples and bool(quoted_text)),
        usage=_usage(path, recipe, stage, adapter, repo_id, include_samples) if has_model else None,
        tables=_metric_tables(metrics, evaluation), results_note=_results_note(data, metrics, has_model),
        samples=samples, samples_published=include_samples,
        quoted=quoted_text,
        papers=[(paper, f"https://arxiv.org/abs/{paper.arxiv}") for paper in papers], trl=trl,
        citations="\n\n".join([paper.bibtex for paper in papers] + ([TRL_CITATION] if trl else [])),
        recipe_text=public.text().rstrip("\n"),
        provenance=public.data.get("provenance") if isinstance(public.data.get("provenance"), dict) else None,
        code=code, fence=fence)
    return str(card).rstrip("\n") + "\n"  # Jinja drops the template's last newline


# ---------------------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------------------
def card_base(run_dir: Path, recipe: dict[str, Any], adapter: dict[str, Any] | None,
              base_repo_id: str | None = None) -> Base:
    """The model this one was trained from, as the Hub should know it: an adapter's base (as its pushed config names
    it); else `base_repo_id`; else the run's parent model when it is on the Hub (a Hub id, or a local run pushed
    before), or the nearest published ancestor through the local runs it came from (which the card then names)."""
    base = str((adapter or {}).get("base_model_name_or_path") or "")
    if adapter is not None and base and is_hub_id(base) and not local_path(base, made_from(run_dir, recipe)).is_dir():
        return Base(base, "adapter", [], "hub")
    if base_repo_id:
        return Base(base_repo_id, "adapter" if adapter is not None else "finetune", [], "hub")
    parent = parent_model(recipe)
    if parent is None:
        return Base(None, None, [], "none")
    line = ancestry(parent)
    relation = "adapter" if adapter is not None and not line.unpushed else "finetune"
    return Base(line.repo_id, relation if line.repo_id else None, line.unpushed, line.root)


def _card_data(recipe: dict[str, Any], stage: str, method: str, base: Base, adapter: dict | None,
               metrics: dict[str, Any], has_model: bool, name: str, license: str | None):
    """What the model derives from and how, what it is for, what trained it, how it scored."""
    from huggingface_hub import ModelCardData

    task = PIPELINE_TAGS.get(stage, "text-generation") if has_model else None
    results = _eval_results(recipe, task, metrics) if task else []
    tags = ["rlhf-pipeline", *([TRAINED_WITH[stage]] if stage in TRAINED_WITH else []),
            *(["rlhf"] if stage in ("reward", "ppo", "dpo") else []), METHOD_TAGS.get(method, stage),
            *(["reward-model"] if stage == "reward" else []), *(["lora"] if adapter is not None else [])]
    # "merge" on the Hub means several models merged into one; LoRA weights merged into their base are a fine-tune
    return ModelCardData(base_model=base.repo_id, base_model_relation=base.relation, license=license, tags=tags,
                         pipeline_tag=task, datasets=hub_datasets(recipe.get("data") or {}) or None,
                         library_name=("peft" if adapter is not None else "transformers") if has_model else None,
                         model_name=name if results else None, eval_results=results or None)


def own_results(metrics: dict[str, Any]) -> dict[str, float]:
    """This model's held-out results after training: metrics.json's eval_* numbers, less the figures from before
    training and the counts of examples."""
    return {k: v for k, v in metrics.items() if k.startswith("eval_") and _is_number(v)
            and not any(fnmatch(k, p) for p in HELD_OUT_COUNTS + BEFORE_TRAINING)}


def _held_out_dataset(recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The Hub dataset the held-out results were measured on, as EvalResult fields; None for local data (the
    model-index names a dataset by its Hub id: local files have none)."""
    data = recipe.get("data") or {}
    name = str(data.get("dataset") or "")
    if not name or not _is_hub_dataset(name):
        return None
    return {"dataset_type": name, "dataset_name": name, "dataset_config": data.get("subset"),
            "dataset_revision": data.get("revision"), "dataset_split": data.get("eval_split") or None}


def _eval_results(recipe: dict[str, Any], task: str, metrics: dict[str, Any]) -> list:
    """This model's own held-out results as model-index entries (none when the held-out data are not on the Hub)."""
    from huggingface_hub import EvalResult

    dataset = _held_out_dataset(recipe)
    if dataset is None:
        return []
    return [EvalResult(task_type=task, metric_type=key, metric_value=value, **dataset)
            for key, value in own_results(metrics).items()]


def _results_note(data: Any, metrics: dict[str, Any], has_model: bool) -> str | None:
    """Why the metadata holds fewer results than the tables show."""
    if not has_model or not own_results(metrics):
        return None
    if not data.eval_results:
        return ("The held-out data are not a Hub dataset, so the card's metadata holds no results (the Hub's "
                "model-index names its datasets by Hub id).")
    return ("The card's metadata (model-index) holds this model's held-out results after training; figures from "
            "before training and counts are in the tables only.")


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
                sources.append(Source(key + extra, f"the Python function {code(function_ref(section['function']))} "
                                                   "(code, not a model)"))
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


def _link(repo_id: str, endpoint: str) -> str:
    return f"[{repo_id}]({endpoint}/{repo_id})"


def _source(role: str, name: str, revision: str | None, endpoint: str) -> Source:
    """A model as the lineage tells it: linked where it is on the Hub, a local run by its stage (never its path)."""
    ref = model_ref(name)
    if ref.record:
        record = ref.record
        branch, commit = record.get("revision"), record.get("commit_sha")
        details = [f"branch {code(branch)}"] if branch not in (None, "main") else []
        details += [f"commit {code(str(commit)[:12])}"] if commit else []
        origin = f"a local {ref.stage} run" if ref.stage else "a local model directory"
        return Source(role, f"{_link(record['repo_id'], endpoint)}, pushed from {origin}"
                            + (f" ({', '.join(details)})" if details else ""), record["repo_id"])
    if ref.repo_id:
        return Source(role, f"{_link(name, endpoint)} on the Hub" + (f" (revision {code(revision)})" if revision
                                                                      else ""), name)
    if ref.stage:
        line = ancestry(name)
        text = ", trained from ".join(f"a local {stage} run (not pushed)" for stage, _ in line.unpushed)
        ending = {"hub": f", trained from {_link(line.repo_id, endpoint)}" if line.repo_id else "",
                  "scratch": ", which started from scratch"}.get(line.root, "")
        return Source(role, text + ending)
    if Path(name).expanduser().exists():
        return Source(role, "a local model directory, not pushed")
    return Source(role, f"{code(Path(name).name)}: a local path, not found where this card was written")


def _data_text(recipe: dict[str, Any], endpoint: str, samples_published: bool) -> str:
    data = recipe.get("data") or {}
    dataset, files, mixture = data.get("dataset"), data.get("files"), data.get("datasets")
    quoted = "; not published, but the samples published with this card quote prompts from them" \
        if samples_published else ", not published"
    if dataset:
        extras = [f"{key.replace('_', ' ')} {code(data[key])}" for key in ("subset", "data_dir", "revision",
                                                                              "train_split") if data.get(key)]
        text = _dataset_link(str(dataset), endpoint) + (f" ({', '.join(extras)})" if extras else "")
        return text if _is_hub_dataset(str(dataset)) else text + quoted
    if isinstance(files, dict) and files:
        parts = [f"{split}: {', '.join(code(data_file(p).removeprefix('local file ')) for p in _as_list(paths))}"
                 for split, paths in files.items()]
        return f"local files ({'; '.join(parts)}){quoted}"
    if isinstance(mixture, list) and mixture:  # TRL's `datasets:` shape: one line per entry
        entries = []
        for entry in mixture:
            source = (_dataset_link(str(entry["path"]), endpoint) if entry.get("path") not in (None, *BUILDERS)
                      else "local files " + ", ".join(code(data_file(p).removeprefix("local file "))
                                                      for p in _as_list(entry.get("data_files"))))
            extras = [f"{key.replace('_', ' ')} {code(entry[key])}"
                      for key in ("name", "data_dir", "revision", "split", "fraction") if entry.get(key)]
            entries.append(source + (f" ({', '.join(extras)})" if extras else ""))
        return "a mixture of " + "; ".join(entries)
    return "not recorded"


def _dataset_link(name: str, endpoint: str) -> str:
    if _is_hub_dataset(name):
        return f"[{name}]({endpoint}/datasets/{name}) on the Hub"
    return f"the dataset {code(dataset_ref(name))}"


def _is_hub_dataset(name: str) -> bool:
    return name not in BUILDERS and not Path(name).expanduser().exists() and is_hub_id(name)


def hub_datasets(data: dict[str, Any]) -> list[str]:
    """The Hub datasets a recipe's `data:` reads: `dataset`, or the `path` of each mixture entry (for the card's
    `datasets` metadata; local files and builders such as `json` are left out)."""
    mixture = [entry.get("path") for entry in data.get("datasets") or [] if isinstance(entry, dict)]
    names = [data.get("dataset"), *mixture]
    return list(dict.fromkeys(str(n) for n in names if n and _is_hub_dataset(str(n))))


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


def _usage(path: Path, recipe: dict[str, Any], stage: str, adapter: dict | None, repo_id: str | None,
           include_samples: bool) -> dict:
    """The loading snippet's values: the Auto class, the repo (or run dir), a prompt (one it saw only when the
    samples are published) and how it sampled: a stage that sampled (PPO, DPO's evaluation) passes every setting of
    its `generation:` section, top_k=0 too (generate's default is 50)."""
    generation = recipe.get("generation") or {}
    rows = (runs.read_jsonl(path / EVAL_SAMPLES_FILE) or runs.read_jsonl(path / SAMPLES_FILE)) if include_samples \
        else []
    prompt = rows[0]["prompt"][:200] if rows and isinstance(rows[0].get("prompt"), str) else USAGE_PROMPT
    settings: dict[str, Any] = {"max_new_tokens": generation.get("response_length") or 64, "do_sample": True}
    if generation:  # the recipe's settings, its defaults where it has none
        defaults = GenerationSection().model_dump()
        settings.update({key: generation.get(key, defaults[key]) for key in ("temperature", "top_k", "top_p")})
    auto = f"Auto{'Peft' if adapter else ''}ModelFor{'SequenceClassification' if stage == 'reward' else 'CausalLM'}"
    text = json.dumps(prompt) + json.dumps(USAGE_RESPONSE)
    return {"auto": auto, "repo": json.dumps(repo_id or str(path)), "prompt": json.dumps(prompt),
            "response": json.dumps(USAGE_RESPONSE), "sampled": bool(generation),
            "settings": ", ".join(f"{key}={value!r}" for key, value in settings.items()), "fence": fence(text)}


def _metric_tables(metrics: dict[str, Any], evaluation: Any) -> list[dict[str, Any]]:
    """The numbers, rounded for reading (the model-index has them exact)."""
    tables = [{"title": title, "source": source, "rows": [(k, _number(v)) for k, v in _numbers(data).items()]}
              for title, source, data in (("Metrics", f"`{runs.METRICS_FILE}` (written when the stage finished)",
                                           metrics), ("Evaluation", f"`{EVAL_FILE}`", evaluation))]
    return [table for table in tables if table["rows"]]


def _quoted_text(path: Path, names: list[str]) -> str:
    """The files that quote samples or data, as the card lists them (a report's `samples` entry by name)."""
    reports = [name for name in REPORTS_WITH_SAMPLES if isinstance(runs.read_json(path / name), dict)
               and "samples" in runs.read_json(path / name)]
    return ", ".join([code(name) for name in names] + [f"the `samples` of {code(name)}" for name in reports])


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
# Markdown
# ---------------------------------------------------------------------------------------------------------------
def fence(text: str, least: int = 3) -> str:
    """A code fence longer than any run of backticks in `text`, so that nothing in it ends the block early."""
    return "`" * max(least, max((len(run) for run in re.findall("`+", text)), default=0) + 1)


def code(value: Any) -> str:
    """Inline code, likewise fenced."""
    text = str(value).replace("\n", " ")
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence(text, 1)}{pad}{text}{pad}{fence(text, 1)}"
