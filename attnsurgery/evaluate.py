"""Moved to :mod:`attnsurgery.eval.text` (runner), :mod:`attnsurgery.eval.text_tables` (table definitions) and
:mod:`attnsurgery.eval.report` (rendering). Old imports from here keep working."""

from ._moved import forward_to

__getattr__ = forward_to(
    ("attnsurgery.eval.text", "attnsurgery.eval.text_tables", "attnsurgery.eval.report"),
    {"_slug": "slug", "_load_tasks": "load_tasks", "_p_label": "p_label", "_fmt": "fmt_value"},
)
