"""Plain VHR, written the way the paper describes it: hooks on each layer's ``o_proj`` input of a stock model,
an explicit text-only forward, one batch row. The engine path (a head-output stage on transformers' attention
seam, batched) is tested against it.
"""

from __future__ import annotations

from typing import Any

import torch


def select_heads(
    with_image: torch.Tensor, text_only: torch.Tensor, outlier_filter: bool = True
) -> torch.Tensor:
    """(H,) bool: heads whose vision-aware head divergence is above the layer median (paper Eqs. 4, 6, 7).

    ``with_image`` / ``text_only``: (H, Dh) head outputs of the query with and without the image.
    """
    vhd = (with_image.double() - text_only.double()).norm(dim=-1)
    if outlier_filter:
        ta = text_only.double().pow(2).sum(-1)
        outlier = (vhd > vhd.mean() + vhd.std(unbiased=False)) & (ta > ta.mean() + ta.std(unbiased=False))
        vhd = torch.where(outlier, torch.zeros_like(vhd), vhd)
    return vhd > vhd.median()


@torch.no_grad()
def vhr_reference(
    model: Any,
    inputs: dict[str, torch.Tensor],
    text_inputs: dict[str, torch.Tensor],
    layers: list[int],
    alpha: float,
    outlier_filter: bool = True,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(logits, {layer: selected heads (H,)}) of one prompt (batch 1, no padding) under VHR.

    The text-only forward runs the stock model; the with-image forward selects each layer's heads from its last
    position, layer by layer (earlier layers already reinforced), and scales them at every position.
    """
    decoder = model.get_decoder()
    attn = [layer.self_attn for layer in decoder.layers]
    heads = model.config.get_text_config().num_attention_heads
    text: dict[int, torch.Tensor] = {}
    chosen: dict[int, torch.Tensor] = {}

    def record(idx: int):
        def hook(module, args):
            text[idx] = args[0][0, -1].view(heads, -1).clone()

        return hook

    def reinforce(idx: int):
        def hook(module, args):
            x = args[0]
            out = x.view(*x.shape[:-1], heads, -1)
            chosen[idx] = select_heads(out[0, -1], text[idx], outlier_filter)
            scale = torch.where(chosen[idx], alpha, 1.0).to(x.dtype)
            return ((out * scale[:, None]).view_as(x),)

        return hook

    handles = [attn[i].o_proj.register_forward_pre_hook(record(i)) for i in layers]
    try:
        model(**text_inputs)
    finally:
        for h in handles:
            h.remove()
    handles = [attn[i].o_proj.register_forward_pre_hook(reinforce(i)) for i in layers]
    try:
        logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return logits, chosen
