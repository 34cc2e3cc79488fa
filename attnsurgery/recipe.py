"""Recipes: YAML files that say which surgeries to apply, with which arguments, on which layers and heads.

.. code-block:: yaml

    name: my-sharpening
    description: Sharper attention on all but the first two layers.
    model: smollm2-135m            # the model it was made for (an alias, hub id or path); optional
    surgeries:
      - surgery: temperature
        args: {tau: 0.9}
        layers: "2:"
        heads: null                # all heads; or [0, 3], or {10: [0, 3]}
        state: null                # optional safetensors file of calibrated/trained state, relative to the YAML
    eval:                          # optional: what `attnsurgery eval` scores it on
      tasks: [bb_general_knowledge]

Unknown keys are errors (a typo must not silently drop a surgery). Shipped recipes live in ``recipes/<surgery>/``
and install with the package; refer to them as ``<surgery>/<file>`` or just ``<surgery>`` (the folder's
``default.yaml``, or the one made for the requested model).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import AttnSurgeryError, RecipeError, did_you_mean

_RECIPE_KEYS = {"name", "description", "model", "surgeries", "eval", "calibration", "training", "notes"}
_SURGERY_KEYS = {"surgery", "args", "layers", "heads", "state"}


@dataclass
class SurgerySpec:
    surgery: str
    args: dict[str, Any] = field(default_factory=dict)
    layers: Any = None
    heads: Any = None
    state: Path | None = None


@dataclass
class Recipe:
    name: str
    surgeries: list[SurgerySpec]
    description: str = ""
    model: str | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # what `attnsurgery train` recorded
    notes: str = ""
    path: Path | None = None


def _check_keys(where: str, data: dict, allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise RecipeError(
                f"{where}: unknown key {key!r}.{did_you_mean(str(key), allowed)} Allowed keys: {', '.join(sorted(allowed))}."
            )


def parse_recipe(data: Any, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping (surgery names and argument names/ranges included) and build a Recipe."""
    from .registry import get_surgery_class

    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe must be a YAML mapping with a 'surgeries' list, got {type(data).__name__}."
        )
    _check_keys(source, data, _RECIPE_KEYS)
    items = data.get("surgeries")
    if not isinstance(items, list) or not items:
        raise RecipeError(
            f"{source}: 'surgeries' must be a non-empty list of {{surgery: name, args: {{...}}}}."
        )
    specs = []
    for i, item in enumerate(items):
        where = f"{source}: surgeries[{i}]"
        if isinstance(item, str):
            item = {"surgery": item}
        if not isinstance(item, dict) or "surgery" not in item:
            raise RecipeError(
                f"{where}: each entry needs a 'surgery' name, e.g. {{surgery: temperature, args: {{tau: 0.9}}}}."
            )
        _check_keys(where, item, _SURGERY_KEYS)
        args = item.get("args") or {}
        if not isinstance(args, dict):
            raise RecipeError(f"{where}: 'args' must be a mapping of argument names to values.")
        try:
            cls = get_surgery_class(str(item["surgery"]))
            cls.config_class.from_kwargs(cls.name, args)  # names and ranges, before any model is touched
        except AttnSurgeryError as err:
            raise RecipeError(f"{where}: {err}") from None
        state = item.get("state")
        if state is not None:
            state = (
                (base_dir / state) if base_dir is not None and not Path(state).is_absolute() else Path(state)
            )
            if state.is_dir():
                raise RecipeError(
                    f"{where}: state {state} is a folder; 'state' names a .safetensors file (relative to the recipe)."
                )
            if not state.is_file():
                raise RecipeError(f"{where}: state file {state} does not exist.")
        specs.append(SurgerySpec(cls.name, dict(args), item.get("layers"), item.get("heads"), state))
    for key in ("eval", "calibration", "training"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise RecipeError(
                f"{source}: {key!r} must be a mapping (e.g. `eval: {{tasks: [bb_emoji_movie]}}`), got "
                f"{type(data[key]).__name__} {data[key]!r}."
            )
    for key in ("name", "description", "model", "notes"):  # str() would turn a list or mapping into a name
        if data.get(key) is not None and not isinstance(data[key], str):
            raise RecipeError(
                f"{source}: {key!r} must be a string, got {type(data[key]).__name__} {data[key]!r}"
                + (" (one model per recipe: an alias, hub id or path)." if key == "model" else ".")
            )
    return Recipe(
        name=str(data.get("name") or source),
        surgeries=specs,
        description=str(data.get("description") or ""),
        model=data.get("model"),
        eval=data.get("eval") or {},
        calibration=data.get("calibration") or {},
        training=data.get("training") or {},
        notes=str(data.get("notes") or ""),
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping: plain YAML keeps the last one silently, so a
    second ``surgeries:`` (or ``tau:``) would drop the first without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found key {key!r} twice (first on line {first.line + 1}); plain YAML would keep only the last: "
                    "merge them or delete one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml_strict(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (see :class:`_UniqueKeyLoader`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def load_recipe_file(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror}.") from None
    except UnicodeDecodeError:
        raise RecipeError(
            f"{path} is not a text file (not UTF-8); a recipe is a YAML file such as recipes/temperature/default.yaml."
        ) from None
    try:
        data = load_yaml_strict(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        raise RecipeError(
            f"{path} is empty; a recipe is a YAML mapping with a 'surgeries' list, e.g. "
            "`surgeries: [{surgery: temperature, args: {tau: 0.9}}]`."
        )
    recipe = parse_recipe(data, str(path), path.parent)
    recipe.path = path
    return recipe


def write_recipe(data: dict[str, Any], path: str | Path) -> Path:
    """Write a recipe mapping as YAML (keys in the given order), after checking that it parses: a calibration must
    never write a recipe that would not load. State files named by ``state:`` must already sit beside ``path``."""
    path = Path(path)
    parse_recipe(data, str(path), path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110))
    return path


def write_calibrated_recipe(
    path: str | Path,
    model_alias: str,
    surgery: dict[str, Any],
    calibration: dict[str, Any],
    *,
    name: str | None,
    description: str,
    notes: str,
    eval_tasks: Sequence[str] | None = None,
) -> Path:
    """:func:`write_recipe` of what a calibration produced: one ``surgeries:`` entry made for ``model_alias`` and
    the ``calibration:`` record of how; ``name`` defaults to ``<surgery>/<model_alias>``."""
    recipe: dict[str, Any] = {
        "name": name or f"{surgery['surgery']}/{model_alias}",
        "description": description,
        "model": model_alias,
        "surgeries": [surgery],
        "calibration": calibration,
    }
    if eval_tasks:
        recipe["eval"] = {"tasks": list(eval_tasks)}
    recipe["notes"] = notes
    return write_recipe(recipe, path)


def _packaged_root() -> Path:
    return Path(str(importlib.resources.files("attnsurgery.recipes")))


def list_recipes() -> list[str]:
    """Names of the shipped recipes (``<surgery>/<file>``)."""
    root = _packaged_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def list_recipe_folders() -> list[str]:
    """The shipped recipe folders (one per surgery): a local folder of the same name does not shadow them."""
    return sorted(p.name for p in _packaged_root().iterdir() if p.is_dir() and not p.name.startswith("_"))


class NoRecipeForModelError(RecipeError):
    """``find_recipe(folder, model)``: the folder has several recipes, no default, and none made for ``model``."""

    def __init__(self, message: str, folder: str, model: str | None, choices: list[str]) -> None:
        super().__init__(message)
        self.folder, self.model, self.choices = folder, model, choices


def user_recipe_root() -> Path:
    """Where recipes calibrated on demand are cached: ``$ATTNSURGERY_CACHE/recipes``, else
    ``~/.cache/attnsurgery/recipes`` (the model cache of :mod:`attnsurgery.models` sits beside it)."""
    return Path(os.environ.get("ATTNSURGERY_CACHE", "~/.cache/attnsurgery")).expanduser() / "recipes"


def model_slug(model: str) -> str:
    """A file name for a model: a hub alias is named by its hub id (``llama-7b`` and ``huggyllama/llama-7b`` share
    one slug, ``huggyllama--llama-7b``), a local path by its folder name plus a hash of its absolute path."""
    path = Path(model).expanduser()
    if path.exists():
        key = str(path.resolve())
        return f"{_slug(path.resolve().name)}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    try:
        from .models import _ALIASES

        spec = _ALIASES.get(model.strip().lower())
        if spec is not None and spec.kind == "hub":
            model = spec.target
    except ImportError:  # pragma: no cover - models needs torch, which is always there at command time
        pass
    return _slug(model.strip().lower().replace("/", "--"))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def cached_recipe_path(folder: str, model: str) -> Path:
    """``<user_recipe_root()>/<folder>/<model_slug(model)>.yaml``: the recipe ``--recipe <folder> MODEL`` calibrated
    for a model without a shipped one (``attnsurgery apply --recipe act MODEL``); :func:`find_recipe` reuses it."""
    return user_recipe_root() / folder / f"{model_slug(model)}.yaml"


def find_recipe(name: str | Path, model: str | None = None) -> Recipe:
    """A recipe from a YAML path or a shipped name (``temperature/position`` or ``temperature``).

    For a bare folder name, picks the recipe made for ``model`` if there is one, else one calibrated for ``model``
    earlier and cached (:func:`cached_recipe_path`), else ``default.yaml``; with several recipes and none of
    those, raises :class:`NoRecipeForModelError`.
    """
    if not isinstance(name, (str, Path)) or not str(name).strip():
        raise RecipeError(
            f"recipe {name!r}: name a shipped recipe (e.g. 'temperature/position', see `attnsurgery list`), a YAML "
            "file or a run folder."
        )
    path = Path(name)
    if path.is_dir() and str(name).strip("/") not in list_recipe_folders():
        # a run folder written by `attnsurgery train` (or any folder holding a recipe.yaml)
        if (path / "recipe.yaml").is_file():
            return load_recipe_file(path / "recipe.yaml")
        hint = (
            " It holds a training checkpoint but no recipe.yaml: the run did not finish; continue it with "
            "`attnsurgery train ... --resume`."
            if (path / "checkpoint.pt").is_file()
            else ""
        )
        raise RecipeError(f"recipe folder {path} holds no recipe.yaml.{hint}")
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist.")
        return load_recipe_file(path)
    root = _packaged_root()
    text = str(name).strip("/")
    candidate = root / f"{text}.yaml"
    if candidate.is_file():
        return load_recipe_file(candidate)
    folder = root / text
    if folder.is_dir():
        files = sorted(folder.glob("*.yaml"))
        if model is not None:
            # the file named after the model wins over variants made for it (act/gemma3-270m.yaml over
            # act/gemma3-270m-fdr.yaml, which sorts first)
            if "/" not in model and (folder / f"{model}.yaml").is_file():
                return load_recipe_file(folder / f"{model}.yaml")
            # else the shortest-named recipe made for it: the base set over its variants (act/mistral-7b-instruct
            # over act/mistral-7b-instruct-mc, which sorts first)
            made_for = [r for r in (load_recipe_file(f) for f in files) if r.model == model]
            if made_for:
                return min(made_for, key=lambda r: (len(r.path.stem), r.path.stem))
            cached = cached_recipe_path(text, model)
            if cached.is_file():
                return load_recipe_file(cached)
        if (folder / "default.yaml").is_file():
            return load_recipe_file(folder / "default.yaml")
        if len(files) == 1:
            return load_recipe_file(files[0])
        choices = [f"{text}/{f.stem}" for f in files]
        raise NoRecipeForModelError(
            f"recipe folder {text!r} has several recipes and none is made for {model!r}: pick one of "
            f"{', '.join(choices)}.",
            text,
            model,
            choices,
        )
    known = list_recipes()
    raise RecipeError(
        f"unknown recipe {str(name)!r}: not a YAML file and not a shipped recipe."
        f"{did_you_mean(text, list_recipe_folders() + known)} "
        f"Shipped recipes: {', '.join(known)} (see `attnsurgery list`)."
    )
