"""``var``: VAR visual attention redistribution (Kang et al., ICLR 2025), exact on a fused kernel."""

from .config import KNOWN_SINK_DIMS, VarConfig
from .surgery import VarSurgery

SURGERY = VarSurgery
__all__ = ["KNOWN_SINK_DIMS", "SURGERY", "VarConfig", "VarSurgery"]
