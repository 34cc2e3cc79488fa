"""The Python API: ``patch``, its handle, persistence and attention maps."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .engine import Engine
from .errors import (
    AttnSurgeryError,
    RecipeError,
    SurgeryConfigError,
    UnknownSurgeryError,
    UnsupportedModelError,
)
from .recipe import Recipe, SurgerySpec, find_recipe, parse_recipe
from .registry import get_surgery_class
from .surgery import Surgery
from .targeting import parse_layers, resolve_targets

CONFIG_NAME = "attnsurgery_config.json"
STATE_NAME = "attnsurgery_state.safetensors"


class SurgeryHandle:
    """What :func:`patch` returns: the surgeries it applied, removable, usable as a context manager.

    >>> with patch(model, "temperature", tau=0.8) as handle:
    ...     out = model.generate(**inputs)
    >>> # the model is exactly as before here
    """

    def __init__(self, model: nn.Module, surgeries: list[Surgery], recipe: Recipe | None = None) -> None:
        self.model = model
        self.surgeries = surgeries
        self.recipe = recipe
        self.active = True

    def remove(self) -> None:
        """Undo the surgeries; once the last one on a model is gone, the model is restored exactly."""
        if not self.active:
            return
        engine = Engine.of(self.model, create=False)
        if engine is not None:
            for surgery in self.surgeries:
                engine.remove(surgery)
        self.active = False

    def __enter__(self) -> SurgeryHandle:
        if not self.active:  # the block would run the unpatched model while the reader believes otherwise
            raise AttnSurgeryError(
                "this handle was removed, so `with handle:` would run the model unpatched; patch again "
                "(`with patch(model, ...):`) to use the surgery."
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def parameters(self) -> Iterable[nn.Parameter]:
        """Trainable surgery parameters (for fitting temperatures, gates ...)."""
        for surgery in self.surgeries:
            yield from surgery.parameters()

    def save(self, directory: str | Path) -> Path:
        return save_surgery(self, directory)

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        body = "; ".join(f"{s.name}({_short_args(s)}) on {s.targets}" for s in self.surgeries)
        return f"<SurgeryHandle {state}: {body}>"


def _short_args(surgery: Surgery) -> str:
    # what applies: ACT's threshold None is 0.1, MoH's head split on this model
    args = surgery.resolved_args()
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def _build(engine: Engine, spec: SurgerySpec) -> Surgery:
    cls = get_surgery_class(spec.surgery)
    config = cls.config_class.from_kwargs(cls.name, spec.args)
    targets = resolve_targets(spec.layers, spec.heads, engine.info.num_layers, engine.info.num_heads)
    return cls(config, targets)


def patch(
    model: nn.Module, surgery: str | Recipe | Path, /, *, layers: Any = None, heads: Any = None, **args: Any
) -> SurgeryHandle:
    """Apply a surgery (by name) or a recipe (name, YAML path or :class:`Recipe`) to a transformers model.

    ``layers`` / ``heads`` pick where it acts (``layers="2:30"``, ``heads={10: [0, 3]}``); other keyword
    arguments are the surgery's own (validated; unknown names and out-of-range values raise). Several patches
    compose on one model. The model is changed in place; ``handle.remove()`` (or leaving a ``with`` block)
    restores it exactly.

    >>> handle = patch(model, "temperature", tau=0.8)
    >>> handle = patch(model, "head_scale", heads={10: [0, 3]}, scale=0.0)
    >>> handle = patch(model, "temperature/position")         # a shipped recipe
    """
    if not isinstance(model, nn.Module):  # (nn.Modules without a config get the engine's own refusal)
        raise UnsupportedModelError(
            f"patch needs a model: {type(model).__name__} is not a transformers PreTrainedModel (load one with "
            "load_model or AutoModelForCausalLM.from_pretrained)."
        )
    if (
        isinstance(surgery, (str, Path))
        and (Path(surgery) / CONFIG_NAME).is_file()
        and not (Path(surgery) / "recipe.yaml").is_file()
    ):  # a save_surgery folder: one folder format, accepted everywhere
        if args or layers is not None or heads is not None:
            raise RecipeError(
                f"{surgery} is a saved surgery; it loads as saved (no keyword overrides). Patch by name to change it."
            )
        return load_surgery(model, surgery)
    recipe: Recipe | None = None
    if isinstance(surgery, Recipe):
        recipe = surgery
    elif isinstance(surgery, Mapping):
        recipe = parse_recipe(dict(surgery))
    else:
        name = str(surgery)
        try:
            get_surgery_class(name)
        except UnknownSurgeryError as unknown:
            if "/" not in name and not name.endswith((".yaml", ".yml")) and not Path(name).exists():
                try:
                    recipe = find_recipe(name)
                except RecipeError:
                    raise unknown from None
            else:
                recipe = find_recipe(name)
    if recipe is None:
        specs = [SurgerySpec(str(surgery), dict(args), layers, heads)]
    else:
        specs = list(recipe.surgeries)
        if args or layers is not None or heads is not None:
            if len(specs) != 1:
                raise RecipeError(
                    f"recipe {recipe.name!r} has {len(specs)} surgeries; keyword overrides are ambiguous. "
                    "Edit a copy of the recipe instead."
                )
            only = specs[0]
            specs = [
                SurgerySpec(
                    only.surgery,
                    {**only.args, **args},
                    layers if layers is not None else only.layers,
                    heads if heads is not None else only.heads,
                    only.state,
                )
            ]
    engine = Engine.of(model)
    added: list[Surgery] = []
    try:
        for spec in specs:
            surgery_obj = _build(engine, spec)
            _refuse_stacking(engine, surgery_obj)
            engine.add(surgery_obj)
            added.append(surgery_obj)
            if spec.state is not None:
                _load_state(surgery_obj, _read_state(Path(spec.state)), engine)
    except BaseException as err:
        for surgery_obj in added:  # nothing half-applied
            engine.remove(surgery_obj)
        engine.discard_if_unused()
        if recipe is not None and isinstance(err, AttnSurgeryError) and not isinstance(err, RecipeError):
            # a recipe that does not fit this model is a bad recipe (exit 5, as documented), whatever the check that
            # caught it; the class stays, so callers catching SurgeryConfigError still do
            err.exit_code = RecipeError.exit_code
            err.args = (f"recipe {recipe.name or '(unnamed)'}: {err}",)
        raise
    return SurgeryHandle(model, added, recipe)


def _refuse_stacking(engine: Engine, new: Surgery) -> None:
    """The same surgery twice on a layer compounds silently (two tau=0.8 give 0.64): refuse, naming the fix."""
    for old in engine.surgeries:
        if old.name == new.name and old is not new:
            shared = sorted(set(old.targets.layers) & set(new.targets.layers))
            if shared:
                from .targeting import compact_ranges

                raise SurgeryConfigError(
                    f"{new.name} is already patched on layers {compact_ranges(shared)} of this model; a second one would "
                    f"compound with it. Remove the first (handle.remove()) or target other layers."
                )


def _load_state(surgery: Surgery, tensors: dict[str, torch.Tensor], engine: Engine) -> None:
    own = surgery.state_dict()
    missing = set(own) - set(tensors)
    unexpected = set(tensors) - set(own)
    if missing or unexpected:
        raise AttnSurgeryError(
            f"{surgery.name}: saved state does not match (missing {sorted(missing)}, unexpected {sorted(unexpected)}); "
            "was it saved for another model or surgery version?"
        )
    for key, value in tensors.items():
        if own[key].shape != value.shape:
            raise AttnSurgeryError(
                f"{surgery.name}: saved tensor {key!r} has shape {tuple(value.shape)}, this model needs "
                f"{tuple(own[key].shape)}; it was saved for a different model."
            )
    before = {k: v.clone() for k, v in own.items()}
    surgery.load_state_dict(tensors)
    try:
        surgery.check_state()  # a state file is no way around the arguments' ranges
    except BaseException:
        surgery.load_state_dict(before)
        raise
    engine.refresh()  # loaded state can switch layers on or off


def save_surgery(handle: SurgeryHandle, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Save a handle's surgeries peft-style: ``attnsurgery_config.json`` + ``attnsurgery_state.safetensors``.

    Only the surgery (arguments, targets, calibrated/trained tensors) is written, never the model weights. A folder
    that already holds a saved surgery is replaced only with ``overwrite=True``.
    """
    if not isinstance(handle, SurgeryHandle):
        raise AttnSurgeryError(
            f"save_surgery saves what patch returned (a SurgeryHandle), not a {type(handle).__name__} {handle!r}: "
            "handle = patch(model, ...); save_surgery(handle, folder)."
        )
    check_save_folder(directory, overwrite=overwrite)
    directory = Path(directory)
    if not handle.surgeries:
        raise AttnSurgeryError("this handle holds no surgery to save.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AttnSurgeryError(
            f"cannot create the folder {directory}: {err.strerror}; name a folder you can write to."
        ) from None
    entries, tensors = [], {}
    for i, surgery in enumerate(handle.surgeries):
        entries.append(
            {"surgery": surgery.name, "args": surgery.config.to_dict(), **surgery.targets.to_json()}
        )
        for key, value in surgery.state_dict().items():
            tensors[f"{i}.{key}"] = value.detach().cpu().contiguous()
    config = {
        "attnsurgery_version": __version__,
        "model_type": getattr(handle.model.config, "model_type", None),
        "num_layers": handle.surgeries[0].targets.num_layers if handle.surgeries else None,
        "num_heads": handle.surgeries[0].targets.num_heads if handle.surgeries else None,
        "recipe": handle.recipe.name if handle.recipe else None,
        "surgeries": entries,
    }
    # write to temporary names, then rename, so an interrupted save never leaves a half-written pair
    tmp_state, tmp_config = directory / (STATE_NAME + ".tmp"), directory / (CONFIG_NAME + ".tmp")
    save_file(tensors, str(tmp_state), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    tmp_state.replace(directory / STATE_NAME)
    tmp_config.replace(directory / CONFIG_NAME)
    return directory


def check_save_folder(directory: str | Path, *, overwrite: bool = False, option: str = "") -> None:
    """What :func:`save_surgery` refuses, checked without writing anything (``apply --save`` runs it before the model
    loads): an empty name, a file, a folder that already holds a saved surgery (unless ``overwrite``), and a path
    that cannot be created (under a file, or in a folder that is not writable). ``option`` prefixes the message
    (``"--save "``)."""
    import os

    if not isinstance(directory, (str, Path)) or not str(directory).strip():
        raise AttnSurgeryError(
            f"{option}{directory!r}: name the folder to save the surgery to (e.g. 'my_surgery/'); an empty name "
            "would write into the current folder."
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AttnSurgeryError(
            f"{option}{directory} is a file; save_surgery writes a folder. Name a new or existing folder."
        )
    if (directory / CONFIG_NAME).exists() and not overwrite:
        raise AttnSurgeryError(
            f"{option}{directory} already holds a saved surgery ({CONFIG_NAME}); pass overwrite=True (--overwrite) "
            "to replace it, or name another folder."
        )
    parent = directory.absolute()
    while not parent.exists():  # the nearest existing folder above it must be a writable folder
        parent = parent.parent
    if not parent.is_dir():
        raise AttnSurgeryError(
            f"{option}{directory} cannot be created: {parent} is a file, not a folder. Name another folder."
        )
    if not os.access(parent, os.W_OK | os.X_OK) or not (directory.exists() or _creatable(parent)):
        raise AttnSurgeryError(
            f"{option}{directory} cannot be created: {parent} is not writable. Name a folder you can write to."
        )


def _creatable(parent: Path) -> bool:
    """Whether a folder can be made in ``parent`` (os.access says yes on read-only mounts such as /proc)."""
    import tempfile

    try:
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError:
        return False
    return True


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors state file, or an error that names it (truncated, corrupt, not safetensors)."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        raise AttnSurgeryError(
            f"{path} cannot be read as safetensors ({type(err).__name__}: {str(err)[:160]}); the file is damaged or "
            "truncated: save or train the surgery again."
        ) from None


def load_surgery(model: nn.Module, directory: str | Path) -> SurgeryHandle:
    """Re-apply surgeries saved with :func:`save_surgery` onto a (fresh) model of the same shape."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file() and (directory / "recipe.yaml").is_file():  # a training run / recipe folder
        return patch(model, find_recipe(directory))
    if not config_path.is_file():
        raise AttnSurgeryError(
            f"{directory} holds no {CONFIG_NAME} (nor a recipe.yaml); save one with save_surgery(handle, dir)."
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AttnSurgeryError(
            f"{config_path} is not valid JSON ({err}); the saved surgery is damaged: save it again."
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("surgeries"), list):
        raise AttnSurgeryError(
            f"{config_path} has no 'surgeries' list, so it is not a file save_surgery wrote; save the surgery again."
        )
    entries = [_saved_entry(config_path, i, entry) for i, entry in enumerate(config["surgeries"])]
    tensors = _read_state(directory / STATE_NAME) if (directory / STATE_NAME).is_file() else {}
    handles = []
    try:
        for i, (name, layers, heads, args) in enumerate(entries):
            handle = patch(model, name, layers=layers, heads=heads, **args)
            handles.append(handle)  # before its state loads: a state that does not fit removes it too
            prefix = f"{i}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            _load_state(handle.surgeries[0], own, Engine.of(model))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return SurgeryHandle(model, [s for h in handles for s in h.surgeries])


def _saved_entry(config_path: Path, i: int, entry: Any) -> tuple[str, Any, Any, dict[str, Any]]:
    """``(surgery, layers, heads, args)`` of one ``surgeries`` entry of a saved config, or an error naming it."""
    where = f"{config_path}: surgeries[{i}]"
    damaged = "; the saved surgery is damaged or not written by save_surgery: save it again."
    if not isinstance(entry, dict) or not isinstance(entry.get("surgery"), str):
        raise AttnSurgeryError(
            f"{where} is {entry!r}, not a mapping with a 'surgery' name ({{'surgery': 'temperature', 'args': "
            f"{{...}}}}){damaged}"
        )
    args = entry.get("args") or {}
    if not isinstance(args, dict):
        raise AttnSurgeryError(
            f"{where}: 'args' is {args!r}, not a mapping of argument names to values{damaged}"
        )
    heads = entry.get("heads")
    if heads is not None:
        if not isinstance(heads, dict):
            raise AttnSurgeryError(
                f"{where}: 'heads' is {heads!r}, not a mapping {{layer: [heads]}}{damaged}"
            )
        try:
            heads = {int(k): v for k, v in heads.items()}
        except (TypeError, ValueError):
            bad = next(k for k in heads if not str(k).lstrip("-").isdigit())
            raise AttnSurgeryError(f"{where}: 'heads' key {bad!r} is not a layer index{damaged}") from None
    return entry["surgery"], entry.get("layers"), heads, args


@torch.no_grad()
def attention_maps(
    model: nn.Module, inputs: Mapping[str, torch.Tensor] | torch.Tensor, layers: Any = None
) -> dict[int, torch.Tensor]:
    """Attention probabilities ``{layer: (B, H, Tq, Tk)}`` as the (patched) model computes them.

    Works on patched and unpatched models alike; probability-level surgeries' edits are included (what the
    surgery sees and produces). Only the requested layers materialise a full map. Layers whose attention a
    ``REPLACE`` surgery computes with its own kernel (MoH, hedgehog) have no probabilities and are left out.
    """
    if not isinstance(inputs, (torch.Tensor, Mapping)):
        raise AttnSurgeryError(
            f"attention_maps takes token ids (a tensor) or the tokenizer's output, not a {type(inputs).__name__}: "
            "tokenize first, attention_maps(model, tokenizer(text, return_tensors='pt'))."
        )
    engine = Engine.of(model)
    selected = parse_layers(layers, engine.info.num_layers)
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    engine.start_recording(set(selected))
    try:
        model(**inputs, use_cache=False)
    finally:
        maps = engine.stop_recording()
    # a layer whose attention a REPLACE surgery computes (MoH, hedgehog) has no softmax probabilities to record
    return {
        layer: torch.cat(maps[layer], dim=2) if len(maps[layer]) > 1 else maps[layer][0]
        for layer in sorted(maps)
        if maps[layer]
    }
