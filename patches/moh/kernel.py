"""Mixture-of-head attention that skips the work of heads a token does not use.

MoH's released code computes every head and multiplies the outputs by a 0/1 mask, so it saves nothing (their
issue #7). Here the shared heads run as one dense attention call, and each routed head attends only the queries
routed to it: those rows are gathered (ascending, so the causal structure survives), cut into blocks of
``BLOCK_ROWS``, and each block attends keys up to its last query's column only, as a causal kernel skips the
upper triangle. Key/value heads are read in place (GQA: a routed head uses its group's key/value head, never a
copy). Which keys a gathered query sees comes from the layer's own mask rows (causality, padding, sliding
windows, additive biases), or from SDPA's upper-left causal rule when transformers passed no mask.

On a GPU, a maskless causal prefill (what ``generate`` and the benchmarks run) goes to
:func:`attnsurgery.flex.routed_attention` instead: every head's routed rows packed into one block-sparse
flex_attention call, with no per-block launches. On a CPU at inference, :mod:`attnsurgery.rowblock`'s compiled
kernel does the same in one pass (every head's routed rows packed into its GEMMs). The blocks below stay the path
for softcapping, additive biases, training and where that kernel cannot be built.

Scores follow the model's backend: fused SDPA on a boolean mask for SDPA models, and the eager recipe (fp32
scores, Gemma-2 logit softcapping, the additive float mask) through :func:`attnsurgery.kernels.tiled_attention`
semantics for eager models, softcapped layers and biased masks.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from attnsurgery import flex, rowblock
from attnsurgery.kernels import flash_cpu_available, has_bias, softcapped, tiled_attention

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


def _block_mask(
    attention_mask: torch.Tensor | None,
    head: int,
    rows: torch.Tensor,
    k_len: int,
    q_len: int,
    is_causal: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, int, int]:
    """The additive mask (B, bq, k1 - k0) of ``dtype`` for the gathered, ascending query rows ``rows`` (B, bq), and
    the key range ``[k0, k1)`` they can see; ``None``: every key of the range is visible.

    Masked scores get the dtype's minimum, as transformers' eager masks, not -inf: a row that sees no key stays
    finite instead of NaN (it would poison gradients). Only the key columns up to the last row's own column are
    read under a causal mask (a query's column is at most ``row + Tk - Tq``, with or without a cache), and the
    range starts at the first column the block's first row sees: the earliest visible key never moves back as
    the query moves on under causal, padding, sliding-window and document masks."""
    last = int(rows[:, -1].max())  # rows ascend: the block's last row sees the most keys
    if attention_mask is None:
        if not (is_causal and q_len > 1):  # a maskless decode step or a non-causal layer: every key
            return None, 0, k_len
        # upper-left causal, as SDPA's is_causal when transformers passes no mask: query t sees keys 0..t
        k1 = min(last + 1, k_len)
        cols = torch.arange(k1, device=rows.device)
        return _additive(cols[None, None, :] <= rows[:, :, None], None, dtype), 0, k1
    bsz, bq = rows.shape
    k1 = min(k_len, last + 1 + k_len - q_len) if is_causal else k_len
    mask = attention_mask[:, head if attention_mask.shape[1] > 1 else 0, :, :k1]  # (B|1, Tq|1, k1)
    if mask.shape[1] == 1:
        picked = mask.expand(bsz, bq, k1)
    else:
        picked = mask.expand(bsz, -1, -1).gather(1, rows[:, :, None].expand(bsz, bq, k1))
    allowed = picked if picked.dtype == torch.bool else picked > torch.finfo(picked.dtype).min / 2
    first = allowed[:, 0].any(0).nonzero()  # the first row's visible columns, over the batch
    k0 = int(first[0]) if len(first) else 0
    values = None if picked.dtype == torch.bool else picked[..., k0:]
    return _additive(allowed[..., k0:], values, dtype), k0, k1


def _additive(allowed: torch.Tensor, values: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask: 0 (or a float mask's own value: a bias) where visible, the dtype's minimum elsewhere."""
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    visible = torch.zeros((), dtype=dtype, device=allowed.device) if values is None else values.to(dtype)
    return torch.where(allowed, visible, low)


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
    manual = eager or softcap is not None  # the eager recipe: fp32 scores, softcap, fp32 softmax
    mask_dtype = torch.float32 if manual else query.dtype
    split = (
        attention_mask is None
        and is_causal
        and q_len > 1
        and not manual
        and not torch.is_grad_enabled()
        and flash_cpu_available(query)
    )
    outs = []
    # on a GPU without cuDNN's SDPA: it plans every new shape, and each block here has a key length of its own
    with _fixed_plan_backends() if query.is_cuda else contextlib.nullcontext():
        for s in range(0, n, block):
            e = min(s + block, n)
            if split:
                outs.append(_causal_block(query[:, s:e], key, value, rows[:, s:e], scaling))
                continue
            bias, k0, k1 = _block_mask(
                attention_mask, head, rows[:, s:e], k_len, q_len, is_causal, mask_dtype
            )
            qb, kb, vb = query[:, s:e], key[:, k0:k1], value[:, k0:k1]
            if not manual:
                out = F.scaled_dot_product_attention(
                    qb[:, None],
                    kb[:, None],
                    vb[:, None],
                    attn_mask=None if bias is None else bias[:, None],
                    scale=scaling,
                )[:, 0]  # (B, bq, Dv)
            else:
                scores = torch.matmul(qb.float(), kb.float().transpose(-1, -2)) * scaling  # (B, bq, bk)
                scores = softcapped(scores, softcap)
                if bias is not None:  # clamped: a score plus the minimum must not overflow to -inf (NaN rows)
                    scores = (scores + bias).clamp_(min=torch.finfo(scores.dtype).min)
                probs = torch.softmax(scores, dim=-1).to(value.dtype)
                out = torch.matmul(probs, vb)  # (B, bq, Dv)
            outs.append(out)
    return torch.cat(outs, dim=1)


def _fixed_plan_backends() -> contextlib.AbstractContextManager:
    """SDPA without its cuDNN backend, which builds an execution plan for every new shape (hundreds of ms each: see
    pytorch#155958, sglang#4650): the routed heads' blocks change key length from block to block, so one prefill
    would build thousands. On an H200 a 7B-shaped MoH prefill of 2,048 tokens had not finished its first forward
    after 50 s (docs/gpu.md); that cuDNN planning is the cause is this fix's hypothesis, not yet measured there."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _causal_block(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor, scaling: float
) -> torch.Tensor:
    """A block of gathered rows under a maskless causal call, without a mask over the keys every row sees.

    Keys ``0..c`` (``c`` the block's first row) are visible to all its rows: one unmasked fused call covers them;
    only the band ``c+1..last`` needs a mask. The two softmaxes are merged through their log-sum-exp (the CPU
    flash kernel returns it, but not its gradient: inference only). Building a (rows x keys) mask costs about a
    third of the attention itself on CPU, so this keeps the skipped work a saving."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q = query[:, None]  # (B, 1, bq, D)
    c = int(rows[:, 0].min()) + 1  # keys [0, c): seen by every row of the block (rows ascend)
    last = int(rows[:, -1].max()) + 1
    out, lse = flash(q, key[:, None, :c], value[:, None, :c], 0.0, False, scale=scaling)
    if last > c:
        cols = torch.arange(c, last, device=rows.device)
        band = _additive(cols[None, None, :] <= rows[:, :, None], None, query.dtype)[
            :, None
        ]  # (B, 1, bq, band)
        out_b, lse_b = flash(
            q, key[:, None, c:last], value[:, None, c:last], 0.0, False, attn_mask=band, scale=scaling
        )
        top = torch.maximum(lse, lse_b)
        w_a, w_b = (lse - top).exp(), (lse_b - top).exp()  # a row that sees no band key: w_b = 0
        out = (out * w_a[..., None] + out_b * w_b[..., None]) / (w_a + w_b)[..., None]
    return out[:, 0].to(query.dtype)


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
    maskless_prefill = attention_mask is None and is_causal and q_len > 1
    if maskless_prefill and softcap is None and not eager and flex.enabled_for(query, key, value):
        # GPU: one flex call for every head, each head's routed queries packed (attnsurgery.flex)
        selected = torch.ones(bsz, num_heads, q_len, dtype=torch.bool, device=query.device)
        selected[:, shared:] = keep.transpose(1, 2).to(query.device)
        try:
            out = flex.routed_attention(query, key[:, :, :q_len], value[:, :, :q_len], selected, scaling)
            return out.transpose(1, 2)
        except Exception as err:  # a compiler failure on this machine: the gathered blocks below
            flex.give_up(err)
    if softcap is None and rowblock.usable(query, key, value, attention_mask):
        # CPU inference: one compiled pass over every head, each computing only the queries routed to it
        selected = torch.ones(bsz, num_heads, q_len, dtype=torch.bool)
        selected[:, shared:] = keep.transpose(1, 2).cpu()
        out, _, _ = rowblock.attention(query, key, value, attention_mask, scaling, is_causal, active=selected)
        return out.transpose(1, 2).to(query.dtype)
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
