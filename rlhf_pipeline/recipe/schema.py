"""Recipe schemas: one pydantic model per stage. Every key is declared once, with its help text.

Unknown keys are errors everywhere (`extra="forbid"`). The `training:` section of the TRL-backed stages is a mapping
checked against the TRL / transformers config class it becomes (see `training_fields.py`). Importing this module
does not import torch or transformers.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
BUILDERS = frozenset(DATA_SUFFIXES.values())  # a mixture entry's `path` that names a builder reads its data_files


class Section(BaseModel):
    # NaN and infinity are refused everywhere: a learning rate of .inf validates under `gt=0` otherwise
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------------------------
# model / tokenizer
# ---------------------------------------------------------------------------------------------------------------
class ModelSection(Section):
    name_or_path: str | None = Field(
        None,
        description="Hub id (e.g. `gpt2`) or local directory of a pretrained model, such as an earlier stage's "
        "output (`runs/tiny/sft`). A directory holding a LoRA adapter loads its base model plus the adapter.",
    )
    revision: str | None = Field(None, description="Branch, tag or commit of a Hub model.")
    trust_remote_code: bool = Field(
        False, description="Run modelling code shipped inside a Hub repository. Off unless you trust the repository."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Dtype of the loaded weights. Mixed-precision training is chosen separately (training.bf16 or "
        "training.fp16 in the TRL-backed stages).",
    )
    attn_implementation: str | None = Field(
        None, description="Attention kernel passed to from_pretrained: `sdpa`, `eager`, `flash_attention_2`, ..."
    )

    @model_validator(mode="after")
    def _needs_a_model(self):
        if self.name_or_path is None and not getattr(self, "init", None):
            raise ValueError("set `name_or_path` (a Hub id or a local model directory)")
        return self


class GPT2Architecture(Section):
    """A GPT-2 model initialised from scratch. The vocabulary size comes from the tokenizer."""

    model_type: Literal["gpt2"] = Field("gpt2", description="Architecture family (GPT-2 class models).")
    n_layer: int = Field(4, ge=1, description="Number of transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block; must divide n_embd.")
    n_embd: int = Field(128, ge=8, description="Hidden size.")
    n_positions: int = Field(128, ge=8, description="Longest sequence (in tokens) the model can read.")
    n_inner: int | None = Field(None, description="MLP width; default 4 * n_embd.")
    activation_function: Literal["gelu_new", "gelu", "relu", "silu", "gelu_pytorch_tanh"] = Field(
        "gelu_new", description="MLP activation."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Residual, embedding and attention dropout.")
    layer_norm_epsilon: float = Field(1e-5, gt=0.0, description="LayerNorm epsilon.")
    initializer_range: float = Field(0.02, gt=0.0, description="Std of the normal weight initialisation.")
    tie_word_embeddings: bool = Field(True, description="Share the input embedding and the LM head.")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        return self


class PretrainModelSection(ModelSection):
    init: GPT2Architecture | None = Field(
        None, description="Initialise a new model from this architecture instead of loading `name_or_path`."
    )

    @model_validator(mode="after")
    def _one_source(self):
        if self.name_or_path and self.init:
            raise ValueError("set either `name_or_path` (continue pre-training) or `init` (start from scratch), "
                             "not both")
        return self


class TokenizerSection(Section):
    name_or_path: str | None = Field(None, description="Hub id or directory of the tokenizer; default: the model's.")
    revision: str | None = Field(None, description="Branch, tag or commit of a Hub tokenizer.")
    trust_remote_code: bool = Field(
        False, description="Run code shipped inside the tokenizer's repository (when `name_or_path` names one; "
        "otherwise the model's setting applies).")
    chat_template: str | None = Field(
        None,
        description="Chat template for conversational data: `chatml` (built in: <|im_start|>role\\n...<|im_end|>, "
        "its two markers added as special tokens, <|im_end|> the EOS, the model's embeddings grown to match), a path "
        "to a `.jinja` file (relative to the current directory, or `{recipe_dir}/...`) or the template text. Needed "
        "when the tokenizer has none (GPT-2 has none); the saved tokenizer keeps it for the later stages.",
    )


class BpeTraining(Section):
    """Train a byte-level BPE tokenizer (the `tokenizers` library) on the training text."""

    vocab_size: int = Field(8000, ge=300, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Pairs seen fewer times than this are not merged.")
    eos_token: str = Field(
        "<|endoftext|>", description="The one special token: end of text, and also BOS, UNK and pad, as in GPT-2.")
    pad_token: str | None = Field(
        None, description="A padding token of its own; default none: pad = EOS, GPT-2's convention.")


class PretrainTokenizerSection(TokenizerSection):
    train: BpeTraining | None = Field(
        None, description="Train a new tokenizer on the training text instead of loading one."
    )


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
class TextColumns(Section):
    text: str | None = Field(None, description="Column holding the plain text (default `text`).")


class SftColumns(Section):
    text: str | None = Field(None, description="Plain-text column (language-modelling data).")
    prompt: str | None = Field(None, description="Prompt column (prompt/completion data).")
    completion: str | None = Field(None, description="Completion column (prompt/completion data).")
    messages: str | None = Field(None, description="Column of chat messages (conversational data).")


class PreferenceColumns(Section):
    prompt: str | None = Field(
        None, description="Prompt column; leave unset when chosen and rejected hold the whole text (implicit prompt)."
    )
    chosen: str | None = Field(None, description="Column of the preferred response (or whole text).")
    rejected: str | None = Field(None, description="Column of the dispreferred response (or whole text).")
    margin: str | None = Field(None, description="Optional column of preference margins (added to the loss).")


SPLIT_PART = re.compile(r"(?P<split>[^\s\[\]+()]+)"  # a name, then optionally [from:to] and a rounding
                        r"(\[(-?[\d_]+%?)?:(-?[\d_]+%?)?\])?(\((closest|pct1_dropremainder)\))?")


def split_names(spec: str) -> list[str]:
    """The split names in a `datasets` split spec: `train`, `train[:10%]`, `train[10:20]+test[-5:]` (the slicing
    itself is done by `datasets`, for local files as for the Hub). Raises ValueError on another shape."""
    names = []
    for part in re.split(r"\s*\+\s*", spec.strip()):
        match = SPLIT_PART.fullmatch(part)
        if match is None:
            raise ValueError(f"{spec!r} is not a split: expected a name, optionally sliced as `datasets` slices it: "
                             "`train[:10%]`, `train[10:20]`, `train[-100:]`, `train[:50%]+test[:5]`")
        names.append(match["split"])
    return names


def normalise_files(value: Any) -> dict[str, list[str]] | None:
    """Local files as a mapping split -> paths, from a path, a list of paths (the train split) or a mapping."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"train": [value]}
    elif isinstance(value, list):
        value = {"train": value}
    if not isinstance(value, dict) or not value:
        raise ValueError("expected a path, a list of paths, or a mapping split -> path(s)"
                         + (" (got an empty mapping)" if value == {} else ""))
    normalised = {}
    for split, paths in value.items():
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"split {split!r}: expected a path or a non-empty list of paths")
        for path in paths:
            data_format(path)  # raises ValueError on an unknown extension
        normalised[str(split)] = paths
    formats = {data_format(p) for paths in normalised.values() for p in paths}
    if len(formats) > 1:
        raise ValueError(f"all files must have one format, got {sorted(formats)}")
    return normalised


FILES_HELP = ("Local data files (.jsonl, .json, .csv, .parquet, .txt; each may end in .gz): a path, a list of paths "
              "(all in the train split) or a mapping split -> path(s). A .txt file gives a `text` column, one row per "
              "non-blank line (see `sample_by`). Relative paths start at the current directory, as in TRL; "
              "`\"{recipe_dir}/data/train.jsonl\"` (quoted) starts at the directory of the recipe file that wrote it "
              "(through `extends` too), for a recipe set that ships its data.")
SPLIT_HELP = " Slices as in `datasets`, for local files too: `train[:10%]`, `train[10:20]`, `train[:90%]+test`."


DATASETS_HELP = ("A mixture instead of `dataset` / `files`, in TRL's `datasets:` shape: a list of entries (path, "
                 "name, data_dir, data_files, split, columns, fraction), concatenated into the training split. Each "
                 "entry maps its own columns onto the roles; hold out with `eval_size` (TRL's `test_split_size` is "
                 "read as it).")


class MixtureEntry(Section):
    """One dataset of a mixture, in the shape of TRL's `DatasetConfig` (`datasets:` in TRL's script configs)."""

    path: str | None = Field(
        None, description="Hub dataset id, a `datasets` builder (`json`, `csv`, `parquet`, `text`) reading "
        "`data_files`, or a local dataset directory. Default with `data_files`: the builder their suffix names.")
    name: str | None = Field(None, description="Configuration (subset) name of a Hub dataset.")
    data_dir: str | None = Field(None, description="Folder inside a Hub dataset.")
    data_files: Any = Field(None, description=FILES_HELP.replace("Local data files", "Local files of this entry"))
    revision: str | None = Field(None, description="Branch, tag or commit of a Hub dataset.")
    split: str = Field("train", description="The split (or slice) this entry contributes." + SPLIT_HELP)
    fraction: float | None = Field(
        None, gt=0, description="Share of this entry in the mixture (TRL's rule): shares are normalised to sum to 1 "
        "and the mixture is the largest that takes no entry's row twice; each entry gives its first rows. Set on "
        "every entry or on none (none: every row of every entry).")

    @field_validator("data_files", mode="before")
    @classmethod
    def _files_shape(cls, value: Any) -> Any:
        return normalise_files(value)

    @field_validator("split")
    @classmethod
    def _split_shape(cls, value: str) -> str:
        split_names(value)
        return value

    @model_validator(mode="after")
    def _a_source(self):
        if self.path is None and self.data_files is None:
            raise ValueError("set `path` (a Hub dataset id or a builder) and/or `data_files` (local files)")
        if self.data_files is not None:
            missing = [n for n in split_names(self.split) if n not in self.data_files]
            if missing:
                raise ValueError(f"split {missing[0]!r} is not among data_files ({', '.join(self.data_files)})")
        return self


def mixture_of(columns: type[Section]) -> type[MixtureEntry]:
    """The mixture entry of a stage's data section: its `columns` map that stage's roles."""
    roles = ", ".join(columns.model_fields)

    def list_form(value: Any) -> Any:  # TRL's `columns: [a, b]`: those columns, under their own names
        if isinstance(value, list):
            unknown = [v for v in value if v not in columns.model_fields]
            if unknown:
                raise ValueError(f"as a list (TRL's form), `columns` keeps columns under their own names, which must "
                                 f"be roles ({roles}); map {unknown[0]!r} as `columns: {{ROLE: {unknown[0]}}}`")
            return {v: v for v in value}
        return value

    return create_model(
        f"{columns.__name__.removesuffix('Columns')}MixtureEntry",
        __base__=MixtureEntry,
        __doc__=MixtureEntry.__doc__,
        __validators__={"_list_form": field_validator("columns", mode="before")(lambda cls, v: list_form(v))},
        columns=(columns | None, Field(
            None, description=f"This entry's column mapping, role -> column ({roles}); default: the section's "
            "`columns`. TRL's list form `[a, b]` keeps those columns, named as roles.")),
    )


class DataSection(Section):
    dataset: str | None = Field(None, description="Hub dataset id, e.g. `Anthropic/hh-rlhf`.")
    subset: str | None = Field(None, description="Configuration (subset) name of a Hub dataset.")
    data_dir: str | None = Field(None, description="Folder inside a Hub dataset, e.g. `harmless-base`.")
    revision: str | None = Field(None, description="Branch, tag or commit of a Hub dataset.")
    files: Any = Field(None, description=FILES_HELP)
    datasets: list[MixtureEntry] = Field(default_factory=list, description=DATASETS_HELP)
    train_split: str = Field("train", description="Split to train on." + SPLIT_HELP)
    eval_split: str | None = Field(
        None, description="Held-out split to evaluate on, when the data has one." + SPLIT_HELP)
    eval_size: int | float | None = Field(
        None,
        gt=0,
        validation_alias=AliasChoices("eval_size", "test_split_size"),
        description="Carve a held-out split off the training split instead: a fraction (< 1) or a number of rows, "
        "drawn with the recipe's seed. `test_split_size` (TRL's name) is read as this key.",
    )
    max_train_samples: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use at most this many held-out rows.")
    sample_by: Literal["line", "paragraph", "document"] | None = Field(
        None, description="For .txt files: one row per line (default), per paragraph (blank-line separated) or one "
        "per file, as `datasets`' text builder reads them; blank rows are left out.")

    @field_validator("files", mode="before")
    @classmethod
    def _files_shape(cls, value: Any) -> Any:
        return normalise_files(value)

    @field_validator("train_split", "eval_split")
    @classmethod
    def _split_shape(cls, value: str | None) -> str | None:
        if value is not None:
            split_names(value)
        return value

    @model_validator(mode="after")
    def _one_source(self):
        if sum(source is not None and source != [] for source in (self.dataset, self.files, self.datasets)) != 1:
            raise ValueError("set exactly one of `dataset` (a Hub dataset id), `files` (local files) or `datasets` "
                             "(a mixture)")
        if self.dataset is None and (self.subset or self.data_dir or self.revision):
            raise ValueError("`subset`, `data_dir` and `revision` apply to a Hub `dataset`; a mixture entry has its "
                             "own (`name`, `data_dir`, `revision`)")
        if self.datasets and ({"train_split", "eval_split"} & self.model_fields_set):
            raise ValueError("with `datasets`, each entry names its own `split`; hold out with `eval_size`")
        if self.eval_split and self.eval_size:
            raise ValueError("set `eval_split` (a given held-out split) or `eval_size` (carve one off), not both")
        if self.eval_size is not None and self.eval_size >= 1 and self.eval_size != int(self.eval_size):
            raise ValueError("`eval_size` is a fraction below 1 or a whole number of rows")
        if self.sample_by is not None and not any(data_format(p) == "text" for p in _all_files(self)):
            raise ValueError("`sample_by` applies to .txt files")
        return self


def _all_files(section: DataSection) -> list[str]:
    groups = [section.files or {}] + [entry.data_files or {} for entry in section.datasets]
    return [path for files in groups for paths in files.values() for path in paths]


def data_format(path: str) -> str:
    """The `datasets` builder for a local file: json, csv, parquet or text (a trailing .gz is allowed)."""
    suffixes = PurePath(path).suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in DATA_SUFFIXES:
        raise ValueError(f"{path!r}: expected a {', '.join(DATA_SUFFIXES)} file (optionally .gz)")
    return DATA_SUFFIXES[suffixes[-1]]


PretrainMixtureEntry = mixture_of(TextColumns)


class PretrainData(DataSection):
    datasets: list[PretrainMixtureEntry] = Field(default_factory=list, description=DATASETS_HELP)
    columns: TextColumns = Field(default_factory=TextColumns, description="Column mapping: role -> column name.")
    block_size: int | None = Field(
        None, ge=8, description="Texts are joined (EOS between them) and cut into blocks of this many tokens; "
        "default: the model's context length, at most 1024."
    )


SftMixtureEntry = mixture_of(SftColumns)


class SftData(DataSection):
    datasets: list[SftMixtureEntry] = Field(default_factory=list, description=DATASETS_HELP)
    columns: SftColumns = Field(default_factory=SftColumns, description="Column mapping: role -> column name.")


PreferenceMixtureEntry = mixture_of(PreferenceColumns)


class PreferenceData(DataSection):
    datasets: list[PreferenceMixtureEntry] = Field(default_factory=list, description=DATASETS_HELP)
    columns: PreferenceColumns = Field(
        default_factory=PreferenceColumns, description="Column mapping: role -> column name."
    )


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------
class LoraSection(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Any = Field(
        "all-linear",
        description="Modules that get adapters: a list of module names (GPT-2: c_attn, c_proj, c_fc) or `all-linear`.",
    )
    save: Literal["merged", "adapter"] = Field(
        "merged",
        description="`merged`: fold the adapter into the weights and save a plain model that loads anywhere. "
        "`adapter`: save only the adapter (small); it loads with AutoModelForCausalLM.from_pretrained(dir) when peft "
        "is installed, which fetches the base model named in adapter_config.json.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _modules(cls, value: Any) -> Any:
        if value == "all-linear" or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return value
        raise ValueError("expected `all-linear` or a non-empty list of module names")


# ---------------------------------------------------------------------------------------------------------------
# Hub
# ---------------------------------------------------------------------------------------------------------------
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_repo_id(value: str | None) -> str | None:
    """A light check (the schema imports no huggingface_hub); the full one happens at push time."""
    if value is not None and (not HUB_REPO_ID.fullmatch(value) or ".." in value or "--" in value):
        raise ValueError(f"expected `namespace/name` (letters, digits, `-`, `_`, `.`), got {value!r}")
    return value


class HubSection(Section):
    """Publish the finished run to the Hugging Face Hub (what `rlhf push` does), at the end of the stage."""

    repo_id: str | None = Field(
        None, description="Hub model repo to push to, `namespace/name` (your user name or an organisation); created "
        "when missing.")
    push: bool = Field(
        False, description="Push the run dir when the stage finishes: weights, tokenizer, recipe, metrics, samples "
        "and a generated model card (never pickles or checkpoints). Needs a write token: HF_TOKEN or `hf auth login`.")
    private: bool = Field(True, description="Create the repo private. An existing repo keeps its visibility.")
    revision: str | None = Field(None, description="Branch to push to, created from main when missing; default main.")
    license: str | None = Field(
        None, description="License id for the model card's metadata (e.g. `mit`, `apache-2.0`; see the Hub's list of "
        "licenses); default: none stated.")
    include_samples: bool = Field(
        False, description="Publish the generated samples and the reports that quote prompts of the data "
        "(samples.jsonl, eval_samples.jsonl, eval.md, the samples in eval_before.json), and let the card quote them. "
        "Default: they stay with the run (`rlhf push --include-samples` publishes them).")

    @field_validator("repo_id")
    @classmethod
    def _valid_repo_id(cls, value: str | None) -> str | None:
        return _check_repo_id(value)

    @model_validator(mode="after")
    def _push_needs_a_repo(self):
        if self.push and not self.repo_id:
            raise ValueError("`push: true` needs `repo_id` (namespace/name)")
        return self


# ---------------------------------------------------------------------------------------------------------------
# stage recipes
# ---------------------------------------------------------------------------------------------------------------
SEED_LIMIT = 2**32  # numpy's np.random.seed (which transformers' set_seed calls) takes 0 to 2**32 - 1


def usable_path(value: str) -> str:
    """An output path as the shell would give it (`~` expanded: `~/runs` is not `./~/runs`), refused when no file
    system could hold it: empty, a NUL byte, a name longer than 255 bytes."""
    import os

    if not value.strip():
        raise ValueError("expected a directory path (got an empty string)")
    if "\x00" in value:
        raise ValueError(f"a path cannot hold a NUL byte (got {value!r})")
    expanded = os.path.expanduser(value)
    long = [part for part in PurePath(expanded).parts if len(os.fsencode(part)) > 255]
    if long:
        raise ValueError(f"the name {long[0][:40]}... is {len(os.fsencode(long[0]))} bytes long; a file system "
                         "allows 255")
    return expanded


class StageRecipe(Section):
    stage: str = Field(description="Which stage this recipe is for.")
    extends: Any = Field(None, description="Recipe(s) this one builds on (deep merge; paths relative to this file).")
    seed: int = Field(42, ge=0, lt=SEED_LIMIT, description="Seed for initialisation, data shuffling and splits, and "
                      "sampling: 0 to 2**32 - 1 (what numpy accepts).")
    output_dir: str = Field(description="Where the stage writes its model, tokenizer, recipe and metrics (`~` is "
                            "your home directory).")
    provenance: dict[str, Any] | None = Field(
        None, description="Written by rlhf into recipe.resolved.yaml (versions, git commit); ignored on input."
    )
    hub: HubSection = Field(default_factory=HubSection, description="Publish the finished run to the Hugging Face Hub.")

    @field_validator("output_dir")
    @classmethod
    def _usable_path(cls, value: str) -> str:
        return usable_path(value)


class PretrainRecipe(StageRecipe):
    """Causal-LM pre-training on plain text, optionally from a freshly trained tokenizer and a new model."""

    stage: Literal["pretrain"]
    model: PretrainModelSection = Field(description="The model to train: a checkpoint or an architecture.")
    tokenizer: PretrainTokenizerSection = Field(
        default_factory=PretrainTokenizerSection, description="Where the tokenizer comes from."
    )
    data: PretrainData = Field(description="The plain-text corpus.")
    training: dict[str, Any] = Field(
        default_factory=dict, description="transformers.TrainingArguments fields (`rlhf recipe keys pretrain`)."
    )

    @model_validator(mode="after")
    def _tokenizer_source(self):
        if self.model.init and not (self.tokenizer.train or self.tokenizer.name_or_path):
            raise ValueError("a new model (`model.init`) needs `tokenizer.train` or `tokenizer.name_or_path`")
        if self.tokenizer.train and self.tokenizer.name_or_path:
            raise ValueError("set either `tokenizer.train` or `tokenizer.name_or_path`, not both")
        if self.tokenizer.train and self.model.name_or_path:
            raise ValueError("a trained tokenizer needs a new model (`model.init`): a checkpoint has its own "
                             "vocabulary")
        return self


class SftRecipe(StageRecipe):
    """Supervised fine-tuning with TRL's SFTTrainer."""

    stage: Literal["sft"]
    model: ModelSection = Field(description="The model to fine-tune.")
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection, description="Tokenizer overrides.")
    data: SftData = Field(description="Demonstrations: plain text, prompt/completion or conversations.")
    training: dict[str, Any] = Field(
        default_factory=dict, description="trl.SFTConfig fields (`rlhf recipe keys sft`)."
    )
    peft: LoraSection | None = Field(None, description="Train LoRA adapters instead of all weights.")


class RewardRecipe(StageRecipe):
    """Reward modelling on preference pairs with TRL's RewardTrainer."""

    stage: Literal["reward"]
    model: ModelSection = Field(description="The base model; it gains a one-output score head.")
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection, description="Tokenizer overrides.")
    data: PreferenceData = Field(description="Preference pairs, with an explicit or implicit prompt.")
    training: dict[str, Any] = Field(
        default_factory=dict, description="trl.RewardConfig fields (`rlhf recipe keys reward`)."
    )
    peft: LoraSection | None = Field(
        None, description="Train LoRA adapters (plus the score head) instead of all weights.")


# ---------------------------------------------------------------------------------------------------------------
# PPO (our own trainer: every knob is declared here, with its help text)
# ---------------------------------------------------------------------------------------------------------------
class PromptColumns(Section):
    prompt: str | None = Field(
        None, description="Prompt column. Without one, preference data (chosen/rejected sharing a prefix) gives its "
        "shared prefix as the prompt.")
    chosen: str | None = Field(None, description="Chosen column, only used to extract an implicit prompt.")
    rejected: str | None = Field(None, description="Rejected column, only used to extract an implicit prompt.")


PromptMixtureEntry = mixture_of(PromptColumns)


class PromptData(DataSection):
    datasets: list[PromptMixtureEntry] = Field(default_factory=list, description=DATASETS_HELP)
    columns: PromptColumns = Field(default_factory=PromptColumns, description="Column mapping: role -> column name.")
    max_prompt_length: int = Field(
        256, ge=1, description="Prompts longer than this many tokens are left out (the count is reported).")
    implicit_prompt_end: str | None = Field(
        None, description="For preference data without a prompt column (plain text): cut each pair's shared prefix "
        "just after the last occurrence of this marker, e.g. `\\n\\nAssistant:` for Anthropic HH-RLHF. Default: "
        "the whole shared prefix (TRL's extract_prompt), which runs into the response when both begin alike.")


class RewardSource(Section):
    """A scorer of (prompt, response) pairs: a reward model, or a Python function."""

    model: str | None = Field(
        None, description="Reward-stage output dir or Hub id of a one-output sequence-classification model.")
    function: str | None = Field(
        None,
        description="`package.module:function` or `path/to/file.py:function`, called as f(prompts, responses) with "
        "lists of strings (plus finished=[bool, ...], whether each response ended with EOS, when the function "
        "accepts it) and returning one float per response.",
    )
    revision: str | None = Field(None, description="Branch, tag or commit of a Hub reward model.")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped inside the reward model's repo.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the reward model's weights.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.function is None):
            raise ValueError("set exactly one of `model` (a reward model) or `function` (module:function)")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"`function` is `module:function` or `file.py:function` (got {self.function!r})")
        return self


class OtherModel(Section):
    """A model loaded from a repository of its own: its own revision and remote-code permission."""

    revision: str | None = Field(None, description="Branch, tag or commit of a Hub model named by `name_or_path`.")
    trust_remote_code: bool = Field(
        False, description="Run modelling code shipped inside the repository named by `name_or_path` (not inherited "
        "from the policy's section).")


class ValueSection(OtherModel):
    mode: Literal["separate", "shared"] = Field(
        "separate",
        description="`separate`: a value network of its own, initialised from `name_or_path` (the classic setting: "
        "a better first estimate, at the cost of a second model's memory and a second forward/backward). `shared`: "
        "a value head on the policy's own trunk (one forward/backward; value and policy gradients share the trunk).",
    )
    name_or_path: str | None = Field(
        None, description="Checkpoint the separate value network starts from; default: the reward model when it "
        "shares the policy's vocabulary, otherwise (or when the reward is a function) the policy.")


class ReferenceSection(OtherModel):
    name_or_path: str | None = Field(
        None, description="The frozen reference policy. Default: a frozen copy of the policy; with LoRA, the policy "
        "with its adapter disabled (no second copy).")


class GenerationSection(Section):
    response_length: int = Field(64, ge=1, description="Tokens sampled per response at most.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (also divides the logits in training).")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0 keeps all (recommended for PPO).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1.0 keeps all (recommended for PPO).")


class PpoGenerationSection(GenerationSection):
    samples_per_prompt: int = Field(
        1, ge=1, description="Responses sampled per prompt in each rollout batch (k). The `rloo` and `grpo` advantage "
        "estimators need k >= 2: each response is judged against the other responses to the same prompt.")


class AdaptiveKL(Section):
    target: float = Field(6.0, gt=0, description="KL (nats per response) the controller steers towards.")
    horizon: float = Field(10000, gt=0, description="Episodes over which the coefficient may change by a factor e^0.2.")


class PpoTraining(Section):
    """PPO hyper-parameters. Defaults follow Huang et al. 2024 where the tiny default does not need otherwise."""

    advantage_estimator: Literal["gae", "rloo", "grpo"] = Field(
        "gae", description="`gae`: PPO with a learned value function (critic) and GAE, the KL penalty in the per-token "
        "reward. `rloo`: REINFORCE Leave-One-Out (Ahmadian et al. 2024), no critic: a response's advantage is its "
        "reward (score - beta * KL) minus the mean reward of the other responses to its prompt. `grpo`: Group "
        "Relative Policy Optimization (Shao et al. 2024), no critic: scores normalised within each prompt's group, "
        "beta * k3 KL to the reference in the loss. `rloo` and `grpo` need generation.samples_per_prompt >= 2 and "
        "load no value model.")
    total_episodes: int = Field(
        10240, ge=1, description="Episodes (prompt -> response) sampled in the whole run; a multiple of "
        "rollout_batch_size.")
    rollout_batch_size: int = Field(
        64, ge=1, description="Episodes sampled per update, all processes together (prompts x samples_per_prompt).")
    num_mini_batches: int = Field(
        1, ge=1, description="Mini-batches per PPO epoch: each is one optimizer step.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per mini-batch on each process (memory only: the optimizer steps and the "
        "loss are those of the whole mini-batch).")
    forward_batch_size: int | None = Field(
        None, ge=1, description="Rows per no-grad forward pass while scoring rollouts; default: the whole local batch.")
    learning_rate: float = Field(3e-6, gt=0, description="AdamW learning rate.")
    value_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of the value parameters; default: learning_rate.")
    lr_schedule: Literal["linear", "constant"] = Field(
        "linear", description="`linear` anneals the learning rate to 0 over the run [N+]; `constant` keeps it.")
    adam_eps: float = Field(1e-5, gt=0, description="AdamW epsilon (1e-5 as in the N+ details).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null disables.")
    kl_coef: float = Field(
        0.05, ge=0, description="beta: weight of the per-token KL penalty (initial value if adaptive).")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token KL estimate in the reward (gae, rloo): k1 = log-ratio; k3 = (r - 1) - log r, "
        "never negative. Not used by grpo, which always puts k3 in the loss.")
    adaptive_kl: AdaptiveKL | None = Field(
        None, description="Adapt beta towards a target KL (Ziegler et al. 2019); null keeps kl_coef fixed.")
    missing_eos_penalty: float | None = Field(
        1.0, description="Subtracted from the score of a response that ends without EOS (TRL's rule: the reward "
        "model's opinion is kept); null disables.")
    missing_eos_score: float | None = Field(
        None, description="Replaces the score of a response that ends without EOS by this value, e.g. -1 (the rule "
        "of Ziegler et al. 2019 and Huang et al. 2024). Setting it switches missing_eos_penalty off.")
    score_normalization: Literal["none", "batch", "initial"] = Field(
        "none", description="`batch`: whiten scores within each rollout batch; `initial`: fix an affine map so that "
        "the initial policy's scores have mean 0 and std 1 (Ziegler et al. 2019); `none`: raw scores.")
    score_clip: float | None = Field(None, gt=0, description="Clip (normalised) scores to [-x, x]; null disables.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(
        True, description="Whiten advantages over each rollout batch. Default: true for gae, false for rloo and grpo "
        "(their advantages are already centred within each prompt's group).")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip epsilon.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip range around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    entropy_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus; 0 disables.")
    target_kl: float | None = Field(
        None, gt=0, description="Stop an update's remaining mini-batches once the approximate KL between the rollout "
        "policy and the current one exceeds this; null never stops early.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Accelerate mixed precision.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    log_every: int = Field(1, ge=1, description="Log metrics every this many updates.")
    sample_every: int = Field(
        10, ge=1, description="Log sample (prompt, response, score) rows every this many updates.")
    num_samples: int = Field(4, ge=0, description="Sample rows logged each time.")
    save_every: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every this many updates (`rlhf ppo --resume` continues "
        "from the last); null: none (Ctrl-C still saves one).")
    save_total_limit: int | None = Field(
        2, ge=1, description="Keep the last this many checkpoints, deleting older ones; null keeps all.")
    eval_prompts: int = Field(
        128, ge=1, description="Held-out prompts scored before and after training (same sampling settings).")
    eval_batch_size: int = Field(64, ge=1, description="Prompts per generation batch during evaluation.")
    report_to: Any = Field(
        "none", description="Experiment trackers, through Accelerate's: `none`, `tensorboard`, `wandb`, `trackio`, "
        "`mlflow`, `comet_ml`, `aim`, `clearml`, `dvclive`, `swanlab`, `all` (every installed one), or a list. "
        "TensorBoard writes under output_dir/runs/; the package is checked at --dry-run and before models load.")
    project: str = Field(
        "rlhf-pipeline", min_length=1, description="The project the trackers file this run under (the W&B and trackio "
        "project, the MLflow experiment, the TensorBoard subdirectory of output_dir/runs/); the run is named after the "
        "output dir. The TRL-backed stages take the same key from transformers' TrainingArguments, where it names "
        "the trackio project.")

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: Any) -> Any:
        from rlhf_pipeline.recipe.trackers import problem

        message = problem("ppo", value)
        if message:
            raise ValueError(message)
        return value

    @model_validator(mode="after")
    def _batches(self):
        from rlhf_pipeline.ppo.plan import BatchPlan

        if self.missing_eos_score is not None and self.missing_eos_penalty is not None:
            if "missing_eos_penalty" in self.model_fields_set:
                raise ValueError("set `missing_eos_score` (replace the score) or `missing_eos_penalty` (subtract from "
                                 "it), not both")
            self.missing_eos_penalty = None
        if self.advantage_estimator != "gae" and "whiten_advantages" not in self.model_fields_set:
            self.whiten_advantages = False

        BatchPlan.of(self)  # raises KeyedValueError, naming the keys to change and the values that fit
        return self


class PolicySection(ModelSection):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the loaded weights of the policy, and of the reference and value networks "
        "loaded beside it. Mixed precision is `training.mixed_precision` (Accelerate's autocast): PPO has no "
        "training.bf16/fp16.")


class PpoRecipe(StageRecipe):
    """PPO against a reward model or function, with a KL penalty to a frozen reference (our own trainer)."""

    stage: Literal["ppo"]
    policy: PolicySection = Field(description="The policy to optimise (normally the SFT output).")
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection, description="Tokenizer overrides.")
    reference: ReferenceSection = Field(default_factory=ReferenceSection, description="The frozen reference policy.")
    reward: RewardSource = Field(description="What scores the responses during training.")
    value: ValueSection = Field(default_factory=ValueSection, description="The value function (critic).")
    gold: RewardSource | None = Field(
        None, description="A gold scorer reported beside the reward (e.g. the tiny default's simulated annotator): "
        "shows whether PPO improves true preference or only games the learned reward.")
    data: PromptData = Field(description="Prompts; the held-out split (or a carved-off part) is used for evaluation.")
    generation: PpoGenerationSection = Field(default_factory=PpoGenerationSection, description="Sampling settings.")
    training: PpoTraining = Field(default_factory=PpoTraining, description="PPO hyper-parameters.")
    peft: LoraSection | None = Field(None, description="Train LoRA adapters on the policy instead of all weights.")

    @model_validator(mode="after")
    def _groups(self):
        from rlhf_pipeline.errors import KeyedValueError
        from rlhf_pipeline.ppo.plan import BatchPlan, in_recipe

        estimator, k = self.training.advantage_estimator, self.generation.samples_per_prompt
        if estimator != "gae" and k < 2:
            raise ValueError(f"training.advantage_estimator `{estimator}` compares the responses to each prompt: set "
                             "generation.samples_per_prompt to 2 or more (4 is common)")
        if estimator != "gae" and self.value.name_or_path is not None:  # (`mode` is ignored: a base recipe's)
            raise ValueError(f"value.name_or_path names a critic, and {estimator} has none: leave it out (or use "
                             "training.advantage_estimator: gae)")
        try:
            BatchPlan.of(self.training, samples_per_prompt=k)
        except KeyedValueError as exc:
            raise in_recipe(exc) from None
        return self


# ---------------------------------------------------------------------------------------------------------------
# DPO (TRL's DPOTrainer; the held-out generation evaluation is shared with PPO)
# ---------------------------------------------------------------------------------------------------------------
class DpoColumns(Section):
    prompt: str | None = Field(
        None, description="Prompt column; leave unset when chosen and rejected hold the whole text (implicit prompt: "
        "their shared prefix is the prompt).")
    chosen: str | None = Field(None, description="Column of the preferred response (or whole text).")
    rejected: str | None = Field(None, description="Column of the dispreferred response (or whole text).")


DpoMixtureEntry = mixture_of(DpoColumns)


class DpoData(DataSection):
    datasets: list[DpoMixtureEntry] = Field(default_factory=list, description=DATASETS_HELP)
    columns: DpoColumns = Field(default_factory=DpoColumns, description="Column mapping: role -> column name.")
    implicit_prompt_end: str | None = Field(
        None, description="For pairs without a prompt column (plain text): the prompt is the shared prefix of chosen "
        "and rejected, cut just after the last occurrence of this marker, e.g. `\\n\\nAssistant:` for Anthropic "
        "HH-RLHF; what follows it becomes part of both responses. Pairs whose shared prefix lacks it are left out "
        "(and counted). Default: the whole shared prefix (TRL's extract_prompt), which runs into the response when "
        "both begin alike.")

    @model_validator(mode="after")
    def _needs_held_out(self):
        if not (self.eval_split or self.eval_size):
            raise ValueError("set `eval_split` or `eval_size`: DPO reports its preference accuracy and its "
                             "before/after generation scores on held-out pairs")
        return self


class DpoEvaluation(Section):
    """The held-out generation evaluation, run before and after training with the same seed and sampling settings."""

    prompts: int = Field(
        128, ge=0, description="Held-out prompts (those of the held-out pairs, in order) sampled once each before and "
        "after training; 0 skips the generation evaluation (the held-out pair metrics remain).")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")
    max_prompt_length: int = Field(
        256, ge=1, description="Held-out prompts longer than this many tokens (or than what leaves room for "
        "`generation.response_length` in the model's context) are not sampled (the count is reported).")


class DpoRecipe(StageRecipe):
    """Direct preference optimisation of a policy on preference pairs with TRL's DPOTrainer, evaluated before and after
    on held-out prompts."""

    stage: Literal["dpo"]
    model: ModelSection = Field(description="The policy to optimise, normally the SFT output.")
    reference: ReferenceSection = Field(
        default_factory=ReferenceSection, description="The frozen reference policy of the DPO loss and of `eval_kl`.")
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection, description="Tokenizer overrides.")
    data: DpoData = Field(
        description="Preference pairs, explicit or implicit prompt; the held-out split (`eval_split`, or `eval_size` "
        "carved off) gives the held-out pair metrics and the evaluation prompts.")
    training: dict[str, Any] = Field(
        default_factory=dict, description="trl.DPOConfig fields, beta and loss_type included (`rlhf recipe keys dpo "
        "training`).")
    peft: LoraSection | None = Field(
        None, description="Train LoRA adapters instead of all weights; the default reference is then the policy with "
        "its adapter disabled (no second copy).")
    generation: GenerationSection = Field(
        default_factory=GenerationSection, description="Sampling settings of the before/after evaluation.")
    reward: RewardSource | None = Field(
        None, description="Scores the evaluation samples (`eval_score_before/after`); not used in training.")
    gold: RewardSource | None = Field(
        None, description="A gold scorer of the evaluation samples (`eval_gold_before/after`), e.g. the tiny "
        "default's simulated annotator.")
    evaluation: DpoEvaluation = Field(
        default_factory=DpoEvaluation, description="The held-out generation evaluation.")


# Names eval.json and the report use themselves: the baseline's figures (`baseline_score`), the reward model's
# (`reward_accuracy`, `reward_score_std`, ...), a sample's prompt (`prompt`).
REPORT_NAMES = ("baseline", "reward", "prompt")


def check_report_names(names: list[str], key: str) -> None:
    """`rlhf eval` writes each policy's figures as `<name>_<figure>` (`ppo_score`, `ppo_gold`, `ppo_gold_win_rate`):
    two names collide when one is the other followed by `_` (`ppo` and `ppo_gold`: is `ppo_gold_win_rate` ppo's gold
    win rate or ppo_gold's win rate?), and a name collides with the report's own (REPORT_NAMES). ValueError naming
    the pair."""
    for name in names:
        for other in (*REPORT_NAMES, *names):
            if name == other and other in REPORT_NAMES:
                raise ValueError(f"{key}: {name!r} cannot name a policy: the evaluation report uses it for "
                                 f"{'the reward model' if name == 'reward' else 'its own entries'}; rename it")
            if name != other and name.startswith(f"{other}_"):
                raise ValueError(f"{key}: the names {other!r} and {name!r} collide in eval.json, which writes each "
                                 f"policy's figures as `<name>_<figure>` (`{name}_score` could be either's); rename "
                                 f"one, e.g. {other}-{name[len(other) + 1:]}")


class EvalRecipe(StageRecipe):
    """Evaluate a reward model on held-out pairs, and a policy against a baseline on held-out prompts."""

    stage: Literal["eval"]
    policy: ModelSection | None = Field(None, description="The policy to evaluate (e.g. a PPO output).")
    policies: dict[str, ModelSection] | None = Field(
        None, description="Several policies compared side by side with the baseline, by name (e.g. `{ppo: "
        "{name_or_path: runs/x/ppo}, dpo: {...}}`), instead of `policy`. A policy that is a run of this tool also "
        "contributes its training time, throughput and (PPO family) per-update trajectory to the report.")
    baseline: ModelSection | None = Field(
        None, description="What the policy is compared with (e.g. the SFT model); also the KL reference unless "
        "`reference` is set.")
    reference: ReferenceSection = Field(
        default_factory=ReferenceSection, description="The KL reference; default: the baseline.")
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection, description="Tokenizer overrides.")
    reward: RewardSource | None = Field(
        None, description="Scores responses (win rate, score distributions); `reward.model` is also the reward "
        "model evaluated on `preferences`.")
    gold: RewardSource | None = Field(None, description="A gold scorer, reported beside the reward.")
    data: PromptData | None = Field(
        None, description="Prompts: the held-out split (`eval_split`, or `eval_size` carved off) is evaluated.")
    preferences: PreferenceData | None = Field(
        None, description="Preference pairs: the reward model is evaluated on their held-out split.")
    generation: GenerationSection = Field(default_factory=GenerationSection, description="Sampling settings.")
    num_prompts: int = Field(256, ge=1, description="Held-out prompts sampled (at most).")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")
    num_samples: int = Field(8, ge=0, description="Side-by-side samples shown in the report.")
    ppo_run: str | None = Field(
        None, description="A PPO output dir whose log.jsonl gives the per-update curves; default: the policy's dir "
        "when it has one.")
    human_labels: str | None = Field(
        None, description="The output dir of an `rlhf label` run in `ab` mode that compared these policies (matched "
        "by `name_or_path`) with this baseline: the human win rate, with its 95% Wilson interval, is reported beside "
        "the reward-model and gold win rates.")

    @model_validator(mode="after")
    def _something_to_evaluate(self):
        if self.policy is not None and self.policies:
            raise ValueError("give `policy` (one) or `policies` (several, by name), not both")
        for name in self.policies or {}:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name == "baseline":
                raise ValueError(f"policies: {name!r} is not a usable name (letters, digits, `_`, `-`, `.`; not "
                                 "`baseline`)")
        check_report_names(list(self.policies or {}), "policies")
        policy_parts = [self.policy or self.policies or None, self.baseline, self.data, self.reward]
        reward_parts = [self.reward is not None and self.reward.model, self.preferences]
        if any(policy_parts[:3]) and not all(policy_parts):
            missing = [n for n, v in zip(("policy", "baseline", "data", "reward"), policy_parts) if not v]
            raise ValueError(f"a policy evaluation needs {', '.join(missing)} too")
        if not (all(policy_parts) or all(reward_parts)):
            raise ValueError("nothing to evaluate: give `policy`, `baseline`, `data` and `reward` (a policy against "
                             "a baseline) and/or `reward.model` and `preferences` (a reward model)")
        for name, section in (("data", self.data), ("preferences", self.preferences)):
            if section is not None and not (section.eval_split or section.eval_size):
                raise ValueError(f"`{name}`: set `eval_split` or `eval_size`: evaluation uses held-out data only")
        if self.human_labels is not None and not all(policy_parts):
            raise ValueError("`human_labels` are compared with a policy evaluation: give `policy` (or `policies`), "
                             "`baseline`, `data` and `reward` too")
        return self


# ---------------------------------------------------------------------------------------------------------------
# label (human preferences in the browser: rlhf_pipeline/label/)
# ---------------------------------------------------------------------------------------------------------------
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class LabelPolicy(ModelSection):
    generation: GenerationSection | None = Field(
        None, description="This model's sampling settings; default: the recipe's `generation`.")


class LabelServer(Section):
    host: str = Field(
        "127.0.0.1", description="Address the labelling page listens on. The default (loopback) serves this machine "
        "only; any other address (e.g. `0.0.0.0`) exposes it and needs a password, read from the environment "
        "variable RLHF_LABEL_PASSWORD or typed at the prompt (never written anywhere); each labeler then logs in "
        "with their name and that password.")
    port: int | None = Field(
        None, ge=1, le=65535, description="Port; default: the first free one from 7860 (Gradio's rule).")


class LabelRecipe(StageRecipe):
    """Collect human preferences (ranking mode) or judge two models side by side (A/B mode) in a local web page."""

    stage: Literal["label"]
    output_dir: str = Field(
        description="The labelling run: samples.jsonl (the responses, generated ahead and stored), labels.jsonl (every "
        "label as given, appended and fsync'd), preferences.jsonl (the preference dataset, TRL's prompt / chosen / "
        "rejected) and summary.json. Labelling resumes here when restarted.")
    mode: Literal["rank", "ab"] = Field(
        "rank", description="`rank`: each prompt with `responses_per_prompt` sampled responses; the labeler ranks them "
        "(or picks the best, or says tie, all bad, skip); rankings expand to pairs as in InstructGPT. `ab`: the "
        "responses of a policy and of `baseline` side by side, their order random and hidden; gives a human win "
        "rate with a confidence interval (and preference pairs too).")
    policy: LabelPolicy | None = Field(None, description="The model to sample responses from (e.g. the SFT output).")
    policies: dict[str, LabelPolicy] | None = Field(
        None, description="Several models by name, instead of `policy`: in `rank` mode the responses to each prompt "
        "are drawn from them in turn; in `ab` mode each prompt compares one of them (in turn) with `baseline`.")
    baseline: LabelPolicy | None = Field(
        None, description="`ab` mode: what the policy is compared with (e.g. the SFT model).")
    tokenizer: TokenizerSection = Field(
        default_factory=TokenizerSection, description="Tokenizer overrides (one tokenizer for every model, as in "
        "`rlhf eval`).")
    data: PromptData = Field(description="The prompts (any data source the other stages take).")
    split: Literal["train", "held_out"] | None = Field(
        None, description="Which split's prompts are labelled: `train` (`data.train_split`) or `held_out` "
        "(`data.eval_split`, or `eval_size` carved off). Default: train in `rank` mode, held_out in `ab` mode.")
    num_prompts: int | None = Field(
        None, ge=1, description="Label at most this many prompts (the first of the split, in order); default: all.")
    responses_per_prompt: int | None = Field(
        None, ge=2, le=9, description="`rank` mode: responses sampled per prompt (K; keys 1-9 pick them), default 4 "
        "(InstructGPT used 4 to 9). `ab` mode always shows 2.")
    generation: GenerationSection = Field(
        default_factory=GenerationSection, description="Sampling settings (a model's own `generation` overrides).")
    overlap: float = Field(
        0.0, ge=0, le=1, description="Share of prompts also shown to a second labeler, chosen at random with the seed, "
        "so that agreement between labelers can be measured (pairwise agreement, Cohen's and Krippendorff's "
        "figures, in summary.json).")
    labelers: list[str] | None = Field(
        None, description="The names allowed to label; default: any name typed on the page (or logged in with).")
    ahead: int = Field(
        16, ge=1, description="Prompts whose responses are generated (in the background) ahead of the labelers.")
    server: LabelServer = Field(default_factory=LabelServer, description="Where the page is served.")
    hub: None = Field(
        None, exclude=True, description="Not a key of a labelling run: it is published, once labelled, with `rlhf push "
        "OUTPUT_DIR --repo-id ORG/NAME` (a Hub dataset repo).")

    @field_validator("hub", mode="before")
    @classmethod
    def _no_hub(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("a labelling run is published with `rlhf push OUTPUT_DIR --repo-id ORG/NAME` (a dataset "
                             "repo) once labelled: leave `hub` out")
        return None

    @field_validator("labelers")
    @classmethod
    def _labeler_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("an empty list allows nobody: leave `labelers` out to allow any name")
            for name in value:
                if not name.strip() or len(name) > 64:
                    raise ValueError(f"{name!r}: a labeler name is 1 to 64 characters")
            if len(set(value)) < len(value):
                raise ValueError("a name is listed twice")
        return value

    @model_validator(mode="after")
    def _models_for_the_mode(self):
        if (self.policy is None) == (not self.policies):
            raise ValueError("give `policy` (one model) or `policies` (several, by name)")
        for name in self.policies or {}:
            if not POLICY_NAME.fullmatch(name) or name == "baseline":
                raise ValueError(f"policies: {name!r} is not a usable name (letters, digits, `_`, `-`, `.`; not "
                                 "`baseline`)")
        if self.mode == "ab" and self.baseline is None:
            raise ValueError("`ab` mode compares a policy with a `baseline`: set `baseline` (e.g. the SFT model)")
        if self.mode == "rank" and self.baseline is not None:
            raise ValueError("`baseline` is for `ab` mode; in `rank` mode list every model under `policies`")
        if self.mode == "ab" and self.responses_per_prompt not in (None, 2):
            raise ValueError("`ab` mode shows 2 responses (the policy's and the baseline's): leave "
                             "`responses_per_prompt` out")
        if self.responses_per_prompt is None:
            self.responses_per_prompt = 4 if self.mode == "rank" else 2
        split = self.split or ("train" if self.mode == "rank" else "held_out")
        if split == "held_out" and not (self.data.eval_split or self.data.eval_size):
            raise ValueError(f"{'`split: held_out`' if self.split else '`ab` mode'} labels the held-out prompts: set "
                             "`data.eval_split` or `data.eval_size` (or `split: train`)")
        return self


# ---------------------------------------------------------------------------------------------------------------
# pipeline
# ---------------------------------------------------------------------------------------------------------------
PIPELINE_ORDER = ("pretrain", "sft", "reward", "ppo", "policies", "eval")
POLICY_STAGES = ("ppo", "dpo")  # the stages a `policies:` entry may run


class PipelineStage(Section):
    recipe: str = Field(description="The stage's recipe, relative to this pipeline file.")
    set: dict[str, Any] = Field(
        default_factory=dict, description="Overrides for that recipe as dotted keys, like --set: "
        "`{training.num_train_epochs: 2}`.")


class RewardPipelineStage(PipelineStage):
    init_from: Literal["sft", "pretrain", "recipe"] = Field(
        "sft", description="The reward model starts from the pipeline's `sft` output (or `pretrain` output), or from "
        "what its own recipe names (`recipe`).")


class EvalPipelineStage(Section):
    recipe: str | None = Field(
        None, description="An eval recipe; default: one built from the other stages (the PPO policy against the SFT "
        "model on PPO's held-out prompts, the reward model on the reward stage's held-out pairs).")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides for the eval recipe, as dotted keys.")


class PipelineStages(Section):
    pretrain: PipelineStage | None = Field(None, description="Pre-training.")
    sft: PipelineStage | None = Field(None, description="SFT; starts from the pretrain output when there is one.")
    reward: RewardPipelineStage | None = Field(None, description="Reward modelling.")
    ppo: PipelineStage | None = Field(
        None, description="PPO; its policy is the SFT output, its reward model (and value initialisation) the reward "
        "output.")
    policies: dict[str, PipelineStage] | None = Field(
        None, description="More policy-optimisation stages, side by side, by name: each a `ppo` recipe (any "
        "advantage_estimator) or a `dpo` recipe, run from the same SFT model (and reward model), written to "
        "<output_dir>/<name>. The generated eval then compares every policy with the SFT model in one report.")
    eval: EvalPipelineStage | None = Field(None, description="Evaluation of what the other stages produced.")

    @field_validator("policies")
    @classmethod
    def _policy_names(cls, value: dict[str, PipelineStage] | None) -> dict[str, PipelineStage] | None:
        for name in value or {}:
            taken = {*PIPELINE_ORDER, "baseline"} - {"ppo"}
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in taken:
                raise ValueError(f"{name!r} cannot name a policy stage (letters, digits, `_`, `-`, `.`; not the name "
                                 "of another stage)")
        return value


class GateSection(Section):
    min_reward_accuracy: float | None = Field(
        0.6, ge=0, le=1, description="Stop before PPO when the reward model's held-out accuracy is below this "
        "(null disables the gate).")


class PipelineHubSection(Section):
    """Publish the pipeline's models to the Hub when it finishes, upstream first, so each card links its lineage."""

    repo_prefix: str | None = Field(
        None, description="`namespace/name`: each stage goes to `<repo_prefix>-<stage>` (e.g. org/tiny-rlhf-ppo).")
    push: bool = Field(False, description="Push when the pipeline finishes. Needs HF_TOKEN or `hf auth login`.")
    private: bool = Field(True, description="Create the repos private. An existing repo keeps its visibility.")
    stages: list[Literal["pretrain", "sft", "reward", "ppo", "eval"]] = Field(
        default_factory=lambda: ["sft", "reward", "ppo"], description="The stages whose outputs are pushed.")
    license: str | None = Field(
        None, description="License id for the model cards' metadata (e.g. `mit`, `apache-2.0`); default: none stated.")
    include_samples: bool = Field(
        False, description="Publish each stage's generated samples and the reports that quote prompts of the data, as "
        "`rlhf push --include-samples` does; default: they stay with the runs.")

    @field_validator("repo_prefix")
    @classmethod
    def _valid_repo_prefix(cls, value: str | None) -> str | None:
        return _check_repo_id(value)

    @model_validator(mode="after")
    def _push_needs_a_prefix(self):
        if self.push and not self.repo_prefix:
            raise ValueError("`push: true` needs `repo_prefix` (namespace/name)")
        return self


class PipelineRecipe(StageRecipe):
    """The whole recipe in one command: each stage's output feeds the next; unchanged stages are skipped."""

    stage: Literal["pipeline"]
    output_dir: str = Field(description="Root directory: each stage writes to <output_dir>/<stage>.")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="When set, every stage uses this seed instead of "
                             "its recipe's.")
    stages: PipelineStages = Field(description="The stages to run, in the order pretrain, sft, reward, ppo, eval.")
    gate: GateSection = Field(default_factory=GateSection, description="Quality gates between stages.")
    hub: PipelineHubSection = Field(
        default_factory=PipelineHubSection, description="Push the stage outputs to the Hub when the pipeline finishes.")

    @model_validator(mode="after")
    def _some_stage(self):
        if not any(getattr(self.stages, name) for name in PIPELINE_ORDER):
            raise ValueError("`stages` lists no stage (pretrain, sft, reward, ppo, policies, eval)")
        if self.stages.ppo is not None and "ppo" in (self.stages.policies or {}):
            raise ValueError("`stages.policies.ppo` would write where `stages.ppo` writes: rename one")
        if self.stages.eval is not None:  # the policy stages' names become the evaluation's policy names
            check_report_names([*(["ppo"] if self.stages.ppo else []), *(self.stages.policies or {})],
                               "stages.policies")
        return self


STAGE_RECIPES: dict[str, type[StageRecipe]] = {
    "pretrain": PretrainRecipe,
    "sft": SftRecipe,
    "reward": RewardRecipe,
    "ppo": PpoRecipe,
    "dpo": DpoRecipe,
    "eval": EvalRecipe,
    "label": LabelRecipe,
    "pipeline": PipelineRecipe,
}
