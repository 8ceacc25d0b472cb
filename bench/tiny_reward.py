"""The one reward both trainers of bench/rloo_vs_trl.py optimise: the tiny reward model's score of (prompt, completion),
minus a missing-EOS penalty, in TRL's reward-function convention.

    reward(prompts, completions, completion_ids, **kwargs) -> list[float]

TRL's `RLOOTrainer` calls it as one of its `reward_funcs`; our `rlhf ppo` takes it as `reward.function:
bench/tiny_reward.py:reward` (a function with a `completions` parameter is called the TRL way). Either way it gets
the prompt texts, the decoded completions (special tokens skipped) and each completion's token ids, cut after the
first EOS (the EOS kept) — the same three things from both trainers, so both see exactly the same scores.

- score: `rlhf_pipeline.scoring.RewardModel` (the sequence TRL's RewardTrainer built in training: prompt + completion
  + EOS, the model's own pooling), the model loaded once, at import, from `$RLHF_BENCH_REWARD_MODEL` (a directory
  with the reward model and its tokenizer, e.g. runs/tiny/reward); 2 threads unless torch was set otherwise.
- minus `$RLHF_BENCH_MISSING_EOS_PENALTY` (default 1.0, our `rlhf ppo`'s default `missing_eos_penalty`) for a
  completion whose last id is not the EOS (it ran out of tokens). TRL's RLOOTrainer has no such option, so the
  penalty lives here, the same for both; the bench sets our `training.missing_eos_penalty: null` so it is not
  subtracted twice.

`CALLS` counts the completions scored (the bench reads it to count the episodes a trainer generated).
"""

from __future__ import annotations

import os

CALLS = {"batches": 0, "completions": 0}


def _load():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_pipeline.scoring import RewardModel

    path = os.environ.get("RLHF_BENCH_REWARD_MODEL")
    if not path:
        raise RuntimeError("bench/tiny_reward.py: set RLHF_BENCH_REWARD_MODEL to the reward model's directory")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return RewardModel(model, tokenizer)


REWARD_MODEL = _load()
EOS_ID = REWARD_MODEL.tokenizer.eos_token_id
PENALTY = float(os.environ.get("RLHF_BENCH_MISSING_EOS_PENALTY", "1.0"))


def reward_model_scores(prompts, completions) -> list[float]:
    """The reward model's raw scores (no penalty)."""
    return REWARD_MODEL.score(list(prompts), list(completions)).tolist()


def reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    scores = reward_model_scores(prompts, completions)
    CALLS["batches"] += 1
    CALLS["completions"] += len(completions)
    if PENALTY:
        scores = [s - PENALTY * (not ids or ids[-1] != EOS_ID) for s, ids in zip(scores, completion_ids)]
    return scores
