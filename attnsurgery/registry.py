"""Surgeries by name, loaded lazily.

Built-in surgeries are the folders of ``attnsurgery.patches`` (the top-level ``patches/`` directory); a folder
is imported only when its surgery is first asked for, so ``attnsurgery list`` and ``--help`` stay fast.
Third-party packages add surgeries with :func:`register_surgery` or the ``attnsurgery.surgeries`` entry-point
group (``name = "package.module:SurgeryClass"``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
from dataclasses import dataclass

from .errors import UnknownSurgeryError, did_you_mean
from .surgery import Surgery

_PATCHES = "attnsurgery.patches"
_REGISTRY: dict[str, type[Surgery] | str] = {}  # name -> class, or "module:attr" not yet imported
_SCANNED = False


def _scan() -> None:
    global _SCANNED
    if _SCANNED:
        return
    _SCANNED = True
    for entry in importlib.resources.files(_PATCHES).iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file() and not entry.name.startswith("_"):
            _REGISTRY.setdefault(entry.name, f"{_PATCHES}.{entry.name}:SURGERY")
    for ep in importlib.metadata.entry_points(group="attnsurgery.surgeries"):
        _REGISTRY.setdefault(ep.name, ep.value)


def register_surgery(cls: type[Surgery]) -> type[Surgery]:
    """Register a surgery class under ``cls.name`` (usable as a decorator). Duplicates fail loudly."""
    _scan()
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`.")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"a surgery named {cls.name!r} is already registered ({existing}).")
    _REGISTRY[cls.name] = cls
    return cls


def get_surgery_class(name: str) -> type[Surgery]:
    _scan()
    entry = _REGISTRY.get(name)
    if entry is None:
        raise UnknownSurgeryError(
            f"unknown surgery {name!r}.{did_you_mean(name, _REGISTRY)} "
            f"Available: {', '.join(sorted(_REGISTRY))} (see `attnsurgery list`)."
        )
    if isinstance(entry, str):
        module_name, attr = entry.split(":")
        cls = getattr(importlib.import_module(module_name), attr)
        if not (isinstance(cls, type) and issubclass(cls, Surgery)) or cls.name != name:
            raise TypeError(f"{entry} does not define a Surgery named {name!r}.")
        _REGISTRY[name] = entry = cls
    return entry


@dataclass(frozen=True)
class SurgeryInfo:
    name: str
    summary: str
    paper: str
    stages: tuple[str, ...]


def list_surgeries() -> list[SurgeryInfo]:
    """Every registered surgery with a one-line summary, sorted by name."""
    _scan()
    out = []
    for name in sorted(_REGISTRY):
        cls = get_surgery_class(name)
        out.append(SurgeryInfo(name, cls.summary, cls.paper, tuple(sorted(s.value for s in cls.stages))))
    return out
