"""Reward (and gold) functions named in recipes: `package.module:function` or `path/to/file.py:function`.

A function takes the prompts and responses as lists of strings and returns one float per response. If it accepts a
`finished` keyword (or **kwargs) it also gets, for each response, whether generation stopped at EOS.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rlhf_pipeline.errors import UserError

RewardFunction = Callable[..., Sequence[float]]


def load_function(spec: str) -> RewardFunction:
    """Import the callable named by `module:function` or `file.py:function`; UserError if it cannot."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UserError(f"{spec!r}: expected `module:function` or `path/to/file.py:function`")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UserError(f"{spec!r}: no such file {target} (relative paths start at {Path.cwd()})")
            module_name = f"rlhf_user_reward_{abs(hash(path.resolve()))}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as exc:  # the user's module failed to import: say which and why
        raise UserError(f"{spec!r}: cannot import {target}: {type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        public = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise UserError(f"{spec!r}: {target} has no function {name!r} (it has: {', '.join(public[:12])})")
    return function


def accepts_finished(function: RewardFunction) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "finished" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def call_function(function: RewardFunction, prompts: list[str], responses: list[str],
                  finished: list[bool]) -> list[float]:
    """Call a reward function and check that it returned one finite float per response."""
    if accepts_finished(function):
        scores = function(prompts, responses, finished=finished)
    else:
        scores = function(prompts, responses)
    scores = [float(s) for s in scores]
    if len(scores) != len(responses):
        raise UserError(f"reward function {getattr(function, '__name__', function)} returned {len(scores)} scores "
                        f"for {len(responses)} responses")
    if not all(math.isfinite(s) for s in scores):
        raise UserError(f"reward function {getattr(function, '__name__', function)} returned a non-finite score")
    return scores
