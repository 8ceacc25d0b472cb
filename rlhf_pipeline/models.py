"""Tokenizers and models: load with `from_pretrained` (Hub id or path), initialise from an architecture, LoRA, save."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.errors import RecipeError, did_you_mean
from rlhf_pipeline.recipe.load import LoadedRecipe
from rlhf_pipeline.recipe.schema import BpeTraining, GPT2Architecture, LoraSection, ModelSection, TokenizerSection
from rlhf_pipeline.recipe.yaml_io import read_text_file

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_tokenizer(loaded: LoadedRecipe, section: TokenizerSection, model: ModelSection, key: str = "tokenizer",
                   model_key: str = "model.name_or_path") -> PreTrainedTokenizerBase:
    """The tokenizer named in `section` (default: the model's, which the recipe names at `model_key`), with a pad
    token and the recipe's chat template."""
    from transformers import AutoTokenizer

    own = section.name_or_path is not None  # another repository: its own revision and remote-code permission
    source = section.name_or_path if own else model.name_or_path
    source_key = f"{key}.name_or_path" if own else model_key
    check_local_source(loaded, source, source_key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=section.revision if own else model.revision,
            trust_remote_code=section.trust_remote_code if own else model.trust_remote_code,
        )
    except Exception as exc:
        if not damaged_folder(exc):
            raise
        raise loaded.error(source_key, f"cannot load a tokenizer from {source!r}: {_short(exc)}") from None
    if tokenizer.pad_token is None:  # GPT-2 has none; padding is always masked, so EOS can stand in
        tokenizer.pad_token = tokenizer.eos_token
    if section.chat_template:
        tokenizer.chat_template = read_chat_template(loaded, section.chat_template, f"{key}.chat_template")
        if section.chat_template == "chatml":
            add_chatml_tokens(tokenizer)
    return tokenizer


# ChatML (<|im_start|>role\ncontent<|im_end|>\n per message), with `{% generation %}` around what the assistant
# writes, so that TRL's `assistant_only_loss` can find it.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
NO_TEMPLATE = ("the data is conversational but the tokenizer has no chat template; set one: `tokenizer.chat_template: "
               "chatml` (built in), a .jinja file, or the template text")


def add_chatml_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """ChatML's markers as special tokens (one id each, never split or produced from text), and `<|im_end|>` as EOS,
    so that generation stops where an assistant turn ends, as in ChatML models. The model gains embedding rows for
    them (align_special_tokens); the saved tokenizer keeps them, so later stages find them there."""
    from transformers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in CHATML_TOKENS], special_tokens=True)
    tokenizer.eos_token = CHATML_TOKENS[1]


def section_for(base: ModelSection, name_or_path: str, own: Any = None) -> ModelSection:
    """A model section for `name_or_path` with `base`'s dtype and attention kernel, and the revision and remote-code
    permission of the recipe section that names it (`own`: e.g. `reference:`, `value:`, `reward:`); without `own`
    it is `base`'s own repository and keeps `base`'s."""
    update: dict[str, Any] = {"name_or_path": name_or_path}
    if own is not None:
        update.update(revision=own.revision, trust_remote_code=own.trust_remote_code)
    return base.model_copy(update=update)


def looks_like_a_path(name: str) -> bool:
    """A local path rather than a Hub id: it exists, starts like a path (`/`, `./`, `../`, `~`), has more parts
    than `org/name`, or its first part is a directory here."""
    if Path(name).exists() or name.startswith(("/", "./", "../", "~")):
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def check_local_source(loaded: LoadedRecipe, name: str, key: str) -> None:
    """A mistyped local path is said to be missing at once (not tried as a Hub id, which retries for a minute)."""
    if looks_like_a_path(name) and not Path(name).expanduser().exists():
        raise loaded.error(key, f"no such directory: {name} (relative paths start at the current directory, "
                                f"{Path.cwd()})")


def vocabulary_on_disk(path: str | None) -> dict[str, int] | None:
    """The token -> id map of a local tokenizer directory's `tokenizer.json` (base vocabulary and added tokens),
    read without transformers; None when there is no such file (a Hub id, or another tokenizer format)."""
    import json

    file = Path(path) / "tokenizer.json" if path else None
    if file is None or not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        vocab = dict(data["model"]["vocab"])
        vocab.update({token["content"]: token["id"] for token in data.get("added_tokens", [])})
    except (ValueError, KeyError, TypeError):
        return None
    return vocab


def read_chat_template(loaded: LoadedRecipe, value: str, key: str) -> str:
    """A chat template by name (`chatml`), from a `.jinja` file path, or given inline."""
    if value == "chatml":
        return CHATML
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        if path.exists():
            raise loaded.error(key, f"{value} is not a regular file (a directory, a FIFO or a device): expected a "
                                    "template file, `chatml` or the template text")
        if value.endswith((".jinja", ".j2", ".txt")) or "/" in value:
            raise loaded.error(key, f"no such file: {value} (relative paths start at the current directory, "
                                    f"{Path.cwd()}; or `chatml`, or the template text)")
        raise loaded.error(key, f"not `chatml`, not a file ({value}) and not a Jinja template (no '{{{{' or '{{%')"
                                f"{did_you_mean(value, ['chatml'])}")
    try:
        return read_text_file(path, what="chat template")
    except RecipeError as exc:
        raise loaded.error(key, f"{value}: {exc.problems[0].message}") from None


def check_chat_template(loaded: LoadedRecipe) -> None:
    """What the run would refuse about `tokenizer.chat_template`, told before it loads anything (torch-free, for
    --dry-run and `rlhf recipe validate`): a template that is neither `chatml`, a readable file nor template text;
    and ChatML's markers missing from the model's vocabulary (read from its tokenizer.json when it is on disk) where
    the run cannot add them: with LoRA (`check_lora_vocabulary`), or in PPO (its reference and critic would not
    match the grown policy)."""
    recipe = loaded.recipe
    section = getattr(recipe, "tokenizer", None)
    if section is None or not section.chat_template:
        return
    read_chat_template(loaded, section.chat_template, "tokenizer.chat_template")
    if section.chat_template != "chatml" or not (getattr(recipe, "peft", None) or recipe.stage == "ppo"):
        return
    model = getattr(recipe, "model", None) or getattr(recipe, "policy", None)
    vocabulary = vocabulary_on_disk(section.name_or_path or getattr(model, "name_or_path", None))
    if vocabulary is None or all(token in vocabulary for token in CHATML_TOKENS):
        return
    if recipe.stage == "ppo":
        raise loaded.error("tokenizer.chat_template", "the policy's vocabulary lacks ChatML's markers: set "
                                                      "`tokenizer.chat_template: chatml` in the SFT recipe, whose "
                                                      "output carries them, not here")
    raise loaded.error("peft", "`tokenizer.chat_template: chatml` adds tokens the model has no embedding for "
                               f"({', '.join(CHATML_TOKENS)}); with LoRA their new embedding rows would never train. "
                               "Add them in a full fine-tuning run (this stage without `peft:`), then use LoRA from "
                               "that model on")


def train_bpe_tokenizer(texts: Iterable[str], config: BpeTraining) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on `texts`, with GPT-2's conventions: one special token, `<|endoftext|>`,
    serving as EOS, BOS, UNK and pad (unless `config.pad_token` asks for a pad of its own), no BOS added."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    special = [config.eos_token] + ([config.pad_token] if config.pad_token else [])
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                            special_tokens=special, show_progress=True)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=config.eos_token,
                                   bos_token=config.eos_token, unk_token=config.eos_token,
                                   pad_token=config.pad_token or config.eos_token)


def init_gpt2(architecture: GPT2Architecture, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised GPT-2 sized by `architecture`, its vocabulary and special ids from `tokenizer`."""
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=architecture.n_positions,
        n_embd=architecture.n_embd,
        n_layer=architecture.n_layer,
        n_head=architecture.n_head,
        n_inner=architecture.n_inner,
        activation_function=architecture.activation_function,
        resid_pdrop=architecture.dropout,
        embd_pdrop=architecture.dropout,
        attn_pdrop=architecture.dropout,
        layer_norm_epsilon=architecture.layer_norm_epsilon,
        initializer_range=architecture.initializer_range,
        tie_word_embeddings=architecture.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def load_pretrained(loaded: LoadedRecipe, model: ModelSection, kind: str = "causal-lm",
                    key: str = "model.name_or_path", **extra: Any) -> PreTrainedModel:
    """`from_pretrained` on a Hub id or a path: a causal LM, or a one-score sequence classifier (`kind="reward"`).
    `key`: where the recipe names the model, for error messages."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.trainer.utils import create_model_from_path

    auto_class = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    kwargs: dict[str, Any] = {"revision": model.revision, "trust_remote_code": model.trust_remote_code,
                              "dtype": model.dtype, "device_map": None, **extra}
    if kind == "reward":
        kwargs["num_labels"] = 1
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    check_local_source(loaded, model.name_or_path, key)
    # a local directory by its absolute path: a LoRA adapter saved later records it as its base model, and a
    # relative path would only resolve from this working directory
    source = str(Path(model.name_or_path).resolve()) if Path(model.name_or_path).is_dir() else model.name_or_path
    try:
        if is_adapter_dir(source):
            return _load_base_plus_adapter(source, auto_class, kwargs)
        return create_model_from_path(source, auto_class, **kwargs)
    except Exception as exc:
        if not damaged_folder(exc):
            raise
        raise loaded.error(key, f"cannot load a model from {model.name_or_path!r}: {_short(exc)}") from None


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    """A LoRA adapter saved without its base: adapter_config.json (which names the base), no config.json."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def load_config(loaded: LoadedRecipe, model: ModelSection, key: str = "model.name_or_path"):
    """The model's transformers config alone (config.json; a LoRA adapter's base model's): what a stage needs to
    build its TRL config before the weights load, as DeepSpeed ZeRO-3 requires to shard them while they load."""
    from transformers import AutoConfig

    check_local_source(loaded, model.name_or_path, key)
    source = model.name_or_path
    try:
        if is_adapter_dir(source):
            source = json.loads((Path(source) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or source
        return AutoConfig.from_pretrained(source, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except Exception as exc:
        if not damaged_folder(exc):
            raise
        raise loaded.error(key, f"cannot load a model from {model.name_or_path!r}: {_short(exc)}") from None


def damaged_folder(exc: BaseException) -> bool:
    """What loading a damaged or doctored model folder raises: a file that is not JSON (ValueError), a config.json
    that is a list (TypeError, AttributeError, KeyError) or holds a layer count of "x" (huggingface_hub's
    StrictDataclassError), weights that are not safetensors (SafetensorError), a missing file (OSError)."""
    return (isinstance(exc, (OSError, ValueError, TypeError, KeyError, AttributeError))
            or any(kind.__name__ in ("SafetensorError", "StrictDataclassError") for kind in type(exc).__mro__))


def check_lora_vocabulary(loaded: LoadedRecipe, lora: LoraSection | None, tokenizer: PreTrainedTokenizerBase,
                          config: Any) -> None:
    """LoRA freezes the embeddings, so tokens the tokenizer has and the model lacks (ChatML's markers, which
    `tokenizer.chat_template: chatml` adds) would get new embedding rows that never train, and that an adapter would
    not even save. peft's trainable tokens would train them, but TRL 1.16's trainers run the LM head fused, which
    cannot take peft's wrapped head. Refused before the weights load."""
    vocabulary = getattr(config.get_text_config(), "vocab_size", None)
    if lora is None or vocabulary is None or len(tokenizer) <= vocabulary:
        return
    new = ", ".join(tokenizer.convert_ids_to_tokens(list(range(vocabulary, len(tokenizer)))))
    raise loaded.error("peft", f"the tokenizer has tokens the model has no embedding for ({new}); with LoRA their "
                               "new embedding rows would never train. Add them in a full fine-tuning run (this "
                               "stage without `peft:`), then use LoRA from that model on")


# ---------------------------------------------------------------------------------------------------------------
# LoRA on a LoRA: a stage that starts from an adapter directory (an SFT run saved with `peft.save: adapter`) trains on
# the base with that adapter merged in. A new adapter saved from it would name the base alone, and reload without the
# first adapter's delta; so the saved adapter is rewritten to hold both (`fold_start_adapter`).
# ---------------------------------------------------------------------------------------------------------------
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


def start_adapter(name_or_path: str) -> Path | None:
    """The adapter directory a stage starts from (its base model with the adapter merged in), or None."""
    return Path(name_or_path).resolve() if is_adapter_dir(name_or_path) else None


def check_adapter_chain(loaded: LoadedRecipe, lora: LoraSection | None, name_or_path: str, key: str) -> None:
    """A LoRA saved as an adapter on top of a starting adapter is folded with it (`fold_start_adapter`), which takes a
    plain LoRA adapter: refuse, before anything loads, a start that cannot be folded."""
    start = start_adapter(name_or_path)
    if lora is None or lora.save != "adapter" or start is None:
        return
    config = json.loads((start / ADAPTER_CONFIG).read_text())
    unfoldable = [name for name, bad in (
        ("a non-LoRA method", config.get("peft_type") != "LORA"), ("DoRA", config.get("use_dora")),
        ("LoRA biases", config.get("lora_bias")), ("per-module ranks", config.get("rank_pattern")),
        ("per-module alphas", config.get("alpha_pattern")), ("modules to save", config.get("modules_to_save")),
        ("trainable tokens", config.get("trainable_token_indices")),
        ("layer selection", config.get("layers_to_transform")),
        ("adapter weights in another format", not (start / ADAPTER_WEIGHTS).is_file()),
    ) if bad]
    if unfoldable:
        raise loaded.error("peft.save", f"{name_or_path} is an adapter with {', '.join(unfoldable)}, which cannot be "
                                        "folded into the adapter this stage saves (it would reload without it); set "
                                        "`peft.save: merged`, or start from that adapter merged into its base")


def fold_start_adapter(saved_dir: str | Path, start: Path) -> None:
    """Rewrite the LoRA adapter saved in `saved_dir`, trained on (base + the adapter in `start`, merged), as one
    adapter on the base that holds both deltas: for every module, s1 B1 A1 + s2 B2 A2 = [s1 B1 | s2 B2] [A1 ; A2],
    a LoRA of rank r1 + r2 with scaling 1 (lora_alpha = r), exact; a module only one adapter targets gets zero rows in
    the other's half. What else the saved adapter holds (a reward model's score head, `modules_to_save`) is kept.
    `adapter_config.json` names the same base as before, the root base model."""
    import math

    import torch
    from safetensors.torch import load_file, save_file

    saved_dir = Path(saved_dir)
    configs = [json.loads((folder / ADAPTER_CONFIG).read_text()) for folder in (start, saved_dir)]
    weights = [load_file(str(folder / ADAPTER_WEIGHTS)) for folder in (start, saved_dir)]

    def factors(tensors: dict, config: dict) -> dict[str, tuple]:
        """module key -> (A, scaled B)."""
        found = {}
        for name, a in tensors.items():
            if name.endswith(_LORA_A):
                module = name[: -len(_LORA_A)]
                rank = a.shape[0]
                scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
                found[module] = (a, tensors[module + _LORA_B] * scale)
        return found

    parts = [factors(t, c) for t, c in zip(weights, configs)]
    ranks = [next(iter(p.values()))[0].shape[0] if p else 0 for p in parts]
    folded: dict = {name: t for name, t in weights[1].items() if not name.endswith((_LORA_A, _LORA_B))}
    for module in sorted(set(parts[0]) | set(parts[1])):
        present = next(p[module] for p in parts if module in p)
        fan_in, fan_out, dtype = present[0].shape[1], present[1].shape[0], weights[1][next(iter(weights[1]))].dtype
        a_rows, b_columns = [], []
        for part, rank in zip(parts, ranks):
            a, b = part.get(module, (torch.zeros(rank, fan_in), torch.zeros(fan_out, rank)))
            a_rows.append(a.float())
            b_columns.append(b.float())
        folded[module + _LORA_A] = torch.cat(a_rows, 0).to(dtype).contiguous()
        folded[module + _LORA_B] = torch.cat(b_columns, 1).to(dtype).contiguous()
    total, prefix = sum(ranks), "base_model.model."
    modules = sorted(m.removeprefix(prefix) for m in set(parts[0]) | set(parts[1]))
    config = {**configs[1], "r": total, "lora_alpha": total, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}, "target_modules": modules}
    save_file(folded, str(saved_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (saved_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _load_base_plus_adapter(adapter_dir: str, auto_class: Any, kwargs: dict[str, Any]) -> PreTrainedModel:
    """A LoRA adapter directory: its base model (named in adapter_config.json) with the adapter merged in, so that
    the result trains like any model."""
    from peft import PeftConfig, PeftModel
    from trl.trainer.utils import create_model_from_path

    config = PeftConfig.from_pretrained(adapter_dir)
    if not config.base_model_name_or_path:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model (base_model_name_or_path)")
    base_model = create_model_from_path(config.base_model_name_or_path, auto_class, **{**kwargs, "revision": None})
    config.task_type = None  # e.g. an SFT (causal-LM) adapter under a reward model's score head: same base weights
    merged = PeftModel.from_pretrained(base_model, adapter_dir, config=config).merge_and_unload()
    return merged.requires_grad_(True)  # peft froze the base weights for inference


def align_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the model's config and generation config agree with the tokenizer on pad / EOS / BOS ids; give the model
    embedding rows for tokens the tokenizer gained (ChatML's markers)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        config.pad_token_id = tokenizer.pad_token_id
        stops = config.eos_token_id
        # an instruct checkpoint's several stop tokens (end of turn, end of text) stay when they include the EOS
        if not (isinstance(stops, list) and tokenizer.eos_token_id in stops):
            config.eos_token_id = tokenizer.eos_token_id
        if tokenizer.bos_token_id is not None:
            config.bos_token_id = tokenizer.bos_token_id


def disable_dropout(model: torch.nn.Module) -> Callable[[], None]:
    """No dropout anywhere in `model` (PPO: it would make the old and new log-probabilities of the same tokens
    differ [N+]): every `nn.Dropout` (LoRA's included), and the probabilities that models keep as plain numbers for
    functional dropout or for dropping whole layers, which a module's `train()` mode turns on: OPT's `dropout`,
    `attention_dropout` and `layerdrop`, Llama's and Qwen's `attention_dropout`, and their config's values (GPT-Neo
    reads its config's as it runs). Returns a function that puts the config's values back, so that the saved
    config is the checkpoint's own."""
    from torch import nn

    changed: list[tuple[object, str, float]] = []

    def zero(holder: object, remember: bool) -> None:
        for name, value in list(vars(holder).items()):
            if isinstance(value, float) and value and ("dropout" in name or "pdrop" in name or name == "layerdrop"):
                if remember:
                    changed.append((holder, name, value))
                setattr(holder, name, 0.0)

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        zero(module, remember=False)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            for part in (config, config.get_text_config()):
                zero(part, remember=True)

    def restore() -> None:
        for holder, name, value in changed:
            setattr(holder, name, value)

    return restore


def fuse_gelu(model: torch.nn.Module) -> int:
    """Run GPT-2's `gelu_new` activation (transformers' `NewGELUActivation`, six tensor ops written in Python) as
    PyTorch's fused `GELU(approximate="tanh")`: the same function, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))),
    in one kernel (transformers calls it `gelu_pytorch_tanh`; results differ in rounding only, about 1e-7). A forward
    and backward pass of the tiny default's GPT-2 takes a fifth less time. In memory only: the config still says
    `gelu_new`, and what is saved is the same weights. Returns how many activations were replaced."""
    from torch import nn
    from transformers.activations import NewGELUActivation

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, nn.GELU(approximate="tanh"))
                replaced += 1
    return replaced


def lora_config(section: LoraSection, task_type: str, model: PreTrainedModel):
    """A peft LoraConfig from the recipe's `peft:` section."""
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        task_type=task_type,
        bias="none",
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",  # GPT-2 uses Conv1D (transposed) layers
    )


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, output_dir: str | Path,
               lora: LoraSection | None, state_dict: dict | None = None, start: Path | None = None) -> str:
    """Save weights (safetensors) and tokenizer. A LoRA model is merged first unless `lora.save == 'adapter'`.
    `state_dict`: the weights to write instead of the model's own (gathered whole when the model is sharded; not
    for a merge, which folds the live weights). `start`: the adapter the model started from (`start_adapter`), folded
    into a saved adapter. Returns what was saved: 'full', 'merged' or 'adapter'."""
    from peft import PeftModel

    saved = "full"
    if isinstance(model, PeftModel):
        if lora is not None and lora.save == "adapter":
            saved = "adapter"
        else:
            model = model.merge_and_unload()
            saved = "merged"
            state_dict = None
    if state_dict is not None and saved == "full":
        state_dict = without_tied_copies(model, state_dict)
    model.save_pretrained(output_dir, state_dict=state_dict)
    if saved == "adapter" and start is not None:
        fold_start_adapter(output_dir, start)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return saved


def without_tied_copies(model: PreTrainedModel, state_dict: dict) -> dict:
    """`state_dict` without the entries the model ties to another (GPT-2's output head is its input embedding):
    save_pretrained drops a tied entry only when it shares the other's storage, and a gathered state dict (FSDP's)
    holds separate copies, which it would write twice (for GPT-2 small, 150 MB more)."""
    tied = {target for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items()
            if target in state_dict and source in state_dict
            and model.get_parameter(target) is model.get_parameter(source)}
    return {key: value for key, value in state_dict.items() if key not in tied}


def count_parameters(model: PreTrainedModel) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"num_parameters": total, "num_trainable_parameters": trainable}


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "Validation error for field 'n_layer':" and what it is
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else type(exc).__name__

