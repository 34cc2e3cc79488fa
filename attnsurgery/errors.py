"""Errors attnsurgery raises on bad input.

Every message names the problem and the fix. The CLI maps each class to its own exit code, so scripts can tell
"you asked for something that does not exist" from "the model crashed".
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AttnSurgeryError(Exception):
    """Base class: a problem with what the user asked for (not a bug in attnsurgery)."""

    exit_code = 2


class UnknownSurgeryError(AttnSurgeryError, KeyError):
    """A surgery name that is not registered."""

    exit_code = 3

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


class SurgeryConfigError(AttnSurgeryError, ValueError):
    """A surgery argument with a wrong name, type or range."""

    exit_code = 4


class RecipeError(AttnSurgeryError, ValueError):
    """A recipe file that is missing, malformed or names unknown keys."""

    exit_code = 5


class UnsupportedModelError(AttnSurgeryError, TypeError):
    """A model whose attention attnsurgery cannot reach through transformers' attention seam."""

    exit_code = 6


class ModelNotFoundError(AttnSurgeryError, FileNotFoundError):
    """A model alias, hub id or path that cannot be loaded here."""

    exit_code = 7

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' when a close match exists, else ''."""
    choices = list(choices)
    same_but_case = [c for c in choices if c.lower() == str(name).lower()]  # 'TEMPERATURE' -> 'temperature'
    close = same_but_case or difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""
