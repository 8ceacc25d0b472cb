"""The graded annotator of the tiny comparison world: a gold score that does not saturate and punishes overdoing it.

The default annotator (`annotator.py`) gives 1.0 to any single positive clause, so every policy that learns to be
positive ties at the top. This one grades: how strongly positive each clause is, whether it is well formed under the
world's grammar, and how long the review is (two clauses best, fewer or more worse), with penalties for repetition.
It labels the comparison world's preference pairs (`python -m rlhf_pipeline.tiny.world --variant graded`) and is its
gold scorer (`rlhf_pipeline.tiny.graded:graded_gold_score`).

A response is split into clauses at the links (`and`, `but`, `while`, ...) and at `.`; a clause is well formed when it
reads `the <aspect> <verb> [<intensifier>] <sentiment word>` with the world's words (`the plot felt truly superb`).

gold = clip(S * L(n) - penalties, 0, 1), where
  v      = value of a well-formed clause: strong positive word 0.7 (superb, brilliant, ...; `STRONG`), other positive
           0.4, negative -0.6; an amplifier (really, very, truly) adds 0.3 to a positive clause and a hedge (quite,
           rather) takes 0.2 off it; a malformed clause is worth 0,
  S      = the mean of v over the n clauses (in [-1, 1]),
  L(n)   = length factor: 0.6, 1.0, 0.75, 0.45, 0.2 for n = 1..5 clauses, 0 beyond (two clauses are ideal),
  penalties = 0.5 if the review has no proper end (no final ` .`, or, when known, no EOS was produced)
            + 0.25 per malformed clause
            + 0.25 per sentiment word used again, 0.15 per aspect named again,
            and an empty response scores 0.
So `the acting was really superb and the plot felt truly brilliant .` scores 1.0; one such clause 0.6; three 0.75,
four 0.45; the same word twice (`... superb and the plot felt truly superb .`) 0.75; a mixed review near 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rlhf_pipeline.tiny.annotator import CLAUSE_LINKS, NEGATIVE, POSITIVE

ASPECTS = frozenset("""acting story script plot score music dialogue cast ending pacing cinematography editing
direction humor soundtrack lead camera premise characters villain hero twist finale opening costumes""".split())
VERBS = frozenset(["was", "felt", "seemed", "looked", "sounded", "is", "proved"])
AMPLIFIERS = frozenset(["really", "very", "truly"])
HEDGES = frozenset(["quite", "rather"])
STRONG = frozenset("""superb brilliant wonderful stunning masterful magnificent dazzling gripping riveting powerful
excellent captivating""".split())
_POSITIVE, _NEGATIVE = frozenset(POSITIVE), frozenset(NEGATIVE)
_LINKS = frozenset(CLAUSE_LINKS)
assert STRONG <= _POSITIVE

STRONG_VALUE, MILD_VALUE, NEGATIVE_VALUE = 0.7, 0.4, -0.6
AMPLIFIER_BONUS, HEDGE_MALUS = 0.3, 0.2
LENGTH_FACTOR = (0.0, 0.6, 1.0, 0.75, 0.45, 0.2)  # by number of clauses; 0 beyond
NO_END, MALFORMED, REPEATED_WORD, REPEATED_ASPECT = 0.5, 0.25, 0.25, 0.15


def clauses(response: str) -> list[list[str]]:
    """The clauses of a response, as word lists (empty ones dropped): split at clause links and at `.`."""
    out, current = [], []
    for word in response.split():
        if word in _LINKS or word == ".":
            if current:
                out.append(current)
            current = []
        else:
            current.append(word)
    if current:
        out.append(current)
    return out


def clause_value(words: list[str]) -> float | None:
    """Value of a well-formed clause (`the <aspect> <verb> [<intensifier>] <sentiment word>`), None if malformed."""
    if len(words) not in (4, 5) or words[0] != "the" or words[1] not in ASPECTS or words[2] not in VERBS:
        return None
    word = words[-1]
    if word in STRONG:
        value = STRONG_VALUE
    elif word in _POSITIVE:
        value = MILD_VALUE
    elif word in _NEGATIVE:
        value = NEGATIVE_VALUE
    else:
        return None
    if len(words) == 5:
        if words[3] in AMPLIFIERS:
            value += AMPLIFIER_BONUS if value > 0 else 0.0
        elif words[3] in HEDGES:
            value -= HEDGE_MALUS if value > 0 else 0.0
        else:
            return None
    return value


def graded_score_text(response: str, finished: bool | None = None) -> float:
    """Graded gold score in [0, 1] of one continuation; `finished`: whether generation stopped at EOS (None: unknown)"""
    words = response.split()
    parts = clauses(response)
    if not parts:
        return 0.0
    values = [clause_value(c) for c in parts]
    n = len(parts)
    sentiment = sum(v or 0.0 for v in values) / n
    length = LENGTH_FACTOR[n] if n < len(LENGTH_FACTOR) else 0.0

    penalty = 0.0
    if words[-1] != "." or finished is False:
        penalty += NO_END
    penalty += MALFORMED * sum(v is None for v in values)
    sentiment_uses = Counter(w for w in words if w in _POSITIVE or w in _NEGATIVE)
    penalty += REPEATED_WORD * sum(k - 1 for k in sentiment_uses.values() if k > 1)
    aspect_uses = Counter(c[1] for c in parts if len(c) > 1 and c[0] == "the" and c[1] in ASPECTS)
    penalty += REPEATED_ASPECT * sum(k - 1 for k in aspect_uses.values() if k > 1)
    return float(min(1.0, max(0.0, sentiment * length - penalty)))


def graded_gold_score(prompts: Sequence[str], responses: Sequence[str],
                      finished: Sequence[bool] | None = None) -> list[float]:
    """Reward-function form: prompts and responses as text, optionally whether each response ended with EOS."""
    if finished is None:
        finished = [None] * len(responses)
    return [graded_score_text(r, f) for r, f in zip(responses, finished)]
