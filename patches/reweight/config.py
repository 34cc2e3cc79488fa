from __future__ import annotations

from dataclasses import dataclass

from attnsurgery.surgery import SurgeryConfig, arg


@dataclass
class ReweightConfig(SurgeryConfig):
    """Arguments of ``reweight``: ``B = ReLU(A * N_i - offset)^p``, renormalised. ``p=1, offset=0`` is the identity;
    the paper's setting is ``p=15`` (3 at 1k tokens), ``offset=1`` except on the first ``free_rows`` rows."""

    p: float = arg(1.0, doc="Sharpening power (paper: 15 at >= 8k tokens, 3 at 1k).", low=1.0, high=64.0)
    offset: float = arg(
        0.0,
        doc="Subtracted from A * N_i before the ReLU (paper: 1, the uniform level): keeps only above-uniform "
        "weights.",
        low=0.0,
        high=1.0,
    )
    free_rows: int = arg(
        3,
        doc="The first free_rows real tokens of each sequence get offset 0 (paper: 3), so no row is emptied.",
        low=0,
    )
