"""Training objectives: what the trainer minimises, as a weighted sum.

* ``lm`` — next-token cross-entropy of the patched model.
* ``kd`` — KL(teacher || student) over the vocabulary, per token, where the teacher is the *same model with its
  surgeries switched off* (:meth:`Engine.disabled`, under ``no_grad``): no second copy in memory.
* ``transfer`` — per-layer MSE between the patched and the unpatched attention outputs, each layer fed the
  teacher's inputs (LoLCATs' attention transfer; Hedgehog's stage 1). Only layers a surgery acts on count.
* ``sink`` — the patched model's first-token (attention-sink) share, mean over layers >= 2, as the outlier tables
  report it, with gradients (:mod:`attnsurgery.train.sink`): a penalty that moves attention off the first token.
* ``outlier`` — mean over decoder layers of ``log(max|x| / rms(x))`` of the residual stream
  (:mod:`attnsurgery.train.outlier`): a penalty on the activation outliers a static 8-bit quantiser suffers from.

Weights: ``"lm"``, ``"kd"``, ``"lm+kd"``, ``"0.5*lm+kd"``, ``"1000*transfer"``, ``"kd+0.5*sink"``, ``"kd+sink+0.1*outlier"``. Surgery regularisers
(:meth:`Surgery.regularizer`, e.g. MoH's load balance) are always added.
"""

from __future__ import annotations

import re

from ..errors import AttnSurgeryError, did_you_mean

OBJECTIVES = ("lm", "kd", "transfer", "sink", "outlier")
_TERM = re.compile(r"^\s*(?:(\d+(?:\.\d*)?(?:e-?\d+)?)\s*\*\s*)?([a-z_]+)\s*$")


class ObjectiveError(AttnSurgeryError):
    """An objective string that does not parse or names an unknown objective."""


def parse_objective(text: str) -> dict[str, float]:
    """``"0.5*lm+kd"`` -> ``{"lm": 0.5, "kd": 1.0}``; unknown names get a did-you-mean."""
    weights: dict[str, float] = {}
    for term in str(text).split("+"):
        match = _TERM.match(term)
        if not match:
            raise ObjectiveError(
                f"cannot parse objective term {term.strip()!r} in {text!r}; write e.g. 'lm', 'kd', '0.5*lm+kd'."
            )
        weight, name = float(match.group(1) or 1.0), match.group(2)
        if name not in OBJECTIVES:
            raise ObjectiveError(
                f"unknown objective {name!r}.{did_you_mean(name, OBJECTIVES)} Objectives: {', '.join(OBJECTIVES)}."
            )
        if weight <= 0:
            raise ObjectiveError(f"objective weight of {name!r} must be positive, got {weight}.")
        weights[name] = weights.get(name, 0.0) + weight
    return weights
