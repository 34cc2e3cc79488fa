"""Fused attention that also returns log-sum-exp, and column sums of the attention matrix without materialising it.

Probability-level surgeries that edit a few columns (ACT, VAR) stay exact on a fused kernel: with the fused output
``o_i`` and ``lse_i``, any probability is ``A_ij = exp(q_i.k_j * scale + m_ij - lse_i)``, so edits over a small
column set cost O(n x |S|) (see ``DESIGN.md`` §3). Detection needs column sums ``sum_i A_ij``.

Measured on CPU (SmolLM2 shapes, 2k tokens): a second fused call for the column sums (keys as queries, ``-lse_i``
folded in as an extra head dimension, read off its log-sum-exp) costs ~1.35x an SDPA call, because the kernel
insists on a value product it does not need; a tiled pass with no value product costs ~1.0x; and one tiled pass
that yields output, lse and column sums together is cheapest, so ACT uses :func:`attention_with_column_sums`.

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


def allowed_tile(
    mask: torch.Tensor | None, is_causal: bool, q_len: int, k_len: int, s: int, e: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """(allowed bool mask, additive float mask or None, k_start, k_end) for query rows [s, e)."""
    if mask is None:
        if is_causal and q_len > 1:
            # transformers drops the mask only for a plain causal prefill: query i sees keys 0..i (SDPA's
            # upper-left alignment; extra keys would be empty static-cache slots).
            k_end = min(e, k_len)
            rows = torch.arange(s, e, device=device)[:, None]
            cols = torch.arange(k_end, device=device)[None, :]
            return (cols <= rows)[None, None], None, 0, k_end
        return torch.ones(1, 1, e - s, k_len, dtype=torch.bool, device=device), None, 0, k_len
    rows = mask[:, :, s:e] if mask.shape[2] > 1 else mask
    if rows.dtype == torch.bool:
        allowed, additive = rows, None
    else:  # an additive float mask (eager): keep its values, they may carry biases
        allowed, additive = rows > torch.finfo(rows.dtype).min / 2, rows
    cols = allowed.flatten(0, -2).any(0).nonzero()
    if len(cols) == 0:
        k_start, k_end = 0, k_len
    else:
        k_start, k_end = int(cols[0]), int(cols[-1]) + 1
    allowed = allowed[..., k_start:k_end]
    if additive is not None:
        additive = additive[..., k_start:k_end]
    return allowed, additive, k_start, k_end


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


def column_sums_tiled(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    query_valid: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool,
    block_rows: int = 64,
) -> torch.Tensor:
    """``(B, H, Tk)``: ``sum_i A_ij`` over the valid queries (``query_valid`` (B, Tq)) that see key ``j``, given
    each row's ``lse``. Over blocks of query rows: one QK^T product and one exp per visible pair, no value product;
    keys right of a causal block are skipped."""
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv, k_len = key.shape[1], key.shape[2]
    groups = num_heads // num_kv
    q = (query.float() * scaling).view(bsz, num_kv, groups, q_len, head_dim)
    k_t = key.float().transpose(-1, -2)  # (B, Hkv, D, Tk)
    neg_lse = torch.where(query_valid[:, None, :], -lse, torch.full_like(lse, _NEG))  # (B, H, Tq)
    sums = torch.zeros(bsz, num_heads, k_len, dtype=torch.float32, device=query.device)
    plain_causal = attention_mask is None and is_causal and q_len > 1
    allowed = None if plain_causal else visible(attention_mask, is_causal, q_len, k_len, query.device)
    for s in range(0, q_len, block_rows):
        e = min(s + block_rows, q_len)
        k1 = min(e, k_len) if plain_causal else k_len
        qb = q[:, :, :, s:e].reshape(bsz, num_kv, groups * (e - s), head_dim)
        scores = torch.matmul(qb, k_t[..., :k1]).view(bsz, num_heads, e - s, k1)  # (B, H, bq, bk)
        scores.add_(neg_lse[:, :, s:e, None])
        if plain_causal:
            diag = scores[..., s:]
            diag.masked_fill_(torch.ones(e - s, k1 - s, dtype=torch.bool, device=query.device).triu_(1), _NEG)
        else:
            rows = allowed[:, :, s:e] if allowed.shape[2] > 1 else allowed
            scores.masked_fill_(~rows, _NEG)
        sums[..., :k1] += scores.exp_().sum(dim=2)
    return sums


def attention_with_column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool,
    query_valid: torch.Tensor,
    block_rows: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tiled pass: attention output (B, H, Tq, Dv), lse (B, H, Tq) and column sums (B, H, Tk) of A over the
    valid queries. Each block of rows is exact (full rows), so sums need no second pass over Q K^T; memory
    O(block x n). About one fused attention's cost at 2k tokens on CPU, where lse + a separate column pass cost two.
    """
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv, k_len = key.shape[1], key.shape[2]
    groups = num_heads // num_kv
    q = (query.float() * scaling).view(bsz, num_kv, groups, q_len, head_dim)
    k_t = key.float().transpose(-1, -2)
    out = query.new_empty(bsz, num_heads, q_len, value.shape[-1])
    lse = torch.empty(bsz, num_heads, q_len, dtype=torch.float32, device=query.device)
    sums = torch.zeros(bsz, num_heads, k_len, dtype=torch.float32, device=query.device)
    row_weight = query_valid.to(torch.float32)  # (B|1, Tq): padding rows add nothing to the sums
    all_valid = bool(query_valid.all())
    for s in range(0, q_len, block_rows):
        e = min(s + block_rows, q_len)
        allowed, additive, k0, k1 = allowed_tile(attention_mask, is_causal, q_len, k_len, s, e, query.device)
        qb = q[:, :, :, s:e].reshape(bsz, num_kv, groups * (e - s), head_dim)
        scores = torch.matmul(qb, k_t[..., k0:k1]).view(bsz, num_heads, e - s, k1 - k0)
        if additive is not None:
            scores.add_(additive)
        lo = s - k0 if attention_mask is None and is_causal and q_len > 1 else 0
        scores[..., lo:].masked_fill_(~allowed[..., lo:], torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1)
        # lse from the row's largest probability: p_max = exp(score_max - lse), and p_max >= 1/n is well
        # conditioned; cheaper than a separate logsumexp pass over the block
        p_max, arg = probs.max(dim=-1, keepdim=True)
        lse[:, :, s:e] = (scores.gather(-1, arg) - p_max.log()).squeeze(-1)
        if all_valid:
            sums[..., k0:k1] += probs.sum(dim=2)
        else:
            sums[..., k0:k1] += torch.einsum("bhqk,bq->bhk", probs, row_weight[:, s:e].expand(bsz, -1))
        block = torch.matmul(
            probs.to(value.dtype).view(bsz, num_kv, groups * (e - s), k1 - k0), value[:, :, k0:k1]
        )
        out[:, :, s:e] = block.view(bsz, num_heads, e - s, -1)
    return out, lse, sums
