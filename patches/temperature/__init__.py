"""``temperature``: fixed per-layer/per-head temperature and the Selective Attention position temperature."""

from .config import TemperatureConfig
from .surgery import TemperatureSurgery

SURGERY = TemperatureSurgery
__all__ = ["SURGERY", "TemperatureConfig", "TemperatureSurgery"]
