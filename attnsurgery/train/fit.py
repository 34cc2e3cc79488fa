"""Fit a surgery's few parameters on next-token loss with every model weight frozen.

The temperature fit's loop (``patches/temperature/calibrate.py``), kept free of anything temperature-specific so
other trainable surgeries can share it: Adam on one parameter tensor, shuffled epochs over fixed-length token
windows, validation every ``eval_every`` steps with early stopping, the best parameters kept. What makes a fit
specific comes in as two projections: ``grad_hook`` (e.g. tie a layer's heads) and ``project`` (e.g. a lower
bound), both applied under ``torch.no_grad()``.

>>> with frozen(model):
...     log = fit(model, surgery.coef, windows, lambda: mean_nll(model, val, 1), steps=200, lr=0.01)
>>> log.best, log.best_val, log.start_val
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Every model weight ``requires_grad=False`` and eval mode (no dropout: the loss the fitted parameters see is
    the one inference sees); flags and mode restored afterwards. Parameters held outside the module tree (a
    trainable surgery's) are left as they are."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids`` (B, T) under the model (the causal-LM ``labels=ids`` loss)."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


@dataclass
class FitLog:
    """What :func:`fit` did: the best and last parameter values and the loss curves."""

    best: torch.Tensor  # the values with the lowest validation loss (the start values if none beat them)
    final: torch.Tensor  # the values after the last step
    start_val: float  # validation loss before the first step
    best_val: float
    history: list[tuple[int, float]]  # (step, validation loss), step 0 first
    losses: list[float]  # training loss per step
    steps: int  # optimiser steps run


def fit(
    model: nn.Module,
    param: nn.Parameter,
    windows: torch.Tensor,
    validate: Callable[[], float],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    eval_every: int,
    patience: int,
    seed: int = 0,
    device: torch.device | None = None,
    grad_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
    project: Callable[[torch.Tensor], None] | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = next_token_loss,
    progress: bool = True,
    desc: str = "fit",
) -> FitLog:
    """Adam on ``param`` over the (N, T) token ``windows``; the model should be :func:`frozen`.

    ``batch_size`` windows per step in shuffled epochs (every window seen once before any is seen twice; all of
    them every step when ``batch_size`` is at least N), seeded by ``seed``. ``validate()`` runs before the first
    step and every ``eval_every`` steps (and after the last); the fit stops after ``patience`` validations without
    improvement. ``grad_hook(grad)`` returns the gradient Adam sees; ``project(param)`` edits the parameter in
    place after each step. ``param`` holds the *last* values on return (``FitLog.best`` the best ones).
    """
    from tqdm import tqdm

    start_val = validate()
    best_val, best = start_val, param.detach().clone()
    history: list[tuple[int, float]] = [(0, start_val)]
    losses: list[float] = []
    optimiser = torch.optim.Adam([param], lr=lr)
    g = torch.Generator().manual_seed(seed)
    device = device if device is not None else windows.device
    stale = 0
    bar = tqdm(range(1, steps + 1), disable=not progress, desc=desc, unit="step")
    step = 0
    queue: list[int] = []
    for step in bar:
        if batch_size >= len(windows):  # full batch: every step sees the whole training objective
            ids = windows.to(device)
        else:
            if len(queue) < batch_size:
                queue += torch.randperm(len(windows), generator=g).tolist()
            ids, queue = windows[queue[:batch_size]].to(device), queue[batch_size:]
        loss = loss_fn(model, ids)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if grad_hook is not None:
            with torch.no_grad():
                param.grad = grad_hook(param.grad)
        optimiser.step()
        if project is not None:
            with torch.no_grad():
                project(param)
        losses.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            v = validate()
            history.append((step, v))
            if v < best_val:
                best_val, best, stale = v, param.detach().clone(), 0
            else:
                stale += 1
            bar.set_postfix_str(f"val {v:.4f} (start {start_val:.4f})", refresh=False)
            if stale >= patience:
                break
    bar.close()
    return FitLog(
        best=best,
        final=param.detach().clone(),
        start_val=start_val,
        best_val=best_val,
        history=history,
        losses=losses,
        steps=step,
    )
