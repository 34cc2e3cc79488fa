"""``vhr``: VHR vision-aware head reinforcement (He et al., ACL 2025), on the per-head output stage."""

from .config import VhrConfig
from .surgery import VhrSurgery

SURGERY = VhrSurgery
__all__ = ["SURGERY", "VhrConfig", "VhrSurgery"]
