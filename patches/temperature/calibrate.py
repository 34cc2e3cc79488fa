"""Position-temperature fit: Selective-Attention position temperatures fitted on calibration text.

:func:`fit_temperature` fits the ``temperature`` surgery's position coefficients ``c`` (per layer or per head) by
next-token loss on calibration text with every model weight frozen (the loop is the shared trainer,
:func:`attnsurgery.train.train`);
:func:`write_temperature_recipe` ships the fitted table as a recipe with a ``state:`` file.
``attnsurgery calibrate temperature`` is :func:`add_arguments` + :func:`run`.

>>> from attnsurgery.patches.temperature.calibrate import fit_temperature, write_temperature_recipe
>>> result = fit_temperature(model, tokenizer, load_split("gutenberg_ppl", "calibration"))
>>> write_temperature_recipe(result, "recipes/temperature/my-model-fitted.yaml", "my-model")
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from attnsurgery.api import SurgeryHandle, patch, save_surgery
from attnsurgery.discovery import discover
from attnsurgery.engine import Engine
from attnsurgery.errors import AttnSurgeryError, SurgeryConfigError
from attnsurgery.eval.scoring import mean_nll, text_windows
from attnsurgery.recipe import write_calibrated_recipe
from attnsurgery.targeting import compact_ranges
from attnsurgery.train import trainer
from attnsurgery.train.data import TrainingData
from attnsurgery.train.freeze import frozen
from attnsurgery.windows import texts_of

if TYPE_CHECKING:
    from attnsurgery.plugins import CalibrateTools


@dataclass
class FitResult:
    """Fitted Selective-Attention position coefficients and what they do to held-out perplexity.

    ``coef`` is what ships (the best table on the validation windows, or zeros, the identity, if no table beat
    the identity there); ``fitted_coef`` is the table at the last step, shipped or not, with its held-out loss in
    ``heldout_loss_fitted``.
    """

    coef: torch.Tensor  # (L, H)
    fitted_coef: torch.Tensor  # (L, H)
    per: str
    layers: list[int]
    seq_len: int
    steps: int  # optimiser steps run
    lr: float
    train_loss: list[float]  # per step
    val_history: list[tuple[int, float]]  # (step, validation NLL)
    identity_val_loss: float
    best_val_loss: float
    heldout_loss_before: float  # identity
    heldout_loss_after: float  # with ``coef``
    heldout_loss_fitted: float  # with ``fitted_coef`` (the last step's table)
    n_train_windows: int
    n_val_windows: int
    n_heldout_windows: int
    seconds: float
    data: str | None = None
    min_c: float = 0.0  # the bound c was fitted under (the recipe carries it when below 0)

    @property
    def improved(self) -> bool:
        """Whether the fit beat the identity on the validation windows (so ``coef`` is not all zeros)."""
        return self.best_val_loss < self.identity_val_loss

    @property
    def heldout_ppl_before(self) -> float:
        return math.exp(self.heldout_loss_before)

    @property
    def heldout_ppl_after(self) -> float:
        return math.exp(self.heldout_loss_after)

    @property
    def heldout_worse(self) -> bool:
        """The shipped table makes held-out loss worse than the identity (reported, never hidden)."""
        return self.heldout_loss_after > self.heldout_loss_before

    def apply(self, model: nn.Module) -> SurgeryHandle:
        """Patch ``model`` with the shipped table (a plain, non-trainable ``temperature`` surgery)."""
        handle = patch(model, "temperature", layers=self.layers)
        surgery = handle.surgeries[0]
        with torch.no_grad():
            surgery.coef.copy_(self.coef.to(surgery.coef))
        Engine.of(model).refresh()  # the loaded table switches layers on
        return handle

    def save(self, model: nn.Module, directory: str | Path, *, overwrite: bool = False) -> Path:
        """``save_surgery`` of the shipped table; ``load_surgery(model, directory)`` restores it exactly."""
        with self.apply(model) as handle:
            return save_surgery(handle, directory, overwrite=overwrite)

    def summary(self) -> str:
        c = self.coef[self.layers]
        verdict = (
            "" if self.improved else " (no table beat the identity on validation: shipping the identity)"
        )
        worse = " WORSE than identity on held-out text" if self.heldout_worse else ""
        return (
            f"temperature fit ({self.per}, {len(self.layers)} layers, seq_len {self.seq_len}, {self.steps} steps, "
            f"{self.seconds:.0f}s): held-out ppl {self.heldout_ppl_before:.4f} -> {self.heldout_ppl_after:.4f}"
            f"{worse} ({self.n_heldout_windows} windows); validation NLL {self.identity_val_loss:.5f} -> "
            f"{self.best_val_loss:.5f}{verdict}; c in [{float(c.min()):.4f}, {float(c.max()):.4f}], "
            f"mean {float(c.mean()):.4f}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: getattr(self, k) for k in ("per", "layers", "seq_len", "steps", "lr", "improved")},
            "heldout": {
                "loss_before": self.heldout_loss_before,
                "loss_after": self.heldout_loss_after,
                "ppl_before": self.heldout_ppl_before,
                "ppl_after": self.heldout_ppl_after,
                "loss_fitted": self.heldout_loss_fitted,
                "windows": self.n_heldout_windows,
            },
            "validation": {
                "identity": self.identity_val_loss,
                "best": self.best_val_loss,
                "history": self.val_history,
            },
            "coef": self.coef.tolist(),
            "seconds": self.seconds,
        }


def write_temperature_recipe(
    result: FitResult,
    path: str | Path,
    model_alias: str,
    *,
    force: bool = False,
    name: str | None = None,
    description: str | None = None,
    data: str | None = None,
    notes: str | None = None,
) -> Path:
    """Write a ``temperature`` recipe plus its ``state:`` file (``<path stem>.safetensors`` beside it).

    Refuses (unless ``force``) when the shipped table is the identity or makes held-out perplexity worse than
    the identity: such a recipe would only mislead.
    """
    from safetensors.torch import save_file

    if not force and not result.improved:
        raise AttnSurgeryError(
            "the fit did not beat the identity on validation text, so there is no table worth shipping "
            f"({result.summary()}); pass --force (force=True) to write it anyway, e.g. for an experiment."
        )
    if not force and result.heldout_worse:
        raise AttnSurgeryError(
            f"the fitted table makes held-out perplexity worse ({result.heldout_ppl_before:.4f} -> "
            f"{result.heldout_ppl_after:.4f}); not writing it (--force / force=True writes it anyway, e.g. for an "
            "experiment)."
        )
    path = Path(path)
    state = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    coef = result.coef.float().contiguous()
    save_file({"inv_tau": torch.ones_like(coef), "coef": coef}, str(state), metadata={"format": "pt"})
    c = coef[result.layers]
    return write_calibrated_recipe(
        path,
        model_alias,
        {
            "surgery": "temperature",
            **({"args": {"min_c": result.min_c}} if result.min_c < 0 else {}),
            "layers": list(result.layers),
            "state": state.name,
        },
        {
            "data": data or result.data or "unspecified",
            "per": result.per,
            "seq_len": result.seq_len,
            "steps": result.steps,
            "lr": result.lr,
            "train_windows": result.n_train_windows,
            "validation": {
                "identity_nll": round(result.identity_val_loss, 5),
                "nll": round(result.best_val_loss, 5),
            },
            "heldout": {
                "windows": result.n_heldout_windows,
                "ppl_before": round(result.heldout_ppl_before, 4),
                "ppl_after": round(result.heldout_ppl_after, 4),
            },
            "c": {
                "min": round(float(c.min()), 6),
                "max": round(float(c.max()), 6),
                "mean": round(float(c.mean()), 6),
            },
        },
        name=name,
        description=description
        or f"Selective Attention position temperature fitted on {model_alias} ({result.per}-wise c, "
        f"layers {compact_ranges(result.layers)}): held-out ppl {result.heldout_ppl_before:.3f} -> "
        f"{result.heldout_ppl_after:.3f}.",
        notes=notes
        or "Fitted by `attnsurgery calibrate temperature`: c (logits_i *= 1 + c log n_i) trained on next-token loss "
        "with all model weights frozen; the (layers, heads) table is the state file.",
    )


def fit_temperature(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[Any],
    *,
    per: str = "layer",
    steps: int = 200,
    lr: float = 0.01,
    seq_len: int = 256,
    batch_size: int = 1,
    layers: Any = None,
    heldout_texts: Sequence[Any] | None = None,
    heldout_fraction: float = 0.2,
    val_fraction: float = 0.1,
    max_val_windows: int = 32,
    eval_every: int = 25,
    patience: int = 3,
    min_c: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    data: str | None = None,
) -> FitResult:
    """Fit the Selective-Attention position coefficients ``c`` of ``temperature`` (``logits_i *= 1 + c log n_i``).

    Only ``c`` is trained (``per="layer"``: one scalar per layer shared by its heads, the reference code's
    choice; ``per="head"``: one per head); every model weight has ``requires_grad=False`` during the fit (flags
    restored after). The shared trainer (:func:`attnsurgery.train.train`, objective ``lm``: Adam, no clipping)
    on next-token loss over ``seq_len`` windows of ``texts`` (joined with EOS), from
    the identity ``c = 0`` (``batch_size`` windows per step in shuffled epochs; all of them when it is at least
    the number of training windows), projected onto ``c >= min_c`` (0: the paper's range, attention only sharpens with
    position; a negative bound lets it flatten, and must keep ``1 + c log n > 0`` up to the model's
    ``max_position_embeddings``). Every ``eval_every`` steps the loss on held-back validation windows (the last ``val_fraction``
    of the training windows, at most ``max_val_windows``) is measured; the best table is kept and the fit stops after ``patience`` evaluations
    without improvement. If no table beats the identity on validation, the identity ships (``result.improved``
    is False).

    Held-out perplexity before/after is measured on ``heldout_texts`` or, if None, on the last
    ``heldout_fraction`` of ``texts`` (split by text, never used for training or selection). The model is left
    unpatched; apply the result with ``result.apply(model)``, save it with ``result.save(model, dir)`` or
    :func:`write_temperature_recipe`.
    """
    started = time.perf_counter()
    if per not in ("layer", "head"):
        raise AttnSurgeryError(f"per must be 'layer' or 'head', got {per!r}.")
    for label, value, ok in (
        ("steps", steps, isinstance(steps, int) and steps >= 1),
        ("lr", lr, isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)),
        ("seq_len", seq_len, isinstance(seq_len, int) and seq_len >= 8),
        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
        ("eval_every", eval_every, isinstance(eval_every, int) and eval_every >= 1),
        ("patience", patience, isinstance(patience, int) and patience >= 1),
        ("heldout_fraction", heldout_fraction, 0 < heldout_fraction < 1),
        ("val_fraction", val_fraction, 0 < val_fraction < 1),
        ("max_val_windows", max_val_windows, isinstance(max_val_windows, int) and max_val_windows >= 1),
        ("min_c", min_c, math.isfinite(min_c)),
    ):
        if not ok:
            raise SurgeryConfigError(f"fit_temperature: {label}={value!r} is out of range.")
    train_texts = texts_of(texts, "text")
    if heldout_texts is None:
        if len(train_texts) < 2:
            raise AttnSurgeryError(
                "need at least two texts to hold some out for perplexity, or pass heldout_texts explicitly."
            )
        n_held = max(1, round(heldout_fraction * len(train_texts)))
        train_texts, held = train_texts[:-n_held], train_texts[-n_held:]
    else:
        held = texts_of(heldout_texts, "held-out text")
    if not train_texts or not held:
        raise AttnSurgeryError("fit_temperature needs non-empty training and held-out texts.")
    overlap = set(train_texts) & set(held)
    if overlap:
        raise AttnSurgeryError(
            f"{len(overlap)} held-out text(s) also appear in the training texts; held-out perplexity must be "
            "measured on unseen text."
        )
    windows = text_windows(tokenizer, train_texts, seq_len)
    heldout = text_windows(tokenizer, held, seq_len)
    if len(windows) < 2:
        raise AttnSurgeryError(
            f"the training text gives {len(windows)} window of {seq_len} tokens; need at least 2 (one for "
            "validation). Give more text or a shorter seq_len."
        )
    # validation compares tables on the same windows (paired), so a few dozen suffice and keep evaluations cheap
    n_val = min(max_val_windows, max(1, round(val_fraction * len(windows))))
    train, val = windows[:-n_val], windows[-n_val:]

    info = discover(model)
    # c < 0 flattens attention with position; below -1/log(n) the factor 1 + c log n reaches 0 and then flips the
    # sign of the logits, so the bound must keep it positive over the whole context the model supports
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if min_c < 0 and isinstance(max_pos, int) and max_pos > 1 and 1 + min_c * math.log(max_pos) <= 0:
        raise SurgeryConfigError(
            f"fit_temperature: min_c={min_c} lets 1 + c log(n) reach 0 within the model's {max_pos} positions "
            f"(attention would invert); use min_c > {-1 / math.log(max_pos):.4f}."
        )
    handle = patch(model, "temperature", layers=layers, trainable=True, min_c=min_c)
    surgery = handle.surgeries[0]
    coef: nn.Parameter = surgery.coef
    targeted = torch.stack([surgery.targets.head_mask(i) for i in range(info.num_layers)]).to(coef.device)

    def tie_heads(grad: torch.Tensor) -> torch.Tensor:
        # the gradient Adam sees: zero outside the targeted heads; per layer, the heads' gradients sum, so the
        # heads of a layer stay tied (one scalar per layer)
        mask = targeted.to(grad.device)
        grad = grad * mask
        if per == "layer":
            grad = grad.sum(-1, keepdim=True).expand_as(grad) * mask
        return grad.contiguous()

    last: list[torch.Tensor] = []  # the table after the latest step (the trainer hands back the best one)

    def bound(surgeries: list[Any]) -> None:  # after every optimiser step, under no_grad: c >= min_c
        coef.clamp_(min=min_c).mul_(targeted.to(coef.device))
        last[:] = [coef.detach().clone()]

    # the shared trainer: Adam (AdamW with weight decay 0) on next-token loss with the model frozen, batches of
    # consecutive slices of seeded per-epoch permutations (the whole training set every step when batch_size
    # covers it), validation every eval_every steps, early stopping after `patience` validations without gain and
    # the best table (the identity at step 0 included) kept; no gradient clipping or warm-up, as before
    config = trainer.TrainConfig(
        objective="lm",
        steps=steps,
        lr=lr,
        batch_size=min(batch_size, len(train)),
        seq_len=seq_len,
        max_grad_norm=None,
        val_every=eval_every,
        keep="best",
        patience=patience,
        seed=seed,
    )
    windows_data = TrainingData(
        train=train, val=val, source=data or "calibration texts", n_texts=len(train_texts), n_val_texts=0
    )
    hook = coef.register_hook(tie_heads)
    try:
        with frozen(model):
            before = mean_nll(model, heldout, batch_size)
            trained = trainer.train(model, handle, windows_data, config, progress=progress, after_step=bound)
            history = [(int(row["step"]), float(row["lm"])) for row in trained.val_history]
            best = coef.detach().clone()  # keep="best": the trainer loaded the best table
            final = last[0] if last else best
            identity_val = history[0][1]
            best_val = min(v for _, v in history)
            improved = best_val < identity_val
            if final.any():
                with torch.no_grad():
                    coef.copy_(final)
                final_heldout = mean_nll(model, heldout, batch_size)
            else:
                final_heldout = before
            if improved and not torch.equal(best, final):
                with torch.no_grad():
                    coef.copy_(best)
                after = mean_nll(model, heldout, batch_size)
            else:
                after = final_heldout if improved else before
    finally:
        hook.remove()
        handle.remove()
    return FitResult(
        min_c=min_c,
        coef=best.float().cpu() if improved else torch.zeros_like(best).float().cpu(),
        fitted_coef=final.float().cpu(),
        per=per,
        layers=sorted(surgery.targets.layers),
        seq_len=seq_len,
        steps=trained.steps,
        lr=lr,
        train_loss=trained.train_loss,
        val_history=history,
        identity_val_loss=identity_val,
        best_val_loss=best_val,
        heldout_loss_before=before,
        heldout_loss_after=after,
        heldout_loss_fitted=final_heldout,
        n_train_windows=len(train),
        n_val_windows=len(val),
        n_heldout_windows=len(heldout),
        seconds=time.perf_counter() - started,
        data=data,
    )


# ----------------------------------------------------------------------------------------------------------
# ``attnsurgery calibrate temperature``
# ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``attnsurgery calibrate temperature`` (the CLI adds MODEL, --dtype and --device-map); numbers are
    range-checked as they are parsed, so a bad flag names itself before any load."""
    from attnsurgery.commands._common import bounded

    parser.add_argument("--data", action="append", help="offline task(s) (their calibration split) or .jsonl")
    parser.add_argument(
        "--per", choices=("layer", "head"), default="layer", help="one c per layer or per head"
    )
    parser.add_argument(
        "--steps", type=bounded(int, 1), default=200, help="maximum optimiser steps (default 200)"
    )
    parser.add_argument(
        "--lr", type=bounded(float, 0, low_open=True), default=0.01, help="Adam learning rate (default 0.01)"
    )
    parser.add_argument(
        "--seq-len", type=bounded(int, 8), default=256, help="tokens per training window (default 256)"
    )
    parser.add_argument("--batch-size", type=bounded(int, 1), default=1, help="windows per step (default 1)")
    parser.add_argument("--layers", default=None, help="layers to fit, e.g. 2: (default all)")
    parser.add_argument(
        "--eval-every", type=bounded(int, 1), default=25, help="validation every N steps (default 25)"
    )
    parser.add_argument(
        "--patience", type=bounded(int, 1), default=3, help="stop after N validations without gain"
    )
    parser.add_argument(
        "--min-c", type=bounded(float), default=0.0, help="lower bound of c (default 0, the paper's range)"
    )
    parser.add_argument(
        "--heldout-fraction",
        type=bounded(float, 0, 1, low_open=True, high_open=True),
        default=0.2,
        help="texts held out for perplexity",
    )
    parser.add_argument("--limit", type=bounded(int, 1), default=None, help="use only the first N texts")
    parser.add_argument("--save", default=None, metavar="DIR", help="save_surgery the fitted table to DIR")
    parser.add_argument("--out", default=None, help="write the recipe YAML (+ .safetensors state) here")
    parser.add_argument(
        "--force",
        action="store_true",
        help="write --out even when the fit does not beat the identity on validation or held-out text",
    )


def run(args: argparse.Namespace, tools: CalibrateTools) -> int:
    """Fit, print the summary, and optionally save the table (--save) and write the recipe (--out)."""
    records, data = tools.records(args.data, args.limit, "perplexity")
    model, tokenizer = tools.load(args.model)
    result = fit_temperature(
        model,
        tokenizer,
        records,
        data=data,
        per=args.per,
        steps=args.steps,
        lr=args.lr,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        layers=args.layers,
        eval_every=args.eval_every,
        patience=args.patience,
        heldout_fraction=args.heldout_fraction,
        min_c=args.min_c,
    )
    tools.console.print(result.summary())
    if args.save:
        saved = result.save(model, args.save, overwrite=getattr(args, "overwrite", False))
        tools.console.print(f"saved to {saved}")
    if args.out:
        tools.wrote_recipe(
            write_temperature_recipe(result, args.out, args.model, data=data, force=args.force), args.model
        )
    return 0
