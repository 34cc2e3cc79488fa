"""The flex_attention paths (attnsurgery.flex: ACT, clipped softmax and MoH on a GPU) against float64 references.

On CPU they run uncompiled (``ATTNSURGERY_FLEX=eager``): the same score_mods, block masks and passes the GPU
compiles, with the scores materialised. tests/test_cuda.py runs the compiled kernels on a GPU."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from test_kernels import case, reference
from tiny import kernel_atol, logit_atol, padded_batch, random_ids, tiny_model

import attnsurgery.flex as flex
from attnsurgery import patch

pytestmark = pytest.mark.skipif(flex.flex_attention is None, reason="this torch has no flex_attention")

T = 300  # three 128-row blocks, the last one partial


@pytest.fixture
def eager_flex(monkeypatch):
    monkeypatch.setattr(flex, "MODE", "eager")


def _call(q, mask, causal=True):
    return SimpleNamespace(
        query=q, key=None, value=None, query_len=q.shape[2], key_len=q.shape[2], attention_mask=mask,
        is_causal=causal, kwargs={},
    )  # fmt: skip


def _dense(block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, QB, KB) bool: the blocks a BlockMask lists as partial and as full."""
    num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    full_num, full_idx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    kb = idx.shape[-1]
    cols = torch.arange(kb)

    def grid(n, i):
        listed = cols < n[..., None].long()  # the first n entries of each row are in use
        dense = torch.zeros(*i.shape[:-1], kb, dtype=torch.bool)
        return dense.scatter_(-1, i.long(), listed)

    return grid(num, idx), grid(full_num, full_idx)


def _check_blocks(block_mask, truth: torch.Tensor) -> None:
    """Every visible pair lies in a listed block; every block listed as full is entirely visible (in range)."""
    partial, full = _dense(block_mask)
    assert not (partial & full).any(), "a block is listed twice"
    b, h, n, m = truth.shape
    qb, kb = partial.shape[-2:]
    padded = torch.zeros(b, h, qb * flex.BLOCK, kb * flex.BLOCK, dtype=torch.bool)
    inside = torch.zeros_like(padded)
    padded[..., :n, :m] = truth
    inside[..., :n, :m] = True
    blocks = padded.view(b, h, qb, flex.BLOCK, kb, flex.BLOCK)
    in_range = inside.view(b, h, qb, flex.BLOCK, kb, flex.BLOCK)
    has_visible = blocks.any(5).any(3)
    all_visible = (blocks | ~in_range).all(5).all(3) & in_range.all(5).all(3)
    listed = (partial | full).expand_as(has_visible)
    assert not (has_visible & ~listed).any(), "a visible pair in an unlisted block"
    assert not (full.expand_as(all_visible) & ~all_visible).any(), "a block listed as full is not"
    # and the grid is tight where it can be: no block without a visible pair is computed
    assert not (listed & ~has_visible).any()


@pytest.mark.parametrize("n", [1, 127, 128, 129, 300, 513])
def test_causal_block_masks_cover_exactly(n):
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    _check_blocks(flex.causal_block_mask(n, torch.device("cpu")), causal)
    _check_blocks(flex.causal_block_mask(n, torch.device("cpu"), transposed=True), causal.transpose(-1, -2))


@pytest.mark.parametrize("density", [1.0, 0.78, 0.3, 0.0])
def test_routed_block_mask_covers_exactly(density):
    g = torch.Generator().manual_seed(1)
    selected = torch.rand(2, 3, T, generator=g) < density
    selected[0, 0] = True  # a shared head: every query
    counts = selected.sum(-1)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)
    valid = torch.arange(T) < counts[..., None]
    positions = torch.where(valid, order, -1)
    truth = positions[..., :, None] >= torch.arange(T)[None, None, None, :]
    _check_blocks(flex.routed_block_mask(positions, counts), truth)


@pytest.mark.parametrize("kind", ["none", "bool", "float"])
def test_lse_and_column_sums_match_float64(kind):
    q, k, v, mask, allowed, valid = case(kind, t=T)
    _, ref_lse, ref_sums = reference(q, k, v, allowed, 0.3, valid)
    tol = kernel_atol(q, k, v, allowed, 0.3, valid)
    vis = flex.Visibility.of(_call(q, mask))
    lse = flex.log_sum_exp(q, k, vis, 0.3)
    rows = valid[:, None, :].expand(-1, q.shape[1], -1)
    torch.testing.assert_close(lse[rows], ref_lse.float()[rows], atol=tol["lse"], rtol=0)
    sums = flex.column_sums(q, k, lse, vis, 0.3, None if bool(valid.all()) else valid, T)
    torch.testing.assert_close(sums, ref_sums.float(), atol=tol["sums"], rtol=0)


def test_shifted_columns_match_float64():
    q, k, v, mask, allowed, valid = case("bool", t=T)
    g = torch.Generator().manual_seed(2)
    columns = torch.rand(2, q.shape[1], T, generator=g) < 0.05
    shift = torch.randn(2, q.shape[1], T, generator=g)
    groups = q.shape[1] // k.shape[1]
    scores = q.double() @ k.repeat_interleave(groups, 1).double().transpose(-1, -2) * 0.3
    scores = scores + torch.where(columns[:, :, None, :], shift.double()[..., None], 0.0)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    ref = probs @ v.repeat_interleave(groups, 1).double()
    out = flex.shifted_columns(q, k, v, columns, shift, flex.Visibility.of(_call(q, mask)), 0.3)
    rows = valid[:, None, :].expand(-1, q.shape[1], -1)
    tol = kernel_atol(q, k, v, allowed, 0.3, valid)["out"]
    torch.testing.assert_close(out[rows], ref.float()[rows], atol=tol, rtol=0)


@pytest.mark.parametrize("kind", ["none", "bool"])
def test_clipped_softmax_matches_float64(kind):
    q, k, v, mask, allowed, valid = case(kind, t=T)
    heads = torch.tensor([True, False, True, True, False, True])
    stretch, gamma = 1.05, -0.03
    groups = q.shape[1] // k.shape[1]
    scores = q.double() @ k.repeat_interleave(groups, 1).double().transpose(-1, -2) * 0.3
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    clipped = torch.where(heads[None, :, None, None], (stretch * probs + gamma).clamp(0, 1), probs)
    ref = clipped @ v.repeat_interleave(groups, 1).double()
    out = flex.clipped_softmax(q, k, v, flex.Visibility.of(_call(q, mask)), 0.3, stretch, gamma, heads)
    rows = valid[:, None, :].expand(-1, q.shape[1], -1)
    tol = kernel_atol(q, k, v, allowed, 0.3, valid)["out"]
    torch.testing.assert_close(out[rows], ref.float()[rows], atol=tol, rtol=0)
    assert (out[rows] - ref.float()[rows]).abs().max() < (out - ref.float()).abs().max() + 1  # rows compared


def test_routed_attention_matches_float64():
    q, k, v, _, allowed, _ = case("none", t=T)
    g = torch.Generator().manual_seed(4)
    selected = torch.rand(2, q.shape[1], T, generator=g) < 0.7
    selected[:, 0] = True
    ref, _, _ = reference(q, k, v, allowed, 0.3, torch.ones(2, T, dtype=torch.bool))
    ref = torch.where(selected[..., None], ref, 0.0)
    out = flex.routed_attention(q, k, v, selected, 0.3)
    tol = kernel_atol(q, k, v, allowed, 0.3)["out"]
    torch.testing.assert_close(out, ref.float(), atol=tol, rtol=0)
    assert (out[~selected] == 0).all()


def test_flex_paths_stay_off_where_they_do_not_apply(monkeypatch):
    q = torch.randn(1, 2, 8, 4)
    call = SimpleNamespace(query=q, key=q, value=q, query_len=8, attention_mask=None, kwargs={})
    assert not flex.flex_ready(q, call)  # CPU, default mode
    monkeypatch.setattr(flex, "MODE", "eager")
    assert flex.flex_ready(q, call)
    assert not flex.flex_ready(q, SimpleNamespace(**{**vars(call), "kwargs": {"softcap": 30.0}}))
    assert not flex.flex_ready(q, SimpleNamespace(**{**vars(call), "query_len": 1}))  # decode: fused SDPA
    biased = torch.zeros(1, 1, 8, 8)
    biased[..., 0] = 0.5
    assert not flex.flex_ready(q, SimpleNamespace(**{**vars(call), "attention_mask": biased}))
    per_head = torch.ones(1, 2, 8, 8, dtype=torch.bool).tril()
    assert not flex.flex_ready(q, SimpleNamespace(**{**vars(call), "attention_mask": per_head}))
    trainable = q.clone().requires_grad_()
    assert not flex.flex_ready(q, SimpleNamespace(**{**vars(call), "query": trainable}))
    monkeypatch.setattr(flex, "MODE", "0")
    assert not flex.flex_ready(q, call)


SURGERIES = [
    ("act", {"beta": 0.4, "threshold": 0.02}),
    ("act", {"beta": 0.0, "alpha": 2.0}),
    ("clipped_softmax", {"gamma": -0.03, "zeta": 1.02}),
    ("clipped_softmax", {"gamma": -0.05, "heads": {1: [0, 2]}}),
]


def _spy_flex(monkeypatch, name: str) -> list:
    calls = []
    real = getattr(flex, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(flex, name, spy)
    return calls


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize(("surgery", "args"), SURGERIES)
def test_surgery_on_flex_equals_tiled_path(arch, surgery, args, monkeypatch):
    """Whole models: the flex path against the tiled path (ATTNSURGERY_FLEX=0), maskless and on a left-padded
    batch, and a cached decode after a flex prefill against the full forward."""
    model = tiny_model(arch)
    ids = random_ids(2, 150)
    padded, mask = padded_batch([random_ids(1, 150, seed=3)[0], random_ids(1, 90, seed=4)[0]])
    with torch.no_grad():
        stock = model(ids).logits
    results = {}
    for mode in ("0", "eager"):
        monkeypatch.setattr(flex, "MODE", mode)
        used = _spy_flex(monkeypatch, "log_sum_exp")
        with patch(model, surgery, **args), torch.no_grad():
            results[mode] = (model(ids).logits, model(padded, attention_mask=mask).logits)
        assert bool(used) == (mode == "eager")
    atol = logit_atol(arch)
    real = mask.bool()
    torch.testing.assert_close(results["eager"][0], results["0"][0], atol=atol, rtol=0)
    torch.testing.assert_close(results["eager"][1][real], results["0"][1][real], atol=atol, rtol=0)
    if surgery == "act" and arch == "gemma3":  # the edit is there (tiny llama / qwen2 heads have no sinks)
        assert (results["0"][0] - stock).abs().max() > 100 * atol
    if surgery == "clipped_softmax":
        assert (results["0"][0] - stock).abs().max() > 100 * atol


def test_act_finds_the_same_sinks_on_the_flex_path(monkeypatch):
    """The flex path's column sums pick the tiled path's sink sets, layer by layer."""
    from attnsurgery.registry import get_surgery_class

    act = get_surgery_class("act")
    model = tiny_model("gemma3")
    ids = random_ids(2, 150)
    sets = {}
    for mode in ("0", "eager"):
        monkeypatch.setattr(flex, "MODE", mode)
        found = sets[mode] = []
        real = act._select

        def spy(self, column_sums, counts, call, real=real, found=found):
            sinks = real(self, column_sums, counts, call)
            found.append(sinks.clone())
            return sinks

        monkeypatch.setattr(act, "_select", spy)
        with patch(model, "act", beta=0.4, threshold=0.02), torch.no_grad():
            model(ids)
        monkeypatch.setattr(act, "_select", real)
    assert len(sets["0"]) == len(sets["eager"]) > 0
    assert any(bool(s.any()) for s in sets["0"])
    for tiled, fused in zip(sets["0"], sets["eager"]):
        assert torch.equal(tiled, fused)


def test_moh_on_flex_equals_the_gathered_kernel(monkeypatch):
    """MoH's kernel (shared + routed heads, GQA) with every head's routed rows in one flex call, against the
    per-head gathered blocks it replaces on a GPU."""
    from attnsurgery.registry import get_surgery_class

    get_surgery_class("moh")
    kernel = next(m for n, m in sys.modules.items() if n.endswith("moh.kernel"))
    g = torch.Generator().manual_seed(0)
    for heads, kv, shared in [(4, 1, 1), (6, 2, 0), (4, 2, 2)]:
        q = torch.randn(2, heads, T, 16, generator=g) * 2
        k = torch.randn(2, kv, T, 16, generator=g) * 2
        v = torch.randn(2, kv, T, 16, generator=g)
        keep = torch.rand(2, T, heads - shared, generator=g) < 0.75
        monkeypatch.setattr(flex, "MODE", "0")
        ref = kernel.moh_attention(q, k, v, None, 0.25, keep, shared)
        monkeypatch.setattr(flex, "MODE", "eager")
        used = _spy_flex(monkeypatch, "routed_attention")
        out = kernel.moh_attention(q, k, v, None, 0.25, keep, shared)
        assert used
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(2, 1, T, T)
        tol = kernel_atol(q, k, v, allowed, 0.25)["out"]
        torch.testing.assert_close(out, ref, atol=tol, rtol=0)


def test_a_failing_flex_path_falls_back_to_the_tiled_pass(monkeypatch):
    """A compiler failure on the user's machine costs speed, not the forward: a warning, the tiled pass, and
    the flex paths off for the rest of the process. Under ATTNSURGERY_FLEX=eager (tests) it raises instead."""
    model = tiny_model("gemma3")
    ids = random_ids(1, 40)
    with patch(model, "act", beta=0.4, threshold=0.02), torch.no_grad():
        expected = model(ids).logits

    def broken(*args, **kwargs):
        raise RuntimeError("triton: no kernel for you")

    monkeypatch.setattr(flex, "log_sum_exp", broken)
    monkeypatch.setattr(flex, "MODE", "eager")
    with patch(model, "act", beta=0.4, threshold=0.02), torch.no_grad(), pytest.raises(RuntimeError):
        model(ids)
    monkeypatch.setattr(flex, "MODE", "1")
    monkeypatch.setattr(flex, "enabled_for", lambda *tensors: flex.MODE == "1")  # as on a GPU
    with patch(model, "act", beta=0.4, threshold=0.02), torch.no_grad():
        with pytest.warns(RuntimeWarning, match="flex_attention path failed"):
            got = model(ids).logits
    assert flex.MODE == "0"
    torch.testing.assert_close(got, expected, atol=logit_atol("gemma3"), rtol=0)


# the correctness contract (tests/test_contract.py, tests/test_act.py) once more with the flex paths on
CONTRACT = [
    ("test_contract", "test_batched_padded_equals_one_by_one", ("clipped_softmax", "moh"), ("left",)),
    ("test_contract", "test_cached_decode_equals_full_forward", ("clipped_softmax", "moh"), ()),
    ("test_contract", "test_generate_with_cache_equals_without", ("clipped_softmax", "moh"), ()),
    ("test_contract", "test_causal_mask_is_kept", ("clipped_softmax", "moh"), ()),
]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize(("module", "name", "surgeries", "extra"), CONTRACT, ids=[c[1] for c in CONTRACT])
def test_contract_on_the_flex_paths(arch, module, name, surgeries, extra, eager_flex):
    test = getattr(__import__(module), name)
    for surgery in surgeries:
        test(arch, surgery, *extra)


@pytest.mark.parametrize(
    "name",
    [
        "test_batched_padded_equals_one_by_one",
        "test_decode_frozen_keeps_prefill_sinks_and_rows_sum_to_one",
        "test_decode_recompute_and_generate",
        "test_future_tokens_can_move_earlier_outputs_but_never_the_mask",
    ],
)
def test_act_contract_on_the_flex_path(name, eager_flex):
    import inspect

    import test_act

    test = getattr(test_act, name)
    if "side" in inspect.signature(test).parameters:
        test("left")
    else:
        test()


def test_full_width_value_fallbacks_give_the_same_log_sum_exps():
    """Where a GPU compiler refuses the 16-wide value tensor, the full-width passes stand in: same numbers."""
    q, k, v, mask, allowed, valid = case("bool", t=T)
    vis = flex.Visibility.of(_call(q, mask))
    narrow = flex._lse_pass(q, k, vis.forward, 0.3)
    torch.testing.assert_close(flex._lse_pass_wide(q, k, vis.forward, 0.3), narrow, atol=0, rtol=0)
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    lse = torch.nan_to_num(narrow, neginf=0.0)
    transposed = vis.transposed(valid, T)
    torch.testing.assert_close(
        flex._colsum_pass_wide(keys, q, lse, transposed, 0.3),
        flex._colsum_pass(keys, q, lse, transposed, 0.3),
        atol=kernel_atol(q, k, v, allowed, 0.3, valid)["lse"],  # both are log-sum-exps (of columns)
        rtol=0,
    )
