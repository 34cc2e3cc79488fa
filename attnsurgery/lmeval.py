"""Moved to :mod:`attnsurgery.eval.lmeval`; this module keeps ``import attnsurgery.lmeval`` (which registers
lm-eval's ``--model attnsurgery``) and its names working."""

from .eval.lmeval import (  # noqa: F401
    SurgeryLM,
    _parse_surgery_args,
    degenerate_fraction,
    harness_main,
    include_path,
)
