"""model_shape: parameter counts and forward FLOPs, without loading weights."""

import json

import pytest

from rlhf_pipeline.model_shape import KNOWN, ModelShape, shape_of


def test_known_gpt2_sizes_match_their_published_parameter_counts():
    assert KNOWN["gpt2"].parameters == 124_439_808
    assert KNOWN["distilgpt2"].parameters == 81_912_576


def test_parameters_match_transformers_for_a_tiny_config(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=97, n_positions=32)
    model = GPT2LMHeadModel(config)
    config.save_pretrained(tmp_path)
    shape = shape_of(str(tmp_path))
    assert shape == ModelShape(2, 16, 2, 97, 32)
    assert shape.parameters == model.num_parameters()


def test_forward_flops_by_hand():
    shape = ModelShape(n_layer=1, n_embd=2, n_head=1, vocab_size=3, n_positions=4)
    # blocks: 4*2^2 + 2*2*8 = 48 weights -> 96 FLOPs; attention 4*1*attended*2; LM head 2*2*3 = 12
    assert shape.forward_flops(tokens=1, attended=1) == 96 + 8 + 12
    assert shape.forward_flops(tokens=5, attended=2, head="score") == 5 * (96 + 16 + 4)
    assert shape.forward_flops(tokens=1, attended=0, head="none") == 96


def test_unknown_hub_id_has_no_shape_and_llama_names_are_read(tmp_path):
    assert shape_of("someone/unknown-model") is None
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 8,
                                                      "num_attention_heads": 2, "vocab_size": 10,
                                                      "max_position_embeddings": 16, "intermediate_size": 20}))
    assert shape_of(str(tmp_path)) == ModelShape(2, 8, 2, 10, 16, 20)
    with pytest.raises(KeyError):
        ModelShape.from_config({"n_layer": 2})
