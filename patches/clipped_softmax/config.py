from __future__ import annotations

from dataclasses import dataclass

from attnsurgery.surgery import SurgeryConfig, arg


@dataclass
class ClippedSoftmaxConfig(SurgeryConfig):
    """Arguments of ``clipped_softmax`` (the paper's names). gamma=0, zeta=1 is the identity.

    The paper's OPT runs use gamma = -alpha / T (alpha=12, T=512 -> -0.0234375), zeta=1; BERT gamma=-0.025.
    """

    gamma: float = arg(
        0.0,
        doc="Lower stretch gamma <= 0: probabilities below -gamma/(zeta-gamma) become exact zeros.",
        low=-1.0,
        high=0.0,
    )
    zeta: float = arg(
        1.0,
        doc="Upper stretch zeta >= 1: probabilities above (1-gamma)/(zeta-gamma) become exact ones.",
        low=1.0,
        high=2.0,
    )
