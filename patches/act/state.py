"""The ACT head sweep's resumable state: a JSON-lines file with a header (the fingerprint of model weights, data,
tokenizer and ACT arguments), the baseline's log-likelihoods and one line per finished head. Resuming on another
fingerprint is refused, so scores of different calibrations are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnsurgery.errors import AttnSurgeryError

STATE_VERSION = 1


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Name, shape and a weight checksum: resuming on other weights must be refused, not silently mixed."""
    config = model.config
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        try:
            h.update(f"{float(p.detach().sum(dtype=torch.float64)):.10e}".encode())
        except (RuntimeError, NotImplementedError):  # meta / offloaded tensors: shapes only
            pass
    return {
        "name": str(getattr(config, "_name_or_path", "") or type(model).__name__),
        "model_type": getattr(config, "model_type", None),
        "weights": h.hexdigest()[:16],
    }


class StateFile:
    """JSON lines: a header with the fingerprint, then the baseline and one line per finished head."""

    def __init__(self, path: str | Path | None, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path) if path is not None else None
        self.baseline: list[list[float]] | None = None
        self.heads: dict[tuple[int, int], list[list[float]]] = {}
        if self.path is None:
            return
        if self.path.is_file() and self.path.stat().st_size > 0:
            self._read(fingerprint)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"type": "header", "version": STATE_VERSION, "fingerprint": fingerprint})

    def _read(self, fingerprint: dict[str, Any]) -> None:
        lines = self.path.read_text().splitlines()
        entries = []
        for i, line in enumerate(lines):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # a write cut short by an interrupt: that head is simply redone
                    break
                raise AttnSurgeryError(
                    f"{self.path}: line {i + 1} is not JSON; the state file is corrupt."
                ) from None
        if not entries or entries[0].get("type") != "header":
            raise AttnSurgeryError(f"{self.path} is not an ACT calibration state file (no header line).")
        saved = entries[0].get("fingerprint", {})
        if saved != fingerprint:
            diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            raise AttnSurgeryError(
                f"{self.path} was written for a different calibration ({', '.join(diff)} differ: saved "
                f"{ {k: saved.get(k) for k in diff} }, now { {k: fingerprint.get(k) for k in diff} }). Resuming "
                "would mix incomparable scores; pass another state path or delete this file."
            )
        for e in entries[1:]:
            if e.get("type") == "baseline":
                self.baseline = e["ll"]
            elif e.get("type") == "head":
                self.heads[(int(e["layer"]), int(e["head"]))] = e["ll"]
        # a truncated last line is rewritten away so later appends start on a fresh line
        good = "".join(json.dumps(e) + "\n" for e in entries)
        if good != self.path.read_text():
            self.path.write_text(good)

    def _append(self, entry: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_baseline(self, ll: list[list[float]]) -> None:
        self.baseline = ll
        self._append({"type": "baseline", "ll": ll})

    def add_head(self, layer: int, head: int, ll: list[list[float]], seconds: float) -> None:
        self.heads[(layer, head)] = ll
        self._append({"type": "head", "layer": layer, "head": head, "ll": ll, "seconds": round(seconds, 3)})


def finished_heads(path: Path) -> set[tuple[int, int]]:
    """(layer, head) pairs an earlier, interrupted sweep already finished (for the estimate; the sweep itself
    checks the fingerprint)."""
    done: set[tuple[int, int]] = set()
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("type") == "head":
            done.add((int(entry["layer"]), int(entry["head"])))
    return done
