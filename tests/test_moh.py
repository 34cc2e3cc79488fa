"""moh: the identity with every routed head kept (through the gathered kernel), the fast path (routed-off heads not
computed) against the masked path and the hook-based reference, the binary mask, the query-norm router's QK-norm
warning, the learned router (identity init, load-balance loss by hand, straight-through gradients, training with
the shared trainer), head-usage inspection, FLOPs accounting and errors. The shared contract (tests/test_contract.py)
runs its example_args (the learned router) on every tiny architecture as well."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from attnsurgery.patches.moh import kernel as moh_kernel
from attnsurgery.patches.moh.reference import moh_reference
from tiny import (
    ARCHS,
    KERNEL_NOISE_FACTOR,
    NOISE_FACTOR,
    decode_stepwise,
    float_noise,
    logit_atol,
    padded_batch,
    random_ids,
    stock_noise,
    tiny_model,
    tiny_tokenizer,
)
from transformers import AutoModelForCausalLM, LlamaConfig

from attnsurgery import load_surgery, patch, save_surgery
from attnsurgery.engine import Engine
from attnsurgery.errors import AttnSurgeryError, SurgeryConfigError

#: the query-norm router on every architecture whose queries are not normalised (Gemma-3's q_norm makes every
#: tiny query norm sqrt(D): its routing would be rounding noise, see test_query_norm_warns_on_qk_norm)
QUERY_NORM_ARCHS = [a for a in ARCHS if a != "gemma3"]


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def padded(lengths, side):
    ids, mask = padded_batch([random_ids(1, n, seed=n)[0] for n in lengths], side)
    return ids, {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def router_params(surgery):
    return {
        int(k): (
            r.routed.detach().clone(),
            None if r.shared is None else r.shared.detach().clone(),
            None if r.balance is None else r.balance.detach().clone(),
        )
        for k, r in surgery.routers.items()
    }


# -- identity ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["query_norm", "learned"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_routed_head_kept_is_the_identity(arch, router):
    model = tiny_model(arch)
    ids = random_ids(2, 20)
    ref = logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gemma3's query-norm warning
        handle = patch(model, "moh", router=router, active=1.0)
    with handle:
        out = logits(model, ids)
        surgery = handle.surgeries[0]
        routing, flops = surgery.last_routing(), surgery.flops_skipped()
    assert (out - ref).abs().max() <= logit_atol(arch)
    # the router and the gathered kernel really ran on every layer, keeping every head
    layers = list(range(model.config.num_hidden_layers))
    assert sorted(routing) == sorted(flops) == layers
    assert all(bool(keep.all()) and keep.shape == (2, 20, 2) for keep in routing.values())
    assert all(f["total"] > 0 and f["skipped"] == 0 for f in flops.values())


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_weighted_learned_router_is_the_identity_at_zero_init(arch):
    model = tiny_model(arch)
    ids = random_ids(2, 16)
    ref = logits(model, ids)
    with patch(model, "moh", router="learned", gates="weighted", active=1.0, shared=1) as handle:
        out = logits(model, ids)
        assert all(
            float(p.detach().abs().max()) == 0 for p in handle.parameters()
        )  # zero init is the default here
    assert (out - ref).abs().max() <= logit_atol(arch)


# -- fast path == masked path == reference ----------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right", "none"])
@pytest.mark.parametrize("arch", QUERY_NORM_ARCHS)
def test_query_norm_fast_matches_masked_and_reference(arch, side, monkeypatch):
    """Padded batches (a 4D mask) and an unpadded one (no mask on SDPA models: the split causal blocks), in
    blocks of 8 gathered rows so every block's key range is cut."""
    monkeypatch.setattr(moh_kernel, "BLOCK_ROWS", 8)
    model = tiny_model(arch)
    if side == "none":
        ids, kw = random_ids(2, 40), {}
        real = torch.ones_like(ids, dtype=torch.bool)
    else:
        ids, kw = padded([17, 9, 13], side)
        real = kw["attention_mask"].bool()
    base = logits(model, ids, **kw)
    with patch(model, "moh", layers="1:") as handle:
        fast = logits(model, ids, **kw)
        surgery = handle.surgeries[0]
        shared, top_k = surgery.num_shared, surgery.top_k
    with patch(model, "moh", layers="1:", skip_compute=False):
        masked = logits(model, ids, **kw)
    layers = list(range(1, model.config.num_hidden_layers))
    with moh_reference(model, layers, shared, top_k):
        ref = logits(model, ids, **kw)
    # routing heads off edits the model far beyond the tolerance the three paths agree to
    assert (fast - base)[real].abs().max() > 10 * logit_atol(arch)
    torch.testing.assert_close(fast[real], masked[real], atol=logit_atol(arch), rtol=0)
    torch.testing.assert_close(fast[real], ref[real], atol=logit_atol(arch), rtol=0)


@pytest.mark.parametrize("gates", ["binary", "weighted"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma2"])
def test_learned_fast_matches_masked_and_reference(arch, gates, monkeypatch):
    monkeypatch.setattr(
        moh_kernel, "BLOCK_ROWS", 4
    )  # several blocks per head: sliding windows cut the key range
    model = tiny_model(arch)
    ids, kw = padded([15, 8, 12], "left")
    real = kw["attention_mask"].bool()
    base = logits(model, ids, **kw)
    args = dict(router="learned", gates=gates, shared=1, top_k=2, init_std=0.2)
    handle = patch(model, "moh", **args)
    surgery = handle.surgeries[0]
    with torch.no_grad():  # non-zero shared / balance weights, so the weighted gates differ from 1
        for r in surgery.routers.values():
            r.balance.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    fast = logits(model, ids, **kw)
    params = router_params(surgery)
    handle.remove()
    masked_handle = patch(model, "moh", skip_compute=False, **args)
    masked_handle.surgeries[0].load_state_dict(surgery.state_dict())
    masked = logits(model, ids, **kw)
    masked_handle.remove()
    with moh_reference(model, sorted(params), 1, 2, router=params, binary=gates == "binary"):
        ref = logits(model, ids, **kw)
    # as above: the routing edits the model far beyond the tolerance the three paths agree to
    assert (fast - base)[real].abs().max() > 10 * logit_atol(arch)
    torch.testing.assert_close(fast[real], masked[real], atol=logit_atol(arch), rtol=0)
    torch.testing.assert_close(fast[real], ref[real], atol=logit_atol(arch), rtol=0)


def test_routed_off_pairs_are_not_computed(monkeypatch):
    """The gathered kernel attends, per routed head, only the queries routed to it (the longest batch row's count)."""
    monkeypatch.setenv("ATTNSURGERY_ROWBLOCK", "0")  # the torch path (the CPU row-block kernel: the test below)
    seen = []
    original = moh_kernel.gathered_head_attention

    def spy(query, *args, **kwargs):
        seen.append(query.shape[1])
        return original(query, *args, **kwargs)

    monkeypatch.setattr(moh_kernel, "gathered_head_attention", spy)
    model = tiny_model("llama")
    ids = random_ids(1, 32)
    with patch(model, "moh", shared=0, top_k=1, layers=[2]) as handle:
        logits(model, ids)
        keep = handle.surgeries[0].last_routing()[2][0]  # (T, E=4)
    assert seen == [int(n) for n in keep.sum(0) if n > 0]
    assert sum(seen) == 32  # each query attended by exactly one head: a quarter of the work


def test_row_block_kernel_computes_routed_pairs_only(monkeypatch):
    """On CPU at inference the compiled row-block kernel runs MoH: it is asked for exactly the routed (head, query)
    pairs plus every query of the shared heads (tests/test_rowblock.py checks it never computes the others)."""
    from attnsurgery import rowblock

    asked = []
    original = rowblock.attention

    def spy(*args, **kwargs):
        asked.append(kwargs["active"].clone())
        return original(*args, **kwargs)

    monkeypatch.setattr(rowblock, "attention", spy)
    model = tiny_model("llama")
    ids = random_ids(1, 32)
    with patch(model, "moh", shared=1, top_k=1, layers=[2]) as handle:
        logits(model, ids)
        keep = handle.surgeries[0].last_routing()[2][0]  # (T, E=3)
    assert len(asked) == 1
    active = asked[0][0]  # (H, T)
    assert active[0].all()  # the shared head
    assert torch.equal(active[1:], keep.T)
    assert int(active[1:].sum()) == 32  # each query on one routed head


@pytest.mark.parametrize("arch", QUERY_NORM_ARCHS)
def test_query_norm_cached_decode_and_generate(arch):
    model = tiny_model(arch)
    ids = random_ids(2, 18)
    with patch(model, "moh"), torch.no_grad():
        full = model(ids).logits
        stepwise, _ = decode_stepwise(model, ids, 12)
        torch.testing.assert_close(stepwise, full, atol=logit_atol(arch), rtol=0)
        prompt, kw = padded([9, 13], "left")
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=kw["attention_mask"])
        assert torch.equal(
            model.generate(prompt, use_cache=True, **gen), model.generate(prompt, use_cache=False, **gen)
        )


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 7, 8, 9, 11, 15, 16, 32])
def test_default_split_is_moh_llama3s(heads):
    """MoH-LLaMA3 (modeling_llama.py): shared_head = int(0.5 H), routed_head = int(0.25 H) per token."""
    from attnsurgery.patches.moh.config import MoHConfig

    shared, top_k = MoHConfig().resolve(heads)
    assert shared == int(0.5 * heads)
    assert top_k == max(1, min(int(0.25 * heads), heads - shared))


# -- the mask ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,active",
    [
        ({}, (2, 1)),
        ({"active": 0.5, "shared": 1}, (1, 1)),
        ({"shared": 0}, (0, 1)),  # top_k stays a quarter of all heads (MoH-LLaMA3), whatever is shared
        ({"shared": 0.25}, (1, 1)),
    ],
)
def test_binary_mask_has_exactly_shared_plus_top_k_heads(args, active):
    model = tiny_model("qwen2")
    ids, kw = padded([14, 6, 10], "right")
    real = kw["attention_mask"].bool()
    with patch(model, "moh", **args) as handle:
        logits(model, ids, **kw)
        surgery = handle.surgeries[0]
        assert (surgery.num_shared, surgery.top_k) == active
        for keep in surgery.last_routing().values():
            per_token = keep.sum(-1)  # routed heads used by each query
            assert bool((per_token[real] == surgery.top_k).all())
            assert bool((per_token[~real] == 0).all())  # padding rows: shared heads only
        usage = surgery.head_usage()
    assert all(
        row["tokens"] == int(real.sum()) and sum(row["counts"]) == active[1] * row["tokens"]
        for row in usage.values()
    )


def test_query_norm_routes_by_query_norm():
    """The kept heads are those with the largest query norms (the released router's chain is monotone in them)."""
    model = tiny_model("llama")
    queries = {}
    ids = random_ids(1, 12)
    with patch(model, "moh", layers=[1]) as handle:

        def grab(module, args, kwargs):
            queries["x"] = args[0] if args else kwargs["hidden_states"]

        h = model.model.layers[1].self_attn.register_forward_pre_hook(grab, with_kwargs=True)
        logits(model, ids)
        h.remove()
        keep = handle.surgeries[0].last_routing()[1][0]  # (T, 2)
    q = model.model.layers[1].self_attn.q_proj(queries["x"])[0].unflatten(-1, (4, 16))  # pre-RoPE
    norms = q[:, 2:].norm(dim=-1)  # routed heads 2, 3
    assert torch.equal(keep[:, 1], norms[:, 1] > norms[:, 0])
    assert 0 < int(keep[:, 1].sum()) < 12  # both heads win somewhere


def test_query_norm_warns_on_qk_norm_models():
    with pytest.warns(UserWarning, match="router='learned'"):
        handle = patch(tiny_model("gemma3"), "moh")
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch(tiny_model("gemma3"), "moh", router="learned").remove()  # the learned router does not warn
        patch(tiny_model("llama"), "moh").remove()  # no q_norm: no warning


# -- learned router: regulariser, gradients, training --------------------------------------------------------------


def test_load_balance_loss_by_hand():
    model = tiny_model("llama")
    ids, kw = padded([12, 7], "right")
    real = kw["attention_mask"].bool()
    # zero router weights: uniform P = 1/E, so L_b = sum_i f_i = top_k whatever the (tied) choice
    with patch(model, "moh", router="learned", gates="weighted", balance_loss=0.5) as handle:
        assert handle.surgeries[0].regularizer() is None  # nothing recorded yet
        model(ids, **kw)
        # exact: x @ 0 = 0 gives every token P = 1/4 exactly, so every token makes the same tied pick and f is 0 or 1
        # per head; mean(P f) E^2 = 1 and 0.5 x mean(1, 1, 1) carry no rounding
        assert float(handle.surgeries[0].regularizer().detach()) == 0.5
    handle = patch(
        model, "moh", router="learned", shared=0, top_k=2, init_std=0.3, balance_loss=0.01, layers="1:"
    )
    surgery = handle.surgeries[0]
    hidden = {}
    hooks = [
        model.model.layers[i].self_attn.register_forward_pre_hook(
            lambda m, a, k, i=i: hidden.__setitem__(i, k.get("hidden_states", a[0] if a else None)),
            with_kwargs=True,
        )
        for i in (1, 2)
    ]
    model(ids, **kw)
    for h in hooks:
        h.remove()
    reg = surgery.regularizer()

    def by_hand(dtype):
        expected = []
        for layer in (1, 2):
            x = hidden[layer][real].detach().to(dtype)  # real tokens only
            p = torch.softmax(x @ surgery.routers[str(layer)].routed.detach().to(dtype).T, -1)  # (N, 4)
            f = torch.nn.functional.one_hot(p.topk(2, -1).indices, 4).sum(1).to(dtype)
            expected.append((p.mean(0) * f.mean(0)).mean() * 16)
        return 0.01 * torch.stack(expected).mean()

    want = by_hand(torch.float64)
    # the router is one op on the same hidden states: KERNEL_NOISE_FACTOR x the formula's own fp32 rounding here
    atol = KERNEL_NOISE_FACTOR * float_noise(by_hand(torch.float32), want)
    assert float(reg.detach()) == pytest.approx(float(want), abs=atol, rel=0)
    assert reg.requires_grad
    reg.backward()
    assert all(surgery.routers[str(i)].routed.grad.abs().max() > 0 for i in (1, 2))
    handle.remove()
    with patch(model, "moh") as h:  # query-norm router: nothing to balance
        model(ids, **kw)
        assert h.surgeries[0].regularizer() is None


@pytest.mark.parametrize("gates", ["binary", "weighted"])
def test_gradients_flow_through_the_router_not_the_model(gates):
    model = tiny_model("llama")
    model.requires_grad_(False)
    ids = random_ids(2, 12)
    with patch(model, "moh", router="learned", gates=gates, shared=1, top_k=2, balance_loss=0) as handle:
        binary = logits(model, ids)
        out = model(ids).logits
        # the straight-through path changes no value (up to the no-grad kernel's own rounding)
        torch.testing.assert_close(out.detach(), binary, atol=logit_atol("llama"), rtol=0)
        loss = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        routers = handle.surgeries[0].routers.values()
        for (
            r
        ) in routers:  # W_r and the two-stage balance W_h get the task gradient (straight-through if binary)
            assert r.routed.grad is not None and r.routed.grad.abs().max() > 0
            assert r.balance.grad is not None and r.balance.grad.abs().max() > 0
            assert r.shared is None  # one shared head: weight 1, no W_s
    assert all(p.grad is None for p in model.parameters())


def test_binary_forward_is_the_hard_mask():
    """Straight-through: the learned router's binary forward equals masking with its 0/1 choice."""
    model = tiny_model("opt")
    ids = random_ids(2, 14)
    handle = patch(model, "moh", router="learned", shared=1, top_k=2)
    out = model(ids).logits.detach()  # with grad enabled: the straight-through expression is in the graph
    params = router_params(handle.surgeries[0])
    handle.remove()
    with moh_reference(model, sorted(params), 1, 2, router=params, binary=True):
        ref = logits(model, ids)
    torch.testing.assert_close(out, ref, atol=logit_atol("opt"), rtol=0)


def test_trainer_lowers_the_kd_loss(tmp_path):
    from attnsurgery.train import TrainConfig, prepare_data, train

    data = prepare_data(tiny_tokenizer(), "gutenberg_ppl", 32, max_val_windows=4)
    model = tiny_model("llama")
    handle = patch(model, "moh", router="learned", shared=0, top_k=2, balance_loss=0)
    config = TrainConfig(
        objective="kd", steps=12, batch_size=4, seq_len=32, lr=0.05, val_every=12, save_every=12
    )
    result = train(model, handle, data, config, out_dir=tmp_path / "run", progress=False)
    first, last = result.val_history[0]["objective"], result.val_history[-1]["objective"]
    assert (
        first > 0 and last < 0.9 * first
    )  # kd against the unpatched model: the router learned to route better
    ids = random_ids(2, 16)
    trained = logits(model, ids)
    handle.remove()
    with patch(model, str(tmp_path / "run")):  # the run folder is a recipe
        torch.testing.assert_close(logits(model, ids), trained, atol=0, rtol=0)
    other = _other_shape(hidden_size=32, num_attention_heads=4)  # ... for this shape of model only
    with pytest.raises(
        AttnSurgeryError,
        match=r"moh: saved tensor 'routers\.0\.routed' has shape \(4, 64\), this model needs \(4, 32\)",
    ):
        patch(other, str(tmp_path / "run"))
    assert Engine.of(other, create=False) is None


def _other_shape(**shape):
    config = LlamaConfig(
        vocab_size=128, intermediate_size=64, num_hidden_layers=3, num_key_value_heads=2, **shape
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_learned_router_recipe_on_another_shape_fails_clearly(tmp_path):
    model = tiny_model("llama")
    handle = patch(model, "moh", router="learned")
    save_surgery(handle, tmp_path / "moh")
    handle.remove()
    for shape in (dict(hidden_size=32, num_attention_heads=4), dict(hidden_size=64, num_attention_heads=8)):
        other = _other_shape(**shape)
        with pytest.raises(
            AttnSurgeryError, match=r"moh: saved tensor 'routers\.0\.\w+' has shape .*different model"
        ):
            load_surgery(other, tmp_path / "moh")
        assert Engine.of(other, create=False) is None  # nothing half-applied


# -- inspection and FLOPs --------------------------------------------------------------------------------------------


def test_write_inspection(tmp_path):
    model = tiny_model("llama")
    ids, kw = padded([16, 9], "left")
    with patch(model, "moh", shared=1, top_k=2) as handle:
        logits(model, ids, **kw)
        logits(model, ids[:1], attention_mask=kw["attention_mask"][:1])
        paths = handle.surgeries[0].write_inspection(tmp_path / "inspect")
    assert [p.name for p in paths] == ["moh-head-usage.json", "moh-head-usage.png"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths[0].read_text())
    assert data["router"] == "query_norm" and data["top_k"] == 2 and data["routed_heads"] == [1, 2, 3]
    assert sorted(data["layers"]) == ["0", "1", "2"]
    for row in data["layers"].values():
        assert row["tokens"] == 25 + 16  # real tokens of both forwards
        assert sum(row["counts"]) == 2 * row["tokens"] and math.isclose(sum(row["load"]), 2.0)
        assert 0 < row["flops_skipped_fraction"] < 1


def test_flops_skipped_by_hand():
    model = tiny_model("llama")  # 4 heads of 16 channels: 2 shared, 1 of 2 routed per token
    ids, kw = padded([16, 10], "right")
    with patch(model, "moh") as handle:
        logits(model, ids, **kw)
        flops = handle.surgeries[0].flops_skipped()
    visible = sum(range(1, 17)) + sum(range(1, 11))  # causal keys of each real query
    for row in flops.values():
        assert row["total"] == 4 * 16 * 4 * visible
        assert row["skipped"] == 4 * 16 * 1 * visible  # one routed head off for every real token
        assert row["fraction"] == pytest.approx(0.25)
    with patch(model, "moh", active=1.0) as handle:
        logits(model, ids, **kw)
        assert all(row["skipped"] == 0 for row in handle.surgeries[0].flops_skipped().values())


# -- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (
            {"top_k": 3},
            r"top_k=3 is out of range on this model: 4 heads, 2 shared, so top_k must lie in \[1, 2\]",
        ),
        ({"top_k": 0}, r"top_k=0(\.0)? is out of range: it must lie in \[1, inf\)"),
        ({"shared": 4}, r"shared=4 leaves no routed head .* use shared <= 3"),
        ({"shared": 3, "top_k": 2}, r"top_k must lie in \[1, 1\]"),
        ({"active": 0.25}, r"active=0.25 \(top_k=-1\) is out of range"),
        ({"active": 0.0}, r"active=0.0 is out of range"),
        ({"top_k": 1, "active": 0.75}, "not both"),
        ({"gates": "weighted"}, "needs router='learned'"),
        ({"router": "lerned"}, "(?i)did you mean 'learned'"),
        ({"heads": [0, 1]}, "not `heads=`"),
        ({"shared": 1.5}, "fraction of the heads below 1"),
        ({"shared": 0.25, "active": 0.25}, r"active=0.25 \(top_k=0\) is out of range"),
        ({"balance_loss": -0.1}, "balance_loss"),
    ],
)
def test_bad_arguments(args, message):
    model = tiny_model("llama")
    with pytest.raises(SurgeryConfigError, match=message):
        patch(model, "moh", **args)
    assert Engine.of(model, create=False) is None
    assert model.config._attn_implementation == "sdpa"


# -- the real packaged model -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_query_norm_on_smollm2():
    from attnsurgery.tasks import load_split

    from attnsurgery import load_model

    model, tokenizer = load_model("smollm2-135m")
    text = " ".join(r["text"] for r in load_split("gutenberg_ppl", "test")[:3])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :192]
    with torch.no_grad():
        base = model(ids, labels=ids).loss
        with patch(model, "moh", active=0.75) as handle:  # 9 heads: 4 shared + 3 of 5 routed = 7 (78%)
            out = model(ids, labels=ids)
            surgery = handle.surgeries[0]
            assert (surgery.num_shared, surgery.top_k) == (4, 3)
            fraction = surgery.flops_skipped()[0]["fraction"]
        with patch(model, "moh", active=0.75, skip_compute=False):
            masked = model(ids).logits
    assert fraction == pytest.approx(2 / 9)
    assert math.isfinite(out.loss) and out.loss > base + 1e-3  # not the identity
    assert math.exp(out.loss) < 5 * math.exp(base)  # training-free, yet the model still reads the text
    # 30 layers of fp32 rounding between the two kernels: NOISE_FACTOR x the stock model's own float noise on this
    # text; a routing or mask error moves logits by far more
    atol = NOISE_FACTOR * stock_noise(model, ids)
    torch.testing.assert_close(out.logits, masked, atol=atol, rtol=0)


def test_attention_maps_leave_out_layers_moh_computes():
    """attention_maps on a model whose attention MoH computes with its own kernel: those layers have no softmax
    probabilities, so they are left out (inspect then writes MoH's head usage instead of maps)."""
    from attnsurgery import attention_maps

    model = tiny_model("llama")
    ids = random_ids(1, 10)
    with patch(model, "moh", router="learned", active=0.75, layers=[0]):
        maps = attention_maps(model, ids)
    assert 0 not in maps and set(maps) == set(range(1, model.config.num_hidden_layers))


def test_gpu_blocks_run_without_cudnn_sdpa():
    """The routed heads' blocks change shape from block to block; cuDNN's SDPA would plan each new shape, so the
    GPU path switches it off (and only it) for those calls, and restores it afterwards."""
    from attnsurgery.patches.moh.kernel import _fixed_plan_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with _fixed_plan_backends():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
