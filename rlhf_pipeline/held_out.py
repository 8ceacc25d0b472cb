"""The held-out generation evaluation shared by `rlhf ppo` (PPOTrainer.evaluate) and `rlhf dpo`.

One response is sampled per held-out prompt under a fixed seed (the same before and after training, so the two
evaluations differ only by the policy), then scored (reward and gold scorers, when given) and compared with the
reference: `kl` is the mean over prompts of the summed log-ratio log pi(y|x) - log pi_ref(y|x) of the policy's own
sample y, the reference being a frozen model or, when None, the policy with its LoRA adapter disabled. Every process
takes every world-th prompt; the means cover all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

SAMPLES_KEPT = 8  # per process: written to eval_samples.jsonl


@torch.no_grad()
def evaluate_generation(policy: torch.nn.Module, reference: torch.nn.Module | None, tokenizer, prompts, generation,
                        accelerator, *, seed: int, batch_size: int, scorer: Callable | None = None,
                        gold: Callable | None = None) -> dict[str, Any]:
    """Sample, score and measure one held-out pass. `policy` is the unwrapped causal LM (a peft model when
    `reference` is None); `prompts` a `ppo.modules.Prompts`; `generation` a GenerationSection; `accelerator` gives the
    processes, the device and autocast. Returns `score` (with a scorer), `kl`, `response_length` (tokens, EOS
    included), `eos_rate`, `samples` and `gold` (with a gold scorer)."""
    from tqdm.auto import tqdm

    from rlhf_pipeline.ppo.modules import sample_rollout, seeded, sequence_logprobs
    from rlhf_pipeline.ppo.trainer import score

    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    temperature, autocast = generation.temperature, accelerator.autocast
    shard = list(range(rank, len(prompts), world))
    scores, golds, kls, lengths, finished, samples = [], [], [], [], [], []
    with seeded(seed + rank, device):
        for begin in tqdm(range(0, len(shard), batch_size), desc="Evaluating held-out prompts",
                          disable=not accelerator.is_main_process, leave=False):
            rows = shard[begin:begin + batch_size]
            rollout = sample_rollout(policy, tokenizer, prompts.select(rows), generation, device, autocast)
            logprobs = sequence_logprobs(policy, rollout, temperature, autocast)
            if reference is not None:
                ref_logprobs = sequence_logprobs(reference, rollout, temperature, autocast)
            else:
                ref_logprobs = sequence_logprobs(policy, rollout, temperature, autocast, adapter_disabled=True)
            kls.append(logprobs - ref_logprobs)
            mask = rollout.response_mask.to(device)
            where = f"held-out evaluation, prompts {rows[0]}-{rows[-1]}"
            if scorer is not None:
                scores.append(score(scorer, rollout, where).to(device))
            if gold is not None:
                golds.append(score(gold, rollout, where).to(device))
            lengths.append(mask.sum(1))
            finished.append(rollout.finished.float().to(device))
            for i in range(len(rows)):
                if len(samples) < SAMPLES_KEPT:
                    sample = {"prompt": rollout.prompts.texts[i], "response": rollout.responses[i]}
                    if scorer is not None:
                        sample["score"] = float(scores[-1][i])
                    if gold is not None:
                        sample["gold"] = float(golds[-1][i])
                    samples.append(sample)
    result: dict[str, Any] = {}
    if scores:
        result["score"] = _mean(accelerator, torch.cat(scores))
    result.update(kl=_mean(accelerator, torch.cat(kls)), response_length=_mean(accelerator, torch.cat(lengths)),
                  eos_rate=_mean(accelerator, torch.cat(finished)), samples=samples)
    if golds:
        result["gold"] = _mean(accelerator, torch.cat(golds))
    return result


def _mean(accelerator, values: torch.Tensor) -> float:
    """Mean over all processes' values."""
    values = values.detach().float().reshape(-1).to(accelerator.device)
    total = accelerator.reduce(torch.stack([values.sum(), values.new_tensor(values.numel())]), "sum")
    return float(total[0] / total[1].clamp(min=1))
