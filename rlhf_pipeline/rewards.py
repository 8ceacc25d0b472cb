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
    except SystemExit as exc:  # a script-style module that exits when imported
        raise UserError(f"{spec!r}: importing {target} called sys.exit({exc.code!r}); a reward module must define "
                        "its function without running anything at import") from None
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


def call_function(function: RewardFunction, prompts: list[str], responses: list[str], finished: list[bool],
                  name: str | None = None) -> list[float]:
    """Call a reward function and check that it returned one finite float per response; anything else (it raised,
    exited, returned the wrong count or a NaN) is a UserError naming the function (`name`: as the recipe spells it)
    and what was wrong."""
    name = name or f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', function)}"
    try:
        if accepts_finished(function):
            returned = function(prompts, responses, finished=finished)
        else:
            returned = function(prompts, responses)
    except (Exception, SystemExit) as exc:
        raise UserError(f"reward function {name} raised {type(exc).__name__}: {exc}") from None
    try:
        scores = [float(s) for s in returned]
    except (TypeError, ValueError) as exc:
        raise UserError(f"reward function {name} returned {type(returned).__name__}, not one number per response "
                        f"({exc})") from None
    if len(scores) != len(responses):
        raise UserError(f"reward function {name} returned {len(scores)} scores for {len(responses)} responses")
    bad = [(i, s) for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        index, value = bad[0]
        raise UserError(f"reward function {name} returned {len(bad)} non-finite score(s), e.g. {value} for response "
                        f"{index} ({responses[index][:60]!r})")
    return scores
