"""Moved to :mod:`attnsurgery.eval.vision` (runner), :mod:`attnsurgery.eval.vision_tables` (tables, data) and
:mod:`attnsurgery.eval.vision_metrics` (POPE / CHAIR scoring). Old imports from here keep working."""

from ._moved import forward_to

__getattr__ = forward_to(
    ("attnsurgery.eval.vision", "attnsurgery.eval.vision_tables", "attnsurgery.eval.vision_metrics"),
    {"_num": "fmt_percent"},
)
