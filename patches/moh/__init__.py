"""``moh``: Mixture-of-Head attention -- shared heads plus top-k routed heads per token, the routed-off heads'
work skipped (Jin et al., MoH, ICML 2025, arXiv 2410.11842)."""

from .config import GATES, ROUTERS, MoHConfig
from .surgery import MoHRouter, MoHSurgery

SURGERY = MoHSurgery
__all__ = ["GATES", "ROUTERS", "SURGERY", "MoHConfig", "MoHRouter", "MoHSurgery"]
