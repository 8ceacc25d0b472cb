"""`rlhf plan`: from a recipe to the inputs of the plan arithmetic (`planning.py`), and the report.

No weight is loaded: a model's shape comes from its config.json (a local directory, the local Hugging Face cache, a
built-in table of a few Hub models), or, for a path an earlier stage will write, from the recipe that writes it (a
recipe beside this one, or the pipeline's wiring); the data are counted, and measured with the tokenizer when both
are local. GPT-2 plans import no torch, transformers or datasets; another architecture is built on the meta device
(model_shape.measure), which imports torch and transformers.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlhf_pipeline import planning
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.model_shape import HUB_CONFIGS, ModelShape, UnplannableModel, read_config
from rlhf_pipeline.planning import (
    GIB,
    Distribution,
    HeldModel,
    MemoryPlan,
    PpoSpec,
    Precision,
    TrlSpec,
    format_bytes,
    format_count,
    format_flops,
)
from rlhf_pipeline.recipe.load import LoadedRecipe, load_recipe
from rlhf_pipeline.recipe.schema import data_format

TRL_STAGES = ("pretrain", "sft", "reward", "dpo")
MEASURE_LIMIT_ROWS = 200_000  # longer local data are counted, not tokenized
MEASURE_LIMIT_BYTES = 256 * 1024**2


# ---------------------------------------------------------------------------------------------------------------
# models: their shape without loading them
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFacts:
    shape: ModelShape
    source: str  # where the shape came from
    dtype: str = "float32"  # the checkpoint's own dtype (what `dtype: auto` loads)
    activation: str = "gelu_new"
    dropout: float = 0.0  # residual dropout in the checkpoint's config
    tokenizer: str | None = None  # a local directory holding its tokenizer.json, when there is one


class Registry:
    """Where a model that does not exist yet will come from: output dir -> the recipe that writes it (the recipes
    beside the planned one, or a pipeline's stages as it wires them)."""

    def __init__(self, recipes: list[LoadedRecipe] | None = None):
        self.by_output: dict[str, LoadedRecipe] = {}
        for loaded in recipes or []:
            self.add(loaded)

    def add(self, loaded: LoadedRecipe) -> None:
        self.by_output[_key(loaded.recipe.output_dir)] = loaded

    def writer(self, path: str) -> LoadedRecipe | None:
        return self.by_output.get(_key(path))

    @classmethod
    def around(cls, recipe_path: Path) -> Registry:
        """The stage recipes in the planned recipe's directory and its parent, and the stages of the pipelines
        there (with their wiring)."""
        from rlhf_pipeline.pipeline import plan_stages

        registry = cls()
        folders = [recipe_path.parent, recipe_path.parent.parent]
        for folder in folders:
            for path in sorted(folder.glob("*.y*ml")):
                try:
                    loaded = load_recipe(path)
                    if loaded.stage == "pipeline":
                        for stage in plan_stages(loaded):
                            registry.by_output.setdefault(_key(stage.loaded.recipe.output_dir), stage.loaded)
                    elif loaded.stage != "eval":
                        registry.by_output.setdefault(_key(loaded.recipe.output_dir), loaded)
                except (UserError, OSError, ValueError):
                    continue
        return registry


def _key(path: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(path))))


def config_facts(config: dict, source: str, directory: Path | None = None) -> ModelFacts:
    """A model's facts from its config.json dict (`source`: where it was read, for messages): the shape (raises
    UnplannableModel for what cannot be counted), dtype, MLP activation, residual dropout; `directory` holds its
    tokenizer when tokenizer.json is there."""
    try:
        shape = ModelShape.from_config(config)
    except KeyError as exc:
        raise UserError(f"{source}: {exc.args[0]}") from None
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    activation = config.get("activation_function") or config.get("hidden_act") or "gelu_new"
    dropout = next((config[k] for k in ("resid_pdrop", "hidden_dropout", "hidden_dropout_prob", "dropout")
                    if isinstance(config.get(k), (int, float))), 0.0)
    tokenizer = str(directory) if directory is not None and (directory / "tokenizer.json").is_file() else None
    return ModelFacts(shape, source, str(dtype), str(activation), float(dropout), tokenizer)


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")  # a Hub repo id


def cached_config(name: str, revision: str | None = None) -> Path | None:
    """A Hub model's config.json in the local Hugging Face cache (as `from_pretrained` left it), or None."""
    if Path(name).expanduser().exists() or not HUB_ID.fullmatch(name):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except (ImportError, ValueError):  # no huggingface_hub, or a name that is no repo id
        return None
    return Path(found) if isinstance(found, str) else None


def model_facts(name: str, registry: Registry | None = None, _seen: tuple[str, ...] = (),
                revision: str | None = None) -> ModelFacts | None:
    """A model's shape and config facts: config.json on disk, a LoRA adapter's base, the built-in table, the local
    Hugging Face cache, or the recipe that will write it. None when none of these knows it."""
    path = Path(name).expanduser()
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            config = read_config(config_file)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return config_facts(config, str(config_file), path)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        try:
            base = read_config(adapter).get("base_model_name_or_path")
        except ValueError as exc:
            raise UserError(str(exc)) from None
        base = base if isinstance(base, str) else None
        facts = model_facts(base, registry, _seen + (name,)) if base and base not in _seen else None
        if facts is not None:
            tokenizer = str(path) if (path / "tokenizer.json").is_file() else facts.tokenizer
            return replace(facts, source=f"{adapter} -> {facts.source}", tokenizer=tokenizer)
        return None
    if name in HUB_CONFIGS:
        return config_facts(HUB_CONFIGS[name], f"built-in table ({name})")
    cached = cached_config(name, revision)
    if cached is not None:
        return config_facts(json.loads(cached.read_text()), f"{name} (config.json in the local Hugging Face cache)",
                            cached.parent)
    writer = registry.writer(name) if registry is not None else None
    if writer is None or _key(name) in _seen:
        return None
    recipe = writer.recipe
    model = getattr(recipe, "model", None) or getattr(recipe, "policy", None)
    init = getattr(model, "init", None)
    if init is not None:  # pretrain from scratch: the architecture, the tokenizer's vocabulary
        vocab = _vocabulary(recipe.tokenizer, registry, _seen + (_key(name),))
        if vocab is None:
            return None
        shape = ModelShape(init.n_layer, init.n_embd, init.n_head, vocab, init.n_positions, init.n_inner)
        return ModelFacts(shape, f"{writer.path}: model.init", "float32", init.activation_function, init.dropout)
    facts = model_facts(model.name_or_path, registry, _seen + (_key(name),))
    if facts is None:
        return None
    return replace(facts, source=f"{writer.path} -> {facts.source}", tokenizer=None)


def _vocabulary(tokenizer, registry: Registry | None, seen: tuple[str, ...]) -> int | None:
    train = getattr(tokenizer, "train", None)
    if train is not None:
        return train.vocab_size
    if tokenizer.name_or_path:
        from rlhf_pipeline.models import vocabulary_on_disk

        vocab = vocabulary_on_disk(tokenizer.name_or_path)
        if vocab is not None:
            return len(vocab)
        facts = model_facts(tokenizer.name_or_path, registry, seen)
        return facts.shape.vocab_size if facts else None
    return None


def require_model(loaded: LoadedRecipe, key: str, name: str, registry_box: list, head: str = "lm") -> ModelFacts:
    """model_facts, or a clear error naming the recipe key: a model nothing local describes, one `rlhf plan` cannot
    count (remote code, an encoder-decoder), a reward or value model (`head` "score") of an architecture without a
    sequence classifier. The registry of neighbouring recipes is built on first need (`registry_box` holds it)."""
    section = getattr(loaded.recipe, key.split(".")[0], None)
    revision = getattr(section, "revision", None)
    try:
        facts = model_facts(name, revision=revision)
        if facts is None:
            if not registry_box:
                registry_box.append(Registry.around(loaded.path))
            facts = model_facts(name, registry_box[0], revision=revision)
    except UnplannableModel as exc:
        raise loaded.error(key, f"cannot plan {name!r}: {exc}") from None
    if facts is None:
        if HUB_ID.fullmatch(name) and not Path(name).expanduser().exists():
            known = ", ".join(sorted(k for k in HUB_CONFIGS if not k.startswith(("openai-community/", "distilbert/"))))
            raise loaded.error(key, f"cannot tell the shape of {name!r} without its config.json: it is not in the "
                                    f"local Hugging Face cache, not built in ({known}), and "
                                    f"no recipe beside this one writes it. Fetch the config alone with `hf download "
                                    f"{name} config.json` and plan again, or plan with --set {key}=<a local model "
                                    "directory>")
        raise loaded.error(key, f"cannot tell the shape of {name!r} without loading it: it has no config.json and no "
                                f"recipe beside this one writes it. Plan once it exists, or plan with --set "
                                f"{key}=<a local model directory or a Hub id>")
    if head == "score" and facts.shape.classifier_parameters is None:
        raise loaded.error(key, f"transformers has no sequence-classification class for {facts.shape.model_type} "
                                f"({name}): it cannot be a reward or value model")
    return facts


# ---------------------------------------------------------------------------------------------------------------
# data: rows, and the longest tokenized sequence when the data and a tokenizer are local
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DataFacts:
    train_rows: int | None = None
    held_out_rows: int | None = None
    longest: int | None = None  # the longest sequence (or prompt, for PPO), tokens, after the stage's cuts
    loss_positions: int | None = None  # SFT prompt/completion, DPO: the most tokens a sequence has a loss on
    dropped: int = 0  # rows the stage leaves out for being too long (counted when measured)
    how: str = ""


def read_rows(path: str) -> list[dict] | None:
    """The rows of a local jsonl / json / csv file (optionally .gz); None for parquet or when too large. UserError
    naming the file (and line) when it cannot be read, as the run would say (`data.check_text_file`)."""
    import zlib

    try:
        rows = _read_rows(path)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError, csv.Error) as exc:
        from rlhf_pipeline.data import check_text_file

        problem = check_text_file(path, data_format(path))
        raise UserError(problem or f"{path}: cannot be read: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None
    if rows == []:
        raise UserError(f"{path} is empty: no rows")
    return rows


def _read_rows(path: str) -> list[dict] | None:
    file = Path(path)
    if file.stat().st_size > MEASURE_LIMIT_BYTES:
        return None
    suffixes = file.suffixes[:-1] if file.suffixes and file.suffixes[-1] == ".gz" else file.suffixes
    kind = suffixes[-1] if suffixes else ""
    if kind == ".parquet":
        return None
    raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    text = raw.decode("utf-8")
    if kind == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if kind == ".txt":  # one document per non-blank line (the default `sample_by`)
        return [{"text": line} for line in text.splitlines() if line.strip()]
    if kind == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
            if isinstance(data, list):
                return data
            if isinstance(data, dict):
                columns = [v for v in data.values() if isinstance(v, list)]
                if columns and len(columns) == len(data):  # a mapping column -> values, every value a list
                    return [dict(zip(data, values)) for values in zip(*[data[k] for k in data])]
        except ValueError:
            pass
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def count_rows(path: str) -> int | None:
    rows = read_rows(path)
    if rows is not None:
        return len(rows)
    if Path(path).suffixes[-1:] == [".parquet"]:
        try:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # no pyarrow, or not a parquet file: uncounted
            return None
    return None


def split_rows(section) -> tuple[list[dict] | None, list[dict] | None, int | None, int | None]:
    """(train rows, held-out rows, train count, held-out count) of a local data section, as the stage splits it
    (the carve-off's count is exact; which rows fall where is not needed here)."""
    if not section.files:
        return None, None, None, None
    read = {split: [read_rows(p) for p in paths] for split, paths in section.files.items()
            if split in (section.train_split, section.eval_split)}
    def joined(split):
        parts = read.get(split)
        if parts is None or any(p is None for p in parts):
            return None
        return [row for part in parts for row in part]

    train, held_out = joined(section.train_split), joined(section.eval_split) if section.eval_split else None
    n_train = len(train) if train is not None else _count_split(section, section.train_split)
    n_held = len(held_out) if held_out is not None else (_count_split(section, section.eval_split)
                                                         if section.eval_split else None)
    if section.eval_size and n_train is not None:
        carved = math.ceil(section.eval_size * n_train) if section.eval_size < 1 else int(section.eval_size)
        n_train, n_held = n_train - carved, carved
    if section.max_train_samples and n_train is not None:
        n_train = min(n_train, section.max_train_samples)
    if section.max_eval_samples and n_held is not None:
        n_held = min(n_held, section.max_eval_samples)
    return train, held_out, n_train, n_held


def _count_split(section, split: str | None) -> int | None:
    counts = [count_rows(p) for p in section.files.get(split, [])]
    return None if not counts or any(c is None for c in counts) else sum(counts)


def load_tokenizer(directory: str | None):
    """A `tokenizers.Tokenizer` from a local tokenizer.json (no transformers), or None."""
    if not directory or not (Path(directory) / "tokenizer.json").is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        return Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    except Exception as exc:  # the Rust library raises a bare Exception on a file it cannot read
        raise UserError(f"{Path(directory) / 'tokenizer.json'}: not a tokenizer the tokenizers library can read: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def implicit_prompt(chosen: str, rejected: str, end: str | None) -> str | None:
    """The shared prefix of a pair (TRL's extract_prompt), cut after the last `end` in it when `end` is set."""
    prompt = os.path.commonprefix([chosen, rejected])
    if end is None:
        return prompt
    at = prompt.rfind(end)
    return None if at < 0 else prompt[:at + len(end)]


def _column(section, role: str) -> str:
    return getattr(section.columns, role, None) or role


def measure_data(loaded: LoadedRecipe, tokenizer_dir: str | None, limit: int | None) -> DataFacts:
    """Rows of the local data and, with a local tokenizer, the longest sequence the stage will build from it: SFT's
    text (or prompt + completion) + EOS, a reward pair's prompt + response + EOS, a DPO pair's prompt + the longer
    response + EOS, PPO's prompt (pairs: the shared prefix cut at implicit_prompt_end). Sequences over `limit` are
    cut (SFT, DPO) or left out and counted (reward pairs, PPO prompts)."""
    recipe = loaded.recipe
    stage, section = recipe.stage, recipe.data
    if section.datasets:
        return DataFacts(how="the data is a mixture (`datasets`): not counted")
    if not section.files:
        return DataFacts(how=f"the data ({section.dataset}) is on the Hub: not counted")
    train, held_out, n_train, n_held = split_rows(section)
    facts = DataFacts(n_train, n_held, how="local files counted")
    rows = (train or []) + (held_out or [])
    if train is None or len(rows) > MEASURE_LIMIT_ROWS:
        return facts
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer is None:
        facts.how += "; no local tokenizer to measure them with" if stage != "pretrain" else ""
        return facts
    eos = 1
    try:
        lengths, completions = _stage_lengths(stage, section, rows, tokenizer, eos)
    except (KeyError, TypeError, AttributeError):
        return facts  # a column the stage would name in its own error; the plan does not need it
    if completions:
        facts.loss_positions = min(max(completions), limit) if limit else max(completions)
    if not lengths:
        return facts
    if stage == "pretrain":
        block = limit or 1
        total = sum(lengths)
        facts.train_rows = total // block  # texts joined with EOS, cut into blocks; the held-out carve is approximate
        if n_held is not None and n_train is not None and section.eval_size:
            facts.held_out_rows = round(facts.train_rows * n_held / (n_train + n_held))
            facts.train_rows -= facts.held_out_rows
        facts.longest = block
        facts.how = f"local files tokenized with {tokenizer_dir}: {total:,} tokens in blocks of {block}"
        return facts
    if limit is not None and stage in ("reward", "ppo"):
        facts.dropped = sum(1 for n in lengths if n > limit)
        lengths = [n for n in lengths if n <= limit] or [limit]
    facts.longest = min(max(lengths), limit) if limit else max(lengths)
    facts.how = f"local files tokenized with {tokenizer_dir}"
    return facts


def _stage_lengths(stage: str, section, rows: list[dict], tokenizer, eos: int) -> tuple[list[int], list[int]]:
    """(sequence lengths, completion lengths: the positions with a loss where only completions have one) of the
    rows, tokenized as the stage builds its sequences."""
    first = rows[0]
    if stage == "pretrain":
        return [n + eos for n in token_lengths(tokenizer, [r[_column(section, "text")] for r in rows])], []
    if stage == "sft":
        if _column(section, "messages") in first and not section.columns.text:
            return [], []  # conversational: the chat template decides; not measured
        if _column(section, "prompt") in first and _column(section, "completion") in first:
            prompts = token_lengths(tokenizer, [r[_column(section, "prompt")] for r in rows])
            completions = [c + eos for c in token_lengths(tokenizer, [r[_column(section, "completion")]
                                                                     for r in rows])]
            return [p + c for p, c in zip(prompts, completions)], completions
        return [n + eos for n in token_lengths(tokenizer, [r[_column(section, "text")] for r in rows])], []
    if stage in ("reward", "dpo"):
        prompt_col = _column(section, "prompt")
        chosen = [r[_column(section, "chosen")] for r in rows]
        rejected = [r[_column(section, "rejected")] for r in rows]
        if not isinstance(chosen[0], str):
            return [], []
        if prompt_col in first:
            prompts = [r.get(prompt_col) or "" for r in rows]
        else:  # implicit: the shared prefix (cut at implicit_prompt_end for DPO) is the prompt
            end = getattr(section, "implicit_prompt_end", None)
            prompts = [implicit_prompt(c, r, end) or "" for c, r in zip(chosen, rejected)]
            chosen = [c[len(p):] for c, p in zip(chosen, prompts)]
            rejected = [r[len(p):] for r, p in zip(rejected, prompts)]
        p = token_lengths(tokenizer, prompts)
        # a pair is one sequence each for chosen and rejected, padded together: the longer counts
        completions = [max(c, r) + eos for c, r in zip(token_lengths(tokenizer, chosen),
                                                        token_lengths(tokenizer, rejected))]
        return [pi + ci for pi, ci in zip(p, completions)], completions if stage == "dpo" else []
    if stage == "ppo":
        prompt_col = _column(section, "prompt")
        if prompt_col in first:
            prompts = [r[prompt_col] for r in rows]
        else:
            prompts = [implicit_prompt(r[_column(section, "chosen")], r[_column(section, "rejected")],
                                       section.implicit_prompt_end) for r in rows]
            prompts = [p for p in prompts if p]
        if not prompts or not isinstance(prompts[0], str):
            return [], []
        return token_lengths(tokenizer, prompts), []
    return [], []


# ---------------------------------------------------------------------------------------------------------------
# from a recipe to the arithmetic's inputs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything `rlhf plan` reports about one stage."""

    stage: str
    recipe: str
    distribution: Distribution
    models: list[tuple[str, str]] = field(default_factory=list)  # (role, description) for the text
    sequences: str = ""
    data: str = ""
    batches: list[tuple[str, str]] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)  # the derived numbers, for --json
    flops: dict[str, float] = field(default_factory=dict)
    flops_unit: str = "optimizer step"
    flops_total: float | None = None
    memory: MemoryPlan | None = None
    knobs: list[Knob] = field(default_factory=list)  # each on its own, when it does not fit
    combination: list[Knob] = field(default_factory=list)  # applied one after the other
    device_memory: int | None = None
    notes: list[str] = field(default_factory=list)
    spec: Any = None  # the TrlSpec / PpoSpec the memory plan came from (the knobs vary it)
    refusals: list[str] = field(default_factory=list)  # what the stage would refuse about this launch

    @property
    def fits(self) -> bool | None:
        """Whether the peak stays under planning.FIT_FRACTION of --device-memory (None without it)."""
        if self.device_memory is None or self.memory is None:
            return None
        return self.memory.peak <= planning.fit_limit(self.device_memory)

    @property
    def approximate(self) -> list[str]:
        return [note for note in self.notes if note.startswith("approximate")]


def plan_recipe(loaded: LoadedRecipe, dist: Distribution, device_memory: int | None = None,
                registry: Registry | None = None) -> Plan:
    """The plan of one stage recipe (pretrain, sft, reward, dpo or ppo)."""
    box = [registry] if registry is not None else []
    refusals = launch_refusals(loaded, dist)
    if loaded.stage == "ppo":
        plan = _plan_ppo(loaded, dist, box)
    elif loaded.stage in TRL_STAGES:
        plan = _plan_trl(loaded, dist, box)
    else:
        raise loaded.error("stage", f"`rlhf plan` plans training stages (pretrain, sft, reward, ppo, dpo, or a "
                                    f"pipeline of them), not `{loaded.stage}`")
    plan.device_memory = device_memory
    plan.refusals = refusals
    plan.notes += architecture_notes([model for model, _ in plan.memory.models])
    if plan.fits is False:
        plan.knobs, plan.combination = _knobs(plan, planning.fit_limit(device_memory))
    return plan


def architecture_notes(models: list[HeldModel]) -> list[str]:
    """What the plan can only approximate about the models' architectures, and how it counts sliding windows."""
    notes = []
    types = sorted({m.shape.model_type for m in models if not m.shape.gpt2})
    if types:
        notes.append(f"approximate: the activations of {', '.join(types)} layers (the per-token terms were measured "
                     "on GPT-2's blocks and are carried over by width: query and key/value heads, RMSNorm's "
                     "normalized input, a gated MLP's two more tensors); their parameters, KV cache and FLOPs are "
                     "counted on the model transformers builds from the config")
    shapes = list(dict.fromkeys(m.shape for m in models))
    for shape in shapes:
        notes += [f"approximate ({shape.model_type}): {text}" for text in shape.approximate]
        windows = shape.sliding_layers
        if windows:
            notes.append(f"{shape.model_type}: {len(windows)} of {shape.n_layer} layers keep a sliding window of "
                         f"{max(windows)} tokens in the KV cache (transformers' DynamicCache), counted so; their "
                         "attention FLOPs are counted in full")
    return notes


def launch_refusals(loaded: LoadedRecipe, dist: Distribution) -> list[str]:
    """What the stage itself refuses about this launch (the rules of `stages.common.engine_refusals`), said before
    planning it. PPO under ZeRO-3 is an error: there is nothing to plan."""
    from rlhf_pipeline.stages.common import engine_refusals

    engine = "fsdp" if dist.fsdp else "deepspeed" if dist.deepspeed else None
    zero = int(dist.strategy[-1]) if dist.deepspeed else None
    refusals = engine_refusals(loaded, engine, zero, dist.fsdp_version if dist.fsdp else None, dist.device == "gpu")
    if loaded.stage == "ppo" and zero == 3:
        raise UserError(f"--accelerate-config: {refusals[0][1]}")
    return [f"{key}: {reason}" if key else reason for key, reason in refusals]


def _setting(loaded: LoadedRecipe, key: str) -> Any:
    """A TRL stage's training setting: the recipe's, else the config class's default (from the snapshot)."""
    from rlhf_pipeline.recipe.training_fields import fields_for

    training = loaded.recipe.training
    if key in training:
        return training[key]
    field_info = fields_for(loaded.stage).get(key)
    return field_info["default"] if field_info else None


def trl_precision(loaded: LoadedRecipe, dtype: str, dist: Distribution) -> Precision:
    """The precision a Trainer stage trains in: bf16 / fp16 when the recipe says so; unset bf16 means TRL's default,
    bf16, on a GPU (this tool turns it off on a CPU); otherwise Accelerate's setting (the config's
    mixed_precision, which `accelerate launch` passes on), else none."""
    bf16, fp16 = _setting(loaded, "bf16"), _setting(loaded, "fp16")
    if bf16 is None and not fp16:
        bf16 = dist.device == "gpu"
    mixed = "bf16" if bf16 else "fp16" if fp16 else (dist.mixed_precision or "no")
    return Precision.of(dtype, "bf16" if mixed == "fp8" else mixed)


def _dtype(section_dtype: str, facts: ModelFacts) -> str:
    return facts.dtype if section_dtype == "auto" else section_dtype


def _gelu_ops(facts: ModelFacts, fused: bool = False) -> int:
    """What the MLP's activation saves beside its output (HeldModel.gelu_ops): ReLU nothing, GPT-2's `gelu_new`
    four tensors (six ops) unless PPO fused it (models.fuse_gelu), a one-op activation its input."""
    if facts.activation == "relu":
        return 0
    return 4 if facts.activation == "gelu_new" and not fused else 1


def _lora(peft, shape: ModelShape, head: str) -> tuple[int, int]:
    """(trainable parameters, elements per token and layer the adapters read) of the recipe's LoRA."""
    trainable = planning.lora_parameters(shape, peft.r, peft.target_modules)
    if head == "score":
        trainable += shape.n_embd  # peft trains (a copy of) the score head too
    return trainable, planning.lora_input_elements(shape, peft.target_modules)


def _plan_trl(loaded: LoadedRecipe, dist: Distribution, box: list) -> Plan:
    recipe, stage = loaded.recipe, loaded.stage
    plan = Plan(stage, str(loaded.path), dist)
    model_section = recipe.model
    head = "score" if stage == "reward" else "lm"
    if stage == "pretrain" and model_section.init is not None:
        registry = Registry()
        registry.add(loaded)
        facts = model_facts(recipe.output_dir, registry)
        if facts is None:
            raise loaded.error("tokenizer.name_or_path", "cannot tell the vocabulary size of this tokenizer without "
                                                         "loading it (no local tokenizer.json)")
        facts = replace(facts, source="model.init")
    else:
        facts = require_model(loaded, "model.name_or_path", model_section.name_or_path, box, head)
    dtype = _dtype(model_section.dtype, facts)
    precision = trl_precision(loaded, dtype, dist)
    peft = getattr(recipe, "peft", None)
    disable_dropout = bool(_setting(loaded, "disable_dropout")) if stage in ("reward", "dpo") else False
    if peft is not None:
        trainable, lora_inputs = _lora(peft, facts.shape, head)
        model = HeldModel("model" if stage != "dpo" else "policy", facts.source, facts.shape, head, "lora", trainable,
                          dtype, gelu_ops=_gelu_ops(facts), dropout=0.0 if disable_dropout else facts.dropout,
                          lora_dropout=0.0 if disable_dropout else peft.dropout, lora_inputs=lora_inputs)
    else:
        model = HeldModel("model" if stage != "dpo" else "policy", facts.source, facts.shape, head, "all", 0, dtype,
                          gelu_ops=_gelu_ops(facts), dropout=0.0 if disable_dropout else facts.dropout)
    # sequence length: pretrain's block; the others' max_length (default: the model's context, at most 1024)
    context = min(facts.shape.n_positions, 1024)
    if stage == "pretrain":
        limit = recipe.data.block_size or context
    else:
        limit = _setting(loaded, "max_length") if "max_length" in recipe.training else context
    tokenizer_dir = _tokenizer_dir(recipe.tokenizer, facts, model_section.name_or_path)
    data = measure_data(loaded, tokenizer_dir, limit)
    packing = stage == "sft" and bool(_setting(loaded, "packing"))
    length = limit if (stage == "pretrain" or packing or data.longest is None) else min(data.longest, limit or 10**9)
    plan.data = _data_text(data)
    plan.sequences = _trl_sequence_text(stage, length, limit, data, packing)

    micro, accumulation = int(_setting(loaded, "per_device_train_batch_size")), int(
        _setting(loaded, "gradient_accumulation_steps"))
    examples = micro * accumulation * dist.processes
    checkpointing_setting = _setting(loaded, "activation_checkpointing")
    if checkpointing_setting is None:
        checkpointing_setting = _setting(loaded, "gradient_checkpointing")
    checkpointing = bool(checkpointing_setting)
    reference = scorers = None
    generation = None
    if stage == "dpo":
        reference = _dpo_reference(loaded, facts, dtype, box)
        scorers = tuple(_scorer(loaded, key, box) for key in ("reward", "gold")
                        if getattr(recipe, key) is not None and getattr(recipe, key).model)
        if recipe.evaluation.prompts:
            response = recipe.generation.response_length
            prompt = min(recipe.evaluation.max_prompt_length, facts.shape.n_positions - response)
            generation = (recipe.evaluation.batch_size, prompt, response)
    held_out = bool(recipe.data.eval_split or recipe.data.eval_size)
    spec = TrlSpec(stage, model, precision, micro, accumulation, length,
                   {"pretrain": "hf-lm", "sft": "trl-fused", "reward": "score", "dpo": "trl-fused"}[stage],
                   2 if stage in ("reward", "dpo") else 1, checkpointing, padded=stage != "pretrain",
                   reference=reference, scorers=scorers or (),
                   eval_batch=int(_setting(loaded, "per_device_eval_batch_size")) if held_out else None,
                   generation=generation, loss_positions=data.loss_positions if not packing else None)
    plan.memory = planning.trl_memory(spec, dist)
    plan.spec = spec  # for the knobs

    unit = {"pretrain": "blocks", "sft": "examples", "reward": "pairs", "dpo": "pairs"}[stage]
    max_steps = int(_setting(loaded, "max_steps") or -1)
    epochs = float(_setting(loaded, "num_train_epochs"))
    rows = data.train_rows - data.dropped if data.train_rows is not None else None
    if max_steps > 0:
        steps, steps_text = max_steps, f"{max_steps:,} (training.max_steps)"
    elif rows is not None:
        steps = planning.trl_steps(rows, micro, dist.processes, accumulation, epochs)
        steps_text = f"{steps:,} ({epochs:g} epoch{'s' if epochs != 1 else ''} over {rows:,} {unit})"
    else:
        steps, steps_text = None, (f"depends on the dataset size ({epochs:g} epoch{'s' if epochs != 1 else ''}; "
                                   "the data is not counted here)")
    sequences = spec.sequences_per_example
    plan.batches = [
        (f"{unit} per optimizer step", f"{examples:,} ({micro} per device x {accumulation} accumulated x "
                                       f"{dist.processes} process{'es' if dist.processes > 1 else ''})"),
        ("optimizer steps", steps_text),
        ("tokens per optimizer step", f"{examples * sequences * length:,} ({examples:,} x "
                                      f"{str(sequences) + ' sequences x ' if sequences > 1 else ''}{length} tokens, "
                                      "padded)"),
    ]
    plan.numbers = {"examples_per_optimizer_step": examples, "micro_batch_per_device": micro,
                    "gradient_accumulation_steps": accumulation, "processes": dist.processes,
                    "optimizer_steps": steps, "sequence_length": length, "sequences_per_example": sequences,
                    "tokens_per_optimizer_step": examples * sequences * length, "train_rows": rows,
                    "held_out_rows": data.held_out_rows}
    per_step = planning.trl_step_flops(spec, examples, lora=peft is not None)
    plan.flops = {"training": per_step}
    plan.flops_total = per_step * steps if steps else None
    role = "policy" if stage == "dpo" else "model"
    plan.models = [(role, _model_text(model, facts))]
    if stage == "dpo":
        plan.models.append(("reference", reference.source if reference is not None else
                            "the policy with its LoRA adapter disabled (no copy)"))
        for scorer in scorers:
            plan.models.append((scorer.role, f"{scorer.source}, {format_count(scorer.parameters)} parameters, "
                                             "frozen (held-out evaluation only; not sharded)"))
        if _setting(loaded, "precompute_ref_log_probs"):
            plan.notes.append("training.precompute_ref_log_probs: the reference's forward runs before training; "
                              "it is still counted as held")
    plan.notes += plan.memory.notes
    return plan


def _tokenizer_dir(section, facts: ModelFacts, model_name: str | None) -> str | None:
    for candidate in (section.name_or_path, facts.tokenizer, model_name):
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return candidate
    return None


def _dpo_reference(loaded: LoadedRecipe, facts: ModelFacts, dtype: str, box: list) -> HeldModel | None:
    recipe = loaded.recipe
    if recipe.reference.name_or_path:
        ref = require_model(loaded, "reference.name_or_path", recipe.reference.name_or_path, box)
        return HeldModel("reference", ref.source, ref.shape, "lm", "frozen", 0, _dtype(recipe.model.dtype, ref),
                         gelu_ops=_gelu_ops(ref))
    if recipe.peft is not None:
        return None
    return HeldModel("reference", f"a frozen copy of the policy ({recipe.model.name_or_path})", facts.shape, "lm",
                     "frozen", 0, dtype, gelu_ops=_gelu_ops(facts))


def _scorer(loaded: LoadedRecipe, key: str, box: list, prepared: bool = False, dtype: str | None = None) -> HeldModel:
    source = getattr(loaded.recipe, key)
    facts = require_model(loaded, f"{key}.model", source.model, box, "score")
    return HeldModel(key, facts.source, facts.shape, "score", "frozen", 0, dtype or _dtype(source.dtype, facts),
                     prepared=prepared, gelu_ops=_gelu_ops(facts))


def _deepspeed_frozen_dtype(dist: Distribution, mixed_precision: str) -> str | None:
    """Under DeepSpeed with bf16 / fp16, trl's prepare_deepspeed gives the frozen models an inference engine that
    casts them to that precision (ppo.modules.prepare_frozen)."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision) if dist.deepspeed else None


def _plan_ppo(loaded: LoadedRecipe, dist: Distribution, box: list) -> Plan:
    from rlhf_pipeline.ppo.plan import plan_of

    recipe, cfg, gen = loaded.recipe, loaded.recipe.training, loaded.recipe.generation
    plan = Plan("ppo", str(loaded.path), dist, flops_unit="update")
    batches = plan_of(loaded, dist.processes)
    facts = require_model(loaded, "policy.name_or_path", recipe.policy.name_or_path, box)
    dtype = _dtype(recipe.policy.dtype, facts)
    precision = Precision.of(dtype, cfg.mixed_precision)
    critic = cfg.advantage_estimator == "gae"
    value_mode = "none" if not critic else recipe.value.mode
    d = facts.shape.n_embd
    extra = d + 1 if value_mode == "shared" else 0
    if recipe.peft is not None:
        trainable, lora_inputs = _lora(recipe.peft, facts.shape, "lm")
        policy = HeldModel("policy", facts.source, facts.shape, "lm", "lora", trainable + extra, dtype,
                           extra_parameters=extra, gelu_ops=_gelu_ops(facts, fused=True), lora_inputs=lora_inputs)
    else:
        policy = HeldModel("policy", facts.source, facts.shape, "lm", "all", 0, dtype, extra_parameters=extra,
                           gelu_ops=_gelu_ops(facts, fused=True))
    frozen_dtype = _deepspeed_frozen_dtype(dist, cfg.mixed_precision)
    if recipe.reference.name_or_path:
        ref = require_model(loaded, "reference.name_or_path", recipe.reference.name_or_path, box)
        reference = HeldModel("reference", ref.source, ref.shape, "lm", "frozen", 0,
                              frozen_dtype or _dtype(recipe.policy.dtype, ref), prepared=dist.fsdp,
                              gelu_ops=_gelu_ops(ref, fused=True))
    elif recipe.peft is None:
        reference = HeldModel("reference", f"a frozen copy of the policy ({recipe.policy.name_or_path})",
                              facts.shape, "lm", "frozen", 0, frozen_dtype or dtype, prepared=dist.fsdp,
                              gelu_ops=_gelu_ops(facts, fused=True))
    else:
        reference = None
    # frozen models: sharded like the policy under FSDP (ppo.modules.prepare_frozen), else whole on every device
    reward = (_scorer(loaded, "reward", box, prepared=dist.fsdp, dtype=frozen_dtype) if recipe.reward.model
              else None)
    gold = (_scorer(loaded, "gold", box, prepared=dist.fsdp, dtype=frozen_dtype)
            if recipe.gold is not None and recipe.gold.model else None)
    value = None
    if value_mode == "separate":
        name, key = _value_start(recipe, reward)
        vf = require_model(loaded, key, name, box, "score")
        if recipe.peft is not None:
            trainable, lora_inputs = _lora(recipe.peft, vf.shape, "score")
            value = HeldModel("value", vf.source, vf.shape, "score", "lora", trainable, dtype,
                              gelu_ops=_gelu_ops(vf, fused=True), lora_inputs=lora_inputs)
        else:
            value = HeldModel("value", vf.source, vf.shape, "score", "all", 0, dtype,
                              gelu_ops=_gelu_ops(vf, fused=True))

    response = gen.response_length
    context = facts.shape.n_positions
    limit = min(recipe.data.max_prompt_length, context - response - 1)
    if limit < 1:
        raise loaded.error("generation.response_length", f"{response} tokens (and an EOS) leave no room for a prompt "
                                                         f"in the model's context of {context} tokens")
    data = measure_data(loaded, _tokenizer_dir(recipe.tokenizer, facts, recipe.policy.name_or_path), limit)
    prompt = data.longest or limit
    held_out = data.held_out_rows if data.held_out_rows is not None else cfg.eval_prompts
    eval_rows = math.ceil(min(cfg.eval_prompts, held_out) / dist.processes)
    spec = PpoSpec(policy, precision, batches.local_rollout_batch_size, batches.micro_batch_size,
                   batches.gradient_accumulation_steps, prompt, response,
                   cfg.forward_batch_size or batches.local_rollout_batch_size, max(1, min(cfg.eval_batch_size,
                                                                                           eval_rows)),
                   reference, reward, gold, value, value_mode, cfg.gradient_checkpointing)
    plan.memory = planning.ppo_memory(spec, dist)
    plan.spec = spec

    length = prompt + response
    plan.data = _data_text(data, unit="prompts")
    why = "the longest in the data" if data.longest else _cap(recipe.data.max_prompt_length, limit)
    plan.sequences = f"prompts of at most {prompt} tokens ({why}) + responses of up to {response} = {length} tokens"
    k = gen.samples_per_prompt
    passes = ""
    if data.train_rows:
        passes = f"; {batches.num_updates * batches.prompts_per_update / (data.train_rows - data.dropped):.2f} " \
                 f"passes over {data.train_rows - data.dropped:,} prompts"
    plan.batches = [
        ("rollouts per update", f"{batches.rollout_batch_size:,} ({batches.prompts_per_update:,} prompts x {k} "
                                f"response{'s' if k > 1 else ''}; {batches.local_rollout_batch_size:,} per process)"),
        ("optimizer steps per update", f"{batches.optimizer_steps_per_update} ({batches.ppo_epochs} epochs x "
                                       f"{batches.num_mini_batches} mini-batches of {batches.mini_batch_size}; "
                                       f"micro-batch {batches.micro_batch_size} per process, "
                                       f"{batches.gradient_accumulation_steps} accumulated)"),
        ("updates", f"{batches.num_updates:,} ({batches.total_episodes:,} episodes{passes})"),
        ("optimizer steps in all", f"{batches.total_optimizer_steps:,}"),
        ("tokens per update", f"{batches.rollout_batch_size * length:,} ({batches.rollout_batch_size:,} x {length}); "
                              f"per optimizer step {batches.mini_batch_size * length:,}"),
    ]
    plan.numbers = {"rollouts_per_update": batches.rollout_batch_size, "prompts_per_update": batches.prompts_per_update,
                    "samples_per_prompt": k, "optimizer_steps_per_update": batches.optimizer_steps_per_update,
                    "updates": batches.num_updates, "total_optimizer_steps": batches.total_optimizer_steps,
                    "mini_batch_size": batches.mini_batch_size, "micro_batch_per_process": batches.micro_batch_size,
                    "processes": dist.processes, "prompt_tokens": prompt, "response_tokens": response,
                    "tokens_per_update": batches.rollout_batch_size * length,
                    "tokens_per_optimizer_step": batches.mini_batch_size * length,
                    "train_prompts": data.train_rows, "held_out_prompts": data.held_out_rows}
    plan.flops = planning.ppo_update_flops(spec, batches.rollout_batch_size, batches.ppo_epochs,
                                           lora=recipe.peft is not None)
    plan.flops_total = sum(plan.flops.values()) * batches.num_updates
    plan.models = [("policy", _model_text(policy, facts) + (" + a value head (value.mode shared)"
                                                             if value_mode == "shared" else ""))]
    plan.models.append(("reference", (reference.source if reference.source.startswith("a frozen copy")
                                      else f"{reference.source}, frozen") if reference
                        else "the policy with its LoRA adapter disabled (no copy)"))
    plan.models.append(("reward", f"{reward.source}, {format_count(reward.parameters)} parameters, frozen"
                        if reward else f"function {recipe.reward.function} (no model)"))
    if value is not None:
        plan.models.append(("value", f"separate, {_model_text(value, None)}"))
    elif value_mode == "none":
        plan.models.append(("value", f"none ({cfg.advantage_estimator} needs no critic)"))
    if gold is not None:
        plan.models.append(("gold", f"{gold.source}, frozen"))
    plan.notes += plan.memory.notes
    return plan


def _cap(asked: int, limit: int) -> str:
    return "data.max_prompt_length" if asked == limit else "what the context leaves after the response"


def _value_start(recipe, reward: HeldModel | None) -> tuple[str, str]:
    """Where the separate value model starts (stages.ppo.value_start): value.name_or_path, else the reward model
    (assumed to share the policy's vocabulary; checked when they load), else the policy."""
    if recipe.value.name_or_path:
        return recipe.value.name_or_path, "value.name_or_path"
    if recipe.reward.model:
        return recipe.reward.model, "reward.model"
    return recipe.policy.name_or_path, "policy.name_or_path"


def _model_text(model: HeldModel, facts: ModelFacts | None) -> str:
    shape = model.shape
    trains = {"all": "full fine-tuning", "lora": f"LoRA, {format_count(model.trainable)} trainable",
              "frozen": "frozen"}[model.trains]
    counted = "closed form" if shape.gpt2 else "counted on the meta device"
    return (f"{model.source}: {shape.describe()}; {format_count(model.parameters)} parameters ({counted}; "
            f"{model.dtype}); {trains}")


def _data_text(data: DataFacts, unit: str = "rows") -> str:
    if data.train_rows is None:
        return data.how
    text = f"{data.train_rows:,} training {unit}"
    if data.held_out_rows is not None:
        text += f", {data.held_out_rows:,} held-out"
    if data.dropped:
        text += f" ({data.dropped:,} too long, left out)"
    return f"{text} ({data.how})"


def _trl_sequence_text(stage: str, length: int, limit: int | None, data: DataFacts, packing: bool) -> str:
    if stage == "pretrain":
        return f"blocks of {length} tokens"
    if packing:
        return f"packed sequences of {length} tokens (training.max_length)"
    what = {"sft": "examples", "reward": "chosen and rejected sequences", "dpo": "prompt + chosen / rejected"}[stage]
    if data.longest is not None:
        return f"{what} of at most {length} tokens (the longest in the data; max_length {limit})"
    return f"{what} of at most {length} tokens (max_length; batches are padded to their longest)"


# ---------------------------------------------------------------------------------------------------------------
# what to turn when it does not fit
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Knob:
    """A change of the recipe or the launch, and the peak per device it gives."""

    label: str
    peak: int
    phase: str  # where the peak then is


def _options(spec: Any, dist: Distribution) -> list[tuple[str, str, Any, Distribution]]:
    """(kind, change, changed spec, changed distribution): the usual ways to lower the peak, from these settings."""
    options: list[tuple[str, str, Any, Distribution]] = []
    if isinstance(spec, TrlSpec):
        micro = spec.micro_batch
        while micro > 1:
            micro //= 2
            accumulation = spec.accumulation * spec.micro_batch // micro
            options.append(("micro", f"training.per_device_train_batch_size {micro} with gradient_accumulation_steps "
                                     f"{accumulation} (the same examples per step)",
                            replace(spec, micro_batch=micro, accumulation=accumulation), dist))
        if not spec.checkpointing:
            options.append(("checkpointing", "training.activation_checkpointing: true",
                            replace(spec, checkpointing=True), dist))
        if spec.model.trains == "all":
            options.append(("lora", "peft: {r: 16} (LoRA: no gradients or AdamW state for the base weights"
                                    + ("; the reference becomes the adapter disabled)" if spec.reference else ")"),
                            replace(spec, model=_as_lora(spec.model), reference=None), dist))
        if spec.precision.autocast == "no" and spec.precision.weights == 4 and dist.device == "gpu":
            options.append(("precision", "training.bf16: true", replace(spec, precision=Precision(4, 2, "bf16")),
                            dist))
        if spec.length > 128 and spec.head != "hf-lm":
            options.append(("length", f"training.max_length {spec.length // 2}",
                            replace(spec, length=spec.length // 2), dist))
        if spec.eval_batch and spec.eval_batch > 1:
            options.append(("eval", f"training.per_device_eval_batch_size {max(1, spec.eval_batch // 4)}",
                            replace(spec, eval_batch=max(1, spec.eval_batch // 4)), dist))
        if spec.generation and spec.generation[0] > 8:
            rows, prompt, response = spec.generation
            options.append(("eval-generation", f"evaluation.batch_size {rows // 4}",
                            replace(spec, generation=(rows // 4, prompt, response)), dist))
    else:
        micro = spec.micro_batch
        while micro > 1:
            micro //= 2
            accumulation = spec.accumulation * spec.micro_batch // micro
            options.append(("micro", f"training.gradient_accumulation_steps {accumulation} (micro-batch {micro}; "
                                     "the same optimizer steps)",
                            replace(spec, micro_batch=micro, accumulation=accumulation), dist))
        forward = min(spec.forward_batch, spec.rollouts)
        while forward > 4:
            forward //= 2
            options.append(("forward", f"training.forward_batch_size {forward}",
                            replace(spec, forward_batch=forward), dist))
        eval_batch = spec.eval_batch
        while eval_batch > 4:
            eval_batch //= 2
            options.append(("eval", f"training.eval_batch_size {eval_batch}", replace(spec, eval_batch=eval_batch),
                            dist))
        if not spec.checkpointing:
            options.append(("checkpointing", "training.gradient_checkpointing: true",
                            replace(spec, checkpointing=True), dist))
        if spec.policy.trains == "all":
            value = _as_lora(spec.value) if spec.value is not None else None
            options.append(("lora", "peft: {r: 16} (LoRA; the reference becomes the adapter disabled: no copy)",
                            replace(spec, policy=_as_lora(spec.policy), reference=None, value=value), dist))
        if spec.value is not None:
            d = spec.policy.shape.n_embd
            options.append(("value", "value.mode: shared (a value head on the policy instead of a second model)",
                            replace(spec, value=None, value_mode="shared",
                                    policy=replace(spec.policy, extra_parameters=d + 1,
                                                   trainable=spec.policy.trainable + d + 1)), dist))
        if spec.precision.autocast == "no" and spec.precision.weights == 4 and dist.device == "gpu":
            options.append(("precision", "training.mixed_precision: bf16",
                            replace(spec, precision=Precision(4, 2, "bf16")), dist))
        if spec.response > 32:
            options.append(("response", f"generation.response_length {spec.response // 2}",
                            replace(spec, response=spec.response // 2), dist))
        rollouts = spec.rollouts
        while rollouts > 8:
            rollouts //= 2
            options.append(("rollouts", f"{rollouts} episodes sampled at once per process (a smaller "
                                        "training.rollout_batch_size, or more processes)",
                            replace(spec, rollouts=rollouts, forward_batch=min(spec.forward_batch, rollouts)), dist))
    if dist.ways("weights") == 1 and dist.device == "gpu":
        n = max(dist.processes, 8)
        sharded = replace(dist, strategy="fsdp-full", processes=n,
                          source=f"recipes/accelerate/fsdp.yaml, {n} processes")
        options.append(("shard", f"--accelerate-config recipes/accelerate/fsdp.yaml (FSDP full shard over {n} GPUs)",
                        spec, sharded))
    return options


def _knobs(plan: Plan, limit: int) -> tuple[list[Knob], list[Knob]]:
    """The knobs that lower the peak, each on its own, and a combination found greedily (the most effective change
    first) until it fits (peaks at `limit` bytes or less)."""
    compute = planning.trl_memory if isinstance(plan.spec, TrlSpec) else planning.ppo_memory

    def best_per_kind(spec, dist, exclude=()):
        """For each kind of change: the first (smallest) change that fits, else the one with the lowest peak."""
        best: dict[str, Knob] = {}
        changed: dict[str, tuple[Any, Distribution]] = {}
        for kind, label, new_spec, new_dist in _options(spec, dist):
            if kind in exclude or (kind in best and best[kind].peak <= limit):
                continue
            memory = compute(new_spec, new_dist)
            if kind not in best or memory.peak < best[kind].peak:
                best[kind] = Knob(label, memory.peak, memory.peak_phase.name)
                changed[kind] = (new_spec, new_dist)
        return best, changed

    singles, _ = best_per_kind(plan.spec, plan.distribution)
    single = sorted((k for k in singles.values() if k.peak < plan.memory.peak), key=lambda k: k.peak)
    combination: list[Knob] = []
    spec, dist, used, peak = plan.spec, plan.distribution, set(), plan.memory.peak
    while peak > limit:
        best, changed = best_per_kind(spec, dist, exclude=used)
        if not best:
            break
        kind = min(best, key=lambda k: best[k].peak)
        if best[kind].peak >= peak:
            break
        combination.append(best[kind])
        spec, dist = changed[kind]
        used.add(kind)
        peak = best[kind].peak
    return single, combination


def _as_lora(model: HeldModel) -> HeldModel:
    """The model with LoRA adapters (r 16 on every linear layer) instead of full fine-tuning."""
    from rlhf_pipeline.recipe.schema import LoraSection

    trainable, inputs = _lora(LoraSection(r=16), model.shape, model.head)
    return replace(model, trains="lora", trainable=trainable + model.extra_parameters, lora_inputs=inputs)


# ---------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------
def render(plan: Plan) -> str:
    lines = [f"plan: {plan.recipe} ({plan.stage}): estimates from shapes and settings; nothing was loaded"]
    memory = plan.memory
    rows = [("distribution", plan.distribution.describe()),
            ("precision", memory.precision.describe())]
    rows += [(role, text) for role, text in plan.models]
    if plan.data:
        rows.append(("data", plan.data))
    rows.append(("sequences", plan.sequences))
    lines += _rows(rows)
    lines += [f"warning: the stage will refuse this launch: {refusal}" for refusal in plan.refusals]
    lines.append("batches")
    lines += _rows(plan.batches, indent=4)
    total = sum(plan.flops.values())
    lines.append(f"compute per {plan.flops_unit} (all processes; 2 FLOPs per multiply-add)")
    flop_rows = [(name, format_flops(value)) for name, value in plan.flops.items()] if len(plan.flops) > 1 else []
    flop_rows.append(("total", format_flops(total) + (f"; the whole run {format_flops(plan.flops_total)}"
                                                      if plan.flops_total else "")))
    lines += _rows(flop_rows, indent=4)
    lines.append("memory per device (estimate)")
    table = [("model", "parameters", "trains", "weights", "gradients", "AdamW state")]
    for model, state in memory.models:
        table.append((model.role, format_count(model.parameters),
                      {"all": "all", "lora": f"LoRA {format_count(model.trainable)}", "frozen": "frozen"}[model.trains],
                      format_bytes(state.weights), format_bytes(state.grads) if state.grads else "-",
                      format_bytes(state.optimizer) if state.optimizer else "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        lines.append("    " + "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in
                                        enumerate(zip(row, widths))).rstrip())
    lines.append(f"    always held: {format_bytes(memory.static_total)}")
    lines += [f"        {term.what}: {format_bytes(term.bytes)}" for term in memory.static if term.bytes]
    peak_phase = memory.peak_phase
    for phase in memory.phases:
        marker = "  <- peak" if phase is peak_phase else ""
        lines.append(f"    + {phase.name}: {format_bytes(phase.total)}{marker}")
        for term in phase.terms:
            if term.bytes:
                lines.append(f"        {term.what}: {format_bytes(term.bytes)}")
    verdict = ""
    limit = planning.fit_limit(plan.device_memory) if plan.device_memory is not None else None
    if plan.device_memory is not None:
        share = f"{100 * memory.peak / plan.device_memory:.0f} % of it"
        margin = f"under {100 * planning.FIT_FRACTION:.0f} % ({format_bytes(limit)}): a margin for what is not counted"
        verdict = (f"; fits in {format_bytes(plan.device_memory)} ({share}; a fit is {margin})" if plan.fits else
                   f"; does NOT fit in {format_bytes(plan.device_memory)} ({share}; a fit is {margin})")
    lines.append(f"    peak: {format_bytes(memory.peak)} ({peak_phase.name}){verdict}")
    if plan.fits is False:
        lines.append(f"warning: the estimated peak, {format_bytes(memory.peak)} per device, exceeds "
                     f"{100 * planning.FIT_FRACTION:.0f} % of --device-memory {format_bytes(plan.device_memory)} "
                     f"({format_bytes(limit)}). Knobs to turn, each on its own (the peak it gives, and "
                     "where the peak then is):")
        for knob in plan.knobs:
            mark = "fits" if knob.peak <= limit else "still too much"
            lines.append(f"    {knob.label}: {format_bytes(knob.peak)} ({knob.phase}; {mark})")
        if not plan.knobs:
            lines.append("    none of the usual knobs lowers it: more devices with a sharded config, or a smaller "
                         "model")
        if len(plan.combination) > 1 or (plan.combination and plan.combination[-1].peak > limit):
            last = plan.combination[-1]
            verdict = "fits" if last.peak <= limit else "still does not fit"
            lines.append(f"  together: {'; then '.join(k.label for k in plan.combination)}: "
                         f"{format_bytes(last.peak)} ({last.phase}; {verdict})")
    lines.append("assumptions")
    notes = plan.notes + [
        "the runtime (Python, libraries, CUDA context), host-side data and allocator fragmentation are not counted",
        "activations: SDPA attention (no L x L scores stored), batches padded to their longest sequence",
    ]
    if plan.distribution.ways("weights") > 1:
        notes.append("frozen models are sharded only where the stage prepares them (the DPO reference under "
                     "ZeRO-3 / FSDP; PPO's reference, reward and gold under FSDP); others are whole on every device")
    lines += [f"    - {note}" for note in notes]
    return "\n".join(lines)


def _rows(rows: list[tuple[str, str]], indent: int = 2) -> list[str]:
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{' ' * indent}{k.ljust(width)}  {v}" for k, v in rows]


def as_json(plan: Plan) -> dict[str, Any]:
    memory = plan.memory
    return {
        "stage": plan.stage,
        "recipe": plan.recipe,
        "distribution": {"strategy": plan.distribution.strategy, "processes": plan.distribution.processes,
                         "device": plan.distribution.device, "source": plan.distribution.source},
        "precision": {"weights_bytes": memory.precision.weights, "compute_bytes": memory.precision.compute,
                      "autocast": memory.precision.autocast},
        "models": [{"role": m.role, "source": m.source, "parameters": m.parameters, "trains": m.trains,
                    "trainable_parameters": m.trainable if m.trains == "lora" else (
                        m.parameters if m.trains == "all" else 0),
                    "architecture": m.shape.model_type, "dtype": m.dtype, "weights_bytes": s.weights,
                    "gradient_bytes": s.grads, "kv_width": m.shape.kv_width,
                    "optimizer_bytes": s.optimizer} for m, s in memory.models],
        "numbers": plan.numbers,
        "flops": {"per": plan.flops_unit, **plan.flops, "total": sum(plan.flops.values()),
                  "run": plan.flops_total},
        "memory": {
            "always_held": {t.what: t.bytes for t in memory.static},
            "phases": {p.name: {"total": p.total, **{t.what: t.bytes for t in p.terms}} for p in memory.phases},
            "peak_phase": memory.peak_phase.name,
            "peak_bytes": memory.peak,
            "peak_gib": round(memory.peak / GIB, 3),
        },
        "device_memory_bytes": plan.device_memory,
        "fit_limit_bytes": planning.fit_limit(plan.device_memory) if plan.device_memory is not None else None,
        "fits": plan.fits,
        "knobs": [{"change": k.label, "peak_bytes": k.peak, "peak_phase": k.phase} for k in plan.knobs],
        "combination": [{"change": k.label, "peak_bytes": k.peak, "peak_phase": k.phase} for k in plan.combination],
        "notes": plan.notes,
        "approximate": plan.approximate,
        "refusals": plan.refusals,
    }
