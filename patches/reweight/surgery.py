from __future__ import annotations

import torch

from attnsurgery.surgery import AttentionTile, Stage, Surgery

from .config import ReweightConfig


class ReweightSurgery(Surgery):
    """EXPERIMENTAL on softmax models. Re-weight attention probabilities: ``B_ij = ReLU(A_ij N_i - O_ij)^p``,
    ``A'_ij = B_ij / sum_j B_ij``, where ``N_i`` is the number of keys query ``i`` sees and ``O`` is ``offset``
    except on the first ``free_rows`` real tokens (0 there).

    ``A N_i`` recentres weights on 1 (the uniform level), the ReLU keeps above-uniform tokens and ``p`` sharpens
    (``p -> inf`` is argmax). From Gao & Spratling, "Softplus attention with re-weighting boosts length
    extrapolation" (arXiv 2501.13428), where it is paired with softplus attention in trained models; the paper
    reports softmax + re-weighting alone doing *worse* at 8k. Applied to a pretrained softmax model it is an
    experiment, not a reproduction. Runs on the tiled path in fp32; rows are scaled by their maximum before the
    power, so ``p=15`` cannot overflow. A row with nothing above its offset is left unchanged (no 0/0).

    >>> patch(model, "reweight", p=3, offset=1.0)
    """

    name = "reweight"
    config_class = ReweightConfig
    summary = "EXPERIMENTAL: re-weight probabilities ReLU(A*N - O)^p, renormalised (softplus-attention paper)"
    paper = "Gao & Spratling, Softplus Attention with Re-weighting, arXiv 2501.13428"
    stages = frozenset({Stage.PROBS})
    example_args = {"p": 3.0, "offset": 1.0}

    def active_stages(self, layer_idx: int) -> frozenset[Stage]:
        if self.config.p == 1.0 and self.config.offset == 0.0:
            return frozenset()  # exactly A: rows already sum to 1
        return super().active_stages(layer_idx)

    def probs(self, probs: torch.Tensor, tile: AttentionTile) -> torch.Tensor:
        visible_keys = tile.allowed.sum(-1, keepdim=True).to(probs)  # (B|1, 1, bq, 1): N_i
        first = tile.positions.to(probs.device) < self.config.free_rows  # (B, bq)
        offset = torch.where(first, 0.0, self.config.offset)[:, None, :, None].to(probs)
        weights = (probs * visible_keys - offset).clamp_(min=0.0)
        top = weights.amax(dim=-1, keepdim=True)
        weights = (weights / top.clamp(min=1e-30)).pow_(self.config.p)  # in [0, 1]: no overflow at large p
        total = weights.sum(dim=-1, keepdim=True)
        out = weights / total.clamp(min=1e-30)
        heads = self.targets.heads_of(tile.call.layer_idx)
        keep = total > 0
        if heads is not None:
            keep = keep & self.targets.head_mask(tile.call.layer_idx, probs.device)[None, :, None, None]
        return torch.where(keep, out, probs)
