"""Fused attention that also returns log-sum-exp, and column sums of the attention matrix without materialising it.

Probability-level surgeries that edit a few columns (ACT, VAR) stay exact on a fused kernel: with the fused output
``o_i`` and ``lse_i``, any probability is ``A_ij = exp(q_i.k_j * scale + m_ij - lse_i)``, so edits over a small
column set cost O(n x |S|) (see ``DESIGN.md`` §3). Detection needs column sums ``sum_i A_ij``; they come from one
more fused call with keys as queries and queries as keys, ``-lse_i`` folded in as an extra head dimension, read off
that call's log-sum-exp.

On CPU these use PyTorch's flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, which returns
``lse``); elsewhere they fall back to :func:`tiled_with_lse` (exact, O(block x n) memory, slower).
"""

from __future__ import annotations

import torch

_NEG = -1e30  # a finite "minus infinity": exp() of it is 0 and it never makes 0 * inf = NaN


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * groups, T, D), each kv head repeated for the query heads that share it."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def visible(
    attention_mask: torch.Tensor | None, is_causal: bool, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor:
    """(B|1, 1, Tq, Tk) bool: which keys each query may attend to (transformers' conventions, see engine)."""
    if attention_mask is None:
        if is_causal and q_len > 1:
            return (
                torch.arange(k_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None]
            )[None, None]
        return torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _flash_cpu_ok(query: torch.Tensor) -> bool:
    return query.device.type == "cpu" and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
    )


def _float_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


def tiled_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    block_rows: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain exact attention over query blocks: (out (B, H, Tq, Dv) in value's dtype, lse (B, H, Tq) fp32)."""
    groups = query.shape[1] // key.shape[1]
    k = repeat_kv(key, groups).float()
    v = repeat_kv(value, groups).float()
    outs, lses = [], []
    for s in range(0, query.shape[2], block_rows):
        e = min(s + block_rows, query.shape[2])
        scores = (query[:, :, s:e].float() @ k.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~allowed[:, :, s:e] if allowed.shape[2] > 1 else ~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None]).nan_to_num_(0.0)
        outs.append(probs @ v)
        lses.append(lse)
    return torch.cat(outs, dim=2).to(value.dtype), torch.cat(lses, dim=2)


def sdpa_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention returning ``(out (B, H, Tq, Dv), lse (B, H, Tq) fp32)``; same masking as transformers' SDPA.

    Rows with no visible key get ``out = 0`` (their lse is meaningless); callers ignore them.
    """
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    if not _flash_cpu_ok(query):
        allowed = visible(attention_mask, is_causal, q_len, k_len, query.device)
        return tiled_with_lse(query, key, value, allowed, scaling)
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    mask, causal = None, False
    if attention_mask is None:
        if is_causal and q_len > 1:
            causal = True
            k, v = (
                k[:, :, :q_len],
                v[:, :, :q_len],
            )  # SDPA's upper-left causal alignment, as transformers does
    else:
        mask = _float_mask(visible(attention_mask, is_causal, q_len, k_len, query.device), query.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, k, v, 0.0, causal, attn_mask=mask, scale=scaling
    )
    return out, lse.float()


def column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    query_valid: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool,
) -> torch.Tensor:
    """``(B, H, Tk)``: ``sum_i A_ij`` over the valid queries (``query_valid`` (B, Tq) bool) that see key ``j``.

    One fused call on keys-as-queries: ``k'_j = [k_j, 1]``, ``q'_i = [q_i * scale, -lse_i]`` gives
    ``log sum_i exp(q_i.k_j * scale - lse_i)`` as that call's log-sum-exp. A plain causal prefill runs reversed in
    time so the transposed mask is causal again and the kernel's ``is_causal`` fast path applies.
    """
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    neg_lse = torch.where(query_valid[:, None, :], -lse, torch.full_like(lse, _NEG))  # invalid rows add 0
    q_aug = torch.cat([query.float() * scaling, neg_lse[..., None]], dim=-1)  # (B, H, Tq, D+1)
    k = repeat_kv(key, groups).float()
    k_aug = torch.cat([k, torch.ones_like(k[..., :1])], dim=-1)  # (B, H, Tk, D+1)
    causal_prefill = attention_mask is None and is_causal and q_len > 1
    if not _flash_cpu_ok(query):
        allowed = visible(attention_mask, is_causal, q_len, k_len, query.device)
        scores_t = (k_aug @ q_aug.transpose(-1, -2)).masked_fill(~allowed.transpose(-1, -2), float("-inf"))
        return torch.logsumexp(scores_t, dim=-1).exp()
    zeros = torch.zeros_like(q_aug)  # the kernel wants V with Q's head size; only its lse is used
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if causal_prefill:
        q_len_used = min(q_len, k_len)
        rev_k = k_aug[:, :, :q_len_used].flip(2)
        rev_q = q_aug.flip(2)
        _, col_lse = flash(rev_k, rev_q, zeros, 0.0, True, scale=1.0)
        sums = col_lse.flip(2).exp()  # (B, H, q_len_used)
        if k_len > q_len_used:  # keys past the causal square are seen by nobody
            sums = torch.cat([sums, sums.new_zeros(*sums.shape[:2], k_len - q_len_used)], dim=-1)
    else:
        allowed = visible(attention_mask, is_causal, q_len, k_len, query.device)
        mask_t = _float_mask(allowed.transpose(-1, -2), torch.float32)  # (B|1, 1, Tk, Tq)
        _, col_lse = flash(k_aug, q_aug, zeros, 0.0, False, attn_mask=mask_t, scale=1.0)
        sums = col_lse.exp()
        # a key no query can see: the kernel reports lse 0 (exp 1); it sums nothing
        seen = (allowed & query_valid[:, None, :, None]).any(dim=2)  # (B, 1, Tk)
        sums = sums * seen
    return sums
