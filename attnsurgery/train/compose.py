"""What a training run trains, patched in one order everywhere (``attnsurgery train``, training tables, budget
curves): an earlier stage kept as trained, then the surgery, then LoRA adapters, then finetuned weight copies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..api import SurgeryHandle, patch


def compose_for_training(
    model: nn.Module,
    *,
    frozen: Any = None,
    surgery: Any = None,
    surgery_args: Mapping[str, Any] | None = None,
    lora: Mapping[str, Any] | None = None,
    finetune: Mapping[str, Any] | None = None,
) -> SurgeryHandle:
    """Patch what a run trains onto ``model`` and return one handle over all of it.

    ``frozen``: a recipe or run folder (an earlier stage) patched first, its parameters frozen; ``surgery``: what
    :func:`attnsurgery.patch` takes (a name, recipe name, path or :class:`~attnsurgery.recipe.Recipe`) with
    ``surgery_args``; ``lora`` / ``finetune``: those surgeries' arguments (``layers`` included), or ``None``.
    If any part fails, what was patched before it is removed: the model is left as it was.
    """
    from ..recipe import find_recipe

    surgeries: list[Any] = []
    try:
        if frozen is not None:
            earlier = patch(
                model, find_recipe(frozen) if not hasattr(frozen, "surgeries") else frozen
            ).surgeries
            for s in earlier:  # the earlier stage stays as trained
                for p in s.parameters():
                    p.requires_grad_(False)
            surgeries += earlier
        if surgery is not None:
            surgeries += patch(model, surgery, **dict(surgery_args or {})).surgeries
        if lora:
            surgeries += patch(model, "lora", **lora).surgeries
        if finetune:
            surgeries += patch(model, "finetune", **finetune).surgeries
    except BaseException:
        SurgeryHandle(model, surgeries).remove()
        raise
    return SurgeryHandle(model, surgeries)
