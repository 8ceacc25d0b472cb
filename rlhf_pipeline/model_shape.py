"""The shape of a decoder-only language model, found without loading weights: its exact parameter counts, the FLOPs
of a forward pass, the width of its key/value cache. Read by `rlhf plan` (estimates before a launch) and by bench/
(model FLOP/s achieved).

GPT-2 (the tiny default, the gpt2-hh recipes) is counted in closed form, without importing torch (the formulas are
checked against transformers in tests/test_model_shape.py). Any other architecture transformers knows is built from
its config on the meta device (`measure`: no weights, no memory) and counted there: parameters with tied weights once,
the sequence-classification variant that reward and value models load, the decoder layers, every linear layer (what
LoRA adapts), the key/value cache each layer keeps (sliding-window layers keep their window).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

GPT2_VOCAB, GPT2_CONTEXT = 50257, 1024


class UnplannableModel(ValueError):
    """A config `rlhf plan` cannot count (no model_type, remote code, an encoder-decoder): the message says why in one
    line."""


@dataclass(frozen=True)
class Measured:
    """What the model transformers builds from a config holds, counted on the meta device."""

    causal_lm: int  # parameters of AutoModelForCausalLM, a tied weight once
    classifier: int | None  # of AutoModelForSequenceClassification with one label; None: transformers has none
    block: int  # the largest decoder layer (the unit FSDP wraps)
    layer_matmul: int  # weights a token multiplies through in the decoder layers, all of them
    linears: tuple[tuple[str, int, int], ...]  # (module name, inputs, outputs) of each linear layer but the LM head
    sizes: tuple[tuple[int, int], ...]  # (elements, how many parameter tensors have that many)
    norms_per_layer: int
    rms_norm: bool
    tied: bool  # the LM head is the input embedding
    cache: tuple[int | None, ...]  # per layer, the tokens its KV cache keeps: None all, else at most that many
    experts: tuple[int, int] | None = None  # a mixture of experts: (experts per token, experts)
    approximate: tuple[str, ...] = ()  # what about this architecture the plan can only approximate


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int = GPT2_VOCAB
    n_positions: int = GPT2_CONTEXT
    n_inner: int | None = None  # the MLP's width; GPT-2: 4 x n_embd
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    head_dim: int | None = None  # None: n_embd // n_head
    gated_mlp: bool = False  # three MLP matrices (gate, up, down) instead of two
    model_type: str = "gpt2"
    measured: Measured | None = None  # None: GPT-2, counted in closed form

    # --- attention and MLP widths -------------------------------------------------------------------------------
    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def head_width(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def attention_width(self) -> int:
        """Width of the queries (and of the attention's output): heads x head_dim."""
        return self.n_head * self.head_width

    @property
    def kv_width(self) -> int:
        """Width of the keys (and of the values) a layer caches: key/value heads x head_dim."""
        return (self.n_kv_head or self.n_head) * self.head_width

    @property
    def gpt2(self) -> bool:
        return self.measured is None

    # --- parameters ---------------------------------------------------------------------------------------------
    def _closed_form(self) -> None:
        if not self.gpt2 or self.model_type != "gpt2":
            raise ValueError(f"a {self.model_type} shape is counted on the meta device (model_shape.measure)")

    @property
    def layer_matmul_parameters(self) -> int:
        """Weights every token multiplies through in the decoder layers, all of them: attention q, k, v and out,
        the MLP (2 matrices, 3 when gated). Measured models: the layers' linear layers as built (a mixture of experts:
        the experts a token is routed to)."""
        if self.measured is not None:
            return self.measured.layer_matmul
        d, q, kv = self.n_embd, self.attention_width, self.kv_width
        return self.n_layer * (d * (q + 2 * kv) + q * d + (3 if self.gated_mlp else 2) * d * self.mlp_width)

    @property
    def parameters(self) -> int:
        """All parameters of the causal LM, a tied weight once (GPT-2's LM head is its token embedding)."""
        if self.measured is not None:
            return self.measured.causal_lm
        self._closed_form()
        d = self.n_embd
        return self.vocab_size * d + self.n_positions * d + self.n_layer * self.block_parameters + 2 * d

    @property
    def classifier_parameters(self) -> int | None:
        """Parameters of the sequence classifier with one label (a reward or value model): the trunk and a score
        head without bias; None when transformers has no such class for this architecture."""
        if self.measured is not None:
            return self.measured.classifier
        return self.parameters + self.n_embd  # GPT-2: the tied head is the embedding, which the trunk keeps

    @property
    def block_parameters(self) -> int:
        """Parameters of one decoder layer (the largest): FSDP's wrapping unit."""
        if self.measured is not None:
            return self.measured.block
        d, f = self.n_embd, self.mlp_width
        return 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # weights, biases, two layer norms

    @property
    def tied(self) -> bool:
        return self.measured.tied if self.measured is not None else True

    def linear_layers(self) -> tuple[tuple[str, int, int], ...]:
        """(module name, inputs, outputs) of every linear layer but the output head: what peft's LoRA may adapt."""
        if self.measured is not None:
            return self.measured.linears
        d, f = self.n_embd, self.mlp_width
        per_layer = (("attn.c_attn", d, 3 * d), ("attn.c_proj", d, d), ("mlp.c_fc", d, f), ("mlp.c_proj", f, d))
        return tuple((f"transformer.h.{i}.{name}", n_in, n_out) for i in range(self.n_layer)
                     for name, n_in, n_out in per_layer)

    def parameter_sizes(self) -> tuple[tuple[int, int], ...]:
        """(elements, how many parameter tensors have that many): DeepSpeed ZeRO-3 keeps the small ones whole."""
        if self.measured is not None:
            return self.measured.sizes
        d, f, n = self.n_embd, self.mlp_width, self.n_layer
        sizes = Counter({self.vocab_size * d: 1, self.n_positions * d: 1})
        # per block: c_attn's weight and bias, attn.c_proj's weight; two biases and two layer norms' weight and
        # bias of width d; c_fc's and mlp.c_proj's weights, c_fc's bias
        for size, count in ((3 * d * d, 1), (3 * d, 1), (d * d, 1), (d, 6), (d * f, 2), (f, 1)):
            sizes[size] += count * n
        sizes[d] += 2  # the final layer norm
        return tuple(sorted(sizes.items()))

    # --- what the activations and the cache look like ----------------------------------------------------------
    @property
    def norms_per_layer(self) -> int:
        return self.measured.norms_per_layer if self.measured is not None else 2

    @property
    def rms_norm(self) -> bool:
        return self.measured.rms_norm if self.measured is not None else False

    @property
    def approximate(self) -> tuple[str, ...]:
        return self.measured.approximate if self.measured is not None else ()

    def cached_tokens(self, length: int, prompt: int = 0) -> int:
        """Token-layers a KV cache holds at most while `length` tokens are generated after a `prompt`: every layer
        all of them; a sliding-window layer its window (transformers' DynamicSlidingWindowLayer keeps the last
        window - 1 tokens as a view of the window it concatenated), but right after the prefill still the whole
        prompt (the view keeps the prefill's tensor alive until the next step)."""
        if self.measured is None:
            return self.n_layer * length
        cache = self.measured.cache
        at_end = sum(length if keep is None else min(keep, length) for keep in cache)
        after_prefill = sum(prompt if keep is None or keep else 0 for keep in cache)
        return max(at_end, after_prefill)

    @property
    def sliding_layers(self) -> list[int]:
        """The windows of the layers whose cache keeps a window (empty: every layer keeps everything)."""
        if self.measured is None:
            return []
        return [keep for keep in self.measured.cache if keep is not None and keep > 0]

    def describe(self) -> str:
        """The architecture in a few words, for `rlhf plan`."""
        parts = [f"{self.model_type}: {self.n_layer} layers x {self.n_embd} wide"]
        if self.n_kv_head and self.n_kv_head != self.n_head:
            parts.append(f"grouped-query attention ({self.n_head} query heads, {self.n_kv_head} key/value heads of "
                         f"{self.head_width})")
        elif self.head_dim and self.head_dim * self.n_head != self.n_embd:
            parts.append(f"{self.n_head} heads of {self.head_width}")
        experts = self.measured.experts if self.measured is not None else None
        if experts:
            parts.append(f"a mixture of {experts[1]} experts ({experts[0]} per token)")
        else:
            parts.append(f"{'gated ' if self.gated_mlp else ''}MLP {self.mlp_width}")
        windows = self.sliding_layers
        if windows:
            parts.append(f"sliding window {max(windows)} on {len(windows)} of {self.n_layer} layers")
        parts.append(f"vocabulary {self.vocab_size:,}, context {self.n_positions}")
        if not self.tied:
            parts.append("untied LM head")
        return ", ".join(parts)

    # --- FLOPs --------------------------------------------------------------------------------------------------
    def head_flops(self, tokens: float, head: str = "lm") -> float:
        """FLOPs of the output head alone over `tokens` hidden states: "lm" (logits over the vocabulary), "score" (one
        number: reward or value) or "none"."""
        return tokens * 2 * self.n_embd * {"lm": self.vocab_size, "score": 1, "none": 0}[head]

    def forward_flops(self, tokens: float, attended: float, head: str = "lm",
                      head_tokens: float | None = None) -> float:
        """Multiply-add FLOPs (2 per multiply-accumulate) of a forward pass over `tokens` tokens, each attending to
        `attended` keys on average (a causal pass over L tokens: (L + 1) / 2; a cached generation step at position t:
        t). `head`: "lm" (logits over the vocabulary), "score" (one number: reward or value) or "none", read at
        `head_tokens` of the positions (default: all of them; PPO reads logits at the response positions only,
        generation's first pass at the last prompt position only). Backward costs twice the forward: a training step
        is 3x this. Attention scores: q.k and the weighted values, 2 x 2 x attended x the queries' width per layer
        (a sliding-window layer is counted in full, as an attention kernel given a mask computes it)."""
        per_token = 2 * self.layer_matmul_parameters + 4 * self.n_layer * attended * self.attention_width
        return tokens * per_token + self.head_flops(tokens if head_tokens is None else head_tokens, head)

    # --- from a config ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """From a transformers config dict (config.json): GPT-2 in closed form, anything else measured on the meta
        device (imports torch and transformers). Raises UnplannableModel (a one-line reason) for what cannot be
        counted, KeyError for a GPT-2 config that lacks a size."""
        if is_gpt2(config):
            def first(*names, default=None):
                for name in names:
                    if config.get(name) is not None:
                        return config[name]
                if default is None:
                    raise KeyError(f"config.json has none of {', '.join(names)}")
                return default

            return cls(n_layer=first("n_layer"), n_embd=first("n_embd"), n_head=first("n_head"),
                       vocab_size=first("vocab_size", default=GPT2_VOCAB),
                       n_positions=first("n_positions", default=GPT2_CONTEXT), n_inner=config.get("n_inner"))
        return measure(config)


def is_gpt2(config: dict) -> bool:
    """GPT-2's own layout (counted in closed form): model_type gpt2, or GPT-2's size names without a model_type."""
    if config.get("add_cross_attention"):
        return False
    return config.get("model_type", "gpt2" if "n_embd" in config else None) == "gpt2"


def measure(config: dict) -> ModelShape:
    """The shape of the model transformers builds from `config` (a config.json dict), counted on the meta device."""
    return _measure(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=32)
def _measure(key: str) -> ModelShape:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = json.loads(key)
    model_type = config.get("model_type")
    if not model_type:
        raise UnplannableModel("its config.json has no model_type, so transformers cannot tell its architecture")
    if model_type not in CONFIG_MAPPING:
        why = (" (its config names code of its own, auto_map: remote code, which `rlhf plan` does not run)"
               if config.get("auto_map") else "")
        raise UnplannableModel(f"model_type {model_type!r} is not an architecture transformers "
                               f"{transformers.__version__} knows{why}")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # reading and building print advice meant for training runs
    try:
        return _build_and_count(config, model_type)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _build_and_count(config: dict, model_type: str) -> ModelShape:
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    try:
        built = CONFIG_MAPPING[model_type].from_dict(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise UnplannableModel(f"transformers cannot read its config.json: {_first_line(exc)}") from None
    if getattr(built, "is_encoder_decoder", False):
        raise UnplannableModel(f"{model_type} is an encoder-decoder; the stages train decoder-only causal LMs")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnplannableModel(f"transformers has no causal-LM class for model_type {model_type!r}; the stages "
                               "train decoder-only causal LMs")
    text = built.get_text_config()
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(built)
            classifier = None
            if model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
                one_label = CONFIG_MAPPING[model_type].from_dict(
                    {**{k: v for k, v in config.items() if k not in ("id2label", "label2id")}, "num_labels": 1})
                classifier = sum(p.numel() for p in
                                 transformers.AutoModelForSequenceClassification.from_config(one_label).parameters())
    except Exception as exc:  # any architecture's own check of its config (head sizes, rope settings, ...)
        raise UnplannableModel(f"transformers cannot build {model_type} from this config: {_first_line(exc)}") \
            from None
    return _count(model, text, model_type, classifier)


def _count(model, text, model_type: str, classifier: int | None) -> ModelShape:
    """The counts of a model built on the meta device; `text`: its (text) config."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    n_layer = text.num_hidden_layers
    layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layer), None)
    if layers is None:
        raise UnplannableModel(f"no list of {n_layer} decoder layers found in {type(model).__name__}")
    head = model.get_output_embeddings()

    def shape_of(module) -> tuple[int, int] | None:
        if isinstance(module, nn.Linear):
            return module.in_features, module.out_features
        if isinstance(module, Conv1D):  # GPT-2 style: weight is (inputs, outputs)
            return module.weight.shape[0], module.weight.shape[1]
        return None

    linears = tuple((name, *shape) for name, module in model.named_modules()
                    if module is not head and (shape := shape_of(module)) is not None)
    d = text.hidden_size
    f = next((getattr(text, k) for k in ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
              if getattr(text, k, None)), None) or 4 * d
    top_k = getattr(text, "num_experts_per_tok", None)
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    moe = bool(top_k and experts and experts > 1)
    approximate = []
    matmul = 0
    for layer in layers:
        for name, module in layer.named_modules():
            shape = shape_of(module)
            if shape is not None and not (moe and ".experts." in f".{name}."):
                matmul += shape[0] * shape[1]
        if moe:  # each token goes through top_k of the experts' weights
            matmul += sum(p.numel() for name, p in layer.named_parameters() if ".experts." in f".{name}"
                          and p.dim() >= 2) * top_k // experts
    if moe:
        approximate.append(f"FLOPs: a mixture of experts is counted as the {top_k} of {experts} experts a token is "
                           "routed to")
    first = layers[0]
    # the MLP's matrices of its hidden width (a fused gate-and-up projection counts twice): 3 when gated
    mlp = [shape for name, m in first.named_modules() if (shape := shape_of(m)) is not None
           and "attn" not in name and "attention" not in name]
    matrices = sum((n_out // f if n_out % f == 0 else 0) + (n_in == f) for n_in, n_out in mlp)
    norms = [m for m in first.modules() if type(m).__name__.endswith("Norm") or "LayerNorm" in type(m).__name__
             or "RMSNorm" in type(m).__name__]
    cache, unknown = _cache_layers(text, n_layer)
    if unknown:
        approximate.append(f"KV cache: layers of type {', '.join(sorted(unknown))} keep a state the plan does not "
                           "count")
    embedding = model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    heads = text.num_attention_heads
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv_heads = 1  # multi-query attention (Falcon, GPT-BigCode): one key/value head
    else:
        kv_heads = getattr(text, "num_key_value_heads", None) or getattr(text, "num_kv_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    measured = Measured(
        causal_lm=sum(p.numel() for p in model.parameters()), classifier=classifier,
        block=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        layer_matmul=matmul, linears=linears,
        sizes=tuple(sorted(Counter(p.numel() for p in model.parameters()).items())),
        norms_per_layer=len(norms), rms_norm=any("RMS" in type(m).__name__ for m in norms), tied=tied,
        cache=cache, experts=(top_k, experts) if moe else None, approximate=tuple(approximate))
    positions = (getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
                 or getattr(text, "max_sequence_length", None))
    return ModelShape(n_layer=n_layer, n_embd=d, n_head=heads, vocab_size=text.vocab_size,
                      n_positions=positions or GPT2_CONTEXT, n_inner=f, n_kv_head=kv_heads,
                      head_dim=head_dim, gated_mlp=matrices >= 3, model_type=model_type, measured=measured)


def _cache_layers(text, n_layer: int) -> tuple[tuple[int | None, ...], set[str]]:
    """Per layer, the tokens the KV cache keeps (None: all; a sliding or chunked layer: its window; 0: none), as
    transformers' DynamicCache builds its layers from the config; and the layer types that keep something else."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(text)
    except Exception:  # an older or unusual config: every layer keeps every token
        return (None,) * n_layer, set()
    cache, unknown = [], set()
    for kind, extra in zip(types, kwargs):
        if kind == "full_attention":
            cache.append(None)
        elif "sliding_window" in extra and extra["sliding_window"]:
            cache.append(int(extra["sliding_window"]))
        elif kind == "dummy":
            cache.append(0)
        else:
            unknown.add(kind)
            cache.append(0)
    return tuple(cache), unknown


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# configs of models on the Hub, for `rlhf plan` without a download: each copied from the model's own config.json
# (the keys that shape it), none guessed
# ---------------------------------------------------------------------------------------------------------------
def _gpt2(n_layer: int, n_embd: int, n_head: int) -> dict:
    return {"model_type": "gpt2", "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "vocab_size": GPT2_VOCAB,
            "n_positions": GPT2_CONTEXT, "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.1}


HUB_CONFIGS: dict[str, dict] = {
    "gpt2": _gpt2(12, 768, 12),
    "openai-community/gpt2": _gpt2(12, 768, 12),
    "gpt2-medium": _gpt2(24, 1024, 16),
    "openai-community/gpt2-medium": _gpt2(24, 1024, 16),
    "gpt2-large": _gpt2(36, 1280, 20),
    "openai-community/gpt2-large": _gpt2(36, 1280, 20),
    "gpt2-xl": _gpt2(48, 1600, 25),
    "openai-community/gpt2-xl": _gpt2(48, 1600, 25),
    "distilgpt2": _gpt2(6, 768, 12),
    "distilbert/distilgpt2": _gpt2(6, 768, 12),
    "Qwen/Qwen2.5-0.5B": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
        "max_position_embeddings": 32768, "tie_word_embeddings": True, "hidden_act": "silu", "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 24,
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16"},
}

# The GPT-2 family's shapes (closed form, no torch)
KNOWN: dict[str, ModelShape] = {name: ModelShape.from_config(config) for name, config in HUB_CONFIGS.items()
                                if is_gpt2(config)}


def shape_of(name_or_path: str) -> ModelShape | None:
    """A local model's shape from its config.json, a known Hub id's from the table; None when neither is there."""
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        return ModelShape.from_config(read_config(config))
    if name_or_path in HUB_CONFIGS:
        return ModelShape.from_config(HUB_CONFIGS[name_or_path])
    return None


# config.json keys a shape or a plan reads: whole numbers > 0, or numbers (dropout) where said
SHAPE_KEYS = ("n_layer", "num_hidden_layers", "n_embd", "hidden_size", "n_head", "num_attention_heads", "vocab_size",
              "n_positions", "max_position_embeddings", "n_inner", "intermediate_size")
FRACTION_KEYS = ("resid_pdrop", "hidden_dropout_prob")


def read_config(path: Path) -> dict:
    """A model's config.json (or a LoRA adapter's adapter_config.json) as a JSON object whose shape numbers are
    whole numbers > 0 (null where absent); ValueError naming the file and what is wrong otherwise (empty, not JSON,
    not an object, a layer count of "x", 1e308 or NaN)."""
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = "it is empty" if not path.exists() or path.stat().st_size == 0 else str(exc).splitlines()[0]
        raise ValueError(f"{path}: not a readable JSON config: {reason}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of settings (got {type(config).__name__})")
    for key in SHAPE_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{path}: {key}: expected a whole number > 0 (got {value!r})")
    for key in FRACTION_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1):
            raise ValueError(f"{path}: {key}: expected a number in [0, 1) (got {value!r})")
    return config
