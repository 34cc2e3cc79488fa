"""attnsurgery: inference-time attention surgery for Hugging Face transformers models.

>>> from attnsurgery import load_model, patch
>>> model, tokenizer = load_model("smollm2-135m")
>>> with patch(model, "temperature", tau=0.8):
...     out = model.generate(**tokenizer("The capital of France is", return_tensors="pt"), max_new_tokens=8)

Names are imported lazily (PEP 562), so ``import attnsurgery`` and ``attnsurgery --help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "patch": "api",
    "SurgeryHandle": "api",
    "attention_maps": "api",
    "save_surgery": "api",
    "load_surgery": "api",
    "load_model": "models",
    "outlier_stats": "eval.outliers",
    "AttnSurgeryError": "errors",
    "ModelNotFoundError": "errors",
    "RecipeError": "errors",
    "SurgeryConfigError": "errors",
    "UnknownSurgeryError": "errors",
    "UnsupportedModelError": "errors",
    "Recipe": "recipe",
    "find_recipe": "recipe",
    "list_recipes": "recipe",
    "get_surgery_class": "registry",
    "list_surgeries": "registry",
    "register_surgery": "registry",
    "AttentionCall": "surgery",
    "AttentionTile": "surgery",
    "Stage": "surgery",
    "Surgery": "surgery",
    "SurgeryConfig": "surgery",
}

__all__ = sorted([*_EXPORTS, "__version__"])  # noqa: PLE0605


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attnsurgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs  # noqa: F401
    from .api import SurgeryHandle, attention_maps, load_surgery, patch, save_surgery
    from .errors import (
        AttnSurgeryError,
        ModelNotFoundError,
        RecipeError,
        SurgeryConfigError,
        UnknownSurgeryError,
        UnsupportedModelError,
    )
    from .eval.outliers import outlier_stats
    from .models import load_model
    from .recipe import Recipe, find_recipe, list_recipes
    from .registry import get_surgery_class, list_surgeries, register_surgery
    from .surgery import AttentionCall, AttentionTile, Stage, Surgery, SurgeryConfig
