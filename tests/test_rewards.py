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
    ([1.0, float("nan")], "not finite in float32"),
    ([1.0, 1e39], r"not finite in float32 \(the dtype scores train in\), e.g. 1e\+39 for response 1"),
    ("ab", "returned a str, not a list of numbers .*read character by character"),
    ({"x": 1.0, "y": 2.0}, "returned a dict, not a list of numbers .*its keys would be taken for scores"),
    ({1.0, 2.0}, "returned a set, not a list of numbers"),
    ((s for s in (1.0, 2.0)), "returned a generator, not a list of numbers"),
    (["1", "2"], "returned text, not a number, for response 0"),
])
def test_bad_returns_are_named(returned, message):
    with pytest.raises(UserError, match=message):
        call_function(lambda prompts, responses: returned, ["p", "q"], ["a", "b"], [True, True], "mine.py:r")


def test_numpy_arrays_bools_and_float32_extremes_are_scores():
    import numpy as np

    assert call_function(lambda p, r: np.array([1.5, 2.0]), ["p", "q"], ["a", "b"], [True, True]) == [1.5, 2.0]
    assert call_function(lambda p, r: [True, False], ["p", "q"], ["a", "b"], [True, True]) == [1.0, 0.0]
    assert call_function(lambda p, r: [3.0e38, -3.0e38], ["p", "q"], ["a", "b"], [True, True]) == [3.0e38, -3.0e38]


def test_a_function_that_edits_its_arguments_edits_copies():
    def vandal(prompts, responses, finished):
        responses[0] = "rewritten"
        responses.append("extra")
        prompts.clear()
        finished[0] = False
        return [1.0, 1.0]

    prompts, responses, finished = ["p", "q"], ["a", "b"], [True, True]
    assert call_function(vandal, prompts, responses, finished) == [1.0, 1.0]
    assert (prompts, responses, finished) == (["p", "q"], ["a", "b"], [True, True])

    def trl_vandal(prompts, completions, solution, **kwargs):
        completions[0][0]["content"] = "rewritten"
        solution[0] = "changed"
        return [0.0]

    conversation = [[{"role": "assistant", "content": "a"}]]
    columns = {"solution": ["s"]}
    call_function(trl_vandal, [[{"role": "user", "content": "p"}]], conversation, [True], keywords=columns)
    assert conversation == [[{"role": "assistant", "content": "a"}]] and columns == {"solution": ["s"]}


def test_os_exit_in_a_reward_function_is_an_error_not_an_exit(monkeypatch):
    """os._exit would end the process at once with the status it is given (0: a run that looks fine), unfinished.
    (os._exit is replaced here by a stand-in, so that without the guard this test fails instead of ending pytest.)"""
    import os

    def process_exit(code):
        raise AssertionError(f"os._exit({code}) reached: the process would have ended")

    monkeypatch.setattr(os, "_exit", process_exit)

    def quitter(prompts, responses):
        os._exit(0)

    with pytest.raises(UserError, match=r"reward function q.py:f called os._exit\(0\).*unfinished"):
        call_function(quitter, ["p"], ["a"], [True], "q.py:f")
    assert os._exit is process_exit  # the guard is gone once the call returns
