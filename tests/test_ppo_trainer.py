"""The PPO trainer's pieces, built in-process from recipes the way `rlhf ppo` builds them: score shaping, chunked
forward passes, the prompt stream, dropout, the value model's starting point, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ppo_recipe, write_recipe

from rlhf_pipeline.ppo.modules import seeded


def make(tmp_path, recipe: dict):
    """(trainer, setup) for a recipe, as the stage makes them."""
    from accelerate import Accelerator

    from rlhf_pipeline.recipe.load import load_recipe
    from rlhf_pipeline.stages.ppo import build, make_trainer

    loaded = load_recipe(write_recipe(tmp_path / "ppo.yaml", recipe))
    accelerator = Accelerator(cpu=True)
    setup = build(loaded, accelerator.device)
    return make_trainer(loaded, setup, accelerator), setup


@pytest.fixture
def recipe(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir):
    return ppo_recipe(tmp_path / "out", tiny_model_dir, {"model": str(tiny_reward_dir)}, data_dir)


@pytest.fixture(scope="module")
def other_vocab_reward_dir(tmp_path_factory, tiny_world) -> object:
    """A reward model whose tokenizer (300 tokens) is not the policy's (400)."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_pipeline.models import init_gpt2, train_bpe_tokenizer
    from rlhf_pipeline.recipe.schema import BpeTraining, GPT2Architecture

    root = tmp_path_factory.mktemp("other-vocab-reward")
    tokenizer = train_bpe_tokenizer([[r["text"] for r in tiny_world["corpus"]]], BpeTraining(vocab_size=300))
    torch.manual_seed(2)
    init_gpt2(GPT2Architecture(n_layer=2, n_head=2, n_embd=32, n_positions=64), tokenizer).save_pretrained(root)
    tokenizer.save_pretrained(root)
    model = AutoModelForSequenceClassification.from_pretrained(root, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(root)
    return root


# ---------------------------------------------------------------------------------------------------------------
# 1. the prompt stream
# ---------------------------------------------------------------------------------------------------------------
def test_prompts_wrap_around_the_prompt_list(tmp_path, recipe):
    """10 prompts, 8 per update: update 1 ends epoch 0 and starts epoch 1; each epoch sees every prompt once, in a
    fresh order."""
    recipe["data"]["max_train_samples"] = 10
    trainer, setup = make(tmp_path, recipe)
    assert len(setup.train_prompts) == 10
    stream = [text for update in range(5) for text in trainer._prompt_batch(update).texts]
    epochs = [stream[i:i + 10] for i in range(0, 40, 10)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(setup.train_prompts.texts)
    assert len({tuple(epoch) for epoch in epochs}) == 4  # reshuffled every pass
    assert trainer._prompt_batch(1).texts == stream[8:16]


# ---------------------------------------------------------------------------------------------------------------
# 3. the no-grad forward pass
# ---------------------------------------------------------------------------------------------------------------
def test_forward_batch_size_chunks_equal_the_whole_batch(tmp_path, recipe):
    trainer, _ = make(tmp_path, recipe)
    with seeded(0, trainer.device):
        rollout = trainer.sample(trainer._prompt_batch(0))
    whole = trainer._score_tokens(rollout)
    trainer.config = trainer.config.model_copy(update={"forward_batch_size": 3})  # 8 rows: chunks of 3, 3, 2
    chunked = trainer._score_tokens(rollout)
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 4. score shaping, against values computed by hand
# ---------------------------------------------------------------------------------------------------------------
def shaped(trainer, scores, finished, **settings) -> list[float]:
    trainer.config = trainer.config.model_copy(update=settings)
    return trainer._shape_scores(torch.tensor(scores), torch.tensor(finished)).tolist()


def test_score_shaping_by_hand(tmp_path, recipe):
    trainer, _ = make(tmp_path, recipe)
    scores, all_done = [1.0, 2.0, 3.0, 6.0], [True] * 4
    base = {"missing_eos_penalty": None, "missing_eos_score": None, "score_normalization": "none", "score_clip": None}
    assert shaped(trainer, scores, [True, False, True, False], **base) == scores
    assert shaped(trainer, scores, [True, False, True, False], **{**base, "missing_eos_penalty": 1.0}) == \
        [1.0, 1.0, 3.0, 5.0]
    assert shaped(trainer, scores, [True, False, True, False], **{**base, "missing_eos_score": -1.0}) == \
        [1.0, -1.0, 3.0, -1.0]
    # batch: mean 3, unbiased variance (4 + 1 + 0 + 9) / 3
    std = math.sqrt(14 / 3)
    expected = [(s - 3.0) / std for s in scores]
    assert shaped(trainer, scores, all_done, **{**base, "score_normalization": "batch"}) == pytest.approx(expected,
                                                                                                          abs=1e-6)
    clipped = [min(max(e, -0.5), 0.5) for e in expected]
    assert shaped(trainer, scores, all_done, **{**base, "score_normalization": "batch", "score_clip": 0.5}) == \
        pytest.approx(clipped, abs=1e-6)
    # initial: the fixed map fitted before training
    trainer.state.score_shift, trainer.state.score_scale = 2.0, 4.0
    assert shaped(trainer, scores, all_done, **{**base, "score_normalization": "initial"}) == \
        pytest.approx([-0.25, 0.0, 0.25, 1.0])
    # the order: the missing-EOS rule first, then normalisation, then the clip
    assert shaped(trainer, scores, [True, True, True, False],
                  **{**base, "missing_eos_score": 3.0, "score_normalization": "initial", "score_clip": 0.1}) == \
        pytest.approx([-0.1, 0.0, 0.1, 0.1])


def test_seeded_restores_the_random_state():
    """`seeded` (initial score normalisation, evaluation) forks the generators it touches: the caller's stream goes on
    as if nothing happened. (Here the CPU generator; on a GPU the device's too, which this machine cannot show.)"""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with seeded(123, torch.device("cpu")):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected) and not torch.equal(inside, expected)


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
def dropout_rates(module) -> list[float]:
    return [m.p for m in module.modules() if isinstance(m, torch.nn.Dropout)]


def test_no_dropout_anywhere_lora_included(tmp_path, recipe, tiny_model_dir):
    """The default peft section (lora_dropout 0.05) on policy and separate value model: after the adapters exist,
    every dropout layer is off, the adapters' own included."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_pipeline.models import lora_config
    from rlhf_pipeline.recipe.schema import LoraSection

    section = LoraSection()
    assert section.dropout == 0.05
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = get_peft_model(base, lora_config(section, "CAUSAL_LM", base))
    assert 0.05 in dropout_rates(plain)  # what the adapters bring, and what PPO must switch off

    recipe["peft"] = {}
    _, setup = make(tmp_path, recipe)
    for name, module in (("policy", setup.model.policy), ("value", setup.model.value_model)):
        rates = dropout_rates(module)
        assert rates and set(rates) == {0.0}, (name, rates)


def test_value_model_starts_from_the_reward_model_when_it_reads_the_policys_tokens(tmp_path, recipe,
                                                                                  tiny_reward_dir):
    from safetensors.torch import load_file

    _, setup = make(tmp_path, recipe)
    assert setup.value_source == f"separate, from the reward model {tiny_reward_dir}"
    reward_head = load_file(str(tiny_reward_dir / "model.safetensors"))["score.weight"]
    assert torch.equal(setup.model.value_model.score.weight.detach(), reward_head)


def test_value_model_starts_from_the_policy_when_the_reward_vocabulary_differs(tmp_path, recipe, tiny_model_dir,
                                                                               other_vocab_reward_dir):
    """A reward model with another vocabulary cannot read the policy's token ids: the value model starts from the
    policy, and says so. The scorer re-tokenizes the texts with the reward model's own tokenizer."""
    from transformers import AutoModelForCausalLM

    from rlhf_pipeline.scoring import reward_input_ids

    recipe["reward"] = {"model": str(other_vocab_reward_dir)}
    trainer, setup = make(tmp_path, recipe)
    assert "differs from the policy's" in setup.value_source and str(tiny_model_dir) in setup.value_source
    policy_embedding = AutoModelForCausalLM.from_pretrained(tiny_model_dir).transformer.wte.weight
    assert torch.equal(setup.model.value_model.transformer.wte.weight.detach(), policy_embedding)

    with seeded(0, trainer.device):
        rollout = trainer.sample(trainer._prompt_batch(0))
    scores = setup.scorer(rollout)
    reward = setup.scorer.reward_model
    assert len(reward.tokenizer) == 300 != len(setup.tokenizer)
    with torch.no_grad():
        expected = [float(reward.model(input_ids=torch.tensor([reward_input_ids(reward.tokenizer, p, r)])).logits[0, 0])
                    for p, r in zip(rollout.prompts.texts, rollout.responses)]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)


def test_dry_run_names_where_the_value_model_starts(tmp_path, recipe, tiny_reward_dir, other_vocab_reward_dir):
    from conftest import run_cli

    path = write_recipe(tmp_path / "ppo.yaml", recipe)
    result = run_cli("ppo", path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"separate, from the reward model {tiny_reward_dir} (same vocabulary as the policy)" in result.output
    result = run_cli("ppo", path, "--dry-run", "--set", f"reward.model={other_vocab_reward_dir}")
    assert "the reward model's vocabulary differs from the policy's" in result.output


def test_shared_value_head_under_a_bfloat16_policy(tmp_path, recipe):
    """A bf16 policy with a shared value head: the head reads the hidden state in float32 (no dtype clash) and a
    whole update runs."""
    recipe["policy"]["dtype"] = "bfloat16"
    recipe["value"] = {"mode": "shared"}
    recipe["training"].update(total_episodes=8)
    trainer, setup = make(tmp_path, recipe)
    assert next(setup.model.policy.parameters()).dtype == torch.bfloat16
    assert setup.model.value_head.weight.dtype == torch.float32
    (tmp_path / "out").mkdir()
    state = trainer.train()
    assert state.update == 1 and state.optimizer_steps == 4
