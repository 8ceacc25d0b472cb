"""The PPO-RLHF math, as pure functions over tensors. Read top to bottom:

    masked helpers -> log-probabilities and entropy -> KL estimators -> per-token rewards -> GAE
    -> critic-free advantages (RLOO, GRPO) -> policy, value and KL losses -> diagnostics -> the adaptive KL controller

(The batch-size arithmetic lives in `plan.py`, which imports no torch so that recipes validate fast.)

Shapes: `[batch, response_length]` for everything per token; `mask` is 1 on real response tokens (up to and including
the first EOS) and 0 on padding after it. Sources, cited by short name in comments:
  [PPO]   Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
  [GAE]   Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation".
  [Z19]   Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".
  [IGPT]  Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT).
  [N+]    Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR Summarization".
  [K3]    Schulman 2020, "Approximating KL Divergence" (blog note; the k1/k3 estimators).
  [RLOO]  Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
          Feedback in LLMs" (REINFORCE Leave-One-Out; Kool et al. 2019 for the estimator).
  [GRPO]  Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------
# 1. Masked helpers
# ---------------------------------------------------------------------------------------------------------------


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where mask is 1 (0 when there are none)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions; Bessel-corrected by default."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  mean: torch.Tensor | None = None, var: torch.Tensor | None = None,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions. With shift_mean=False the mean is added back (scale only).

    `mean` and `var` may be given (e.g. reduced across processes); they default to this tensor's masked moments.
    Masked-out positions are returned as 0.
    """
    mean = masked_mean(values, mask) if mean is None else mean
    var = masked_var(values, mask) if var is None else var
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---------------------------------------------------------------------------------------------------------------
# 2. Log-probabilities and entropy of the sampled tokens
# ---------------------------------------------------------------------------------------------------------------


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) under logits / temperature: [B, T, V] x [B, T] -> [B, T].

    The temperature used for sampling must also divide the logits here, or the "old" log-probabilities would not
    be those of the sampling distribution [N+ detail: "dividing logits by the sampling temperature"].

    The chosen logit minus the log-partition, computed a few rows at a time (`_TokenLogProbs`): no vocabulary-sized
    tensor is made besides the gradient of the logits, where autograd would make six (the scaled copy, logsumexp's
    temporaries, and in backward the softmax, the gather's zero-filled gradient, their sum and its scaled copy). The
    values and gradients are those of `(logits.float() / t).gather(...) - (logits.float() / t).logsumexp(-1)`, the
    same operations in the same order (tests/test_ppo_core.py holds them equal bit for bit).
    """
    return _TokenLogProbs.apply(logits, tokens, float(temperature))


def _rows_per_block(vocab: int, device: torch.device) -> int:
    """Rows of logits per block: few enough to stay in a CPU core's cache (4 MiB of float32); on an accelerator,
    256 MiB (its kernels stream memory anyway; the blocks only bound the temporaries)."""
    budget = (4 if device.type == "cpu" else 256) * 2**20
    return max(1, budget // (4 * vocab))


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        vocab = logits.shape[-1]
        flat, index = logits.reshape(-1, vocab), tokens.reshape(-1, 1)
        lse = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        chosen = torch.empty_like(lse)
        step = _rows_per_block(vocab, logits.device)
        for start in range(0, flat.shape[0], step):
            rows = slice(start, start + step)
            scaled = flat[rows].float() / temperature
            lse[rows] = torch.logsumexp(scaled, dim=-1)
            chosen[rows] = torch.gather(scaled, 1, index[rows]).squeeze(1)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        return (chosen - lse).view(tokens.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # d/dx of (x_k / t - logsumexp(x / t)): (onehot_k - softmax(x / t)) / t, formed as autograd forms it
        logits, tokens, lse = ctx.saved_tensors
        t = ctx.temperature
        vocab = logits.shape[-1]
        flat, index = logits.reshape(-1, vocab), tokens.reshape(-1, 1)
        g = grad.reshape(-1, 1).float()
        out = torch.empty(flat.shape, dtype=logits.dtype, device=logits.device)
        in_place = out.dtype == torch.float32
        step = _rows_per_block(vocab, logits.device)
        for start in range(0, flat.shape[0], step):
            rows = slice(start, start + step)
            # float32: work in the gradient's own rows; bf16 / fp16 logits: in float32, cast at the end
            part = torch.div(flat[rows], t, out=out[rows]) if in_place else flat[rows].float() / t
            part.sub_(lse[rows, None]).exp_().mul_(-g[rows])  # logsumexp's backward, of the -grad it receives
            part.scatter_add_(1, index[rows], g[rows])  # the gather's
            part.div_(t)
            if not in_place:
                out[rows] = part
        return out.view(logits.shape), None, None


def entropy_of(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the token distribution at each position: [B, T, V] -> [B, T]."""
    logits = logits.float() / temperature
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# 3. KL between the policy and the reference, per token
# ---------------------------------------------------------------------------------------------------------------


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Single-sample estimates of KL(pi || pi_ref) at each sampled token [K3].

    k1 = log pi - log pi_ref                       unbiased, can be negative, high variance ([Z19], [IGPT]).
    k3 = (r - 1) - log r, with r = pi_ref / pi     unbiased, never negative, lower variance.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


# ---------------------------------------------------------------------------------------------------------------
# 4. Per-token rewards: the missing-EOS rule, the KL penalty on every token, the score on the last one
# ---------------------------------------------------------------------------------------------------------------


def missing_eos_rule(scores: torch.Tensor, finished: torch.Tensor, penalty: float | None = None,
                     replacement: float | None = None) -> torch.Tensor:
    """The score of a response that ran out of tokens without EOS.

    `replacement`: the score is *replaced* by this fixed value, e.g. -1, whatever the reward model thought of the
    response ([Z19]: `penalty_reward_value` in OpenAI's lm-human-preferences; [N+]: the "EOS trick").
    `penalty`: the score is kept and this is *subtracted* (TRL's `missing_eos_penalty`): an unfinished response still
    ranks by its content. At most one is set.
    """
    if replacement is not None:
        return torch.where(finished, scores, torch.full_like(scores, replacement))
    if penalty is not None:
        return scores - penalty * (~finished).to(scores.dtype)
    return scores



def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real response token in each row (the EOS when there is one); 0 for an empty row."""
    lengths = mask.long().sum(1)
    return (lengths - 1).clamp(min=0)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta * KL_t on every response token, plus the sequence score on its last real token [Z19 eq. 2].

    The score lands on the last real token itself, not one step past it (no extra dummy step: TRL 1.12 placed it one
    token past EOS). Returns (rewards, non_score_rewards), both [B, T] and zero on padding.
    """
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards, non_score


# ---------------------------------------------------------------------------------------------------------------
# 5. Generalised advantage estimation [GAE eq. 16]
# ---------------------------------------------------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, computed backwards over the response.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},   returns_t = A_t + V_t.
    The episode ends at the last real token: V and A past it are 0 (padding contributes nothing).
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


# ---------------------------------------------------------------------------------------------------------------
# 6. Critic-free advantages: k responses per prompt, each judged against its siblings
# ---------------------------------------------------------------------------------------------------------------
#
# A rollout batch of B = n * k episodes holds k responses to each of n prompts, prompt-major: rows g*k ... g*k + k - 1
# are group g. The advantage is one number per response, given to each of its tokens (`per_token`).


def groups_of(values: torch.Tensor, k: int) -> torch.Tensor:
    """[n * k] -> [n, k]: one row per prompt."""
    if k < 2 or values.shape[0] % k:
        raise ValueError(f"{values.shape[0]} values do not make groups of k = {k} >= 2")
    return values.reshape(-1, k)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = R_i - mean_{j != i} R_j over the k responses to the same prompt [RLOO].

    The baseline leaves the response itself out, so it is independent of that response's action and the estimate
    stays unbiased; equal to k / (k - 1) * (R_i - mean_j R_j). `rewards` are whole-sequence rewards R = score - beta *
    KL (the KL penalty in the reward, as in [RLOO] and [Z19]).
    """
    grouped = groups_of(rewards, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) over the k responses to the same prompt [GRPO sec. 4.1.2, "outcome
    supervision"]. std is Bessel-corrected; a group whose responses all score alike gets advantages 0 (nothing to
    learn from it). The KL to the reference is not in r: GRPO puts it in the loss (`kl_loss`)."""
    grouped = groups_of(scores, k)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level advantage [B] on every real token of its response: [B, T]."""
    return advantages[:, None] * mask


# ---------------------------------------------------------------------------------------------------------------
# 7. Losses [PPO eq. 7 and 9]
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar: masked mean of the clipped surrogate (to minimise)
    clipfrac: torch.Tensor  # share of tokens where clipping was active
    approx_kl: torch.Tensor  # 0.5 * mean((log ratio)^2): a low-variance estimate of KL(old || new)
    ratio_mean: torch.Tensor


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, normaliser: torch.Tensor | float | None = None) -> PolicyLoss:
    """Clipped surrogate: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), averaged over real tokens [PPO eq. 7].

    `normaliser` (a token count) replaces the mask's own count when a mini-batch is split into micro-batches, so
    that the accumulated gradient is that of the mean over the whole mini-batch.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    losses = torch.max(unclipped, clipped)
    count = mask.sum() if normaliser is None else normaliser
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLoss(masked_sum(losses, mask) / count, clipfrac, approx_kl, ratio_mean)


@dataclass
class ValueLoss:
    loss: torch.Tensor  # scalar: 0.5 * masked mean of the clipped squared error
    clipfrac: torch.Tensor


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, normaliser: torch.Tensor | float | None = None) -> ValueLoss:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -eps_v, eps_v) [N+, PPO2]."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    losses = 0.5 * torch.max(unclipped, clipped)
    count = mask.sum() if normaliser is None else normaliser
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return ValueLoss(masked_sum(losses, mask) / count, clipfrac)


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
            normaliser: torch.Tensor | float | None = None) -> torch.Tensor:
    """GRPO's KL term, mean over real tokens of k3(pi_theta || pi_ref) at the current parameters [GRPO eq. 3, 4]:
    added to the loss as beta * kl_loss, so its gradient pulls the policy back towards the reference directly
    (instead of through the reward). k3 is never negative and its gradient is that of the true KL in expectation."""
    count = mask.sum() if normaliser is None else normaliser
    return masked_sum(kl_per_token(logprobs, ref_logprobs, "k3"), mask) / count


# ---------------------------------------------------------------------------------------------------------------
# 8. Diagnostics
# ---------------------------------------------------------------------------------------------------------------


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."""
    return explained_variance_from(masked_var(returns - values, mask, unbiased=False),
                                   masked_var(returns, mask, unbiased=False))


def explained_variance_from(var_error: torch.Tensor, var_returns: torch.Tensor) -> torch.Tensor:
    """The same from the two variances (e.g. reduced over processes); NaN when the returns do not vary."""
    if var_returns == 0:
        return torch.tensor(float("nan"))
    return 1.0 - var_error / var_returns


# ---------------------------------------------------------------------------------------------------------------
# 9. KL coefficient: fixed, or the adaptive controller of Ziegler et al. [Z19 sec. 2.2]
# ---------------------------------------------------------------------------------------------------------------


class KLController:
    """beta_{t+1} = beta_t * (1 + K_beta * e_t), e_t = clip((KL_t - KL_target) / KL_target, -0.2, 0.2),
    K_beta = n_t / horizon, where n_t is the number of episodes in the update. With no target, beta stays fixed."""

    def __init__(self, initial: float, target: float | None = None, horizon: float | None = None):
        self.value = float(initial)
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, episodes: int) -> float:
        if self.target is not None and self.horizon:
            error = min(max((kl - self.target) / self.target, -0.2), 0.2)
            self.value *= 1.0 + error * episodes / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
