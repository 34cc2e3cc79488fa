"""``clipped_softmax``: clip((zeta - gamma) * softmax + gamma, 0, 1), on the tiled path."""

from .config import ClippedSoftmaxConfig
from .surgery import ClippedSoftmaxSurgery

SURGERY = ClippedSoftmaxSurgery
__all__ = ["SURGERY", "ClippedSoftmaxConfig", "ClippedSoftmaxSurgery"]
