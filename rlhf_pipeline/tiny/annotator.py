"""The simulated annotator of the tiny default: a gold scoring function for movie-review continuations.

It plays the human labeller twice: it labels the preference pairs the reward model learns from (with a little label
noise, see `world.py`), and it is the gold metric that shows whether PPO improves true preference or only games the
learned reward model. It is also a valid PPO reward function (`rlhf_pipeline.tiny.annotator:gold_score`).

gold = sentiment - penalties, clipped to [0, 1], where
  sentiment  = positive / (positive + negative) sentiment words in the continuation (0.5 when there are none),
  penalties  = 0.5 if the review has no proper end (no final " ." or, when known, no EOS token was produced)
             + 0.25 per repeated word pair (bigram) and 0.25 per sentiment word used twice
             + 0.15 per clause beyond three (rambling), and 1.0 for an empty continuation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

POSITIVE = tuple(
    """superb brilliant wonderful delightful moving gripping stunning charming clever fresh beautiful excellent
    gorgeous heartfelt hilarious inspiring masterful memorable powerful riveting smart thrilling touching vivid warm
    witty elegant joyful lovely magnificent tender captivating dazzling engaging funny graceful""".split()
)
NEGATIVE = tuple(
    """dull boring awful dreadful clumsy tedious bland messy lifeless flat painful weak annoying confusing forgettable
    hollow lazy mediocre pointless predictable shallow silly sloppy stale tiresome ugly unfunny wooden bloated cheap
    clunky dreary empty murky overlong sluggish tepid""".split()
)
_POSITIVE, _NEGATIVE = frozenset(POSITIVE), frozenset(NEGATIVE)
CLAUSE_LINKS = ("and", "but", "while", "yet", "although", "though", "whereas")
MAX_CLAUSES = 3


def score_text(response: str, finished: bool | None = None) -> float:
    """Gold score in [0, 1] of one continuation. `finished`: whether generation stopped at EOS (None: unknown)."""
    words = response.split()
    if not words:
        return 0.0
    positive = sum(w in _POSITIVE for w in words)
    negative = sum(w in _NEGATIVE for w in words)
    sentiment = positive / (positive + negative) if positive + negative else 0.5

    penalty = 0.0
    if words[-1] != "." or finished is False:
        penalty += 0.5
    bigrams = Counter(zip(words, words[1:]))
    penalty += 0.25 * sum(n - 1 for n in bigrams.values() if n > 1)
    sentiment_uses = Counter(w for w in words if w in _POSITIVE or w in _NEGATIVE)
    penalty += 0.25 * sum(n - 1 for n in sentiment_uses.values() if n > 1)
    clauses = 1 + sum(w in CLAUSE_LINKS for w in words) + max(0, words.count(".") - 1)
    penalty += 0.15 * max(0, clauses - MAX_CLAUSES)
    return float(min(1.0, max(0.0, sentiment - penalty)))


def gold_score(prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool] | None = None) -> list[float]:
    """Reward-function form: prompts and responses as text, optionally whether each response ended with EOS."""
    if finished is None:
        finished = [None] * len(responses)
    return [score_text(r, f) for r, f in zip(responses, finished)]
