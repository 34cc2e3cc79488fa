"""Mixture-of-head attention that skips the work of heads a token does not use.

MoH's released code computes every head and multiplies the outputs by a 0/1 mask, so it saves nothing (their
issue #7). Here the shared heads run as one dense attention call, and each routed head attends only the queries
routed to it: those rows are gathered (ascending, so the causal structure survives), cut into blocks of
``BLOCK_ROWS``, and each block attends keys up to its last query's column only, as a causal kernel skips the
upper triangle. Key/value heads are read in place (GQA: a routed head uses its group's key/value head, never a
copy). Which keys a gathered query sees comes from the layer's own mask rows (causality, padding, sliding
windows, additive biases), or from SDPA's upper-left causal rule when transformers passed no mask.

Scores follow the model's backend: fused SDPA on a boolean mask for SDPA models, and the eager recipe (fp32
scores, Gemma-2 logit softcapping, the additive float mask) through :func:`attnsurgery.kernels.tiled_attention`
semantics for eager models, softcapped layers and biased masks.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from attnsurgery.kernels import has_bias, softcapped, tiled_attention

#: gathered query rows per block of a routed head: smaller blocks skip more of the causal upper triangle (the
#: gathered rows of a block span ~rows/density positions), larger ones make fewer calls
BLOCK_ROWS = int(os.environ.get("ATTNSURGERY_MOH_BLOCK_ROWS", "128"))


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    *,
    is_causal: bool,
    softcap: float | None,
    eager: bool,
) -> torch.Tensor:
    """Every query of ``query`` (B, h, Tq, D) against per-head ``key``/``value`` (B, h, Tk, D): (B, Tq, h, Dv).

    The same computation as the model's stock kernel: transformers' ``sdpa_attention_forward`` rules (``is_causal``
    only for a maskless prefill, keys cut to the queries then), or the eager recipe via the exact tiled pass."""
    q_len, k_len = query.shape[2], key.shape[2]
    if eager or softcap is not None or has_bias(attention_mask):
        return tiled_attention(
            query, key, value, attention_mask, scaling, is_causal=is_causal, softcap=softcap
        )
    causal = q_len > 1 and attention_mask is None and is_causal
    if causal and k_len > q_len:  # an empty static cache's slots: SDPA's upper-left causal alignment
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=causal
    )
    return out.transpose(1, 2)


def _mask_rows(
    attention_mask: torch.Tensor | None,
    head: int,
    rows: torch.Tensor,
    k_len: int,
    q_len: int,
    is_causal: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Visibility (B, bq, Tk) bool and additive bias (fp32, or None) of the gathered query rows ``rows`` (B, bq).

    None visibility: every key is visible (a maskless decode step or a non-causal layer)."""
    bsz, bq = rows.shape
    if attention_mask is None:
        if is_causal and q_len > 1:  # upper-left causal, as SDPA's is_causal: query t sees keys 0..t
            cols = torch.arange(k_len, device=rows.device)
            return cols[None, None, :] <= rows[:, :, None], None
        return None, None
    mask = attention_mask[:, head if attention_mask.shape[1] > 1 else 0]  # (B|1, Tq|1, Tk')
    mask = mask[..., :k_len]
    if mask.shape[1] == 1:
        picked = mask.expand(bsz, bq, mask.shape[-1])
    else:
        picked = mask.expand(bsz, -1, -1).gather(1, rows[:, :, None].expand(bsz, bq, mask.shape[-1]))
    if picked.dtype == torch.bool:
        return picked, None
    allowed = picked > torch.finfo(picked.dtype).min / 2
    return allowed, torch.where(allowed, picked.float(), 0.0)


def gathered_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    head: int,
    rows: torch.Tensor,
    q_len: int,
    *,
    is_causal: bool,
    softcap: float | None,
    eager: bool,
    block_rows: int | None = None,
) -> torch.Tensor:
    """One head's attention for the gathered queries ``query`` (B, n, D) at query indices ``rows`` (B, n), which
    ascend along n, of a call with ``q_len`` queries, against this head's ``key``/``value`` (B, Tk, D):
    (B, n, Dv).

    ``head`` picks the mask's row when the mask has one per head. Rows are processed in blocks; each block attends
    only the key range its rows can see (up to the last row's column under a causal mask, from the first visible
    column under a sliding window), as a causal kernel skips the upper triangle."""
    n = query.shape[1]
    k_len = key.shape[1]
    block = block_rows or BLOCK_ROWS
    use_sdpa = not (eager or softcap is not None or has_bias(attention_mask))
    outs = []
    for s in range(0, n, block):
        e = min(s + block, n)
        allowed, bias = _mask_rows(attention_mask, head, rows[:, s:e], k_len, q_len, is_causal)
        if allowed is None:
            k0, k1 = 0, k_len
        else:
            cols = allowed.flatten(0, 1).any(0).nonzero()
            k0, k1 = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
            # a row that sees no key (padding under some masks) reads key k0 instead of giving NaN, which would
            # poison gradients; the caller drops such rows
            allowed = allowed[..., k0:k1].clone()
            allowed[..., 0] |= ~allowed.any(-1)
            bias = None if bias is None else bias[..., k0:k1]
        qb, kb, vb = query[:, s:e], key[:, k0:k1], value[:, k0:k1]
        if use_sdpa:
            out = F.scaled_dot_product_attention(
                qb[:, None],
                kb[:, None],
                vb[:, None],
                attn_mask=None if allowed is None else allowed[:, None],
                scale=scaling,
            )[:, 0]  # (B, bq, Dv)
        else:  # the eager recipe: fp32 scores, softcap, additive mask, fp32 softmax
            scores = torch.matmul(qb.float(), kb.float().transpose(-1, -2)) * scaling  # (B, bq, bk)
            scores = softcapped(scores, softcap)
            if bias is not None:
                scores = scores + bias
            if allowed is not None:
                scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1).to(value.dtype)
            out = torch.matmul(probs, vb)  # (B, bq, Dv)
        outs.append(out)
    return torch.cat(outs, dim=1)


def moh_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    keep: torch.Tensor,
    shared: int,
    *,
    is_causal: bool = True,
    softcap: float | None = None,
    eager: bool = False,
    block_rows: int | None = None,
) -> torch.Tensor:
    """Mixture-of-head attention with the routed-off (token, head) pairs never computed.

    ``query`` (B, H, Tq, D), ``key``/``value`` (B, Hkv, Tk, D) not GQA-expanded; ``keep`` (B, Tq, H - shared) bool:
    which routed heads each query uses (heads ``shared..H-1``); heads ``0..shared-1`` attend every query.
    Returns attn_output (B, Tq, H, Dv) with zeros for the pairs routed off."""
    bsz, num_heads, q_len, head_dim = query.shape
    groups = num_heads // key.shape[1]
    dv = value.shape[-1]
    heads: list[torch.Tensor] = []
    if shared:
        kv = torch.arange(shared, device=key.device) // groups
        # shared heads attend every query: the stock computation, on their key/value heads only
        out = dense_attention(
            query[:, :shared],
            key.index_select(1, kv),
            value.index_select(1, kv),
            attention_mask,
            scaling,
            is_causal=is_causal,
            softcap=softcap,
            eager=eager,
        )  # (B, Tq, shared, Dv)
        heads.extend(out.unbind(2))
    counts = keep.sum(1)  # (B, E): queries routed to each head, per batch row
    most = counts.amax(0).tolist()  # (E,) the longest row per head decides the gathered length
    for r, n in enumerate(most):
        h = shared + r
        sel = keep[:, :, r]  # (B, Tq)
        if n == 0:
            heads.append(query.new_zeros(bsz, q_len, dv))
            continue
        # selected query indices first, ascending (a stable sort of "not selected"); rows past a batch row's
        # count repeat its last selected index (cummax keeps them ascending) and are dropped below
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :n]  # (B, n)
        valid = torch.arange(n, device=sel.device)[None, :] < counts[:, r : r + 1]  # (B, n)
        rows = torch.where(valid, order, 0).cummax(dim=1).values
        q = query[:, h].gather(1, rows[:, :, None].expand(bsz, n, head_dim))  # (B, n, D)
        kv = h // groups
        out = gathered_head_attention(
            q, key[:, kv], value[:, kv], attention_mask, scaling, h, rows, q_len,
            is_causal=is_causal, softcap=softcap, eager=eager, block_rows=block_rows,
        )  # fmt: skip
        full = query.new_zeros(bsz, q_len, dv, dtype=out.dtype)
        heads.append(full.masked_scatter(sel[:, :, None], out[valid]))
    return torch.stack(heads, dim=2)
