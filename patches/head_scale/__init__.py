"""``head_scale``: scale or silence chosen heads' outputs before the output projection."""

from .config import HeadScaleConfig
from .surgery import HeadScaleSurgery

SURGERY = HeadScaleSurgery
__all__ = ["SURGERY", "HeadScaleConfig", "HeadScaleSurgery"]
