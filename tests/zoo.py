"""A model zoo built offline: one tiny random checkpoint per architecture family users bring, each with a tokenizer
that follows that family's real conventions (which special tokens exist, whether BOS is added, whether pad is set and
whether it is EOS), saved like a Hub checkpoint so that every stage loads it with `from_pretrained`.

- gpt2: GPT2LMHeadModel with GPT-2's own 50,257-token vocabulary; no pad (pad = EOS once loaded).
- llama: LlamaForCausalLM, grouped-query attention, untied head; `<s>` BOS added to every text, `</s>` EOS, no pad.
- qwen2: Qwen2ForCausalLM, grouped-query attention, tied head; no BOS, `<|endoftext|>` both EOS and pad.
- gpt_neox: GPTNeoXForCausalLM (Pythia); `<|endoftext|>` BOS = EOS, not added; no pad.
- opt: OPTForCausalLM (functional dropout, layerdrop); `</s>` BOS = EOS, added to every text; `<pad>` distinct.
- gemma2: Gemma2ForCausalLM, soft-capped logits, sliding-window layers; `<bos>` added, `<eos>`, `<pad>` distinct.
- instruct: a Qwen2 chat model: ChatML template, EOS `<|im_end|>` distinct from pad `<|endoftext|>`, and a
  generation_config.json that samples its own way (INSTRUCT_SAMPLING) and stops at two tokens.

Gemma-2's final_logit_softcapping is 30.0 in the real models, where logits are large; a tiny random model's logits are
small, so the zoo's Gemma-2 starts with large weights (initializer_range 0.5) and caps at 2.0, to make the cap change
every log-probability visibly.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = REPO / "tests" / "assets" / "gpt2-tokenizer"
FAMILIES = ("gpt2", "llama", "qwen2", "gpt_neox", "opt", "gemma2", "instruct")

# Sampling fields an instruct checkpoint's generation_config.json carries (Qwen2.5-Instruct's kind of file, made
# stronger): a rollout must ignore every one of them.
INSTRUCT_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.3,
                     "min_new_tokens": 6, "no_repeat_ngram_size": 2}

# Qwen2.5-Instruct's chat template, shortened to what the zoo's data uses (a default system message, ChatML turns).
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SIZE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256}


def _bpe_tokenizer(texts: list[str], special: list[str], *, bos: str | None, eos: str, pad: str | None,
                   add_bos: bool, unk: str | None = None, vocab_size: int = 320):
    """A byte-level BPE trained on `texts` with `special` tokens (ids 0, 1, ... in that order); `add_bos`: every
    tokenized text starts with BOS (a TemplateProcessing post-processor, as Llama 3's and Gemma's tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk)


def build(family: str, root: Path, texts: list[str]) -> Path:
    """Build `family`'s tiny checkpoint (model, tokenizer, generation config) into root/family; returns that dir."""
    import torch
    import transformers as tf

    out = root / family
    ids = {}
    if family == "gpt2":
        tokenizer = tf.GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER)
        config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=256, vocab_size=len(tokenizer),
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    else:
        if family == "llama":
            tokenizer = _bpe_tokenizer(texts, ["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad=None,
                                       add_bos=True, unk="<unk>")
            cls = tf.LlamaConfig
            extra = {"num_key_value_heads": 2, "intermediate_size": 64, "tie_word_embeddings": False}
        elif family in ("qwen2", "instruct"):
            special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            eos = "<|im_end|>" if family == "instruct" else "<|endoftext|>"
            tokenizer = _bpe_tokenizer(texts, special, bos=None, eos=eos, pad="<|endoftext|>", add_bos=False)
            cls = tf.Qwen2Config
            extra = {"num_key_value_heads": 2, "intermediate_size": 64, "tie_word_embeddings": True}
            if family == "instruct":  # a trained chat model's peaked distributions, where penalties change samples
                extra["initializer_range"] = 0.5
        elif family == "gpt_neox":
            tokenizer = _bpe_tokenizer(texts, ["<|endoftext|>", "<|padding|>"], bos="<|endoftext|>",
                                       eos="<|endoftext|>", pad=None, add_bos=False, unk="<|endoftext|>")
            cls = tf.GPTNeoXConfig
            extra = {"intermediate_size": 64, "rotary_pct": 0.25, "use_parallel_residual": True,
                     "tie_word_embeddings": False}
        elif family == "opt":
            tokenizer = _bpe_tokenizer(texts, ["<s>", "<pad>", "</s>", "<unk>"], bos="</s>", eos="</s>",
                                       pad="<pad>", add_bos=True, unk="<unk>")
            cls = tf.OPTConfig
            extra = {"ffn_dim": 64, "word_embed_proj_dim": 32, "do_layer_norm_before": True}
        elif family == "gemma2":
            tokenizer = _bpe_tokenizer(texts, ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                               "<end_of_turn>"], bos="<bos>", eos="<eos>", pad="<pad>",
                                       add_bos=True, unk="<unk>")
            cls = tf.Gemma2Config
            extra = {"num_key_value_heads": 2, "intermediate_size": 64, "head_dim": 8, "query_pre_attn_scalar": 8,
                     "final_logit_softcapping": 2.0, "attn_logit_softcapping": 50.0, "sliding_window": 16,
                     "initializer_range": 0.5}
        else:
            raise ValueError(f"no family {family!r}: one of {', '.join(FAMILIES)}")
        ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
        config = cls(vocab_size=len(tokenizer), **SIZE, **extra,
                     **{f"{name}_token_id": value for name, value in ids.items() if value is not None})
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    if family == "instruct":
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
        model.generation_config = tf.GenerationConfig(
            **INSTRUCT_SAMPLING, bos_token_id=None, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def family_of(path: Path) -> str:
    return json.loads((path / "config.json").read_text())["model_type"]
