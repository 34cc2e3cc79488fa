"""The ``sink`` objective term: the first-token (attention-sink) share, differentiable, as a training penalty.

``outlier_stats`` reports the sink share of a model: per layer, the attention probability each real query after
the first puts on its row's first real token, averaged over heads and queries, then over sequences; the table
column is its mean over layers >= 2. The ``sink`` term is the same number computed *with gradients* on the
student pass, so ``--objective "kd+1*sink"`` asks the trainable parameters to move attention off the first token
while the ``kd`` term keeps the model's outputs. Gates give heads another way to do nothing (Qiu et al. 2025:
sparse gates are what make the sink unnecessary); the term is what pushes a retrofitted model to use it.

It is read by :class:`SinkProbe`, an internal head-output-stage surgery the trainer attaches for the run (and
removes after it): it does not change the attention output; from the layer's final ``query``/``key`` (after any
query-stage surgery) and mask it computes ``p_first = exp(s_first - logsumexp(s))`` of the plain softmax, with the
model's logit softcap when it has one. The layer keeps its kernel; the probe costs one ``q k^T`` per layer (the
scores of a ``seq_len``-token window, as eager attention would hold). Logit- and probability-stage surgeries on
the same layer (clipped softmax, ACT ...) are not reflected in the probe's number: it is the share of the stock
softmax on the layer's q and k.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..surgery import AttentionCall, Stage, Surgery, SurgeryConfig
from ..targeting import LayerHeads

#: the layers the sink share is averaged over, as the outlier tables report it (layers 0-1 rarely sink)
FIRST_SINK_LAYER = 2


def first_token_share(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None,
    query_valid: torch.Tensor,
    positions: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean over sequences of the per-sequence first-token share of one layer, differentiable.

    query (B, H, Tq, D), key (B, Hkv, Tk, D); mask: SDPA-style (bool True = attend, or additive float;
    broadcastable to (B, 1, Tq, Tk)) or None for a plain causal prefill; query_valid / positions (B, Tq) as
    :class:`AttentionCall` gives them. Counted: real queries past their row's first real token.
    """
    B, H, Tq, D = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    q = query.float().view(B, Hkv, H // Hkv, Tq, D)
    scores = torch.einsum("bkgqd,bktd->bkgqt", q, key.float()).flatten(1, 2) * scaling  # (B, H, Tq, Tk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        offset = Tk - Tq  # bottom-right aligned causal mask
        allowed = torch.arange(Tk, device=scores.device)[None, :] <= (
            torch.arange(Tq, device=scores.device)[:, None] + offset
        )
        allowed = allowed[None, None]
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > torch.finfo(mask.dtype).min / 2
        scores = scores + mask.float().clamp(min=-1e30)
    allowed = allowed.to(scores.device).expand(B, 1, Tq, Tk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    first = allowed.any(dim=2)[:, 0].float().argmax(dim=-1)  # (B,) first real key column of each row
    s_first = scores.gather(3, first.view(B, 1, 1, 1).expand(B, H, Tq, 1))[..., 0]  # (B, H, Tq)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Tq)
    counted = query_valid.to(scores.device) & (positions.to(scores.device) > 0)  # (B, Tq)
    p_first = torch.exp(s_first - torch.where(counted[:, None], lse, torch.zeros_like(lse)))
    p_first = torch.where(counted[:, None], p_first, torch.zeros_like(p_first)).mean(dim=1)  # (B, Tq)
    n = counted.sum(-1)
    has = n > 0
    if not bool(has.any()):
        return scores.new_zeros(())
    return ((p_first.sum(-1) / n.clamp(min=1))[has]).mean()


class SinkProbe(Surgery):
    """Reads each targeted layer's differentiable first-token share on the forward pass; changes nothing."""

    name = "sink_probe"
    summary = "internal: the trainer's differentiable first-token share (the 'sink' objective term)"
    stages = frozenset({Stage.HEAD_OUTPUT})

    def __init__(self, num_layers: int, num_heads: int) -> None:
        layers = frozenset(range(FIRST_SINK_LAYER, num_layers))
        super().__init__(SurgeryConfig(), LayerHeads(layers, None, num_layers, num_heads))
        self.shares: dict[int, torch.Tensor] = {}

    def head_output(self, attn_output: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        config = getattr(call.module, "config", None)
        softcap = getattr(config, "attn_logit_softcapping", None) if config is not None else None
        self.shares[call.layer_idx] = first_token_share(
            call.query,
            call.key,
            call.scaling,
            call.attention_mask,
            call.query_valid,
            call.positions,
            softcap,
        )
        return attn_output

    def take(self) -> torch.Tensor | None:
        """The mean share over the layers of the last forward (None if none ran), and forget them."""
        if not self.shares:
            return None
        shares, self.shares = self.shares, {}
        device = next(iter(shares.values())).device
        return torch.stack([s.to(device) for s in shares.values()]).mean()


def attach_probe(model: nn.Module, engine: Any) -> SinkProbe | None:
    """A :class:`SinkProbe` on every layer >= 2 of the model (None when it has no such layer)."""
    info = engine.info
    if info.num_layers <= FIRST_SINK_LAYER:
        return None
    probe = SinkProbe(info.num_layers, info.num_heads)
    engine.add(probe)
    return probe
