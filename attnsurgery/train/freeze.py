"""Freeze a model for fitting or measuring a surgery's parameters: :func:`frozen`.

The temperature fit's own optimisation loop that lived here is gone: ``fit_temperature``
(``patches/temperature/calibrate.py``) runs on the shared trainer, :func:`attnsurgery.train.train`, like every
other trainable surgery. What is left is the context manager it measures held-out loss under.

>>> with frozen(model):
...     loss = mean_nll(model, windows, 1)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Every model weight ``requires_grad=False`` and eval mode (no dropout: the loss the fitted parameters see is
    the one inference sees); flags and mode restored afterwards. Parameters held outside the module tree (a
    trainable surgery's) are left as they are."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
