"""bench/flops.py: the FLOP accounting of the PPO phases, checked against sums done by hand (no timing)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_pipeline.model_shape import KNOWN, ModelShape

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "flops.py"

# 1 layer, width 2, vocabulary 3: the blocks' 48 weights give 96 FLOPs a token, attention 4 * 1 * attended * 2 =
# 8 * attended, the LM head 2 * 2 * 3 = 12 and a score head 2 * 2 * 1 = 4 per token they read.
SHAPE = ModelShape(n_layer=1, n_embd=2, n_head=1, vocab_size=3, n_positions=16)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_flops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def test_forward_flops_reads_the_head_where_asked():
    assert SHAPE.head_flops(4) == 48 and SHAPE.head_flops(4, "score") == 16 and SHAPE.head_flops(4, "none") == 0
    # 5 tokens through the blocks (attending to 2 keys each), logits at one position
    assert SHAPE.forward_flops(tokens=5, attended=2, head="lm", head_tokens=1) == 5 * (96 + 16) + 12
    assert SHAPE.forward_flops(tokens=5, attended=2) == 5 * (96 + 16 + 12)


def test_generation_flops_by_hand():
    # 2 prompts of 3 tokens: the first pass over 6 tokens attending to (3 + 1) / 2 = 2 keys, logits at 2 positions
    first = 6 * (96 + 8 * 2) + 2 * 12
    assert first == 696
    assert bench.generation_flops(SHAPE, rows=2, prompt_length=3, steps=1) == first
    # then tokens 1 and 2 fed back at positions 4 and 5, each row attending to 4, then 5 keys
    assert bench.generation_flops(SHAPE, rows=2, prompt_length=3, steps=3) == \
        first + 2 * (96 + 8 * 4 + 12) + 2 * (96 + 8 * 5 + 12)
    assert bench.generation_flops(SHAPE, rows=2, prompt_length=3, steps=0) == 0


def test_scoring_and_training_flops_by_hand():
    # 2 rows of prompt 3 + response 2: 10 tokens attending to (5 + 1) / 2 = 3 keys; logits at 2 x 2 positions
    lm_pass = 10 * (96 + 8 * 3) + 4 * 12
    assert lm_pass == 1248
    value_head = 4 * 4  # the shared value head at the 4 response positions
    assert bench.policy_value_flops(SHAPE, 2, 3, 2, "shared") == lm_pass + value_head
    assert bench.policy_value_flops(SHAPE, 2, 3, 2, "none") == lm_pass
    # a separate value model: its own pass, a score head at the response positions
    assert bench.policy_value_flops(SHAPE, 2, 3, 2, "separate") == lm_pass + 10 * (96 + 8 * 3) + 4 * 4
    # scoring: policy + value, the reference, and the reward model over one batch of 2 x 4 tokens (score head at
    # every position: 8 x 4)
    reward = 8 * (96 + 8 * 2.5) + 8 * 4
    assert bench.scoring_flops(SHAPE, 2, 3, 2, SHAPE, [(2, 4)]) == (lm_pass + value_head) + lm_pass + reward == 3472
    assert bench.scoring_flops(SHAPE, 2, 3, 2, reference=False) == lm_pass + value_head
    # training: forward + backward (3 x forward) of what is trained, over 4 rows (2 epochs of 2)
    assert bench.training_flops(SHAPE, 4, 3, 2) == 3 * 2 * (lm_pass + value_head) == 7584


def test_update_flops_adds_the_phases():
    record = {"rows": 2, "prompt_length": 3, "response_length": 2, "reward_batches": [[2, 4]], "rows_trained": 4}
    flops = bench.update_flops(SHAPE, record, "shared", SHAPE)
    assert flops["generation"] == bench.generation_flops(SHAPE, 2, 3, 2) == 696 + 2 * (96 + 8 * 4 + 12)
    assert flops["scoring"] == 3472 and flops["training"] == 7584
    assert flops["update"] == pytest.approx(flops["generation"] + 3472 + 7584)


def test_gpt2_small_training_is_about_six_flops_per_parameter_and_token():
    """Sanity at full size: with the LM head read at every position and short contexts, a training pass costs close to
    the 6 x parameters x tokens rule (the position embedding and the biases do no matmul)."""
    shape = KNOWN["gpt2"]
    tokens = 1000
    flops = bench.training_flops(shape, tokens, 0, 1)  # 1000 rows of one token: every position has logits
    assert flops == pytest.approx(6 * shape.parameters * tokens, rel=0.02)


@pytest.mark.parametrize(("name", "shapes", "kind"), [
    ("aten::mm", [[192, 768], [768, 50257]], "LM-head"),
    ("aten::addmm", [[3072], [352, 768], [768, 3072], [], []], "block matmuls"),
    ("aten::_fused_adamw_", [], "optimizer"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", [[8, 12, 44, 64]], "attention"),
    ("aten::sub", [[8, 24, 50257], [8, 24, 1], []], "[tokens x vocabulary]"),
    ("aten::add", [[50257, 768], [50257, 768], []], "the tied embedding"),
    ("aten::fill_", [[50257, 768], []], "the tied embedding"),
    ("aten::linalg_vector_norm", [[768, 3072], [], [], [], []], "gradient clipping"),
    ("aten::native_layer_norm", [[8, 44, 768]], "layer norm"),
])
def test_profile_kinds(name, shapes, kind):
    assert bench.kind_of(name, shapes, 50257, 768).startswith(kind)


def test_help_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "--device" in out.stdout and "--threads" in out.stdout
