"""The PPO-RLHF training loop. One update, top to bottom:

    1. take the next rollout batch of prompts (a seeded order, the same after --resume)
    2. sample responses with the policy (KV cache), truncate after the first EOS
    3. one no-grad pass: old log-probs and values (policy), reference log-probs
    4. score: reward model or function, the missing-EOS rule, optionally normalised and clipped
    5. rewards: -beta * KL on every token, the score on the last real token (gae); per response, score - beta * KL
       (rloo); the score alone (grpo, whose KL is in the loss)
    6. advantages, by `advantage_estimator`: GAE over the critic's values (gae), or per response against the other
       responses to the same prompt (rloo: leave-one-out mean; grpo: group mean and std); optionally whitened
    7. PPO epochs over shuffled mini-batches (micro-batches accumulate): clipped policy loss, clipped value loss
       (gae), beta * k3 KL (grpo), entropy bonus; one optimizer step per mini-batch; optional early stop on
       approximate KL
    8. adapt beta, anneal the learning rate, log, save a checkpoint

The math lives in `core.py`; this module only orchestrates. Metric names are defined in docs/ppo.md.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import RNG_STATE_NAME, DistributedType

from rlhf_pipeline.ppo import core
from rlhf_pipeline.ppo.modules import (
    PolicyAndValue,
    Prompts,
    Rollout,
    gathered,
    prepare_frozen,
    reference_logits,
    sample_rollout,
    scorer_model,
    seeded,
)
from rlhf_pipeline.ppo.plan import BatchPlan
from rlhf_pipeline.recipe.schema import GenerationSection, PpoTraining
from rlhf_pipeline.runs import LOG_FILE

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # beside Accelerate's files in a checkpoint
SAMPLES_FILE = "samples.jsonl"


@dataclass
class TrainerState:
    """What a checkpoint must restore besides weights and optimizer: resumable by construction."""

    update: int = 0  # updates completed
    episodes: int = 0
    optimizer_steps: int = 0
    kl_coef: dict = field(default_factory=dict)
    score_shift: float = 0.0  # score normalisation "initial": (score - shift) / scale
    score_scale: float = 1.0
    train_seconds: float = 0.0


class PPOTrainer:
    def __init__(self, *, config: PpoTraining, generation: GenerationSection, model: PolicyAndValue,
                 reference: torch.nn.Module | None, tokenizer, scorer: Callable[[Rollout], torch.Tensor],
                 gold: Callable[[Rollout], torch.Tensor] | None, prompts: Prompts, output_dir: str | Path, seed: int,
                 accelerator, on_log: Callable[[dict], None] | None = None):
        self.config = config
        self.generation = generation
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.gold = gold
        self.prompts = prompts
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.accelerator = accelerator
        self.on_log = on_log
        self.samples_per_prompt = getattr(generation, "samples_per_prompt", 1)
        self.plan = BatchPlan.of(config, accelerator.num_processes, self.samples_per_prompt)
        self.state = TrainerState()
        self.kl_controller = core.KLController(
            config.kl_coef,
            config.adaptive_kl.target if config.adaptive_kl else None,
            config.adaptive_kl.horizon if config.adaptive_kl else None,
        )
        value_lr = config.value_learning_rate or config.learning_rate
        groups = [{"params": model.policy_parameters(), "lr": config.learning_rate, "initial_lr": config.learning_rate}]
        if model.has_critic:
            groups.append({"params": model.value_parameters(), "lr": value_lr, "initial_lr": value_lr})
        # the fused kernel (one op for every tensor; CPU and CUDA): a small model's step costs a fifth as long
        fused = accelerator.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(groups, eps=config.adam_eps, weight_decay=config.weight_decay, fused=fused)
        # DeepSpeed (ZeRO-1/2) steps inside `backward`, once every `gradient_accumulation_steps` micro-batches, and
        # scales each micro-batch's loss by 1 / that count (told in stages/ppo.py: `deepspeed_settings`): it takes
        # the optimizer steps of the loop below, and `_loss_scale` undoes its scaling (our losses are already
        # normalised by the whole mini-batch's tokens)
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self._loss_scale = float(config.gradient_accumulation_steps) if self.deepspeed else 1.0
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if accelerator.device.type == "cpu":
            keep_freed_memory()
        self.reference = prepare_frozen(reference, accelerator) if reference is not None else None
        self.device = accelerator.device
        self._epoch_order: tuple[int, list[int]] = (-1, [])
        for function in (scorer, gold):  # TRL-convention reward functions may read trainer_state
            if hasattr(function, "progress"):
                function.progress.max_steps = self.plan.total_optimizer_steps

    # -----------------------------------------------------------------------------------------------------------
    # the loop
    # -----------------------------------------------------------------------------------------------------------
    def train(self, should_stop: Callable[[], bool] = lambda: False) -> TrainerState:
        """Run the updates left. `should_stop` is asked after each update (Ctrl-C): if it says so, a checkpoint is
        saved and the state returned early."""
        from tqdm.auto import tqdm

        cfg, plan = self.config, self.plan
        if cfg.score_normalization == "initial" and self.state.update == 0:
            self._fit_initial_score_normalisation()
        bar = tqdm(total=plan.num_updates, initial=self.state.update, desc="PPO updates", unit="update",
                   disable=not self.accelerator.is_main_process, dynamic_ncols=True)
        while self.state.update < plan.num_updates:
            update = self.state.update
            t_start = time.perf_counter()
            self._anneal_learning_rate(update)

            # 1. the next prompts for this process
            prompts = self._prompt_batch(update)
            for scorer in (self.scorer, self.gold):
                if hasattr(scorer, "progress"):
                    scorer.progress.global_step = self.state.optimizer_steps
                    scorer.progress.epoch = update * plan.prompts_per_update / len(self.prompts)

            # FSDP: the trained model gathered once for the rollout's generation and forward passes (the reference
            # while it scores them, in _score_tokens)
            with self.whole_weights():
                # 2. sample responses, truncate after the first EOS
                rollout = self.sample(prompts)
                t_generated = time.perf_counter()

                # 3. old log-probs and values, reference log-probs (no grad)
                old_logprobs, old_values, ref_logprobs, entropy = self._score_tokens(rollout)

            # 4. sequence scores
            where = f"update {update + 1} of {plan.num_updates}"
            raw_scores = score(self.scorer, rollout, where).to(self.device)
            scores = self._shape_scores(raw_scores, rollout.finished.to(self.device))
            gold_scores = score(self.gold, rollout, where).to(self.device) if self.gold is not None else None
            t_scored = time.perf_counter()

            # 5. rewards and 6. advantages (and, for gae, returns)
            mask = rollout.response_mask.to(self.device)
            kl_coef = self.kl_controller.value
            advantages, returns, non_score = self._advantages(scores, old_logprobs, ref_logprobs, old_values, mask,
                                                              kl_coef)
            if cfg.whiten_advantages:
                mean, var = self._global_moments(advantages, mask)
                advantages = core.masked_whiten(advantages, mask, mean=mean, var=var)

            # 7. PPO epochs
            stats = self._optimise(rollout, old_logprobs, old_values, ref_logprobs, advantages, returns, mask,
                                   kl_coef)
            t_trained = time.perf_counter()
            check_finite_losses(stats, update + 1, raw_scores)  # before anything saves the weights it stepped

            # 8. bookkeeping
            k1 = core.masked_sum(old_logprobs - ref_logprobs, mask, dim=1)
            mean_kl = self._mean(k1)
            self.kl_controller.update(mean_kl, plan.rollout_batch_size)
            self.state.update += 1
            self.state.episodes += plan.rollout_batch_size
            self.state.optimizer_steps += stats.pop("optimizer_steps")
            self.state.train_seconds += t_trained - t_start
            row = {
                "objective/score": self._mean(raw_scores),
                "objective/score_used": self._mean(scores),
                "objective/kl": mean_kl,
                "objective/kl_k3": self._mean(core.masked_sum(core.kl_per_token(old_logprobs, ref_logprobs, "k3"),
                                                              mask, dim=1)),
                "objective/non_score_reward": self._mean(non_score.sum(1)),
                "objective/rlhf_reward": self._mean(scores + non_score.sum(1)),
                "objective/kl_coef": kl_coef,
                "policy/entropy": self._token_mean(entropy, mask),
                "rollout/response_length": self._mean(mask.sum(1)),
                "rollout/eos_rate": self._mean(rollout.finished.float().to(self.device)),
                **stats,
                "train/learning_rate": self.optimizer.param_groups[0]["lr"],
                "train/episodes": self.state.episodes,
                "train/update": self.state.update,
                "train/optimizer_steps": self.state.optimizer_steps,
                "time/generation": t_generated - t_start,
                "time/scoring": t_scored - t_generated,
                "time/training": t_trained - t_scored,
                "time/update": t_trained - t_start,
                "time/episodes_per_second": plan.rollout_batch_size / (t_trained - t_start),
            }
            if old_values is not None:
                row["value/explained_variance"] = self._explained_variance(old_values, returns, mask)
            if self.samples_per_prompt > 1:
                row["objective/frac_zero_std_groups"] = self._mean(
                    (core.groups_of(scores, self.samples_per_prompt).std(1) < 1e-6).float())
            if gold_scores is not None:
                row["objective/gold"] = self._mean(gold_scores)
            for scorer, prefix in ((self.scorer, "reward_fn"), (self.gold, "gold_fn")):
                if hasattr(scorer, "take_metrics"):
                    row.update(scorer.take_metrics(prefix))
            if self.state.update % cfg.log_every == 0 or self.state.update == plan.num_updates:
                self._log(row)
            if cfg.num_samples and (self.state.update % cfg.sample_every == 0 or self.state.update == 1):
                self._log_samples(rollout, raw_scores, gold_scores)
            stop = should_stop() and self.state.update < plan.num_updates
            if stop or (cfg.save_every and self.state.update % cfg.save_every == 0
                        and self.state.update < plan.num_updates):
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(score=f"{row['objective/score']:.3f}", kl=f"{mean_kl:.2f}",
                            **({"gold": f"{row['objective/gold']:.3f}"} if gold_scores is not None else {}))
            if stop:
                break
        bar.close()
        return self.state

    def whole_weights(self, *frozen):
        """The trained model and the `frozen` models held whole for a block that calls their parts directly
        (`gathered` in modules.py: FSDP gathers a unit only when its own forward runs). Every process must enter
        it."""
        return gathered(self.accelerator, self.model, *frozen)

    # -----------------------------------------------------------------------------------------------------------
    # 1. prompts
    # -----------------------------------------------------------------------------------------------------------
    def _prompt_batch(self, update: int) -> Prompts:
        """The global batch of update `update` holds prompts [u*P, (u+1)*P) of a stream that walks a fresh seeded
        permutation of the prompts each epoch (P = prompts per update); each process takes its slice, and each
        prompt comes `samples_per_prompt` times in a row."""
        plan, n = self.plan, len(self.prompts)
        start = update * plan.prompts_per_update + self.accelerator.process_index * plan.local_prompts_per_update
        indices = []
        for in_stream in range(start, start + plan.local_prompts_per_update):
            epoch, position = divmod(in_stream, n)
            indices.append(self._permutation(epoch)[position])
        return self.prompts.select(indices).repeated(self.samples_per_prompt)

    def _permutation(self, epoch: int) -> list[int]:
        """The prompt order of one pass over the prompts (only the current one is kept)."""
        if self._epoch_order[0] != epoch:
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    # -----------------------------------------------------------------------------------------------------------
    # 2. sampling
    # -----------------------------------------------------------------------------------------------------------
    def sample(self, prompts: Prompts) -> Rollout:
        """Generate one response per prompt with the current policy (KV cache), truncated after the first EOS."""
        policy = self.accelerator.unwrap_model(self.model).policy
        return sample_rollout(policy, self.tokenizer, prompts, self.generation, self.device,
                              self.accelerator.autocast)

    # -----------------------------------------------------------------------------------------------------------
    # 3. no-grad forward passes
    # -----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score_tokens(self, rollout: Rollout):
        """Old log-probs, old values, reference log-probs and per-token entropy of the rollout."""
        temperature = self.generation.temperature
        model = self.accelerator.unwrap_model(self.model)
        size = self.config.forward_batch_size or rollout.query.shape[0]
        parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "values": [], "ref": [], "entropy": []}
        input_ids, attention_mask, start = rollout.input_ids, rollout.attention_mask, rollout.response_start
        with gathered(self.accelerator, self.reference):  # FSDP: whole, as its trunk and head are called apart
            for begin in range(0, input_ids.shape[0], size):
                chunk = slice(begin, begin + size)
                ids, mask, tokens = input_ids[chunk], attention_mask[chunk], rollout.response[chunk]
                with self.accelerator.autocast():
                    logits, values = model(ids, mask, start)
                    ref_logits = reference_logits(self.reference, model.policy, ids, mask, start)
                parts["logprobs"].append(core.logprobs_of(logits, tokens, temperature))
                parts["entropy"].append(core.entropy_of(logits, temperature))
                if values is not None:
                    parts["values"].append(values.float())
                parts["ref"].append(core.logprobs_of(ref_logits, tokens, temperature))
        joined = {k: torch.cat(v) if v else None for k, v in parts.items()}
        return joined["logprobs"], joined["values"], joined["ref"], joined["entropy"]

    # -----------------------------------------------------------------------------------------------------------
    # 4. score shaping
    # -----------------------------------------------------------------------------------------------------------
    def _shape_scores(self, scores: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        scores = core.missing_eos_rule(scores, finished, cfg.missing_eos_penalty, cfg.missing_eos_score)
        if cfg.score_normalization == "batch":
            ones = torch.ones_like(scores)
            mean, var = self._global_moments(scores, ones)
            scores = core.masked_whiten(scores, ones, mean=mean, var=var)
        elif cfg.score_normalization == "initial":
            scores = (scores - self.state.score_shift) / self.state.score_scale
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        return scores

    def _fit_initial_score_normalisation(self) -> None:
        """Ziegler et al. 2019: map the initial policy's scores to mean 0, std 1 (a fixed affine map)."""
        cfg = self.config
        with seeded(self.seed + 17 + 1000 * self.accelerator.process_index, self.device):
            rollout = self.sample(self._prompt_batch(0))
        scores = core.missing_eos_rule(score(self.scorer, rollout, "fitting the initial score normalisation")
                                       .to(self.device), rollout.finished.to(self.device),
                                       cfg.missing_eos_penalty, cfg.missing_eos_score)
        mean, var = self._global_moments(scores, torch.ones_like(scores))
        self.state.score_shift, self.state.score_scale = float(mean), float(var.clamp(min=1e-8).sqrt())

    # -----------------------------------------------------------------------------------------------------------
    # 5-6. rewards and advantages
    # -----------------------------------------------------------------------------------------------------------
    def _advantages(self, scores, old_logprobs, ref_logprobs, old_values, mask, kl_coef):
        """(advantages [B, T], returns [B, T] or None, non-score rewards [B, T]) by the configured estimator.

        The non-score reward is -beta * KL per token: in the reward for gae and rloo; for grpo the KL is in the loss,
        and the same quantity (k3) is reported so that objective/rlhf_reward means score - beta * KL for every
        estimator."""
        cfg, k = self.config, self.samples_per_prompt
        if cfg.advantage_estimator == "gae":
            kl = core.kl_per_token(old_logprobs, ref_logprobs, cfg.kl_estimator)
            rewards, non_score = core.per_token_rewards(scores, kl, mask, kl_coef)
            return (*core.gae(rewards, old_values, mask, cfg.gamma, cfg.lam), non_score)
        if cfg.advantage_estimator == "rloo":
            non_score = -kl_coef * core.kl_per_token(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
            sequence_rewards = scores + non_score.sum(1)
            return core.per_token(core.rloo_advantages(sequence_rewards, k), mask), None, non_score
        non_score = -kl_coef * core.kl_per_token(old_logprobs, ref_logprobs, "k3") * mask
        return core.per_token(core.grpo_advantages(scores, k), mask), None, non_score

    # -----------------------------------------------------------------------------------------------------------
    # 7. optimisation
    # -----------------------------------------------------------------------------------------------------------
    def _optimise(self, rollout, old_logprobs, old_values, ref_logprobs, advantages, returns, mask,
                  kl_coef) -> dict[str, float]:
        cfg, plan = self.config, self.plan
        temperature = self.generation.temperature
        totals: dict[str, float] = {}
        steps = 0
        early_stopped = False
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.state.update * 31 +
                                                  self.accelerator.process_index)
        self.model.train()
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(plan.local_rollout_batch_size, generator=generator)
            for mini in range(plan.num_mini_batches):
                mini_index = order[mini * plan.local_mini_batch_size:(mini + 1) * plan.local_mini_batch_size]
                tokens = mask[mini_index].sum().clamp(min=1)  # the normaliser of the whole mini-batch
                step_stats: dict[str, float] = {}
                for micro in range(plan.gradient_accumulation_steps):
                    index = mini_index[micro * plan.micro_batch_size:(micro + 1) * plan.micro_batch_size]
                    last_micro = micro == plan.gradient_accumulation_steps - 1
                    if self.deepspeed:  # the engine reduces and steps at the boundary that accumulate() marks:
                        sync = self.accelerator.accumulate(self.model)  # every gradient_accumulation_steps-th
                    else:
                        sync = nullcontext() if last_micro else self.accelerator.no_sync(self.model)
                    with sync:
                        part = self._micro_step(rollout, index, old_logprobs, old_values, ref_logprobs, advantages,
                                                returns, mask, tokens, temperature, kl_coef)
                    for key, value in part.items():
                        step_stats[key] = step_stats.get(key, 0.0) + value
                grad_norm = None
                if cfg.max_grad_norm is not None:  # under DeepSpeed the engine clipped when it stepped: None here
                    grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()  # under DeepSpeed a no-op: the engine stepped in the last backward
                self.optimizer.zero_grad(set_to_none=True)
                if self.deepspeed and cfg.max_grad_norm is not None:
                    grad_norm = self.model.get_global_grad_norm()
                if grad_norm is not None:
                    step_stats["policy/grad_norm"] = float(grad_norm)
                steps += 1
                for key, value in step_stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                if cfg.target_kl is not None and self._mean(torch.tensor(step_stats["policy/approx_kl"],
                                                                         device=self.device)) > cfg.target_kl:
                    early_stopped = True
                    break
            if early_stopped:
                break
        # each micro-batch added its token-weighted share, so one step's sum is that mini-batch's mean
        stats = {key: self._mean(torch.tensor(value / steps, device=self.device)) for key, value in totals.items()}
        stats["train/early_stopped"] = float(early_stopped)
        stats["optimizer_steps"] = steps
        return stats

    def _micro_step(self, rollout, index, old_logprobs, old_values, ref_logprobs, advantages, returns, mask, tokens,
                    temperature, kl_coef) -> dict[str, float]:
        cfg = self.config
        ids = rollout.input_ids[index]
        attention = rollout.attention_mask[index]
        with self.accelerator.autocast():
            logits, values = self.model(ids, attention, rollout.response_start)
        m = mask[index]
        share = float(m.sum() / tokens)  # this micro-batch's share of the mini-batch's tokens
        logprobs = core.logprobs_of(logits, rollout.response[index], temperature)
        pg = core.policy_loss(logprobs, old_logprobs[index], advantages[index], m, cfg.cliprange, normaliser=tokens)
        loss = pg.loss
        stats: dict[str, float] = {"loss/policy": pg.loss.item()}
        if values is not None:  # gae: the critic's clipped value loss
            vf = core.value_loss(values.float(), old_values[index], returns[index], m, cfg.cliprange_value,
                                 normaliser=tokens)
            loss = loss + cfg.vf_coef * vf.loss
            stats.update({"loss/value": vf.loss.item(), "value/clipfrac": float(vf.clipfrac) * share})
        if cfg.advantage_estimator == "grpo" and kl_coef > 0:  # GRPO's KL to the reference, in the loss
            kl_term = kl_coef * core.kl_loss(logprobs, ref_logprobs[index], m, normaliser=tokens)
            loss = loss + kl_term
            stats["loss/kl"] = kl_term.item()
        entropy = None
        if cfg.entropy_coef > 0:
            entropy = core.masked_sum(core.entropy_of(logits, temperature), m) / tokens
            loss = loss - cfg.entropy_coef * entropy
        self.accelerator.backward(loss * self._loss_scale)
        stats.update({
            "loss/total": loss.item(),
            "policy/approx_kl": float(pg.approx_kl) * share,
            "policy/clipfrac": float(pg.clipfrac) * share,
            "policy/ratio": float(pg.ratio_mean) * share,
        })
        if entropy is not None:
            stats["loss/entropy"] = -cfg.entropy_coef * entropy.item()  # the bonus term as it enters loss/total
        return stats

    # -----------------------------------------------------------------------------------------------------------
    # helpers
    # -----------------------------------------------------------------------------------------------------------
    def _anneal_learning_rate(self, update: int) -> None:
        fraction = 1.0 - update / self.plan.num_updates if self.config.lr_schedule == "linear" else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * fraction

    def _mean(self, values: torch.Tensor) -> float:
        """Mean over all processes' values."""
        values = values.detach().float().reshape(-1).to(self.device)
        total = self.accelerator.reduce(torch.stack([values.sum(), values.new_tensor(values.numel())]), "sum")
        return float(total[0] / total[1].clamp(min=1))

    def _token_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean over every real token of all processes' rollouts (long responses weigh by their length)."""
        sums = self.accelerator.reduce(torch.stack([core.masked_sum(values, mask), mask.sum()]).float(), "sum")
        return float(sums[0] / sums[1].clamp(min=1))

    def _explained_variance(self, values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
        """core.explained_variance over all processes' real tokens (population variances)."""
        _, var_returns = self._global_moments(returns, mask, unbiased=False)
        _, var_error = self._global_moments(returns - values, mask, unbiased=False)
        return float(core.explained_variance_from(var_error, var_returns))

    def _global_moments(self, values: torch.Tensor, mask: torch.Tensor,
                        unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked mean and variance (Bessel-corrected unless `unbiased=False`) over all processes."""
        sums = torch.stack([core.masked_sum(values, mask), core.masked_sum(values**2, mask), mask.sum()]).float()
        sums = self.accelerator.reduce(sums, "sum")
        count = sums[2].clamp(min=1)
        mean = sums[0] / count
        var = (sums[1] / count - mean**2).clamp(min=0)
        if unbiased:
            var = var * count / (count - 1).clamp(min=1)
        return mean, var

    def _log(self, row: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            self.accelerator.log(row, step=self.state.update)  # the trackers of `report_to`, if any
            if self.on_log is not None:
                self.on_log(row)

    def _log_samples(self, rollout: Rollout, scores: torch.Tensor, gold: torch.Tensor | None) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.output_dir / SAMPLES_FILE, "a", encoding="utf-8") as handle:
            for i in range(min(self.config.num_samples, len(rollout.responses))):
                row = {"update": self.state.update, "prompt": rollout.prompts.texts[i],
                       "response": rollout.responses[i],
                       "score": float(scores[i]), "finished": bool(rollout.finished[i])}
                if gold is not None:
                    row["gold"] = float(gold[i])
                for column, values in getattr(self.scorer, "extra", {}).items():  # a TRL function's log_extra
                    if len(values) == len(rollout.responses):
                        row[column] = values[i]
                handle.write(json.dumps(row, default=str) + "\n")

    # -----------------------------------------------------------------------------------------------------------
    # evaluation
    # -----------------------------------------------------------------------------------------------------------
    def evaluate(self, prompts: Prompts, seed: int) -> dict[str, Any]:
        """Sample once per held-out prompt with the training settings (a fixed seed), score, compare to the
        reference. Every process takes a shard; the means cover all prompts (`rlhf_pipeline.held_out`, shared with
        DPO)."""
        from rlhf_pipeline.held_out import evaluate_generation

        model = self.accelerator.unwrap_model(self.model)
        # the reward models too: processes may hold different numbers of prompts, and a sharded model's own
        # forward would wait on a process that has none left
        with self.whole_weights(self.reference, scorer_model(self.scorer), scorer_model(self.gold)):
            return evaluate_generation(model.policy, self.reference, self.tokenizer, prompts, self.generation,
                                       self.accelerator, seed=seed, batch_size=self.config.eval_batch_size,
                                       scorer=self.scorer, gold=self.gold)

    # -----------------------------------------------------------------------------------------------------------
    # checkpoints
    # -----------------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Accelerate's `save_state` (the weights, the optimizer, the loss scaler, every process's RNG states; sharded
        under FSDP) and our trainer state (JSON: update counter, which also places the prompt stream, KL controller,
        score normalisation, counters), written whole: into `checkpoints/update-NNNNNN.tmp`, fsync'd, then renamed
        to `update-NNNNNN` (a kill mid-save leaves only a .tmp that nothing resumes from). Older checkpoints beyond
        `save_total_limit` are then deleted. (Accelerate's automatic checkpoint naming would write in place and
        delete the oldest checkpoint before the new one is complete.)"""
        from rlhf_pipeline import runs

        root = self.output_dir / CHECKPOINTS
        path = root / f"update-{self.state.update:06d}"
        partial = path.with_name(path.name + ".tmp")
        main = self.accelerator.is_main_process
        try:
            if main and partial.exists():
                shutil.rmtree(partial)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(partial))
            if main:
                state = {**self.state.__dict__, "kl_coef": self.kl_controller.state_dict()}
                (partial / TRAINER_STATE).write_text(json.dumps(state, indent=1))
            self.accelerator.wait_for_everyone()
            if main:
                runs.ordinary_modes(partial)  # readable by others as the finished model is, not mkstemp's 0600
                runs.fsync_tree(partial)
                os.replace(partial, path)
                runs.fsync_dir(root)  # the rename itself
                complete = sorted(p for p in root.glob("update-*") if not p.name.endswith(".tmp"))
                runs.prune_checkpoints(complete, self.config.save_total_limit)
            self.accelerator.wait_for_everyone()
        except (OSError, RuntimeError) as exc:
            raise runs.disk_full(exc, partial) or exc from None
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Everything `save_checkpoint` wrote, through Accelerate's `load_state` (which reads the optimizer and RNG
        pickles with torch.load(weights_only=True))."""
        from rlhf_pipeline.errors import UserError, unreadable

        check_rng_file(path / f"{RNG_STATE_NAME}_{self.accelerator.process_index}.pkl")
        try:
            self.accelerator.load_state(str(path))
            state = json.loads((path / TRAINER_STATE).read_text())
            self.kl_controller.load_state_dict(state.pop("kl_coef"))
            self.state = TrainerState(**{k: v for k, v in state.items() if k in TrainerState.__dataclass_fields__})
        except Exception as exc:  # a damaged or doctored file: torch.load(weights_only) refuses code, says why
            raise UserError(f"cannot resume from {path}: it cannot be read ({unreadable(exc)}); nothing in it was "
                            "run. Start over with --overwrite") from None


def check_finite_losses(stats: dict[str, float], update: int, scores: torch.Tensor) -> None:
    """A loss that is NaN or infinite has stepped the weights into NaN: stop before a checkpoint or the final save
    writes them (the last checkpoint, if any, stays the one to resume from)."""
    import math

    from rlhf_pipeline.errors import UserError

    bad = [key for key in ("loss/policy", "loss/value", "loss/kl") if key in stats and not math.isfinite(stats[key])]
    if bad:
        raise UserError(f"update {update}: {bad[0]} is {stats[bad[0]]}: training diverged and the weights are no "
                        f"longer usable, so nothing of this update is saved (this update's scores range from "
                        f"{float(scores.min()):.4g} to {float(scores.max()):.4g}; scores this large overflow float32 "
                        "in the advantages: scale them down, or lower training.learning_rate)")


def check_rng_file(path: Path) -> None:
    """Accelerate's load_state reads a process's RNG states with weights_only=True, but passes over a file that is
    missing or refused with a log line, and the run would resume with other random streams: refuse instead (a
    crafted file could otherwise run code on --resume, were it ever loaded without weights_only)."""
    from accelerate.utils import load

    from rlhf_pipeline.errors import UserError, unreadable

    if not path.is_file():
        raise UserError(f"{path} is missing: the checkpoint cannot restore this process's random state")
    try:
        load(path)  # tensors, numpy's state and python's (a tuple of ints): weights_only takes them, and refuses code
    except Exception as exc:
        raise UserError(f"{path} is not a plain tensor file; refusing to load it (it could run code): "
                        f"{unreadable(exc)}") from None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep large freed blocks for reuse instead of handing them back to the kernel.

    Every optimizer step frees and allocates again the same large tensors (for GPT-2: the [vocabulary x width]
    gradient of the tied embedding, 154 MB, twice; the logits and their gradient). By default glibc serves a block
    of more than 32 MiB with its own mmap and unmaps it when freed, so each step pays a page fault, with the kernel
    zero-filling, for every 4 KiB of each new block: for a GPT-2-small PPO micro-batch on 2 CPU cores this took more
    time than the embedding's and LM head's arithmetic (bench/README.md, "FLOP/s against the machine's limit").
    Raising the mmap and trim thresholds to 1 GiB keeps such blocks in the heap for the next step. The cost: freed
    memory is not returned to the system until the process exits, and the heap can fragment (GPT-2-small PPO: peak
    RSS 3.8 -> 4.2 GB). Linux with glibc only (a no-op elsewhere); returns whether it applied. Process-wide, so
    called once the trainer runs on the CPU.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def score(scorer: Callable[[Rollout], torch.Tensor], rollout: Rollout, where: str) -> torch.Tensor:
    """The scorer's scores of a rollout; its errors say where in the run they happened."""
    from rlhf_pipeline.errors import UserError

    try:
        scores = scorer(rollout)
    except UserError as exc:
        raise UserError(f"{exc} ({where}, a batch of {len(rollout.responses)} responses)") from None
    if not bool(torch.isfinite(scores.float()).all()):  # a reward model gone NaN: nothing may train on it
        raise UserError(f"the scorer returned {int((~torch.isfinite(scores.float())).sum())} score(s) that are not "
                        f"finite in float32 ({where}, a batch of {len(rollout.responses)} responses)")
    return scores


def read_log(output_dir: str | Path) -> list[dict]:
    from rlhf_pipeline import runs

    return runs.read_jsonl(Path(output_dir) / LOG_FILE)
