"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

EXIT_ENVIRONMENT = 1
EXIT_USER_ERROR = 2
EXIT_GATE_FAILED = 3
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input (a recipe, a path, a flag): shown as a message, never as a traceback."""


class DiskFull(UserError):
    """The disk filled up while writing: a message naming where, exit code 1 (not the user's input)."""


class GateFailed(Exception):
    """A pipeline quality gate stopped the run (e.g. reward accuracy under the threshold): exit code 3."""


class Interrupted(Exception):
    """Ctrl-C stopped a run after saving what it could: exit code 130, with the command that resumes it."""

    def __init__(self, message: str, resume_command: str | None = None):
        super().__init__(message)
        self.resume_command = resume_command


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where (file, line, dotted key) and what was expected."""

    message: str
    key: str = ""
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.file or "<recipe>"
        if self.line:
            where += f":{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class KeyedValueError(ValueError):
    """A validator's findings about particular keys (dotted, relative to the section it validates), so that each
    error points at its own key's line rather than at the section's."""

    def __init__(self, problems: Iterable[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{key}: {message}" for key, message in self.problems))


class RecipeError(UserError):
    """One or more problems in a recipe (or in what it points to: data files, columns, models)."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice spelt most like `word`, if any is close."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest choice, or ''."""
    match = closest(word, choices)
    return f"; did you mean '{match}'?" if match else ""


def unreadable(exc: BaseException) -> str:
    """Why a file could not be read, on one line, from the exception its reader raised."""
    text = str(exc).strip()
    if "Weights only load failed" in text:  # torch.load's long UnpicklingError
        return "torch.load(weights_only=True) refused it: not plain tensors (a pickle of code is never run)"
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first and first != type(exc).__name__ else type(exc).__name__
