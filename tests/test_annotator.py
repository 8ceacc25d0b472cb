"""The simulated annotator's gold score, checked against values computed by hand from its definition:
gold = sentiment - penalties, clipped to [0, 1] (see rlhf_pipeline/tiny/annotator.py)."""

from __future__ import annotations

import pytest

from rlhf_pipeline.tiny.annotator import CLAUSE_LINKS, NEGATIVE, POSITIVE, gold_score, score_text


@pytest.mark.parametrize("text, expected", [
    # one positive clause, properly ended: sentiment 1, no penalty
    (" the acting was superb .", 1.0),
    ("the acting was superb .", 1.0),
    # no sentiment words: 0.5
    (" the acting was fine .", 0.5),
    # one positive and one negative clause: 1 / 2
    (" the acting was superb but the plot felt dull .", 0.5),
    # two positive, one negative: 2 / 3
    (" the acting was superb but the plot felt dull while the music seemed clever .", 2 / 3),
    # no final " .": 1 - 0.5
    (" the acting was superb", 0.5),
    (" the acting was superb.", 0.0),  # "superb." is neither a sentiment word nor the end mark: 0.5 - 0.5
    # a repeated bigram ("the plot"): 1 - 0.25
    (" the plot was superb and the plot felt clever .", 0.75),
    # two repeated bigrams ("the plot", "plot was"), plus "superb" used twice: 1 - 0.5 - 0.25
    (" the plot was superb and the plot was clever and superb .", 0.25),
    # a sentiment word used twice ("superb"), no repeated bigram: 1 - 0.25
    (" the acting was superb and the music felt superb .", 0.75),
    # a word used three times costs 0.25 per extra use: 1 - 0.25 * 2
    (" superb acting , superb music ; superb cast .", 0.5),
    # ... and with a repeated bigram (", superb") on top: 1 - 0.5 - 0.25
    (" superb acting , superb music , superb cast .", 0.25),
    # five clauses (four links): 1 - 0.15 * 2
    (" the acting was superb and the plot felt clever but a score seemed witty while our cast felt warm yet my "
     "ending proved moving .", 0.7),
    # four sentences count as four clauses: 1 - 0.15
    (" a was superb . b felt clever . c seemed witty . d was warm .", 0.85),
    # three clauses are allowed
    (" the acting was superb and the plot felt clever but the score seemed witty .", 1.0),
    # empty
    ("", 0.0),
    ("   ", 0.0),
    # clipped at 0: 0 - 0.5
    (" the acting was dull", 0.0),
    # clipped at 0: 0.5 - 0.5 - 0.25 * 3 (bigrams "the the" x3) would be negative
    (" the the the the", 0.0),
    (" .", 0.5),
])
def test_score_text(text, expected):
    assert score_text(text) == pytest.approx(expected, abs=1e-12)


def test_finished():
    text = " the acting was superb ."
    assert score_text(text, finished=None) == 1.0
    assert score_text(text, finished=True) == 1.0
    assert score_text(text, finished=False) == 0.5  # no EOS produced: the review did not end
    # the end penalty is charged once, even when both the " ." and the EOS are missing
    assert score_text(" the acting was superb", finished=False) == 0.5
    assert score_text(" the acting was superb", finished=True) == 0.5


def test_scores_stay_in_range():
    words = list(POSITIVE[:5]) + list(NEGATIVE[:5]) + list(CLAUSE_LINKS) + ["the", "plot", "was", "."]
    import random

    rng = random.Random(0)
    for _ in range(500):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 25)))
        assert 0.0 <= score_text(text) <= 1.0
        assert 0.0 <= score_text(text, finished=False) <= score_text(text, finished=True) <= 1.0


def test_word_lists():
    assert not set(POSITIVE) & set(NEGATIVE)
    assert len(POSITIVE) == len(set(POSITIVE)) and len(NEGATIVE) == len(set(NEGATIVE))


def test_gold_score():
    prompts = ["review of X :", "review of Y :", "review of Z :"]
    responses = [" the acting was superb .", " the plot felt dull .", " the music was witty"]
    assert gold_score(prompts, responses) == [1.0, 0.0, 0.5]
    assert gold_score(prompts, responses, finished=[True, True, True]) == [1.0, 0.0, 0.5]
    assert gold_score(prompts, responses, finished=[False, True, False]) == [0.5, 0.0, 0.5]
    assert all(isinstance(s, float) for s in gold_score(prompts, responses))
    assert gold_score([], []) == []
