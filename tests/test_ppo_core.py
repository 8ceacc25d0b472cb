"""The PPO math against values computed by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhf_pipeline.ppo import core
from rlhf_pipeline.ppo.modules import position_ids, truncate_after_eos
from rlhf_pipeline.ppo.plan import BatchPlan

T = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


def test_masked_mean_var_whiten():
    x, m = T([1.0, 2.0, 3.0, 4.0]), T([1.0, 1.0, 0.0, 0.0])
    assert close(core.masked_mean(x, m), 1.5)
    assert close(core.masked_var(x, m), 0.5)  # unbiased: ((-.5)^2 + .5^2) / (2 - 1)
    assert close(core.masked_var(x, m, unbiased=False), 0.25)
    w = core.masked_whiten(x, m)
    assert close(w, [-1 / math.sqrt(2), 1 / math.sqrt(2), 0, 0], tol=1e-5)
    scaled = core.masked_whiten(x, m, shift_mean=False)
    assert close(scaled, [1.5 - 1 / math.sqrt(2), 1.5 + 1 / math.sqrt(2), 0, 0], tol=1e-5)
    assert close(core.masked_mean(x, torch.zeros(4)), 0.0)  # no positions: 0, not nan
    rows = core.masked_mean(T([[1.0, 3.0], [2.0, 8.0]]), T([[1.0, 1.0], [1.0, 0.0]]), dim=1)
    assert close(rows, [2.0, 2.0])


def test_logprobs_and_entropy():
    logits = T([[[0.0, math.log(3.0)]]])  # softmax = [0.25, 0.75]
    assert close(core.logprobs_of(logits, T([[1]])), [[math.log(0.75)]])
    assert close(core.logprobs_of(logits, T([[0]])), [[math.log(0.25)]])
    # temperature 2 halves the logits: p1 = sqrt(3) / (1 + sqrt(3))
    assert close(core.logprobs_of(logits, T([[1]]), temperature=2.0), [[math.log(math.sqrt(3) / (1 + math.sqrt(3)))]])
    assert close(core.entropy_of(torch.zeros(1, 1, 4)), [[math.log(4.0)]])
    assert close(core.entropy_of(logits), [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_equal_autograd_bit_for_bit(dtype):
    """logprobs_of's blockwise function gives exactly the values and gradients of the plain autograd expression, in
    float32 and from bf16 logits; 27 rows of a 50,257 vocabulary span two of its CPU blocks."""
    torch.manual_seed(0)
    base = (3 * torch.randn(3, 9, 50257)).to(dtype)
    tokens = torch.randint(0, 50257, (3, 9))
    weights = torch.randn(3, 9)
    plain, blockwise = base.clone().requires_grad_(), base.clone().requires_grad_()
    scaled = plain.float() / 0.7
    expected = torch.gather(scaled, 2, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
    got = core.logprobs_of(blockwise, tokens, 0.7)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    assert torch.equal(got, expected)
    assert blockwise.grad.dtype == dtype and torch.equal(blockwise.grad, plain.grad)
    with torch.no_grad():
        assert torch.equal(core.logprobs_of(base, tokens, 0.7), expected.detach())


def test_kl_estimators():
    logp, ref = T([[-1.0, -2.0]]), T([[-2.0, -2.0]])
    assert close(core.kl_per_token(logp, ref, "k1"), [[1.0, 0.0]])
    # k3 = (r - 1) - log r with r = pi_ref / pi = e^-1 on the first token
    assert close(core.kl_per_token(logp, ref, "k3"), [[math.exp(-1) - 1 + 1, 0.0]])
    generator = torch.Generator().manual_seed(0)
    assert (core.kl_per_token(torch.randn(50, generator=generator), torch.randn(50, generator=generator), "k3")
            >= 0).all()
    with pytest.raises(ValueError):
        core.kl_per_token(logp, ref, "k2")


def test_score_lands_on_last_real_token():
    kl = T([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    rewards, non_score = core.per_token_rewards(T([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert close(non_score, [[-0.05, -0.1, -0.15, 0.0], [-0.25, 0, 0, 0]])
    assert close(rewards, [[-0.05, -0.1, 1.85, 0.0], [-1.25, 0, 0, 0]])  # no dummy step past the end
    assert close(core.last_token_index(mask), [2, 0])


def test_gae_by_hand():
    rewards, values, mask = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]]), torch.ones(1, 3)
    adv, ret = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert close(adv, [[0.5, 0.5, 0.5]]) and close(ret, [[1.0, 1.0, 1.0]])
    adv, ret = core.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t2: d = 1 - .5 = .5; t1: d = .9*.5 - .5 = -.05, A = -.05 + .45*.5 = .175; t0: A = -.05 + .45*.175 = .02875
    assert close(adv, [[0.02875, 0.175, 0.5]]) and close(ret, [[0.52875, 0.675, 1.0]])


def test_gae_ignores_padding_after_the_end():
    rewards, values = T([[0.0, 1.0, 7.0]]), T([[0.5, 0.5, 9.0]])
    adv, ret = core.gae(rewards, values, T([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.95)
    # the episode ends at t=1: V_2 counts as 0 and r_2 is ignored. t1: d = 1 - .5 = .5; t0: d = .5 - .5 = 0,
    # A0 = 0 + .95 * .5. Returns = A + V.
    assert close(adv, [[0.475, 0.5, 0.0]]) and close(ret, [[0.975, 1.0, 0.0]])


def test_policy_loss_clipping():
    old = T([[0.0]])
    new = old + math.log(1.5)  # ratio 1.5, beyond 1 + 0.2
    up = core.policy_loss(new, old, T([[1.0]]), torch.ones(1, 1), cliprange=0.2)
    assert close(up.loss, -1.2) and close(up.clipfrac, 1.0)  # max(-1.5, -1.2): the clipped term binds
    assert close(up.approx_kl, 0.5 * math.log(1.5) ** 2) and close(up.ratio_mean, 1.5)
    down = core.policy_loss(new, old, T([[-1.0]]), torch.ones(1, 1), cliprange=0.2)
    assert close(down.loss, 1.5) and close(down.clipfrac, 0.0)  # pessimistic: the unclipped term binds


def test_value_loss_clipping():
    out = core.value_loss(T([[2.0]]), T([[1.0]]), T([[3.0]]), torch.ones(1, 1), cliprange_value=0.2)
    # V_clipped = 1.2: max((2-3)^2, (1.2-3)^2) = 3.24, halved
    assert close(out.loss, 1.62) and close(out.clipfrac, 1.0)
    inside = core.value_loss(T([[1.1]]), T([[1.0]]), T([[3.0]]), torch.ones(1, 1), cliprange_value=0.2)
    assert close(inside.loss, 0.5 * 1.9**2) and close(inside.clipfrac, 0.0)


def test_micro_batches_accumulate_to_the_mini_batch_gradient():
    """With the mini-batch's token count as normaliser, micro-batch losses sum to the mini-batch loss exactly."""
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (6, 5))
    old = core.logprobs_of(logits.detach() + 0.1 * torch.randn(6, 5, 11), tokens)
    adv = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    full = core.policy_loss(core.logprobs_of(logits, tokens), old, adv, mask, 0.2).loss
    (grad_full,) = torch.autograd.grad(full, logits)
    n = mask.sum()
    parts = [core.policy_loss(core.logprobs_of(logits[s], tokens[s]), old[s], adv[s], mask[s], 0.2, normaliser=n).loss
             for s in (slice(0, 2), slice(2, 6))]
    (grad_parts,) = torch.autograd.grad(sum(parts), logits)
    assert close(sum(parts), full) and torch.allclose(grad_parts, grad_full, atol=1e-7)


def test_explained_variance():
    returns, mask = T([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert close(core.explained_variance(returns, returns, mask), 1.0)
    assert close(core.explained_variance(torch.full((1, 3), 2.0), returns, mask), 0.0)
    # values off by [0, 1, 0] on returns [1, 2, 3]: Var(error) = 2/9, Var(returns) = 2/3 -> 1 - 1/3
    assert close(core.explained_variance(T([[1.0, 1.0, 3.0]]), returns, mask), 2 / 3)
    assert close(core.explained_variance_from(T(2 / 9), T(2 / 3)), 2 / 3)
    assert math.isnan(core.explained_variance_from(T(1.0), T(0.0)))


def test_missing_eos_rule_replaces_or_subtracts():
    scores, finished = T([2.0, 2.0, -0.5]), T([True, False, False])
    assert close(core.missing_eos_rule(scores, finished), [2.0, 2.0, -0.5])
    assert close(core.missing_eos_rule(scores, finished, penalty=1.0), [2.0, 1.0, -1.5])  # TRL: subtract
    assert close(core.missing_eos_rule(scores, finished, replacement=-1.0), [2.0, -1.0, -1.0])  # Z19 / N+: replace


def test_adaptive_kl_controller():
    fixed = core.KLController(0.1)
    assert fixed.update(kl=50.0, episodes=64) == 0.1
    adaptive = core.KLController(0.1, target=6.0, horizon=10000)
    assert math.isclose(adaptive.update(kl=12.0, episodes=64), 0.1 * (1 + 0.2 * 64 / 10000))  # error clipped at +0.2
    before = adaptive.value
    assert math.isclose(adaptive.update(kl=5.4, episodes=100), before * (1 - 0.1 * 100 / 10000))
    restored = core.KLController(1.0, 6.0, 10000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value


@pytest.mark.parametrize("mini, accumulation, processes, epochs", list(itertools.product([1, 2, 4], [1, 2, 4], [1, 2],
                                                                                          [1, 3])))
def test_batch_plan_states_the_optimizer_steps(mini, accumulation, processes, epochs):
    plan = BatchPlan(total_episodes=256, rollout_batch_size=64, num_mini_batches=mini, ppo_epochs=epochs,
                     gradient_accumulation_steps=accumulation, num_processes=processes)
    assert plan.num_updates == 4
    assert plan.optimizer_steps_per_update == epochs * mini
    assert plan.total_optimizer_steps == 4 * epochs * mini
    # the micro-batches of all processes tile each mini-batch, and the mini-batches tile the rollout
    assert plan.micro_batch_size * accumulation * processes == plan.mini_batch_size
    assert plan.mini_batch_size * mini == 64


def test_batch_plan_rejects_what_does_not_divide():
    with pytest.raises(ValueError, match="multiple of rollout_batch_size"):
        BatchPlan(100, 64, 1, 1, 1)
    with pytest.raises(ValueError, match=r"divisible by processes \(2\) x num_mini_batches \(4\) x "
                                         r"gradient_accumulation_steps \(3\) = 24"):
        BatchPlan(64, 64, 4, 1, 3, num_processes=2)


def test_truncate_after_first_eos():
    response = T([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    ids, mask, finished = truncate_after_eos(response, eos_token_id=2, pad_token_id=0)
    assert ids.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]
    # pad == EOS (GPT-2): lengths come from positions, not from comparing ids with the pad token
    ids, mask, finished = truncate_after_eos(T([[5, 2, 2, 2], [5, 6, 7, 8]]), eos_token_id=2, pad_token_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and finished.tolist() == [True, False]


def test_position_ids_skip_left_padding():
    assert position_ids(T([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


# ---------------------------------------------------------------------------------------------------------------
# critic-free advantages (RLOO, GRPO) and GRPO's KL loss
# ---------------------------------------------------------------------------------------------------------------
def test_rloo_advantages_by_hand():
    # k = 2: each response against the other one
    assert close(core.rloo_advantages(T([1.0, 2.0, 3.0, 6.0]), 2), [-1.0, 1.0, -3.0, 3.0])
    # k = 4: 1 - (2 + 3 + 6) / 3, 2 - (1 + 3 + 6) / 3, 3 - (1 + 2 + 6) / 3, 6 - (1 + 2 + 3) / 3
    assert close(core.rloo_advantages(T([1.0, 2.0, 3.0, 6.0]), 4), [-8 / 3, -4 / 3, 0.0, 4.0], tol=1e-6)
    # the same as k / (k - 1) * (R - mean) within each group, and zero-sum within each group
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(0))
    advantages = core.rloo_advantages(rewards, 3)
    grouped = rewards.reshape(4, 3)
    assert close(advantages, (1.5 * (grouped - grouped.mean(1, keepdim=True))).reshape(-1), tol=1e-6)
    assert close(advantages.reshape(4, 3).sum(1), torch.zeros(4), tol=1e-6)


def test_grpo_advantages_by_hand():
    # group [1, 3]: mean 2, Bessel std sqrt(2); group [5, 5]: no spread, advantages 0
    expected = 1 / (math.sqrt(2) + 1e-4)
    assert close(core.grpo_advantages(T([1.0, 3.0, 5.0, 5.0]), 2), [-expected, expected, 0.0, 0.0], tol=1e-6)
    # k = 3, [0, 0, 3]: mean 1, std sqrt((1 + 1 + 4) / 2) = sqrt(3)
    s3 = math.sqrt(3) + 1e-4
    assert close(core.grpo_advantages(T([0.0, 0.0, 3.0]), 3), [-1 / s3, -1 / s3, 2 / s3], tol=1e-6)


def test_groups_need_k_at_least_2_and_whole_groups():
    with pytest.raises(ValueError, match="groups of k = 3"):
        core.groups_of(T([1.0, 2.0, 3.0, 4.0]), 3)
    with pytest.raises(ValueError, match="k = 1"):
        core.rloo_advantages(T([1.0, 2.0]), 1)


def test_sequence_advantages_go_to_every_real_token():
    mask = T([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert close(core.per_token(T([2.0, -1.0]), mask), [[2.0, 2.0, 0.0], [-1.0, -1.0, -1.0]])


def test_grpo_kl_loss_by_hand():
    # pi = 0.5, pi_ref = 0.25 at the first token: k3 = (0.25 / 0.5 - 1) - log(0.25 / 0.5) = -0.5 + log 2;
    # equal at the second (k3 = 0); the third is padding
    logprobs = T([[math.log(0.5), math.log(0.3), 5.0]])
    ref = T([[math.log(0.25), math.log(0.3), -5.0]])
    mask = T([[1.0, 1.0, 0.0]])
    assert close(core.kl_loss(logprobs, ref, mask), (-0.5 + math.log(2)) / 2, tol=1e-6)
    assert close(core.kl_loss(logprobs, ref, mask, normaliser=4), (-0.5 + math.log(2)) / 4, tol=1e-6)
    # its gradient pushes log pi towards log pi_ref: d/dx [(e^(ref - x) - 1) - (ref - x)] = 1 - e^(ref - x) > 0 here
    x = logprobs.clone().requires_grad_(True)
    core.kl_loss(x, ref, mask).backward()
    assert x.grad[0, 0] == pytest.approx((1 - 0.5) / 2, abs=1e-6) and x.grad[0, 1] == pytest.approx(0.0, abs=1e-7)


def test_batch_plan_with_several_samples_per_prompt():
    plan = BatchPlan(total_episodes=128, rollout_batch_size=64, num_mini_batches=4, ppo_epochs=1,
                     gradient_accumulation_steps=1, num_processes=2, samples_per_prompt=4)
    assert (plan.prompts_per_update, plan.local_prompts_per_update, plan.local_rollout_batch_size) == (16, 8, 32)
    assert "16 prompts x 4 responses" in plan.describe()
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        BatchPlan(128, 64, 4, 1, 1, num_processes=2, samples_per_prompt=3)
