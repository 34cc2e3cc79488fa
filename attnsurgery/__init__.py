"""attnsurgery: inference-time attention surgery for Hugging Face transformers models.

>>> from attnsurgery import load_model, patch
>>> model, tokenizer = load_model("smollm2-135m")
>>> with patch(model, "temperature", tau=0.8):
...     out = model.generate(**tokenizer("The capital of France is", return_tensors="pt"), max_new_tokens=8)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import SurgeryHandle, attention_maps, load_surgery, patch, save_surgery  # noqa: E402
from .errors import (  # noqa: E402
    AttnSurgeryError,
    ModelNotFoundError,
    RecipeError,
    SurgeryConfigError,
    UnknownSurgeryError,
    UnsupportedModelError,
)
from .recipe import Recipe, find_recipe, list_recipes  # noqa: E402
from .registry import get_surgery_class, list_surgeries, register_surgery  # noqa: E402
from .surgery import AttentionCall, AttentionTile, Stage, Surgery, SurgeryConfig  # noqa: E402


def load_model(name_or_path: str, **options):  # noqa: ANN201 - thin lazy wrapper, see attnsurgery.models
    """Load a model and tokenizer by alias (``smollm2-135m``, ``gemma3-270m``, ``llama-7b``), hub id or path."""
    from .models import load_model as _load

    return _load(name_or_path, **options)


__all__ = [
    "AttentionCall",
    "AttentionTile",
    "AttnSurgeryError",
    "ModelNotFoundError",
    "Recipe",
    "RecipeError",
    "Stage",
    "Surgery",
    "SurgeryConfig",
    "SurgeryConfigError",
    "SurgeryHandle",
    "UnknownSurgeryError",
    "UnsupportedModelError",
    "__version__",
    "attention_maps",
    "find_recipe",
    "get_surgery_class",
    "list_recipes",
    "list_surgeries",
    "load_model",
    "load_surgery",
    "patch",
    "register_surgery",
    "save_surgery",
]
