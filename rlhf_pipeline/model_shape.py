"""The shape of a GPT-2-class model, found without loading weights or importing torch: its parameter count and the
FLOPs of a forward pass. Read by `rlhf plan` (estimates before a launch) and by bench/ (model FLOP/s achieved)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GPT2_VOCAB, GPT2_CONTEXT = 50257, 1024


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int = GPT2_VOCAB
    n_positions: int = GPT2_CONTEXT
    n_inner: int | None = None  # the MLP's width; GPT-2: 4 x n_embd

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def layer_matmul_parameters(self) -> int:
        """Weights every token multiplies through in the blocks: attention q, k, v and out (4 d^2), the MLP (2 d f)."""
        return self.n_layer * (4 * self.n_embd**2 + 2 * self.n_embd * self.mlp_width)

    @property
    def parameters(self) -> int:
        """All parameters of the causal LM, the LM head tied to the token embedding (as GPT-2's is)."""
        d, f = self.n_embd, self.mlp_width
        per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # weights, biases, two layer norms
        return self.vocab_size * d + self.n_positions * d + self.n_layer * per_layer + 2 * d

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
        is 3x this."""
        per_token = 2 * self.layer_matmul_parameters + 4 * self.n_layer * attended * self.n_embd
        return tokens * per_token + self.head_flops(tokens if head_tokens is None else head_tokens, head)

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """From a transformers config dict (config.json) of the GPT-2 family, or one with the common Llama-style
        names (num_hidden_layers, hidden_size, ...)."""
        def first(*names, default=None):
            for name in names:
                if config.get(name) is not None:
                    return config[name]
            if default is None:
                raise KeyError(f"config.json has none of {', '.join(names)}")
            return default

        return cls(n_layer=first("n_layer", "num_hidden_layers"), n_embd=first("n_embd", "hidden_size"),
                   n_head=first("n_head", "num_attention_heads"), vocab_size=first("vocab_size"),
                   n_positions=first("n_positions", "max_position_embeddings", default=GPT2_CONTEXT),
                   n_inner=config.get("n_inner") or config.get("intermediate_size"))


# The GPT-2 family on the Hub, for `rlhf plan` without a download.
KNOWN: dict[str, ModelShape] = {
    "gpt2": ModelShape(12, 768, 12),
    "openai-community/gpt2": ModelShape(12, 768, 12),
    "gpt2-medium": ModelShape(24, 1024, 16),
    "openai-community/gpt2-medium": ModelShape(24, 1024, 16),
    "gpt2-large": ModelShape(36, 1280, 20),
    "openai-community/gpt2-large": ModelShape(36, 1280, 20),
    "gpt2-xl": ModelShape(48, 1600, 25),
    "openai-community/gpt2-xl": ModelShape(48, 1600, 25),
    "distilgpt2": ModelShape(6, 768, 12),
    "distilbert/distilgpt2": ModelShape(6, 768, 12),
}


def shape_of(name_or_path: str) -> ModelShape | None:
    """A local model's shape from its config.json, a known Hub id's from the table; None when neither is there."""
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        return ModelShape.from_config(read_config(config))
    return KNOWN.get(name_or_path)


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
