"""Old module paths kept working after the layout split core / eval / train / patches (see the README's layout)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def forward_to(homes: Sequence[str], renamed: Mapping[str, str] = {}) -> Callable[[str], Any]:  # noqa: B006
    """A module ``__getattr__`` that finds a name in ``homes`` (imported on first use) under its new name."""

    def __getattr__(name: str) -> Any:
        new = renamed.get(name, name)
        for home in homes:
            module = importlib.import_module(home)
            if hasattr(module, new):
                return getattr(module, new)
        raise AttributeError(f"{homes[0]} and its siblings have no attribute {name!r}")

    return __getattr__
