"""The CPU row-block kernel (attnsurgery/rowblock.py, csrc/rowblock.cpp) against a float64 reference, and the
surgeries that use it (ACT's detection, clipped softmax) against their exact torch path.

Tolerances are KERNEL_NOISE_FACTOR x the stock op's own float32 rounding on the same inputs (tiny.kernel_atol) and
NOISE_FACTOR x the stock model's (tiny.logit_atol), as everywhere in the suite. The kernel is compiled on first use;
on a machine that cannot build it these tests fail (CI installs a compiler), except the fallback test, which
simulates a failed build.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import (
    KERNEL_NOISE_FACTOR,
    causal,
    kernel_atol,
    logit_atol,
    padded_batch,
    random_ids,
    stock_noise,
    tiny_model,
)

from attnsurgery import load_model, patch, rowblock

SCALE = 0.125


@pytest.fixture(scope="module", autouse=True)
def built():
    assert rowblock.load() is not None, f"the row-block kernel did not build: {rowblock._failure}"


def reference(q, k, v, allowed, clip=None, weights=None):
    """float64 softmax attention: (out, lse, column sums) with rows that see no key at out 0, lse +inf."""
    groups = q.shape[1] // k.shape[1]
    kk, vv = (x.double().repeat_interleave(groups, 1) for x in (k, v))
    scores = (q.double() @ kk.transpose(-1, -2) * SCALE).masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(-1)
    probs = (scores - lse[..., None]).exp().nan_to_num(0.0)
    cols = None if weights is None else (probs * weights.double()[:, None, :, None]).sum(2)
    if clip is not None:
        heads, a, b = clip
        clipped = (a * probs + b).clamp(0, 1).masked_fill(~allowed, 0.0)
        probs = torch.where(heads[None, :, None, None], clipped, probs)
    blind = ~allowed.any(-1).expand_as(lse)
    out = (probs @ vv).masked_fill(blind[..., None], 0.0)
    return out, lse.masked_fill(blind, float("inf")), cols


def padded(b, t, s, pad):
    """Left padding of ``pad`` tokens on batch row 0: its padding queries see nothing (as transformers' masks)."""
    allowed = causal(b, t, s).clone()
    allowed[0, :, :, :pad] = False
    return allowed


def window(b, t, w):
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    return ((j <= i) & (i - j < w))[None, None].expand(b, 1, t, t)


CASES = {
    # name: (B, H, Hkv, Tq, Tk, D, Dv, mask kind)
    "causal-gqa": (1, 6, 2, 97, 97, 16, 16, "causal"),
    "causal-mha-dv": (2, 4, 4, 70, 70, 16, 8, "causal"),
    "left-padded": (2, 4, 2, 50, 50, 16, 16, "padded"),
    "sliding-window": (2, 4, 2, 60, 60, 16, 16, "window"),
    "decode-row": (2, 4, 2, 1, 33, 16, 16, "padded"),
    "chunked-prefill": (1, 4, 2, 9, 40, 16, 16, "padded"),
    "bidirectional": (2, 4, 1, 20, 30, 16, 16, "none"),
    # a static cache: key slots past the tokens are never visible, and padding rows see nothing at all (the block's
    # key range is then narrower than a blind row's)
    "static-cache": (2, 4, 2, 12, 40, 16, 16, "static"),
}


def inputs(case, seed=0):
    bsz, heads, kv, tq, tk, d, dv, kind = CASES[case]
    g = torch.Generator().manual_seed(seed)
    # peaked rows: a few keys take most of the mass, as sinks do
    q = 3 * torch.randn(bsz, heads, tq, d, generator=g)
    k, v = torch.randn(bsz, kv, tk, d, generator=g), torch.randn(bsz, kv, tk, dv, generator=g)
    if kind == "causal":
        allowed, mask = causal(bsz, tq, tk), None
    elif kind == "padded":
        allowed = padded(bsz, tq, tk, 5)
        mask = allowed
    elif kind == "static":
        allowed = torch.zeros(bsz, 1, tq, tk, dtype=torch.bool)
        allowed[..., :tq] = padded(bsz, tq, tq, 3)
        mask = allowed
    elif kind == "window":
        allowed = window(bsz, tq, 7)
        mask = allowed
    else:
        allowed = torch.ones(bsz, 1, tq, tk, dtype=torch.bool)
        mask = allowed
    return q, k, v, allowed, mask, kind == "causal"


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_float64(case):
    q, k, v, allowed, mask, is_causal = inputs(case)
    weights = torch.rand(q.shape[0], q.shape[2], generator=torch.Generator().manual_seed(1))
    out, lse, cols = rowblock.attention(q, k, v, mask, SCALE, is_causal, column_weights=weights)
    ref_out, ref_lse, ref_cols = reference(q, k, v, allowed, weights=weights)
    seen = allowed.any(-1).expand_as(ref_lse)
    tol = kernel_atol(q, k, v, allowed, SCALE, valid=allowed.any(-1)[:, 0])
    assert (out - ref_out).abs().max() <= tol["out"]
    assert (lse[seen] - ref_lse[seen]).abs().max() <= tol["lse"]
    assert torch.equal(lse[~seen], ref_lse[~seen])  # +inf: no key, probabilities rebuilt from it are 0
    # column sums weigh rows by arbitrary weights <= 1: the stock sums' rounding bounds them
    assert (cols - ref_cols).abs().max() <= tol["sums"]


@pytest.mark.parametrize("case", ["causal-gqa", "left-padded", "sliding-window", "decode-row"])
def test_clipped_rows_match_float64(case):
    q, k, v, allowed, mask, is_causal = inputs(case)
    # a subset of heads is clipped, the rest keep softmax
    heads = torch.tensor([True, False] * (q.shape[1] // 2))
    clip = (heads, 1.05, -0.05)
    out, _, cols = rowblock.attention(q, k, v, mask, SCALE, is_causal, clip=clip)
    ref_out, _, _ = reference(q, k, v, allowed, clip=clip)
    tol = kernel_atol(q, k, v, allowed, SCALE, valid=allowed.any(-1)[:, 0])
    assert cols is None
    assert (out - ref_out).abs().max() <= tol["out"]
    # the clipping did something on the clipped heads, far beyond the tolerance, and nothing on the others
    plain, _, _ = rowblock.attention(q, k, v, mask, SCALE, is_causal)
    assert (out - plain)[:, heads].abs().max() > 10 * tol["out"]
    assert torch.equal(out[:, ~heads], plain[:, ~heads])


@pytest.mark.parametrize("case", ["causal-gqa", "left-padded", "static-cache"])
def test_skipped_rows_are_never_computed(case):
    """``active`` (MoH's routed pairs): active rows match float64; the others are 0 with lse +inf and add nothing to
    the column sums."""
    q, k, v, allowed, mask, is_causal = inputs(case)
    g = torch.Generator().manual_seed(2)
    active = torch.rand(q.shape[0], q.shape[1], q.shape[2], generator=g) < 0.7
    weights = torch.ones(q.shape[0], q.shape[2])
    out, lse, cols = rowblock.attention(
        q, k, v, mask, SCALE, is_causal, column_weights=weights, active=active
    )
    ref_out, ref_lse, _ = reference(q, k, v, allowed)
    _, _, ref_cols = reference(q, k, v, allowed & active[:, :, :, None], weights=weights)
    tol = kernel_atol(q, k, v, allowed, SCALE, valid=allowed.any(-1)[:, 0])
    seen = active & allowed.any(-1).expand_as(ref_lse)
    assert (out - ref_out)[active].abs().max() <= tol["out"]
    assert (lse - ref_lse)[seen].abs().max() <= tol["lse"]
    assert torch.equal(out[~active], torch.zeros_like(out[~active]))
    assert torch.isinf(lse[~active]).all()
    assert (cols - ref_cols).abs().max() <= tol["sums"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tile", [(1, 5), (7, 16), (64, 512)], ids=["1x5", "7x16", "64x512"])
def test_key_tiles_match_float64(case, tile, monkeypatch):
    """Plain rows (no column sums, no clipping: MoH's path) take the online softmax over key tiles: at any tile
    shape it matches float64, including rows whose keys start or end inside a tile, rows that see nothing and
    skipped (head, query) rows; the running max grows across tiles on these peaked rows, so rescaling runs."""
    monkeypatch.setattr(rowblock, "tile_shape", lambda groups, key_len: tile)
    q, k, v, allowed, mask, is_causal = inputs(case)
    ref_out, ref_lse, _ = reference(q, k, v, allowed)
    tol = kernel_atol(q, k, v, allowed, SCALE, valid=allowed.any(-1)[:, 0])
    active = torch.rand(q.shape[:3], generator=torch.Generator().manual_seed(3)) < 0.7
    for rows in (None, active):
        out, lse, cols = rowblock.attention(q, k, v, mask, SCALE, is_causal, active=rows)
        on = torch.ones_like(active) if rows is None else rows
        seen = on & allowed.any(-1).expand_as(ref_lse)
        assert cols is None
        assert (out - ref_out)[on].abs().max() <= tol["out"]
        assert (lse - ref_lse)[seen].abs().max() <= tol["lse"]
        assert torch.isinf(lse[~seen]).all() and not out[~seen].any()


def test_column_sums_are_deterministic_at_any_thread_count():
    """Threads add their column sums in a fixed order: the same call gives the same bits, and another thread count
    (other chunks) still matches float64."""
    q, k, v, allowed, mask, is_causal = inputs("left-padded")
    weights = torch.ones(q.shape[0], q.shape[2])
    first = rowblock.attention(q, k, v, mask, SCALE, is_causal, column_weights=weights)[2]
    assert torch.equal(first, rowblock.attention(q, k, v, mask, SCALE, is_causal, column_weights=weights)[2])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = rowblock.attention(q, k, v, mask, SCALE, is_causal, column_weights=weights)[2]
    finally:
        torch.set_num_threads(threads)
    _, _, ref_cols = reference(q, k, v, allowed, weights=weights)
    tol = kernel_atol(q, k, v, allowed, SCALE, valid=allowed.any(-1)[:, 0])
    assert (single - ref_cols).abs().max() <= tol["sums"]
    assert (first - ref_cols).abs().max() <= tol["sums"]


def test_kernel_loop_runs_on_every_thread():
    """The kernel's own loop is parallel (built with OpenMP where ATen uses it): without the flag its parallel_for
    ran on one thread and only MKL's GEMMs used the others, 1.25x from a second core where flash gets 1.7x."""
    if not rowblock._openmp():
        pytest.skip("ATen does not parallelise with OpenMP here")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert rowblock.load().worker_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("tiles", [False, True], ids=["whole-rows", "key-tiles"])
def test_skewed_routing_splits_by_work_at_any_thread_count(tiles):
    """Threads take ranges of units weighed by their work (MoH sends most tokens to a few heads: whole kv groups are
    nearly idle). Whatever the split, every unit runs once: outputs and lse are the same bits at 1, 2 and 3 threads,
    column sums (added in another order) match float64."""
    q, k, v, allowed, mask, is_causal = inputs("causal-gqa")  # 6 heads over 2 kv heads
    active = torch.rand(q.shape[:3], generator=torch.Generator().manual_seed(4)) < 0.9
    active[:, :3] &= torch.rand(q.shape[2]) < 0.05  # kv group 0: almost no rows
    weights = None if tiles else torch.ones(q.shape[0], q.shape[2])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(
                rowblock.attention(q, k, v, mask, SCALE, is_causal, column_weights=weights, active=active)
            )
    finally:
        torch.set_num_threads(threads)
    for out, lse, _ in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    ref_out, _, _ = reference(q, k, v, allowed)
    tol = kernel_atol(q, k, v, allowed, SCALE, valid=allowed.any(-1)[:, 0])
    assert (results[0][0] - ref_out)[active].abs().max() <= tol["out"]
    if not tiles:
        _, _, ref_cols = reference(q, k, v, allowed & active[:, :, :, None], weights=weights)
        for _, _, cols in results:
            assert (cols - ref_cols).abs().max() <= tol["sums"]


def test_block_boundaries_do_not_matter(monkeypatch):
    """Rows are independent: any block size gives the same numbers bit for bit (GEMMs of other shapes may round
    differently, so compare against the float64 reference at one size and for equality of the softmax part)."""
    q, k, v, allowed, mask, is_causal = inputs("causal-gqa")
    results = []
    for rows in (1, 7, 64, 1000):
        monkeypatch.setattr(rowblock, "block_rows", lambda groups, key_len, rows=rows: rows)
        results.append(rowblock.attention(q, k, v, mask, SCALE, is_causal, column_weights=torch.ones(1, 97)))
    ref_out, ref_lse, ref_cols = reference(q, k, v, allowed, weights=torch.ones(1, 97))
    tol = kernel_atol(q, k, v, allowed, SCALE)
    for out, lse, cols in results:
        assert (out - ref_out).abs().max() <= tol["out"]
        assert (lse - ref_lse).abs().max() <= tol["lse"]
        assert (cols - ref_cols).abs().max() <= tol["sums"]


@pytest.mark.parametrize("case", ["causal-gqa", "left-padded", "decode-row"])
@pytest.mark.parametrize("tiles", [False, True], ids=["whole-rows", "key-tiles"])
def test_transposed_views_are_read_in_place(case, tiles, monkeypatch):
    """transformers hands the attention function (B, H, T, D) views of its (B, T, H, D) projections: the kernel reads
    them where they lie (no copy) and gives what it gives for contiguous copies, within the float64 tolerance; its
    output is a view whose (B, Tq, H, Dv) transpose is contiguous (an attention function's return layout)."""
    q, k, v, allowed, mask, is_causal = inputs(case)
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]  # (B, T, H, D) memory
    assert all(rowblock._readable(x) is x for x in views)  # no copy
    weights = None if tiles else torch.ones(q.shape[0], q.shape[2])
    ref_out, ref_lse, ref_cols = reference(q, k, v, allowed, weights=weights)
    tol = kernel_atol(q, k, v, allowed, SCALE, valid=allowed.any(-1)[:, 0])
    seen = allowed.any(-1).expand_as(ref_lse)
    for args in ((q, k, v), views):
        out, lse, cols = rowblock.attention(*args, mask, SCALE, is_causal, column_weights=weights)
        assert out.transpose(1, 2).is_contiguous()
        assert (out - ref_out).abs().max() <= tol["out"]
        assert (lse - ref_lse)[seen].abs().max() <= tol["lse"]
        if not tiles:
            assert (cols - ref_cols).abs().max() <= tol["sums"]
    # a key stride below a row's width (an expanded tensor) cannot be a GEMM operand: copied, not misread
    narrow = k[:, :, :1].expand(-1, -1, k.shape[2], -1)
    assert rowblock._readable(narrow) is not narrow and rowblock._readable(narrow).is_contiguous()


def _count_calls(monkeypatch):
    calls = []
    real = rowblock.attention
    monkeypatch.setattr(rowblock, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


SURGERIES = {
    "act": {"beta": 0.4},
    "clipped_softmax": {"gamma": -0.03, "zeta": 1.02},
    "moh": {"active": 0.75, "router": "learned"},
}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("name", list(SURGERIES))
def test_surgery_on_kernel_equals_torch_path(arch, name, monkeypatch):
    """ACT, clipped softmax and MoH give the same logits through the kernel as through their exact torch paths,
    on a left-padded batch (Gemma-3: sliding-window layers too), and the kernel is what ran."""
    model = tiny_model(arch)
    ids, mask = padded_batch([random_ids(1, 21, seed=3)[0], random_ids(1, 14, seed=4)[0]])
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
        with patch(model, name, **SURGERIES[name]):
            calls = _count_calls(monkeypatch)
            fast = model(ids, attention_mask=mask).logits
            assert calls, "the kernel was not used"
            monkeypatch.setenv("ATTNSURGERY_ROWBLOCK", "0")
            slow = model(ids, attention_mask=mask).logits
    real = mask.bool()
    tol = logit_atol(arch)
    assert (fast - slow)[real].abs().max() <= tol
    assert (fast - stock)[real].abs().max() > 10 * tol  # the surgery is on


@pytest.mark.parametrize("rows,heads,head_dim", [(37, 9, 64), (5, 3, 20), (8, 2, 3)])
def test_gate_pass_matches_float64(rows, heads, head_dim):
    """gated attention's one-pass elementwise gate (row tails where head_dim is not a vector's width) against the
    float64 formula, within KERNEL_NOISE_FACTOR x the error the same formula shows in float32 torch ops."""
    g = torch.Generator().manual_seed(rows)
    attn, logits = (torch.randn(rows, heads * head_dim, generator=g) * 3 for _ in range(2))
    bias, scale = torch.randn(heads * head_dim, generator=g), 1.7
    want_gate = scale * torch.sigmoid(logits.double() + bias.double())
    want = attn.double() * want_gate
    torch_ops = attn * (torch.sigmoid(logits + bias) * scale)  # the surgery's torch path
    noise = max((torch_ops.double() - want).abs().max().item(), torch.finfo(torch.float32).eps)
    out = attn.clone()
    means = rowblock.gate_heads_(out, logits, bias, scale, head_dim)
    assert (out.double() - want).abs().max() <= KERNEL_NOISE_FACTOR * noise
    want_means = want_gate.view(rows, heads, head_dim).mean(-1)
    assert means.shape == (rows, heads)
    assert (means.double() - want_means).abs().max() <= KERNEL_NOISE_FACTOR * torch.finfo(
        torch.float32
    ).eps * 2
    assert (out - attn).abs().max() > 1  # it gated in place


def test_gated_attention_on_kernel_equals_torch_path(monkeypatch):
    """Elementwise gates at inference take the one-pass kernel; logits and mean gates equal the torch ops' on a
    left-padded batch, and training (gradients) keeps the torch ops."""
    model = tiny_model("llama")
    ids, mask = padded_batch([random_ids(1, 21, seed=3)[0], random_ids(1, 14, seed=4)[0]])
    calls = []
    real = rowblock.gate_heads_
    monkeypatch.setattr(rowblock, "gate_heads_", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
    with patch(model, "gated_attention", form="elementwise", init_std=0.3, gate_init=0.4) as handle:
        surgery = handle.surgeries[0]
        with torch.no_grad():
            fast = model(ids, attention_mask=mask).logits
            fast_means = surgery.mean_gates()
            assert len(calls) == model.config.num_hidden_layers, "the kernel was not used on every layer"
            monkeypatch.setenv("ATTNSURGERY_ROWBLOCK", "0")
            slow = model(ids, attention_mask=mask).logits
            slow_means = surgery.mean_gates()
        monkeypatch.delenv("ATTNSURGERY_ROWBLOCK")
        calls.clear()
        model(ids, attention_mask=mask).logits.sum().backward()
        assert not calls and all(p.grad is not None for p in surgery.parameters())
    real_tokens = mask.bool()
    tol = logit_atol("llama")
    assert (fast - slow)[real_tokens].abs().max() <= tol
    assert (fast - stock)[real_tokens].abs().max() > 10 * tol  # the gates are on
    assert fast_means.keys() == slow_means.keys()
    for layer, value in slow_means.items():
        assert fast_means[layer] == pytest.approx(value, abs=KERNEL_NOISE_FACTOR * 1e-6, rel=0)


def test_training_keeps_the_torch_path(monkeypatch):
    """The kernel has no backward: a call that needs gradients must not reach it."""
    model = tiny_model("llama")
    ids = random_ids(2, 12)
    with patch(model, "act", beta=0.4):
        calls = _count_calls(monkeypatch)
        model(ids).logits.sum().backward()
    assert not calls
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    model = tiny_model("llama")
    ids = random_ids(2, 16)
    with torch.no_grad(), patch(model, "act", beta=0.4):
        fast = model(ids).logits
        monkeypatch.setattr(rowblock, "_module", None)
        monkeypatch.setattr(rowblock, "_failure", None)

        def broken(*args, **kwargs):
            raise RuntimeError("Error building extension 'attnsurgery_rowblock': g++ not found")

        monkeypatch.setattr("torch.utils.cpp_extension.load", broken)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            slow = model(ids).logits
            model(ids)
    messages = [str(w.message) for w in caught if "row-block" in str(w.message)]
    assert len(messages) == 1, messages
    assert "g++ not found" in messages[0] and "ATTNSURGERY_ROWBLOCK=0" in messages[0]
    assert (fast - slow).abs().max() <= logit_atol("llama")


def test_kernel_of_another_version_is_refused(monkeypatch):
    """A process that imported an older attnsurgery compiles the newer source on its first kernel call (torch keys
    builds by source): a build whose calling convention differs is refused with one warning that says to restart,
    and the exact torch path runs, instead of a TypeError hours into a job."""
    built = rowblock.load()
    monkeypatch.setattr(rowblock, "_module", None)
    monkeypatch.setattr(rowblock, "_failure", None)
    monkeypatch.setattr(rowblock, "API", built.API + 1)
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *a, **kw: built)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert rowblock.load() is None
        q, k, v, _, mask, is_causal = inputs("causal-gqa")
        assert not rowblock.usable(q, k, v, mask)
    messages = [str(w.message) for w in caught if "row-block" in str(w.message)]
    assert len(messages) == 1 and "restart" in messages[0], messages


@pytest.mark.slow
def test_smollm2_act_on_kernel(monkeypatch):
    """The real model: ACT through the kernel is as close to ACT in float64 as ACT through the torch path is, and
    moves the logits far beyond that. (ACT's correction divides by 1 - P, the mass off the sinks, so on SmolLM2 its
    own float32 rounding reaches ~1e-2 in the logits, ~1000x the stock model's: the scale is ACT's, measured.)"""
    import copy

    model, tok = load_model("smollm2-135m")
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    exact_model = copy.deepcopy(model).double()
    with torch.no_grad():
        stock = model(ids).logits
        with patch(exact_model, "act"):
            exact = exact_model(ids).logits
        with patch(model, "act"):
            calls = _count_calls(monkeypatch)
            fast = model(ids).logits
            assert calls
            monkeypatch.setenv("ATTNSURGERY_ROWBLOCK", "0")
            slow = model(ids).logits
    torch_path_error = float((slow.double() - exact).abs().max())
    assert torch_path_error > stock_noise(model, ids)  # ACT's own rounding, beyond the stock model's
    # KERNEL_NOISE_FACTOR x the torch path's error, as the other kernel checks: 2x held on the machines this ran on
    # until an AMD EPYC (AVX512) CI host, where the kernel's error was 0.089 against the torch path's 0.018 on the
    # last token (the same with the kernel source before the gate pass was added); ACT's detection compares column
    # sums with a threshold, and float32 paths that sum in another order can decide a borderline column apart
    tol = KERNEL_NOISE_FACTOR * torch_path_error
    assert (fast.double() - exact).abs().max() <= tol
    assert (fast - stock).abs().max() > 20 * torch_path_error


def test_compiler_without_openmp_still_builds_the_kernel(monkeypatch):
    """A compiler that refuses -fopenmp (clang without libomp) gets the kernel built without it, with one warning
    naming the fix; the build is not abandoned for the torch path."""
    if not rowblock._openmp():
        pytest.skip("ATen does not parallelise with OpenMP here: the flag is never asked for")
    monkeypatch.setattr(rowblock, "_module", None)
    monkeypatch.setattr(rowblock, "_failure", None)
    builds = []

    def fake_build(**kwargs):
        builds.append(kwargs)
        if "-fopenmp" in kwargs["extra_cflags"] or "-fopenmp" in kwargs["extra_ldflags"]:
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")
        return type("Module", (), {"API": rowblock.API})()

    monkeypatch.setattr("torch.utils.cpp_extension.load", fake_build)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = rowblock.load()
    assert module is not None and rowblock._failure is None and len(builds) == 2
    messages = [str(w.message) for w in caught if "row-block" in str(w.message)]
    assert len(messages) == 1 and "without OpenMP" in messages[0] and "libomp" in messages[0], messages
