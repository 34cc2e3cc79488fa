"""What the commands share: console, model loading, surgery options, the recipe resolver, calibration data.

Nothing here imports torch at module level: ``attnsurgery --help`` builds every parser without it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..plugins import CalibrateTools  # noqa: F401  (the calibrate plugins' contract, re-exported for commands)


def bounded(
    kind: type,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses a whole number (``int``) or a number (``float``) and checks its range, so a bad
    flag fails at once (exit 2, naming the value and the range) instead of after a model load."""
    left, right = ("(" if low_open else "["), (")" if high_open or high is None else "]")
    span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if kind is int else 'number'} (it must lie in {span})"
            ) from None
        bad = value != value or value in (float("inf"), float("-inf"))  # NaN, inf
        bad = bad or (low is not None and (value < low or (low_open and value == low)))
        bad = bad or (high is not None and (value > high or (high_open and value == high)))
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must lie in {span}")
        return value

    parse.__name__ = "whole number" if kind is int else "number"  # argparse names the type in its message
    return parse


def doc_limit(text: str) -> float:
    """``--limit``: a whole number of docs (1, 50), or a fraction of each task below 1 (0.1); not 1.5, whose
    meaning lm-eval would pick silently (it truncates to 1 doc)."""
    value = bounded(float, 0, low_open=True)(text)
    if value > 1 and not value.is_integer():
        raise argparse.ArgumentTypeError(
            f"{text} is neither a number of docs (a whole number, e.g. {int(value)}) nor a fraction of each task "
            "(below 1, e.g. 0.5)"
        )
    return value


doc_limit.__name__ = "limit"


def dtype_name(text: str) -> str:
    """``--dtype``: a name ``load_model`` takes (checked as it is parsed, before anything loads)."""
    from ..models import _DTYPES

    if text != "auto" and text not in _DTYPES:
        from ..errors import did_you_mean

        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dtype.{did_you_mean(text, [*_DTYPES, 'auto'])} Use one of {', '.join(_DTYPES)} or auto"
        )
    return text


dtype_name.__name__ = "dtype"

_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_name(text: str) -> str:
    """``--device-map``: accelerate's strategies or one device (``cpu``, ``cuda:0``), checked as it is parsed."""
    if text in _DEVICE_MAPS or text.isdigit():  # a GPU index
        return text
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a device map ({', '.join(_DEVICE_MAPS)}) nor a device (cpu, cuda, cuda:0, mps)"
        ) from None
    return text


device_map_name.__name__ = "device map"


def model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        type=dtype_name,
        default="float32",
        help="float32 | bfloat16 | float16 | auto (default float32)",
    )
    p.add_argument(
        "--device-map", type=device_map_name, default=None, help="accelerate device map, e.g. auto"
    )


def surgery_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="shipped recipe (temperature, temperature/position, act) or a YAML path")
    p.add_argument("--arg", action="append", metavar="NAME=VALUE", help="surgery argument (repeatable)")
    p.add_argument("--layers", help="layers to act on, e.g. 2:30, -14:, 1,18:32")
    p.add_argument("--heads", help="heads, e.g. '[0, 3]' or '{10: [0, 3]}'")


def eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit",
        type=doc_limit,
        default=None,
        help="docs per task (a quick look; same docs per arm); below 1, a fraction of each task",
    )
    p.add_argument("--force", action="store_true", help="re-run arms even if their results are cached")


def make_console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def parse_kv(pairs: list[str] | None) -> dict[str, Any]:
    """``["tau=0.8", "heads={10: [0, 3]}"]`` -> dict, values parsed as YAML (numbers, lists, mappings)."""
    import yaml

    from ..errors import AttnSurgeryError

    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # as typed, for the message
    for pair in pairs or []:
        if "=" not in pair:
            raise AttnSurgeryError(f"--arg {pair!r}: write arguments as name=value, e.g. --arg tau=0.8.")
        key, value = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise AttnSurgeryError(
                f"--arg {pair!r} has no name before '='; write name=value, e.g. --arg tau=0.8."
            )
        if key in out:  # the last one would win without a word
            raise AttnSurgeryError(
                f"--arg {key} is given more than once ({given[key]} and {pair.strip()}); give it once."
            )
        given[key] = pair.strip()
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise AttnSurgeryError(f"--arg {pair!r}: the value is not valid YAML.") from None
    return out


def check_output_path(path: str | None, option: str, *, folder: bool, overwrite: bool | None = None) -> None:
    """Refuse, before any model loads, an output that cannot be written or would replace something: an empty name,
    a folder where a file goes (or a file where a folder goes), a path under a file or in a folder that is not
    writable, and (``overwrite`` False: the command has ``--overwrite``) an output file that exists already."""
    import os

    from ..errors import AttnSurgeryError

    if path is None:
        return
    if not str(path).strip():
        raise AttnSurgeryError(f"{option} is empty; name the output {'folder' if folder else 'file'}.")
    target = Path(path)
    if target.exists():
        if folder and not target.is_dir():
            raise AttnSurgeryError(f"{option} {target} is a file; the output is a folder. Name a folder.")
        if not folder and target.is_dir():
            raise AttnSurgeryError(f"{option} {target} is a folder; the output is a file. Name a file.")
        if not folder and overwrite is False:
            raise AttnSurgeryError(
                f"{option} {target} exists; pass --overwrite to replace it, or name another file."
            )
    parent = target.absolute() if folder else target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise AttnSurgeryError(
            f"{option} {target} cannot be written: {parent} is a file, not a folder. Name another path."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AttnSurgeryError(
            f"{option} {target} cannot be written: {parent} is not writable. Name a path you can write to."
        )
    from ..api import _creatable

    if not (target.exists() or _creatable(parent)):  # os.access says yes on read-only mounts (/proc)
        raise AttnSurgeryError(
            f"{option} {target} cannot be written: nothing can be created in {parent}. Name a path you can write to."
        )


def surgery_request(args: argparse.Namespace, model_name: str):
    """(recipe-or-name, kwargs) from --recipe / SURGERY plus --arg/--layers/--heads."""
    import yaml

    from ..recipe import find_recipe

    kwargs = parse_kv(args.arg)
    for name in ("layers", "heads"):
        if getattr(args, name) is not None and name in kwargs:
            from ..errors import AttnSurgeryError

            raise AttnSurgeryError(
                f"--arg {name}={kwargs[name]!r} and --{name} {getattr(args, name)!r} both say where the surgery acts; "
                f"give --{name} only."
            )
    if args.layers is not None:
        kwargs["layers"] = args.layers
    if args.heads is not None:
        if not args.heads.strip():  # YAML reads '' as null: every head, without a word
            from ..errors import SurgeryConfigError

            raise SurgeryConfigError(
                "--heads is empty; omit it (every head) or name heads: '[0, 3]', '0,3' or '{10: [0, 3]}'."
            )
        try:
            kwargs["heads"] = yaml.safe_load(args.heads)
        except yaml.YAMLError:
            from ..errors import SurgeryConfigError

            raise SurgeryConfigError(
                f"--heads {args.heads!r} is not a list or mapping of head indices; write '[0, 3]', '0,3' or "
                "'{10: [0, 3]}' (brackets and braces closed)."
            ) from None
    if args.recipe is not None:
        return find_recipe(args.recipe, model=model_name), kwargs
    from ..registry import get_surgery_class

    cls = get_surgery_class(args.surgery)  # fail before the slow model load
    cls.config_class.from_kwargs(cls.name, {k: v for k, v in kwargs.items() if k not in ("layers", "heads")})
    return args.surgery, kwargs


def load(model_name: str, args: argparse.Namespace):
    from ..models import load_model

    err = make_console(stderr=True)
    start = time.perf_counter()
    with err.status(f"loading {model_name} ..."):
        model, tokenizer = load_model(model_name, dtype=args.dtype, device_map=args.device_map)
    err.print(
        f"[dim]loaded {model_name} ({type(model).__name__}, {model.config._attn_implementation}) "
        f"in {time.perf_counter() - start:.1f}s[/dim]"
    )
    return model, tokenizer


def ensure_recipe(
    name: str, model_name: str, args: argparse.Namespace, loaded: tuple[Any, Any] | None = None
) -> tuple[Any, Any] | None:
    """``--recipe FOLDER MODEL`` when FOLDER has no recipe made for MODEL: calibrate one, if the surgery can.

    The one resolver behind ``apply`` (and ``eval``): a surgery whose ``calibrate.py`` offers ``auto_recipe`` (ACT)
    gets a recipe calibrated on demand — the model is loaded first (a model that cannot be found fails here, exit 7,
    before any calibration), the sweep says what it runs and how long it should take, and the recipe is cached
    per model (``attnsurgery.recipe.cached_recipe_path``: ``$ATTNSURGERY_CACHE/recipes/<folder>/<model>.yaml``),
    where ``find_recipe`` picks it up next time. ``--no-calibrate`` (``args.no_calibrate``) refuses instead.
    Returns the loaded ``(model, tokenizer)`` when it calibrated (so the caller need not load it again), else None;
    a cached recipe that is reused is announced.
    """
    import importlib

    from ..errors import RecipeError
    from ..recipe import NoRecipeForModelError, cached_recipe_path, find_recipe, user_recipe_root

    err = make_console(stderr=True)
    try:
        recipe = find_recipe(name, model=model_name)
    except NoRecipeForModelError as error:
        module_name = f"attnsurgery.patches.{error.folder}.calibrate"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as missing:  # no such surgery package, or no calibrate.py in it
            if not f"{module_name}.".startswith(f"{missing.name}."):
                raise
            module = None
        if module is None or not hasattr(module, "auto_recipe"):
            raise
        alternatives = f"{error.folder}/all-heads" if f"{error.folder}/all-heads" in error.choices else None
        if getattr(args, "no_calibrate", False):
            raise RecipeError(
                f"{error} Without --no-calibrate, `--recipe {error.folder} {model_name}` calibrates one for this "
                f"model ({error.folder}'s head sweep on the shipped calibration splits; the time is estimated "
                f"first) and caches it; or run `attnsurgery calibrate {error.folder} {model_name} --data ... "
                f"--out FILE` yourself"
                + (f"; `--recipe {alternatives}` is the uncalibrated form." if alternatives else ".")
            ) from None
        model, tokenizer = loaded or load(model_name, args)  # an earlier calibration's model is reused
        tools = CalibrateTools(
            console=make_console(), load=lambda n: load(n, args), records=calibration_records
        )
        path = module.auto_recipe(
            model, tokenizer, model_name, cached_recipe_path(error.folder, model_name), tools
        )
        err.print(
            f"cached the {error.folder} recipe calibrated for {model_name} at {path}; it is reused next time"
        )
        return model, tokenizer
    if recipe.path is not None and user_recipe_root() in recipe.path.parents:
        err.print(
            f"using the {recipe.name} recipe calibrated for {model_name} earlier: {recipe.path} (delete it to "
            "calibrate again)"
        )
    return None


def print_report(markdown: str, paths: dict[str, Path]) -> None:
    """An eval table on the console: one row per (task, metric, arm) — four columns that fit an 80-column
    terminal whatever the number of arms, names folded, never cut — with the wide side-by-side table in the .md;
    other reports (budget curves, outlier tables) as their markdown."""
    import json

    from rich.markdown import Markdown

    console = make_console()
    try:
        reports = json.loads(paths["json"].read_text()).get("reports")
    except (OSError, ValueError, AttributeError):
        reports = None
    if reports and all(isinstance(r, dict) and "table" in r for r in reports):
        for report in reports:
            console.print(compact_table(report))
        console.print(f"side by side: {paths['md']}")
    else:
        console.print(Markdown(markdown))
    console.print(f"wrote {paths['json']}, {paths['md']} and {paths['png']}")


def compact_table(report: dict[str, Any]) -> Any:
    """A rich Table of one model's eval report in long form (task · metric, arm, value, change vs baseline)."""
    from rich.table import Table

    from ..eval.report import p_label

    limit = (report.get("settings") or {}).get("limit")
    table = Table(
        title=f"{report['model']}" + (f" (limited run: {limit:g} docs per task)" if limit else ""),
        expand=False,
        show_lines=False,
    )
    table.add_column("task · metric", overflow="fold", ratio=3)
    table.add_column("arm", overflow="fold", ratio=3)
    table.add_column("value ± se", justify="right", no_wrap=True)
    table.add_column("Δ vs baseline", justify="right", overflow="fold", ratio=2)
    for row in report["table"]:
        first = True
        for arm, cell in row["arms"].items():
            value = cell.get("value")
            text = "–" if value is None else f"{value:.4g} ± {cell.get('stderr') or 0:.2g}"
            if not cell.get("valid", True):
                text += " (invalid)"
            delta = ""
            if cell.get("delta") is not None:
                delta = (
                    f"{cell['delta']:+.3g} ({p_label(cell['p'])})"
                    if cell.get("p") is not None
                    else f"{cell['delta']:+.3g}"
                )
            table.add_row(f"{row['task']} · {row['metric']}" if first else "", arm, text, delta)
            first = False
        table.add_section()
    return table


def arm_progress(model: str, arm: str, status: str) -> None:
    style = {"cached": "dim", "running": "bold", "done": "green"}.get(status, "")
    make_console(stderr=True).print(f"[{style}]{model} · {arm}: {status}[/{style}]")


def calibration_records(data: list[str], limit: int | None, kind: str) -> tuple[list[dict], str]:
    """Calibration splits of offline tasks (or JSON-lines files): never the test split a table reports on."""
    import itertools
    import json

    from ..errors import AttnSurgeryError

    names = [d for item in data or [] for d in item.split(",") if d]
    if not names:
        raise AttnSurgeryError(
            "calibration data missing: pass --data TASK (an offline task's calibration split, e.g. "
            f"{'bb_general_knowledge' if kind == 'multiple_choice' else 'gutenberg_ppl'}) or a .jsonl file."
        )
    per_source: list[list[dict]] = []
    for name in names:
        path = Path(name)
        if path.suffix == ".jsonl":
            if not path.is_file():
                raise AttnSurgeryError(f"calibration data file {path} does not exist.")
            try:
                records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            except json.JSONDecodeError as err:
                raise AttnSurgeryError(
                    f"calibration data file {path}: line {err.lineno} is not JSON ({err.msg})."
                ) from None
            if kind == "multiple_choice":  # the file is named here, before the model loads, not after
                from ..eval.scoring import check_choice_records

                try:
                    check_choice_records(records)
                except AttnSurgeryError as err:
                    raise AttnSurgeryError(
                        f"calibration data file {path}: {err} Each line is one JSON record "
                        "{'query': ..., 'choices': [...], 'gold': index}."
                    ) from None
            from ..train.data import refuse_test_content

            texts = [r.get("text") or r.get("query") for r in records if isinstance(r, dict)]
            refuse_test_content([t for t in texts if isinstance(t, str)], str(path))
            per_source.append(records)
            continue
        from ..tasks import load_split, task_info

        try:
            info = task_info(name)
        except ValueError as err:
            raise AttnSurgeryError(str(err)) from None
        if info["kind"] != kind:
            raise AttnSurgeryError(
                f"--data {name} is a {info['kind']} task; this calibration needs {kind} data."
            )
        per_source.append(load_split(name, "calibration"))
    # round-robin over the sources, so --limit keeps a balanced mix of tasks
    records = [r for group in itertools.zip_longest(*per_source) for r in group if r is not None]
    if limit:
        records = records[:limit]
    return records, ",".join(f"{n}:calibration" if not n.endswith(".jsonl") else n for n in names)
