"""``gated_attention``: learnable sigmoid gates on each head's output before ``o_proj`` (Qiu et al. 2025 G1;
Bondarenko et al. 2023)."""

from .config import FORMS, GatedAttentionConfig
from .surgery import GatedAttentionSurgery

SURGERY = GatedAttentionSurgery
__all__ = ["FORMS", "SURGERY", "GatedAttentionConfig", "GatedAttentionSurgery"]
