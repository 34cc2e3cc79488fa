from __future__ import annotations

import torch

from attnsurgery.surgery import AttentionTile, Stage, Surgery

from .config import ClippedSoftmaxConfig


class ClippedSoftmaxSurgery(Surgery):
    """Clipped softmax: ``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)`` replaces the softmax.

    Lets a head put exact zeros on tokens (a "no-op" head without a sink) so outliers need not grow; rows no
    longer sum to 1. Computed in fp32 on the engine's tiled path (O(block x n) memory). Training-free here
    means "applied to a softmax-trained model", which changes its function; the paper pretrains with it.
    Paper: Bondarenko, Nagel, Blankevoort, "Quantizable Transformers: Removing Outliers by Helping Attention
    Heads Do Nothing", NeurIPS 2023 (arXiv 2306.12929).

    >>> patch(model, "clipped_softmax", gamma=-12 / 512)
    """

    name = "clipped_softmax"
    config_class = ClippedSoftmaxConfig
    summary = "Clipped softmax clip((zeta-gamma)*softmax+gamma, 0, 1) as the normaliser (tiled path)"
    paper = "Bondarenko et al., Quantizable Transformers, NeurIPS 2023 (arXiv 2306.12929)"
    stages = frozenset({Stage.NORMALIZE})
    example_args = {"gamma": -0.03, "zeta": 1.02}

    def active_stages(self, layer_idx: int) -> frozenset[Stage]:
        # gamma=0, zeta=1 is exactly softmax: leave the layer on the fused kernel
        if self.config.gamma == 0.0 and self.config.zeta == 1.0:
            return frozenset()
        return super().active_stages(layer_idx)

    def normalize(self, scores: torch.Tensor, tile: AttentionTile) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)  # fp32 scores from the engine
        heads = self.targets.heads_of(tile.call.layer_idx)
        stretch = self.config.zeta - self.config.gamma
        if heads is None and not probs.requires_grad:  # in place: one pass, no extra block-sized buffer
            return probs.mul_(stretch).add_(self.config.gamma).clamp_(0.0, 1.0)
        # out of place under autograd (fine-tuning): softmax's backward needs its output unchanged
        clipped = (stretch * probs + self.config.gamma).clamp(0.0, 1.0)
        if heads is None:
            return clipped
        # only the targeted heads are clipped; the others keep plain softmax
        mask = self.targets.head_mask(tile.call.layer_idx, probs.device)[None, :, None, None]
        return torch.where(mask, clipped, probs)
