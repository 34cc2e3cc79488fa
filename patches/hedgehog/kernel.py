"""The Hedgehog / LoLCATs attention in pure PyTorch: feature map, chunked hybrid kernel, recurrent form.

Notation (one head): ``phi(x) = [softmax(x W), softmax(-x W)]`` (2F dims, ``clamp(min=1e-12)``), ``s_ij`` the
model's own softmax logit (``q_i . k_j * scaling``, softcapped where the model softcaps), ``gamma`` the per-head
window factor and ``lam`` the linear factor (1, or ``1 - gamma`` when affine). Query i attends with softmax to the
keys of its window ``i - w < j <= i`` and through the feature maps to every older key ``j <= i - w``, under one
shared normaliser (LoLCATs, Zhang et al., ICLR 2025, arXiv 2410.10254, ``hybrid_attention_quadratic``)::

    y_i = (gamma sum_win e^{s_ij - m_i} v_j + lam sum_lin phi(q_i).phi(k_j) v_j)
          / (gamma sum_win e^{s_ij - m_i}   + lam sum_lin phi(q_i).phi(k_j))

with ``m_i`` the row maximum over the window (as LoLCATs: the max is *not* applied to the linear terms, so it is
part of the definition, not only of the numerics). ``w = 0`` is Hedgehog's pure causal linear attention
(Zhang et al., ICLR 2024, arXiv 2402.04347); ``w = None`` puts every key in the window: softmax attention.

:func:`hybrid_attention` computes this in query chunks: inside a chunk of C queries a quadratic block over the
C + w - 1 keys that are in some query's window or newer than the running state; keys older than every window of
the chunk live in the running state ``S = sum phi(k_j) v_j^T`` (2F x D) and ``z = sum phi(k_j)`` (2F). Time O(n (C +
w)), memory O(C (C + w)) per head. The same function is the decode step (C = 1 query against the w - 1 cached
keys plus the state); :func:`hybrid_recurrent` is the token-by-token form the tests compare it with.
"""

from __future__ import annotations

import torch

EPS = 1e-12  # LoLCATs' clamp on phi: every feature stays positive, so the linear normaliser never vanishes


def feature_map(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """LoLCATs' ``softmax_dim``: ``[softmax(x W), softmax(-x W)]`` per head, fp32.

    ``x`` (B, H, T, D), ``weight`` (H, D, F) -> (B, H, T, 2F); each half sums to 1 over its F features.
    (flash-linear-attention's ``HedgehogFeatureMap`` differs: one softmax over ``[2 x W + b, -2 x W - b]`` jointly,
    so its two halves share a normaliser and its projection has a bias.)
    """
    proj = torch.einsum("bhtd,hdf->bhtf", x.float(), weight.float())
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1).clamp(min=eps)


def fold(
    state: tuple[torch.Tensor, torch.Tensor],
    fk: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add keys to the running state: ``S += sum_j phi(k_j) v_j^T``, ``z += sum_j phi(k_j)`` over real keys.

    ``fk`` (B, H, n, 2F), ``v`` (B, H, n, D), ``valid`` (B|1, n) bool or None (all real): padding never enters.
    """
    if fk.shape[2] == 0:
        return state
    if valid is not None:
        fk = fk * valid[:, None, :, None].to(fk.dtype)
    s, z = state
    return s + torch.einsum("bhnf,bhnd->bhfd", fk, v.float()), z + fk.sum(2)


def empty_state(fq: torch.Tensor, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, _, f = fq.shape
    return (
        torch.zeros(b, h, f, value_dim, dtype=torch.float32, device=fq.device),
        torch.zeros(b, h, f, dtype=torch.float32, device=fq.device),
    )


def _per_head(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """gamma / lam as (1, H, 1, 1) fp32 (a float broadcasts)."""
    if isinstance(x, torch.Tensor):
        return x.float().reshape(1, -1, 1, 1).to(like.device)
    return torch.tensor(float(x), device=like.device).reshape(1, 1, 1, 1)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    window: int | None,
    gamma: torch.Tensor | float,
    linear_factor: torch.Tensor | float,
    scaling: float,
    softcap: float | None = None,
    allowed: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    fold_to: int | None = None,
    chunk: int = 128,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], int]:
    """Chunked hybrid (or pure linear) attention. Returns ``(y, state, folded)``.

    ``q`` (B, H, Tq, D), ``k``/``v`` (B, H, Tk, D) (GQA already expanded), ``fq``/``fk`` their feature maps; query
    i sits at key column ``Tk - Tq + i`` (a KV cache or a kept tail in front). ``window``: None (all keys softmax),
    0 (linear only) or w >= 1. ``allowed`` (B|1, 1|H, Tq, Tk) bool: the model's mask (None: causal); it bounds the
    softmax part, while the linear part takes every causal key that ``key_valid`` (B|1, Tk) marks real — the same
    keys the running state folds in, so chunks and decode steps agree (a causal mask with key padding: identical). ``state`` covers keys before column
    0. ``fold_to``: after the last chunk, fold keys up to that column into the state too (the decode cache keeps
    only the columns after it); ``folded`` is the number of columns the returned state covers.
    """
    bsz, heads, tq, _ = q.shape
    tk = k.shape[2]
    off = tk - tq
    device = q.device
    g = _per_head(gamma, q)
    lam = _per_head(linear_factor, q)
    use_linear = window is not None
    use_softmax = window != 0
    run = state if state is not None else empty_state(fq, v.shape[-1])
    folded = 0
    outs = []
    vf = v.float()
    for s in range(0, tq, chunk):
        e = min(s + chunk, tq)
        p0 = off + s  # key column of the chunk's first query
        # keys before `lo` are linear for every query of the chunk (j <= p0 - w <= p_i - w)
        lo = 0 if window is None else max(0, p0 - window + 1)
        if lo > folded:
            run = fold(
                run,
                fk[:, :, folded:lo],
                v[:, :, folded:lo],
                None if key_valid is None else key_valid[:, folded:lo],
            )
            folded = lo
        lo = folded
        hi = off + e
        rel = torch.arange(p0, off + e, device=device)[:, None] - torch.arange(lo, hi, device=device)[None, :]
        # unnormalised weights of the block's keys: gamma e^{s - m} in the window, lam phi(q).phi(k) below it
        weights = None
        if use_softmax:
            win = rel >= 0 if window is None else (rel >= 0) & (rel < window)
            if allowed is not None:
                win = win & allowed[..., s:e, lo:hi]
            logits = torch.matmul(q[:, :, s:e].float(), k[:, :, lo:hi].float().transpose(-1, -2)) * scaling
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            logits = logits.masked_fill(~win, float("-inf"))
            m = logits.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row with no key in its window
            weights = torch.exp(logits - m) * g
        fq_c = fq[:, :, s:e]
        if use_linear:
            # only the block's first columns can be linear (j <= p_{e-1} - w): a narrower matmul than the block
            n_lin = max(0, hi - window - lo)
            if n_lin > 0:
                # the linear part sees every real older key, like the folded state does (so a chunk and a decode
                # step agree): causal & key_valid, not the model's own window on an all-sliding model (as LoLCATs
                # on Mistral)
                lin = rel[:, :n_lin] >= window
                if key_valid is not None:
                    lin = lin & key_valid[:, None, None, lo : lo + n_lin]
                elif allowed is not None:
                    lin = lin & allowed[..., s:e, lo : lo + n_lin]
                a = (
                    torch.matmul(fq_c, fk[:, :, lo : lo + n_lin].transpose(-1, -2)).masked_fill(~lin, 0.0)
                    * lam
                )
                if weights is None:
                    weights = a
                else:
                    weights = weights + torch.nn.functional.pad(a, (0, hi - lo - n_lin))
        if weights is not None:
            num = torch.matmul(weights, vf[:, :, lo:hi])
            den = weights.sum(-1, keepdim=True)
        else:
            num = torch.zeros(bsz, heads, e - s, v.shape[-1], dtype=torch.float32, device=device)
            den = torch.zeros(bsz, heads, e - s, 1, dtype=torch.float32, device=device)
        if use_linear:
            num = num + lam * torch.matmul(fq_c, run[0])
            den = den + lam * torch.matmul(fq_c, run[1][..., None])
        # a query that sees no key at all (a padding row) gets 0, never NaN (its NaN would reach real rows as a
        # masked value: 0 * NaN = NaN)
        outs.append(num / den.clamp(min=torch.finfo(torch.float32).tiny))
    if fold_to is not None and use_linear and fold_to > folded:
        fold_to = min(fold_to, tk)
        run = fold(
            run,
            fk[:, :, folded:fold_to],
            v[:, :, folded:fold_to],
            None if key_valid is None else key_valid[:, folded:fold_to],
        )
        folded = fold_to
    y = torch.cat(outs, dim=2) if outs else q.new_zeros(bsz, heads, 0, v.shape[-1], dtype=torch.float32)
    return y, run, folded


def hybrid_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    window: int | None,
    gamma: torch.Tensor | float,
    linear_factor: torch.Tensor | float,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Token-by-token form (no padding, Tq = Tk): a constant-size state ``(S, z)`` plus the last ``window - 1``
    keys, updated as each key leaves the window — what decoding computes, written independently of
    :func:`hybrid_attention` so the tests can compare the two."""
    bsz, heads, t_len, _ = q.shape
    g = _per_head(gamma, q)[..., 0]  # (1, H, 1)
    lam = _per_head(linear_factor, q)[..., 0]
    s_state, z_state = empty_state(fq, v.shape[-1])
    outs = []
    for t in range(t_len):
        if window is not None:
            leaving = t - window  # this key leaves the softmax window at step t (window 0: key t itself)
            if leaving >= 0:
                s_state = s_state + fk[:, :, leaving, :, None] * v[:, :, leaving, None, :].float()
                z_state = z_state + fk[:, :, leaving]
        start = 0 if window is None else max(0, t - window + 1)
        num = torch.zeros(bsz, heads, v.shape[-1], dtype=torch.float32, device=q.device)
        den = torch.zeros(bsz, heads, 1, dtype=torch.float32, device=q.device)
        if window != 0 and start <= t:
            logits = (
                torch.einsum("bhd,bhnd->bhn", q[:, :, t].float(), k[:, :, start : t + 1].float()) * scaling
            )
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            p = torch.exp(logits - logits.amax(-1, keepdim=True))
            num = num + g * torch.einsum("bhn,bhnd->bhd", p, v[:, :, start : t + 1].float())
            den = den + g * p.sum(-1, keepdim=True)
        if window is not None:  # window 0: key t itself was folded above, as j <= t - 0
            num = num + lam * torch.einsum("bhf,bhfd->bhd", fq[:, :, t], s_state)
            den = den + lam * torch.einsum("bhf,bhf->bh", fq[:, :, t], z_state)[..., None]
        outs.append(num / den)
    return torch.stack(outs, dim=2)
