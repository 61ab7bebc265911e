"""Exceptions that mean "the user's input is wrong" (exit code 2, one line, no traceback).

Anything else that escapes an action is an internal failure (exit code 1).  Each error renders as one line:
``<what> : <problem>`` followed, when known, by a hint saying what to do.
"""
from __future__ import annotations

import re

_LAST_LINE = re.compile(r"^[\w.]*(?:Error|Exception)\w*: (?P<line>.+)$")


def _original_line(message: str) -> str:
    """The error's own one line from a message that may wrap it in a traceback (the traceback's last line,
    without its ``package.ExceptionType: `` prefix); the message folded to one line otherwise."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) > 1:
        match = _LAST_LINE.match(lines[-1])
        if match:
            return match.group("line")
    return " ".join(lines)


class TaoUserError(Exception):
    """Bad input from the user: a spec value, a file, a dataset record or a checkpoint.

    ``subject`` names the field, file (with line) or value at fault; ``hint`` says what to do.
    """

    exit_code = 2

    def __init__(self, subject: str, problem: str | None = None, hint: str | None = None):
        if problem is None:
            # Rebuilt from one message: torch re-raises a DataLoader worker's exception as ``type(msg)`` with
            # msg = "Caught DataError in DataLoader worker process 0. Original Traceback ... DataError: <line>".
            subject, problem = "", _original_line(subject)
        self.subject = subject
        self.problem = problem
        self.hint = hint
        super().__init__(self.one_line())

    def __reduce__(self):
        # DataLoader workers pickle exceptions back to the main process; keep all three parts
        return (type(self), (self.subject, self.problem, self.hint))

    def one_line(self) -> str:
        text = f"{self.subject}: {self.problem}" if self.subject else self.problem
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class ConfigError(TaoUserError):
    """A spec key is unknown, mistyped, out of range, not an option, or missing for this action."""


class DataError(TaoUserError):
    """A dataset file or record cannot be used (missing file, bad JSON line, unknown label, ...)."""


class CheckpointError(TaoUserError):
    """A checkpoint or weights file cannot be loaded safely (unsafe pickle, wrong network, wrong key, tampered)."""
