"""Tiny random-weight models of the architectures attnsurgery claims, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    Qwen2Config,
)

VOCAB = 128


def _config(arch: str):
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":  # GQA: 4 query heads share 2 key/value heads
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    if arch == "gemma3":  # sliding-window and global layers mixed, 1 kv head
        return Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=256,
            sliding_window=6,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16,
            **common,
        )
    if arch == "gemma2":  # logit softcapping (small cap, so it bites), sliding + global layers, eager only
        return Gemma2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=30.0,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, **common)
    if arch == "opt":  # pre-scales q and passes scaling=1.0
        return OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
            **common,
        )
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "gemma3", "gemma2", "gpt2", "opt"]
#: architectures transformers runs on eager attention only (Gemma-2: SDPA has no logit softcapping)
EAGER_ONLY = {"gemma2"}


def tiny_model(
    arch: str, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0
):
    if arch in EAGER_ONLY:
        attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        _config(arch), attn_implementation=attn_implementation, dtype=dtype
    )
    # random init leaves attention nearly uniform; widen q/k so heads are peaked and edits show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj.weight", "k_proj.weight", "c_attn.weight")):
                p.mul_(4.0)
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def padded_batch(seqs, side: str = "left", pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad 1D id tensors to one batch (with ``pad_id``) on the ``side`` given, with the matching attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = s
        mask[i, sl] = 1
    return ids, mask


def cache_kwarg(model) -> str:
    """transformers >= 5.24 calls the cache argument `cache`; older 5.x `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_stepwise(model, ids: torch.Tensor, prefix: int):
    """Logits of ``ids`` from a cached run: a prefill of the first ``prefix`` tokens, then one token per step
    (what ``generate`` does); ``(logits (B, T, V), cache)``, to compare with a full forward. Call under no_grad."""
    out = model(ids[:, :prefix], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(prefix, ids.shape[1]):
        out = model(ids[:, t : t + 1], use_cache=True, **{cache_kwarg(model): cache})
        cache = out.past_key_values
        steps.append(out.logits)
    return torch.cat(steps, dim=1), cache


def tiny_tokenizer():
    """A character-level fast tokenizer that fits VOCAB (printable ASCII + newline), for lm-eval tests."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(chars)})
    assert len(vocab) <= VOCAB
    # BPE without merges is character-level; Fuse decodes by concatenation (no spaces between characters)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def force_real_path(handle) -> None:
    """Make every surgery of ``handle`` run its stages on all its targeted layers, even where its settings are the
    identity and it would skip the layer (``active_stages`` -> empty): identity tests then exercise the surgery's
    own code path, not the stock kernel."""
    from attnsurgery.engine import Engine

    for surgery in handle.surgeries:
        surgery.active_stages = lambda layer, s=surgery: (
            s.stages if layer in s.targets.layers else frozenset()
        )
    engine = Engine.of(handle.model)
    engine.refresh()
    for layer in {
        layer for s in handle.surgeries if s.stages - {_weights_stage()} for layer in s.targets.layers
    }:
        assert not engine.info.attention[layer].attnsurgery_layer.idle, f"layer {layer} still skipped"


def _weights_stage():
    from attnsurgery.surgery import Stage

    return Stage.WEIGHTS


# -- tolerances scaled to this machine's float noise ----------------------------------------------------------------
#: how many times the stock model's own float32 rounding a surgery path may deviate (a fused kernel, a tiled pass and
#: an O(n |S|) correction each round differently from the stock kernel, and ACT's correction amplifies rounding by
#: 1 / (1 - P) where sinks hold most of a row); a wrong surgery misses by orders of magnitude more (>= 1e-3 here)
NOISE_FACTOR = 50.0


def stock_noise(model, ids: torch.Tensor, **kw) -> float:
    """The float32 rounding this machine's BLAS gives the *unpatched* model on these inputs: max |fp32 - fp64| of its
    logits. Call before patching. A different CPU, BLAS or thread count moves this and every tolerance with it."""
    import copy

    with torch.no_grad():
        single = model(ids, **kw).logits.double()
        double = copy.deepcopy(model).double()
        kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
        exact = double(ids, **kw64).logits
    noise = float((single - exact).abs().max())
    assert noise > 0, "fp32 and fp64 logits agree exactly: the noise probe measured nothing"
    return noise


_ATOL: dict[str, float] = {}


def logit_atol(arch: str) -> float:
    """Absolute tolerance for logits of the tiny ``arch`` model: NOISE_FACTOR x its stock float32 noise, measured once
    per process on a fixed batch."""
    if arch not in _ATOL:
        _ATOL[arch] = NOISE_FACTOR * stock_noise(tiny_model(arch), random_ids(2, 24))
    return _ATOL[arch]


def attention_noise(q, k, v, allowed, scaling: float, valid=None) -> dict[str, float]:
    """The float32 rounding of *stock* eager attention (matmul, softmax, matmul) on these inputs, against float64:
    max |fp32 - fp64| of its output, log-sum-exp and column sums (over ``valid`` query rows). A kernel compared to a
    float64 reference gets ``NOISE_FACTOR`` times these: a different CPU or BLAS moves them, a wrong kernel does not
    fit under them."""

    def run(dtype):
        groups = q.shape[1] // k.shape[1]
        kk, vv = (x.repeat_interleave(groups, 1).to(dtype) for x in (k, v))
        scores = (q.to(dtype) @ kk.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, -1)
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        rows = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool) if valid is None else valid
        return probs @ vv, lse, (probs * rows[:, None, :, None]).sum(2), rows

    out32, lse32, sums32, rows = run(torch.float32)
    out64, lse64, sums64, _ = run(torch.float64)
    sel = rows[:, None, :].expand(-1, q.shape[1], -1)
    noise = {
        "out": float((out32.double() - out64)[sel].abs().max()),
        "lse": float((lse32.double() - lse64)[sel].abs().max()),
        "sums": float((sums32.double() - sums64).abs().max()),
    }
    assert all(n > 0 for n in noise.values()), (
        f"fp32 and fp64 agree exactly: the probe measured nothing {noise}"
    )
    return noise


#: one attention op against float64 differs from the stock op by a few roundings (measured: up to 4.4x the stock
#: fp32 noise for the tiled pass); the model-level NOISE_FACTOR also covers what accumulates through the layers
KERNEL_NOISE_FACTOR = 10.0


def kernel_atol(q, k, v, allowed, scaling: float, valid=None) -> dict[str, float]:
    """``KERNEL_NOISE_FACTOR`` x :func:`attention_noise`: absolute tolerances for an attention kernel's output,
    log-sum-exp and column sums against a float64 reference on the same inputs."""
    return {
        key: KERNEL_NOISE_FACTOR * n for key, n in attention_noise(q, k, v, allowed, scaling, valid).items()
    }


def op_noise(fn, *tensors) -> float:
    """max |fn(fp32 inputs) - fn(fp64 inputs)|: the rounding of a stock computation (e.g. matmul + softmax) on these
    inputs, the scale for a kernel doing the same work."""
    with torch.no_grad():
        single = fn(*(t.float() for t in tensors)).double()
        exact = fn(*(t.double() for t in tensors))
    noise = float((single - exact).abs().max())
    assert noise > 0, "fp32 and fp64 agree exactly: the probe measured nothing"
    return noise


def causal(b: int, t: int, s: int | None = None) -> torch.Tensor:
    """(b, 1, t, s) bool causal pattern, the last t of s keys (decode rows see every earlier key)."""
    s = s or t
    return torch.ones(t, s, dtype=torch.bool).tril(s - t)[None, None].expand(b, 1, t, s)


def float_noise(single, exact) -> float:
    """max |single - exact| of a float32 result against the same computation in float64 (tensors, floats or lists),
    and at least float32's resolution of the result (eps x max |exact|): a result that happens to round the same
    still carries a rounding. The scale for comparing two float32 computations of one number; tests multiply it by
    NOISE_FACTOR (a whole forward or training run) or KERNEL_NOISE_FACTOR (one op)."""

    def f64(x):
        # Python floats are doubles: convert them as such (as_tensor's default float32 would round them first)
        return x.detach().to(torch.float64) if torch.is_tensor(x) else torch.as_tensor(x, dtype=torch.float64)

    single, exact = f64(single), f64(exact)
    eps = torch.finfo(torch.float32).eps
    return max(float((single - exact).abs().max()), eps * float(exact.abs().max()))
