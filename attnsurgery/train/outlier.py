"""The ``outlier`` objective term: how far the residual stream's largest activation stands above its typical one.

A static per-tensor 8-bit quantiser (the W8A8 of the outlier tables) fixes one range per tensor; SmolLM2's
residual stream carries a ~2e4 activation on the first token from layer 11 on, so the range step of every later
residual quantiser swamps the other tokens' values. The damage is set by the *crest factor* ``max|x| / rms(x)``
of the tensor, not by its scale. The term is the mean over decoder layers and sequences of
``log(max|x| / rms(x))`` of each decoder layer's output (the residual stream after the block; per sequence over
its tokens and channels): scale-free, about 1.5-2 for Gaussian-like activations, about 6 for SmolLM2's layers
that carry the massive activation. Bondarenko et al. fine-tuned OPT with "a small FFN activation regulariser"
next to their gates; this one penalises the property the quantiser suffers from directly.

The term is read with forward hooks on the decoder layers during the student pass only (the teacher pass of
``kd`` runs without them). Packed training windows have no padding, so every token counts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def log_crest(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B,) ``log(max|x| / rms(x))`` of each sequence of ``x`` (B, T, d), in fp32."""
    x = x.float().flatten(1)
    peak = x.abs().amax(dim=1)
    rms = x.pow(2).mean(dim=1).add(eps).sqrt()
    return torch.log(peak + eps) - torch.log(rms)


class OutlierReader:
    """Collects :func:`log_crest` of each decoder layer's output while active (a context manager)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.values: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        x = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            self.values.append(log_crest(x).mean())

    def __enter__(self) -> OutlierReader:
        self.values = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def take(self) -> torch.Tensor | None:
        """Mean over the layers of the last forward (None when none ran), and forget them."""
        if not self.values:
            return None
        values, self.values = self.values, []
        return torch.stack([v.to(values[0].device) for v in values]).mean()
