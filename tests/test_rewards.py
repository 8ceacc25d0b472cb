"""Reward functions in both conventions (ours and TRL's), and what happens when one misbehaves."""

from __future__ import annotations

import pytest

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.rewards import call_function, uses_trl_convention


def ours(prompts, responses):
    return [float(len(r)) for r in responses]


def ours_with_finished(prompts, responses, finished=None):
    return [float(f) for f in finished]


def trl_style(completions, solution, **kwargs):
    return [float(c == s) for c, s in zip(completions, solution)]


def trl_ids_only(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def trl_without_kwargs(prompts, completions, solution):
    return [1.0 for _ in completions]


def test_the_convention_is_told_by_the_parameter_names():
    assert not uses_trl_convention(ours) and not uses_trl_convention(ours_with_finished)
    assert uses_trl_convention(trl_style) and uses_trl_convention(trl_ids_only)


def test_our_convention_positional_and_finished():
    assert call_function(ours, ["p", "q"], ["ab", "c"], [True, False]) == [2.0, 1.0]
    assert call_function(ours_with_finished, ["p", "q"], ["ab", "c"], [True, False]) == [1.0, 0.0]


def test_trl_convention_gets_columns_by_keyword():
    keywords = {"solution": ["a", "x"], "completion_ids": [[1, 2], [3]], "trainer_state": None}
    assert call_function(trl_style, ["p", "q"], ["a", "b"], [True, True], keywords=keywords) == [1.0, 0.0]
    assert call_function(trl_ids_only, ["p", "q"], ["a", "b"], [True, True], keywords=keywords) == [2.0, 1.0]
    # without **kwargs, only the keywords it names
    assert call_function(trl_without_kwargs, ["p"], ["a"], [True], keywords={"solution": ["a"], "other": [1]}) == [1.0]


def test_a_column_the_function_needs_and_the_data_lacks_is_named():
    with pytest.raises(UserError, match=r"needs 'solution'.*other columns: topic"):
        call_function(trl_without_kwargs, ["p"], ["a"], [True], "f.py:r", keywords={"topic": ["t"]})


@pytest.mark.parametrize("returned, message", [
    ([1.0, None], "returned None for 1 response"),
    ([1.0], "returned 1 scores for 2 responses"),
    ([1.0, float("nan")], "non-finite"),
    ("ab", "not one number per response"),
])
def test_bad_returns_are_named(returned, message):
    with pytest.raises(UserError, match=message):
        call_function(lambda prompts, responses: returned, ["p", "q"], ["a", "b"], [True, True], "mine.py:r")
