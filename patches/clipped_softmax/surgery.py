from __future__ import annotations

import torch

from attnsurgery import flex, rowblock
from attnsurgery.surgery import AttentionCall, AttentionTile, Stage, Surgery

from .config import ClippedSoftmaxConfig


class ClippedSoftmaxSurgery(Surgery):
    """Clipped softmax: ``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)`` replaces the softmax.

    Lets a head put exact zeros on tokens (a "no-op" head without a sink) so outliers need not grow; rows no
    longer sum to 1. Computed in fp32 on the engine's tiled path (O(block x n) memory). Training-free here
    means "applied to a softmax-trained model", which changes its function; the paper pretrains with it.
    Paper: Bondarenko, Nagel, Blankevoort, "Quantizable Transformers: Removing Outliers by Helping Attention
    Heads Do Nothing", NeurIPS 2023 (arXiv 2306.12929). On a GPU (inference) it runs as two flash-style passes
    (:func:`attnsurgery.flex.clipped_softmax`): a log-sum-exp pass, then one whose score_mod is the clipped
    probability; composed with other probability-level surgeries, in training and on CPU, the tiled path.

    >>> patch(model, "clipped_softmax", gamma=-12 / 512)
    """

    name = "clipped_softmax"
    config_class = ClippedSoftmaxConfig
    summary = (
        "Clipped softmax clip((zeta-gamma)*softmax+gamma, 0, 1) as the normaliser (fused on GPU, else tiled)"
    )
    paper = "Bondarenko et al., Quantizable Transformers, NeurIPS 2023 (arXiv 2306.12929)"
    stages = frozenset({Stage.NORMALIZE})
    fused = True  # alone on a layer: its own kernel (the flex passes on a GPU; it declines elsewhere)
    example_args = {"gamma": -0.03, "zeta": 1.02}

    def active_stages(self, layer_idx: int) -> frozenset[Stage]:
        # gamma=0, zeta=1 is exactly softmax: leave the layer on the fused kernel
        if self.config.gamma == 0.0 and self.config.zeta == 1.0:
            return frozenset()
        return super().active_stages(layer_idx)

    def attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, call: AttentionCall
    ) -> torch.Tensor | None:
        heads = self.targets.head_mask(call.layer_idx, query.device)
        stretch, gamma = self.config.zeta - self.config.gamma, self.config.gamma
        if not flex.flex_ready(query, call):
            if rowblock.ready(call):  # CPU inference: one compiled pass (lse, then the clipped row, per row)
                out, _, _ = rowblock.attention(
                    query,
                    key,
                    value,
                    call.attention_mask,
                    scaling,
                    call.is_causal,
                    clip=(heads, stretch, gamma),
                )
                return out.transpose(1, 2).to(query.dtype)
            return None  # the engine's tiled path, with :meth:`normalize`
        try:
            out = flex.clipped_softmax(
                query, key, value, flex.Visibility.of(call), scaling, stretch, gamma, heads,
            )  # fmt: skip
        except Exception as err:  # a compiler failure on this machine: the engine's tiled path
            flex.give_up(err)
            return None
        return out.transpose(1, 2)

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
