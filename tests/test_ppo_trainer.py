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


# ---------------------------------------------------------------------------------------------------------------
# critic-free estimators: k responses per prompt, no value model
# ---------------------------------------------------------------------------------------------------------------
def critic_free(recipe: dict, estimator: str, k: int = 4) -> dict:
    recipe["training"]["advantage_estimator"] = estimator
    recipe["generation"]["samples_per_prompt"] = k
    return recipe


def test_each_prompt_comes_k_times_in_a_row(tmp_path, recipe):
    """8 episodes per update with k = 4: 2 prompts per update, each 4 times in a row; 10 prompts are walked in
    order, 2 per update, as with one response per prompt."""
    recipe["data"]["max_train_samples"] = 10
    trainer, setup = make(tmp_path, critic_free(recipe, "rloo"))
    batches = [trainer._prompt_batch(update).texts for update in range(5)]
    assert all(len(b) == 8 and b[:4] == [b[0]] * 4 and b[4:] == [b[4]] * 4 and b[0] != b[4] for b in batches)
    assert sorted(t for b in batches for t in b[::4]) == sorted(setup.train_prompts.texts)  # one epoch, no repeats


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_critic_free_estimators_load_no_value_model(tmp_path, recipe, estimator):
    trainer, setup = make(tmp_path, critic_free(recipe, estimator))
    model = setup.model
    assert not model.has_critic and model.value_head is None and model.value_model is None
    assert len(trainer.optimizer.param_groups) == 1  # the policy's parameters only
    assert setup.value_source.startswith("none")
    rollout = trainer.sample(trainer._prompt_batch(0))
    _, values, _, _ = trainer._score_tokens(rollout)
    assert values is None


def test_rloo_and_grpo_advantages_in_the_trainer(tmp_path, recipe):
    """With the policy equal to the reference (KL 0) the advantages are the pure functions' on the scores, given to
    every real token; with KL, rloo subtracts beta * KL (k1 by default) from each response's reward first."""
    trainer, _ = make(tmp_path, critic_free(recipe, "rloo", k=2))
    scores = torch.tensor([1.0, 3.0, 0.0, 4.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logprobs = torch.full((4, 3), -1.0)
    advantages, returns, non_score = trainer._advantages(scores, logprobs, logprobs.clone(), None, mask, 0.1)
    assert returns is None and torch.equal(non_score, torch.zeros(4, 3))
    assert torch.allclose(advantages, torch.tensor([-2.0, 2.0, -4.0, 4.0])[:, None] * mask)
    ref = logprobs - torch.tensor([[0.5], [0.0], [0.0], [0.0]])  # response 0: KL 0.5 per token, 1.0 in all
    advantages, _, non_score = trainer._advantages(scores, logprobs, ref, None, mask, 0.1)
    assert torch.allclose(non_score.sum(1), torch.tensor([-0.1, 0.0, 0.0, 0.0]))
    assert torch.allclose(advantages[:, 0], torch.tensor([-2.1, 2.1, -4.0, 4.0]))
    trainer.config.advantage_estimator = "grpo"  # the score alone; the KL goes to the loss
    advantages, _, non_score = trainer._advantages(scores, logprobs, ref, None, mask, 0.1)
    g1, g2 = 1 / (math.sqrt(2) + 1e-4), 2 / (2 * math.sqrt(2) + 1e-4)  # (1, 3): std sqrt(2); (0, 4): 2 sqrt(2)
    assert torch.allclose(advantages[:, 0], torch.tensor([-g1, g1, -g2, g2]), atol=1e-6)
    # reported as -beta * k3, r = pi_ref / pi = e^-0.5 on response 0's two tokens: (r - 1) - log r each
    assert non_score[0].tolist() == pytest.approx([-0.1 * (math.exp(-0.5) - 1 + 0.5)] * 2 + [0.0], abs=1e-6)


def test_trl_reward_functions_get_columns_ids_and_progress(tmp_path, recipe, data_dir):
    """A function written for TRL's trainers (keywords; the dataset's other columns; completion_ids) plugs in as is,
    and TRL's own `get_repetition_penalty_reward` (which reads completion_ids only) scores the sampled token ids."""
    from conftest import write_jsonl
    from trl.rewards import get_repetition_penalty_reward

    rows = [{"prompt": f"review of film {i} :", "solution": f"answer {i}"} for i in range(12)]
    write_jsonl(tmp_path / "prompts.jsonl", rows)
    module = tmp_path / "trl_style.py"
    module.write_text(
        "seen = []\n"
        "def reward(prompts, completions, solution, completion_ids, trainer_state, **kwargs):\n"
        "    seen.append((list(prompts), list(completions), list(solution), completion_ids, trainer_state.max_steps))\n"
        "    kwargs['log_metric']('calls', 1.0)\n"
        "    return [float(len(c)) for c in completions]\n"
        "from trl.rewards import get_repetition_penalty_reward\n"
        "repetition = get_repetition_penalty_reward(ngram_size=1)\n")
    recipe["data"]["files"]["train"] = str(tmp_path / "prompts.jsonl")
    recipe["reward"] = {"function": f"{module}:reward"}
    trainer, setup = make(tmp_path, recipe)
    assert setup.train_prompts.columns["solution"] == [r["solution"] for r in rows]
    prompts = trainer._prompt_batch(0)
    rollout = trainer.sample(prompts)
    scores = trainer.scorer(rollout)
    seen = trainer.scorer.function.__globals__["seen"][-1]  # what the user's module recorded
    texts, completions, solutions, ids, max_steps = seen
    assert texts == prompts.texts and completions == rollout.responses
    assert solutions == [next(r["solution"] for r in rows if r["prompt"] == t) for t in texts]
    assert [len(i) for i in ids] == rollout.response_mask.sum(1).int().tolist()
    assert max_steps == trainer.plan.total_optimizer_steps
    assert scores.tolist() == [float(len(c)) for c in rollout.responses]
    assert trainer.scorer.take_metrics("reward_fn") == {"reward_fn/calls": 1.0}

    from rlhf_pipeline.ppo.modules import FunctionScorer

    penalty = FunctionScorer(get_repetition_penalty_reward(ngram_size=1), "repetition")(rollout)
    ids = [row[m.bool()].tolist() for row, m in zip(rollout.response, rollout.response_mask)]
    assert penalty.tolist() == pytest.approx(get_repetition_penalty_reward(ngram_size=1)(ids))


def test_gelu_runs_fused_with_the_same_function(tmp_path, recipe, tiny_model_dir):
    """PPO's models run GPT-2's gelu_new as PyTorch's fused tanh GELU: the same outputs up to rounding, the config
    and saved weights untouched."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    from rlhf_pipeline.models import fuse_gelu

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    fused = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert fuse_gelu(fused) == original.config.n_layer and fuse_gelu(fused) == 0
    ids = torch.randint(0, original.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(original(ids).logits, fused(ids).logits, atol=1e-5)
    assert fused.config.activation_function == original.config.activation_function
    _, setup = make(tmp_path, recipe)
    assert setup.reference is not None  # a frozen copy here: fused too
    assert not any(isinstance(m, NewGELUActivation) for m in [*setup.model.modules(), *setup.reference.modules()])
