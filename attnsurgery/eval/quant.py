"""Simulated static W8A8 (Bondarenko et al.'s setup) and bitsandbytes LLM.int8 as the real-library arm.

**W8A8, as in Bondarenko, Nagel & Blankevoort** (NeurIPS 2023, arXiv 2306.12929; their code
``Qualcomm-AI-research/outlier-free-transformers``: ``validate_clm.py``, ``quantization/``): a fake-quantiser --
values are rounded to the 8-bit grid and mapped back to floats, so the maths is int8's while the kernels stay
float. It is *static* and *per-tensor*: one range per tensor, fixed after calibration, shared by every token,
which is what makes a single outlier token hurt all the others (a dynamic per-token scheme would hide it).

What is quantised (every ``nn.Linear`` and transformers ``Conv1D`` inside the decoder -- the decoder layers'
q/k/v/o, MLP projections, OPT's ``project_in/out``; never the LM head, which keeps full precision, weights and
input, like the paper's ``--quant_setup fp32_head``):

* **weights** -- symmetric signed int8, per tensor: ``scale = a / 127``, codes ``[-128, 127]``, zero point 0. The
  clipping threshold ``a`` is the paper's MSE grid search (``MSE_Estimator``, ``OptMethod.grid``): candidates
  ``a_i = i * (max|W| + margin) / grid`` for ``i = 1..grid`` (defaults ``grid=100``, ``margin=0.5``, their
  ``num_candidates`` and ``range_margin``), keeping the ``a_i`` with the least ``sum((W - Q_a(W))^2)``.
* **activations** -- asymmetric uint8, per tensor: ``scale = (max - min) / 255``, zero point
  ``clamp(round(-min / scale), 0, 255)``, the range always containing 0. The range is the paper's
  ``running_minmax`` estimator: per calibration batch the min/max (or, with ``act_percentile``, the
  ``100 - p`` / ``p`` percentiles -- their OPT command passes ``--percentile 99.999``), smoothed across batches
  as ``r <- (1 - momentum) * r_batch + momentum * r`` (``momentum=0.9``); ``act_momentum=None`` and
  ``act_percentile=None`` give the plain running min/max. As in their code each quantiser already quantises
  during calibration (with its range so far), so later layers calibrate on quantised inputs; afterwards the
  ranges are frozen. Quantised activations: the **input** of every quantised linear (the norm outputs feeding
  q/k/v and the MLP, the merged heads feeding ``o_proj``, the MLP hidden state feeding ``down_proj``), its
  **output** (as the paper's quantised layers do), and each decoder layer's **output** (the residual stream
  after the block: the paper's residual-sum quantiser). Padding positions are left out of the ranges.

``weight_range="minmax"`` (threshold ``max|W|``) and the ``quantize_inputs/outputs/residual`` switches give
milder variants. On SmolLM2-135M (a ~2e4 activation on the first token) the paper's setup collapses perplexity,
and even its MSE weight ranges alone hurt badly (they clip the few large weights); see ``tests/test_quant.py``.

Not quantised, unlike the paper's full model: attention scores and probabilities (the attention kernel stays
float), the residual sum between attention and MLP (no module returns it), embeddings and norm weights. So this
measures the damage outliers do to linear layers and the residual stream, not to the softmax.

>>> with quantize_w8a8(model, calibration_batches) as handle:
...     ppl_w8a8 = perplexity(model, eval_batches)
>>> # weights and hooks are restored bit for bit here
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..discovery import discover
from ..errors import AttnSurgeryError, UnsupportedModelError
from .outliers import iter_batches, model_inputs

_EPS = 1e-8  # the paper's quantiser floors scales and ranges at this


# ----------------------------------------------------------------------------------------------------------
# The quantiser: a readable float64 reference and the fast path tested against it
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantParams:
    """A uniform grid: ``x_hat = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int


def quant_params(x_min: float, x_max: float, bits: int = 8, symmetric: bool = False) -> QuantParams:
    """The grid for a range, as the paper's ``(A)SymmetricUniformQuantizer.set_quant_range``: the range is
    widened to contain 0; symmetric grids are signed (``[-2^(b-1), 2^(b-1)-1]``) when the range has negative
    values, else unsigned; asymmetric grids are ``[0, 2^b - 1]`` with a rounded, clamped zero point."""
    x_min, x_max = min(float(x_min), 0.0), max(float(x_max), _EPS)
    if symmetric:
        signed = x_min < 0
        qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        qmin = -(2 ** (bits - 1)) if signed else 0
        return QuantParams(max(max(-x_min, x_max) / qmax, _EPS), 0, qmin, qmax)
    qmax = 2**bits - 1
    scale = max((x_max - x_min) / qmax, _EPS)
    zero_point = int(min(max(round(-x_min / scale), 0), qmax))  # round half to even, like torch.round
    return QuantParams(scale, zero_point, 0, qmax)


def reference_quantize(
    x: torch.Tensor, x_min: float, x_max: float, bits: int = 8, symmetric: bool = False
) -> torch.Tensor:
    """Textbook uniform quantise-dequantise of ``x`` for the range ``[x_min, x_max]``, all in float64 (numpy).

    Plain and slow on purpose: :func:`fake_quantize` is tested against it.
    """
    v = x.detach().cpu().double().numpy()
    lo, hi = min(x_min, 0.0), max(x_max, _EPS)
    if symmetric:
        signed = lo < 0
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        scale, zero = max(max(-lo, hi) / qmax, _EPS), 0.0
    else:
        qmin, qmax = 0, 2**bits - 1
        scale = max((hi - lo) / qmax, _EPS)
        zero = float(np.clip(np.round(-lo / scale), qmin, qmax))  # np.round: half to even
    codes = np.clip(np.round(v / scale) + zero, qmin, qmax)
    return torch.from_numpy((codes - zero) * scale)


def fake_quantize(x: torch.Tensor, p: QuantParams) -> torch.Tensor:
    """Quantise-dequantise ``x`` onto ``p``'s grid; computed in float32 (float64 for float64 input), returned in
    ``x``'s dtype."""
    work = x if x.dtype == torch.float64 else x.float()
    codes = torch.clamp(torch.round(work / p.scale) + p.zero_point, p.qmin, p.qmax)
    return ((codes - p.zero_point) * p.scale).to(x.dtype)


def mse_weight_range(w: torch.Tensor, bits: int = 8, grid: int = 100, margin: float = 0.5) -> float:
    """The paper's symmetric MSE grid search: the threshold ``a_i = i * (max|w| + margin) / grid``,
    ``i = 1..grid``, whose signed grid ``[-a_i, a_i]`` gives the least squared error (first one on ties)."""
    work = w.detach().float().flatten()
    step = (float(work.abs().max()) + margin) / grid
    # Equal weights quantise equally, so the loss can run over distinct values times their counts: exact, and
    # ~30x less work for weights stored in 16 bits or converted from GGUF (SmolLM2: 26k distinct of 885k).
    values, counts = torch.unique(work, return_counts=True)
    compact = values.numel() * 2 <= work.numel()
    x = values if compact else work
    weights = counts.double() if compact else torch.ones_like(work, dtype=torch.float64)
    grids = [quant_params(-step * i, step * i, bits, symmetric=True) for i in range(1, grid + 1)]
    losses = torch.empty(grid, dtype=torch.float64)
    chunk = max(1, (1 << 24) // max(1, x.numel()))  # candidates per pass: ~16M elements at a time
    for start in range(0, grid, chunk):
        part = grids[start : start + chunk]
        scale = torch.tensor([p.scale for p in part], dtype=x.dtype, device=x.device)[:, None]  # (K, 1)
        # fake_quantize's arithmetic for K candidates at once: x/scale -> round -> clamp -> *scale -> error
        err = torch.div(x[None], scale).round_().clamp_(part[0].qmin, part[0].qmax).mul_(scale).sub_(x[None])
        losses[start : start + len(part)] = (err.double().square_() * weights.to(err.device)).sum(-1).cpu()
    return step * (int(torch.argmin(losses)) + 1)  # argmin returns the first minimum on ties


# ----------------------------------------------------------------------------------------------------------
# Static activation quantisers
# ----------------------------------------------------------------------------------------------------------


class ActQuantizer:
    """One static per-tensor asymmetric activation quantiser: calibrates a running range, then is frozen."""

    def __init__(
        self, bits: int = 8, momentum: float | None = 0.9, percentile: float | None = 99.999
    ) -> None:
        self.bits, self.momentum, self.percentile = bits, momentum, percentile
        self.x_min: float | None = None
        self.x_max: float | None = None
        self.frozen = False
        self._params: QuantParams | None = None

    def observe(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        if self.percentile is not None:
            values = x.detach().float().cpu().numpy().ravel()
            lo, hi = (float(v) for v in np.percentile(values, (100 - self.percentile, self.percentile)))
        else:
            lo, hi = float(x.min()), float(x.max())
        if self.x_min is None or self.x_max is None:
            self.x_min, self.x_max = lo, hi
        elif self.momentum is None:
            self.x_min, self.x_max = min(self.x_min, lo), max(self.x_max, hi)
        else:
            m = self.momentum
            self.x_min = (1 - m) * lo + m * self.x_min
            self.x_max = (1 - m) * hi + m * self.x_max
        self._params = quant_params(self.x_min, self.x_max, self.bits)

    def freeze(self) -> None:
        if self._params is None:
            raise AttnSurgeryError("an activation quantiser saw no calibration data; its layer never ran.")
        self.frozen = True

    @property
    def params(self) -> QuantParams | None:
        return self._params

    def __call__(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if not self.frozen:
            self.observe(x if valid is None else x[valid])
        assert self._params is not None
        return fake_quantize(x, self._params)


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


# ----------------------------------------------------------------------------------------------------------
# The model-level handle
# ----------------------------------------------------------------------------------------------------------


class W8A8Handle:
    """What :func:`quantize_w8a8` returns: the quantised modules and ranges; ``remove()`` (or leaving a ``with``
    block) puts back the original weight tensors and removes every hook, leaving the model bit for bit as it was."""

    def __init__(self, model: nn.Module, setup: dict[str, Any]) -> None:
        self.model = model
        self.setup = setup
        self.weight_ranges: dict[str, float] = {}  # module name -> clipping threshold a
        self.act_quantizers: dict[str, ActQuantizer] = {}  # "name:input" / "name:output" / "layers.i:output"
        self.active = True
        self._originals: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._hooks: list[Any] = []
        self._valid: torch.Tensor | None = None  # the calibration batch's real-token mask

    # -- internals -------------------------------------------------------------------------------------------
    def _quantizer(self, key: str) -> ActQuantizer:
        q = ActQuantizer(self.setup["act_bits"], self.setup["act_momentum"], self.setup["act_percentile"])
        self.act_quantizers[key] = q
        return q

    def _rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Which of ``x``'s leading positions are real tokens, while calibrating on a padded batch."""
        valid = self._valid
        if valid is None:
            return None
        valid = valid.to(x.device)
        if x.dim() >= 2 and tuple(x.shape[:2]) == tuple(valid.shape):
            return valid
        if x.dim() >= 1 and x.shape[0] == valid.numel():  # (B*T, d): OPT flattens before its MLP
            return valid.reshape(-1)
        return None

    def _input_hook(self, q: ActQuantizer) -> Any:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            return (q(args[0], self._rows(args[0])), *args[1:])

        return hook

    def _output_hook(self, q: ActQuantizer) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                return q(output, self._rows(output))
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                return (q(output[0], self._rows(output[0])), *output[1:])
            return None

        return hook

    # -- public ----------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore the original weights (the same tensors, so bit for bit) and remove every hook."""
        if not self.active:
            return
        for handle in self._hooks:
            handle.remove()
        for param, original in self._originals:
            param.data = original
        self._hooks, self._originals = [], []
        self.active = False

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable: the setup, what was quantised and the frozen activation ranges."""
        return {
            **self.setup,
            "num_quantized_linears": len(self.weight_ranges),
            "weight_ranges": dict(self.weight_ranges),
            "act_ranges": {
                k: [q.x_min, q.x_max] for k, q in self.act_quantizers.items() if q.x_min is not None
            },
        }

    def __enter__(self) -> W8A8Handle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<W8A8Handle {state}: {len(self.weight_ranges)} linears, {len(self.act_quantizers)} act quantizers>"


@torch.no_grad()
def quantize_w8a8(
    model: nn.Module,
    calibration_batches: Any,
    *,
    weight_bits: int = 8,
    act_bits: int = 8,
    weight_range: str = "mse",
    weight_grid: int = 100,
    weight_margin: float = 0.5,
    act_momentum: float | None = 0.9,
    act_percentile: float | None = 99.999,
    quantize_inputs: bool = True,
    quantize_outputs: bool = True,
    quantize_residual: bool = True,
) -> W8A8Handle:
    """Simulate static W8A8 on ``model`` in place (see the module docstring for exactly what is quantised).

    ``calibration_batches``: token ids (B, T), a tokenizer output, or an iterable of either (the paper uses 4
    batches for OPT). Returns a :class:`W8A8Handle`; ``handle.remove()`` or ``with quantize_w8a8(...):`` restores
    the model exactly. On any error during calibration the model is restored before the error propagates.
    """
    if weight_range not in ("mse", "minmax"):
        raise AttnSurgeryError(
            f"weight_range must be 'mse' (the paper's grid search) or 'minmax'; got {weight_range!r}."
        )
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is already quantised (bitsandbytes/...); simulate W8A8 on the float model."
        )
    info = discover(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    setup = {
        "scheme": "static per-tensor W8A8 (Bondarenko et al. 2023)",
        "weight_bits": weight_bits,
        "act_bits": act_bits,
        "weight_range": weight_range,
        "act_range": "asymmetric, running min-max",
        "weight_grid": weight_grid,
        "weight_margin": weight_margin,
        "act_momentum": act_momentum,
        "act_percentile": act_percentile,
        "quantize_inputs": quantize_inputs,
        "quantize_outputs": quantize_outputs,
        "quantize_residual": quantize_residual,
        "lm_head": "full precision",
    }
    handle = W8A8Handle(model, setup)
    names = {m: n for n, m in info.decoder.named_modules()}
    targets = [
        (names[m], m)
        for m in info.decoder.modules()
        if _is_linear(m) and m is not head and (head_weight is None or m.weight is not head_weight)
    ]
    if not targets:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no nn.Linear / Conv1D in the decoder to quantise."
        )
    try:
        seen: set[int] = set()
        for name, module in targets:
            weight = module.weight
            if weight.device.type == "meta":
                raise UnsupportedModelError(
                    f"{type(model).__name__}: {name} has its weights offloaded (meta device); load the model fully "
                    "onto one device to simulate W8A8."
                )
            if not weight.dtype.is_floating_point:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: {name}.weight is {weight.dtype}, not float."
                )
            if id(weight) not in seen:  # a weight shared by two modules is quantised once
                seen.add(id(weight))
                a = (
                    mse_weight_range(weight.data, weight_bits, weight_grid, weight_margin)
                    if weight_range == "mse"
                    else float(weight.data.abs().max())
                )
                quantized = fake_quantize(weight.data, quant_params(-a, a, weight_bits, symmetric=True))
                handle._originals.append((weight, weight.data))
                weight.data = quantized
                handle.weight_ranges[name] = a
            if quantize_inputs:
                q = handle._quantizer(f"{name}:input")
                handle._hooks.append(module.register_forward_pre_hook(handle._input_hook(q)))
            if quantize_outputs:
                q = handle._quantizer(f"{name}:output")
                handle._hooks.append(module.register_forward_hook(handle._output_hook(q)))
        if quantize_residual:
            for i, layer in enumerate(info.layers):
                q = handle._quantizer(f"{names.get(layer, f'layers.{i}')}:output")
                handle._hooks.append(layer.register_forward_hook(handle._output_hook(q)))
        _calibrate(handle, calibration_batches)
    except BaseException:
        handle.remove()
        raise
    return handle


def _calibrate(handle: W8A8Handle, batches: Any) -> None:
    model = handle.model
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in iter_batches(batches):
            handle._valid = batch["attention_mask"].bool()
            model(**model_inputs(model, batch))
            count += 1
    finally:
        handle._valid = None
        model.train(was_training)
    if count == 0:
        raise AttnSurgeryError("quantize_w8a8 needs at least one calibration batch.")
    for q in handle.act_quantizers.values():
        q.freeze()


# ----------------------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------------------


#: the most float32 logits one forward of :func:`perplexity` may hold: a large vocabulary makes them the biggest
#: tensor of a forward (Gemma-3's 262k tokens x 256 positions x 24 windows are 6.4 GB, twice that with the
#: log-softmax), so a batch is scored a few rows at a time
LOGITS_BUDGET_BYTES = 1 << 30


@torch.no_grad()
def perplexity(model: nn.Module, inputs: Any, *, attention_mask: torch.Tensor | None = None) -> float:
    """Token-level perplexity over every real next-token pair (padding excluded), pooled over all batches; each
    batch runs in row chunks whose logits fit :data:`LOGITS_BUDGET_BYTES` (rows are independent sequences)."""
    total, count = 0.0, 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None else 1  # no known head: whole batches, as before
    for batch in iter_batches(inputs, attention_mask):
        kwargs = model_inputs(model, batch)
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"].bool()
        rows = max(1, LOGITS_BUDGET_BYTES // (4 * vocab * ids.shape[1]))
        for start in range(0, ids.shape[0], rows):
            part = {k: (v[start : start + rows] if torch.is_tensor(v) and v.shape[:1] == ids.shape[:1] else v)
                    for k, v in kwargs.items()}  # fmt: skip
            logits = model(**part).logits[:, :-1].float()
            chunk_ids, chunk_mask = ids[start : start + rows], mask[start : start + rows]
            target, valid = chunk_ids[:, 1:], chunk_mask[:, 1:] & chunk_mask[:, :-1]
            nll = -torch.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]
            total += float(nll[valid].sum())
            count += int(valid.sum())
            del logits, nll
    if count == 0:
        raise AttnSurgeryError("perplexity needs at least one sequence of two or more real tokens.")
    return math.exp(total / count)


# ----------------------------------------------------------------------------------------------------------
# bitsandbytes LLM.int8, the real-library arm
# ----------------------------------------------------------------------------------------------------------


class Int8UnavailableError(AttnSurgeryError, RuntimeError):
    """bitsandbytes LLM.int8 cannot run here."""


def _probe_int8(device: str) -> None:
    """Run one ``Linear8bitLt`` on ``device`` and check it against the float product; raises on any problem."""
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 64, generator=g), torch.randn(4, 64, generator=g)
    layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "inputs will be cast from float32 to float16": expected
        y = layer(x.to(device)).float().cpu()
    error = float((y - x @ w.T).norm() / (x @ w.T).norm())
    if not math.isfinite(error) or error > 0.05:
        raise RuntimeError(f"a probe Linear8bitLt is off by {error:.3g} (relative) from the float product")


def int8_unavailable_reason(device: str | None = None) -> str | None:
    """Why bitsandbytes LLM.int8 cannot run on ``device`` (default: CUDA if present, else CPU), or None if it can."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import bitsandbytes
    except ImportError as e:
        return f"bitsandbytes is not installed ({e}). Fix: pip install bitsandbytes (or pip install attnsurgery[quant])."
    try:
        _probe_int8(device)
    except Exception as e:
        fix = (
            "bitsandbytes >= 0.46 runs LLM.int8 on CPU: pip install -U bitsandbytes; or run on a CUDA GPU"
            if device == "cpu"
            else "check that bitsandbytes was built for this CUDA version (python -m bitsandbytes)"
        )
        return (
            f"bitsandbytes {getattr(bitsandbytes, '__version__', '?')} cannot run LLM.int8 on {device}: "
            f"{type(e).__name__}: {e}. Fix: {fix}."
        )
    return None


def load_int8(name_or_path: str, *, threshold: float = 6.0, **load_kwargs: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` loaded through bitsandbytes LLM.int8 (``BitsAndBytesConfig(load_in_8bit=True)``,
    outlier threshold ``threshold``) via :func:`attnsurgery.load_model`; raises :class:`Int8UnavailableError`
    naming the reason and the fix when bitsandbytes cannot run it on this machine.

    LLM.int8 is dynamic (per-token activation scales, outlier columns in fp16): a contrast to :func:`quantize_w8a8`,
    not the paper's metric.
    """
    reason = int8_unavailable_reason()
    if reason is not None:
        raise Int8UnavailableError(reason)
    from transformers import BitsAndBytesConfig

    from ..models import load_model

    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    return load_model(name_or_path, quantization_config=config, **load_kwargs)
