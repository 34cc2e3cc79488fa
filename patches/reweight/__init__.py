"""``reweight`` (experimental): fine-tuning-free re-weighting of attention probabilities (Gao & Spratling 2025)."""

from .config import ReweightConfig
from .surgery import ReweightSurgery

SURGERY = ReweightSurgery
__all__ = ["SURGERY", "ReweightConfig", "ReweightSurgery"]
