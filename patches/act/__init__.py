"""``act``: ACT attention-sink calibration (Yu et al., ICML 2024), exact on a fused kernel."""

from .config import ActConfig
from .surgery import ActSurgery

SURGERY = ActSurgery
__all__ = ["SURGERY", "ActConfig", "ActSurgery"]
