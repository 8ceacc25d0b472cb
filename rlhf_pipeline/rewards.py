"""Reward (and gold) functions named in recipes: `package.module:function` or `path/to/file.py:function`.

Two conventions, told apart by the function's parameters:

- ours: `f(prompts, responses)` over lists of strings, returning one float per response. If it accepts a `finished`
  keyword (or **kwargs) it also gets, for each response, whether generation stopped at EOS.
- TRL's (GRPOTrainer / RLOOTrainer), for any function with a parameter named `completions` or `completion_ids`:
  `f(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_metric=..., log_extra=..., **columns)`,
  where `columns` are the prompt dataset's other columns, row for row; for conversational data prompts and
  completions are message lists. So a function written for TRL (e.g. from `trl.rewards`) plugs in unchanged. A
  function without **kwargs gets only the keywords it names.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import math
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import UserError

RewardFunction = Callable[..., Sequence[float]]


def check_spec(spec: str) -> None:
    """What can be told of a function spec without running any of its code (for --dry-run and `rlhf recipe
    validate`): its shape, that a `file.py` exists, that a module's top-level package is installed. UserError if
    not."""
    target, _, name = spec.rpartition(":")
    if not target or not name or not name.isidentifier():
        raise UserError(f"{spec!r}: expected `module:function` or `path/to/file.py:function`")
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise UserError(f"{spec!r}: no such file {target} (relative paths start at {Path.cwd()})")
        return
    top = target.split(".")[0]
    try:
        found = all(part.isidentifier() for part in target.split(".")) and importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UserError(f"{spec!r}: no module {top!r} can be imported here (a file is named `path/to/file.py:"
                        "function`)")


def load_function(spec: str) -> RewardFunction:
    """Import the callable named by `module:function` or `file.py:function`; UserError if it cannot."""
    check_spec(spec)
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            module_name = f"rlhf_user_reward_{abs(hash(path.resolve()))}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            with no_exit():
                module_spec.loader.exec_module(module)
        else:
            with no_exit():
                module = importlib.import_module(target)
    except UserError:
        raise
    except ExitCalled as exc:
        raise UserError(f"{spec!r}: importing {target} called os._exit({exc.code}); a reward module must define its "
                        "function without running anything at import") from None
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


def uses_trl_convention(function: RewardFunction) -> bool:
    """Whether the function is written for TRL's trainers (which pass everything by keyword): it names a
    `completions` or `completion_ids` parameter."""
    try:
        return bool({"completions", "completion_ids"} & set(inspect.signature(function).parameters))
    except (TypeError, ValueError):
        return False


def trl_keywords(function: RewardFunction, name: str, keywords: dict) -> dict:
    """The keywords a TRL-convention function receives: all of them with **kwargs, else those it names; a parameter
    it requires that nothing provides is a UserError naming what there is."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return keywords
    missing = [p.name for p in parameters.values() if p.name not in keywords and p.default is inspect.Parameter.empty
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        columns = [k for k in keywords if k not in TRL_KEYWORDS]
        raise UserError(f"reward function {name} needs {', '.join(repr(m) for m in missing)}, which the prompt data "
                        f"does not provide (its other columns: {', '.join(columns) or 'none'}; TRL's keywords: "
                        f"{', '.join(TRL_KEYWORDS)})")
    return {k: v for k, v in keywords.items() if k in parameters}


TRL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")


def call_function(function: RewardFunction, prompts: list, responses: list, finished: list[bool],
                  name: str | None = None, keywords: dict | None = None) -> list[float]:
    """Call a reward function and check that it returned one float per response, finite in float32 (the dtype
    scores train in); anything else (it raised, exited, returned a dict, a string or the wrong count, a None, a NaN
    or 1e39) is a UserError naming the function (`name`: as the recipe spells it) and what was wrong. It is given
    copies of its arguments: a function that edits them cannot change what the gold scorer, the samples and the log
    see. `keywords`: for a TRL-convention function, what it gets besides prompts and completions (completion_ids,
    the dataset's columns, trainer_state, log_metric, log_extra)."""
    name = name or f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', function)}"
    given_prompts, given_responses = copy.deepcopy(prompts), copy.deepcopy(responses)
    if uses_trl_convention(function):
        offered = {"prompts": given_prompts, "completions": given_responses,
                   **{k: copy.deepcopy(v) if isinstance(v, (list, dict)) else v for k, v in (keywords or {}).items()}}
        chosen = trl_keywords(function, name, offered)
        call = lambda: function(**chosen)  # noqa: E731
    elif accepts_finished(function):
        call = lambda: function(given_prompts, given_responses, finished=list(finished))  # noqa: E731
    else:
        call = lambda: function(given_prompts, given_responses)  # noqa: E731
    try:
        with no_exit():
            returned = call()
    except ExitCalled as exc:
        raise UserError(f"reward function {name} called os._exit({exc.code}): a reward function must return its "
                        "scores; the run stops here, unfinished") from None
    except (Exception, SystemExit) as exc:
        raise UserError(f"reward function {name} raised {type(exc).__name__}: {exc}") from None
    return checked_scores(returned, name, responses)


def checked_scores(returned: Any, name: str, responses: list) -> list[float]:
    """A reward function's return value as one float per response, finite in float32; UserError otherwise."""
    if hasattr(returned, "tolist") and not isinstance(returned, (str, bytes)):  # a numpy array or a torch tensor
        returned = returned.tolist()
    if not isinstance(returned, (list, tuple)):
        kind = type(returned).__name__
        hint = {"dict": ": its keys would be taken for scores", "str": ": it would be read character by character"}
        raise UserError(f"reward function {name} returned a {kind}, not a list of numbers (one per response)"
                        f"{hint.get(kind, '')}")
    nones = [i for i, s in enumerate(returned) if s is None]
    if nones:
        raise UserError(f"reward function {name} returned None for {len(nones)} response(s), e.g. response "
                        f"{nones[0]}: TRL sums several functions and skips a None; here the one function must score "
                        "every response")
    texts = [i for i, s in enumerate(returned) if isinstance(s, (str, bytes))]
    if texts:
        raise UserError(f"reward function {name} returned text, not a number, for response {texts[0]} "
                        f"({returned[texts[0]]!r})")
    try:
        scores = [float(s) for s in returned]
    except (TypeError, ValueError, OverflowError) as exc:
        raise UserError(f"reward function {name} returned {type(returned).__name__}, not one number per response "
                        f"({exc})") from None
    if len(scores) != len(responses):
        raise UserError(f"reward function {name} returned {len(scores)} scores for {len(responses)} responses")
    bad = [(i, s) for i, s in enumerate(scores) if not finite_in_float32(s)]
    if bad:
        index, value = bad[0]
        raise UserError(f"reward function {name} returned {len(bad)} score(s) that are not finite in float32 (the "
                        f"dtype scores train in), e.g. {value} for response {index} ({str(responses[index])[:60]!r})")
    return scores


def finite_in_float32(value: float) -> bool:
    """Whether `value` is finite once rounded to float32 (1e39 is not: it rounds to infinity)."""
    return math.isfinite(struct.unpack("f", struct.pack("f", value))[0])


class ExitCalled(BaseException):
    """os._exit called by a reward function (under `no_exit`): a BaseException, so that its `except Exception`
    cannot swallow it."""

    def __init__(self, code: Any):
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def no_exit() -> Iterator[None]:
    """While the block runs, os._exit called from this thread raises ExitCalled instead of ending the process at
    once, exit status 0 included, with the run unfinished and nothing said. A forked child (multiprocessing) and
    other threads still exit as they ask. sys.exit is a SystemExit, caught like any exception."""
    real_exit, pid, thread = os._exit, os.getpid(), threading.get_ident()

    def refuse(code: int = 0) -> None:
        if os.getpid() != pid or threading.get_ident() != thread:
            real_exit(code)
        raise ExitCalled(code)

    os._exit = refuse
    try:
        yield
    finally:
        os._exit = real_exit
