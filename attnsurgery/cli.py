"""``attnsurgery`` command line: list, apply, inspect, eval, reproduce, calibrate, lm-eval.

Heavy imports (torch, transformers) happen inside the commands, so ``attnsurgery --help`` is instant.
Exit codes: 0 success, 1 unexpected error, 2 bad input in general, 3 unknown surgery, 4 bad surgery argument,
5 bad recipe, 6 unsupported model, 7 model not found, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_PROMPT = "The capital of France is"


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _parse_kv(pairs: list[str] | None) -> dict[str, Any]:
    """``["tau=0.8", "heads={10: [0, 3]}"]`` -> dict, values parsed as YAML (numbers, lists, mappings)."""
    import yaml

    from .errors import AttnSurgeryError

    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise AttnSurgeryError(f"--arg {pair!r}: write arguments as name=value, e.g. --arg tau=0.8.")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise AttnSurgeryError(f"--arg {pair!r}: the value is not valid YAML.") from None
    return out


def _surgery_request(args: argparse.Namespace, model_name: str):
    """(recipe-or-name, kwargs) from --recipe / SURGERY plus --arg/--layers/--heads."""
    import yaml

    from .recipe import find_recipe

    kwargs = _parse_kv(args.arg)
    if args.layers is not None:
        kwargs["layers"] = args.layers
    if args.heads is not None:
        kwargs["heads"] = yaml.safe_load(args.heads)
    if args.recipe:
        return find_recipe(args.recipe, model=model_name), kwargs
    from .registry import get_surgery_class

    cls = get_surgery_class(args.surgery)  # fail before the slow model load
    cls.config_class.from_kwargs(cls.name, {k: v for k, v in kwargs.items() if k not in ("layers", "heads")})
    return args.surgery, kwargs


def _load(model_name: str, args: argparse.Namespace):
    from .models import load_model

    err = _console(stderr=True)
    start = time.perf_counter()
    with err.status(f"loading {model_name} ..."):
        model, tokenizer = load_model(model_name, dtype=args.dtype, device_map=args.device_map)
    err.print(
        f"[dim]loaded {model_name} ({type(model).__name__}, {model.config._attn_implementation}) "
        f"in {time.perf_counter() - start:.1f}s[/dim]"
    )
    return model, tokenizer


def _ensure_recipe(name: str, model_name: str, args: argparse.Namespace) -> tuple[Any, Any] | None:
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

    from .errors import RecipeError
    from .recipe import NoRecipeForModelError, cached_recipe_path, find_recipe, user_recipe_root

    err = _console(stderr=True)
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
        model, tokenizer = _load(model_name, args)
        tools = CalibrateTools(
            console=_console(), load=lambda n: _load(n, args), records=_calibration_records
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


def cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .models import list_aliases
    from .recipe import find_recipe, list_recipes
    from .registry import get_surgery_class, list_surgeries

    console = _console()
    table = Table(title="surgeries", show_lines=False)
    for col in ("name", "stages", "what it does"):
        table.add_column(col)
    for info in list_surgeries():
        table.add_row(info.name, ",".join(info.stages), info.summary)
    console.print(table)
    if args.verbose:
        for info in list_surgeries():
            cls = get_surgery_class(info.name)
            console.print(f"\n[bold]{info.name}[/bold]  ({info.paper})")
            for name, default, doc in cls.config_class.describe():
                console.print(f"  {name} = {default}: {doc}")
    recipes = Table(title="recipes")
    for col in ("recipe", "model", "description"):
        recipes.add_column(col)
    for name in list_recipes():
        recipe = find_recipe(name)
        recipes.add_row(name, recipe.model or "-", recipe.description)
    console.print(recipes)
    models = Table(title="model aliases")
    models.add_column("alias")
    models.add_column("source")
    for alias, text in list_aliases().items():
        models.add_row(alias, text)
    console.print(models)
    return 0


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    """Greedy continuation and the prompt's mean next-token NLL (nats)."""
    import torch

    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
        gen = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    text = tokenizer.decode(gen[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return text, float(out.loss)


def cmd_apply(args: argparse.Namespace) -> int:
    import math

    from rich.table import Table

    from .api import patch, save_surgery
    from .errors import AttnSurgeryError

    positional = args.targets
    if args.recipe:
        if len(positional) != 1:
            raise AttnSurgeryError(
                "apply --recipe R needs exactly one MODEL, e.g. `attnsurgery apply --recipe "
                "temperature smollm2-135m`."
            )
        args.surgery, model_name = None, positional[0]
    else:
        if len(positional) != 2:
            raise AttnSurgeryError(
                "apply needs SURGERY MODEL (or --recipe R MODEL), e.g. `attnsurgery apply "
                "temperature smollm2-135m --arg tau=0.8`."
            )
        args.surgery, model_name = positional
    # no recipe made for this model: calibrate one (ACT), or refuse with --no-calibrate
    loaded = _ensure_recipe(args.recipe, model_name, args) if args.recipe else None
    what, kwargs = _surgery_request(args, model_name)  # validate before the slow model load
    model, tokenizer = loaded or _load(model_name, args)
    console = _console()
    rows = []
    if args.prompt is not None:
        with _console(stderr=True).status("baseline ..."):
            rows.append(("baseline", *_generate(model, tokenizer, args.prompt, args.max_new_tokens)))
    handle = patch(model, what, **kwargs)
    console.print(f"[bold]patched:[/bold] {handle}")
    if args.prompt is not None:
        with _console(stderr=True).status("patched ..."):
            rows.append(("patched", *_generate(model, tokenizer, args.prompt, args.max_new_tokens)))
        table = Table(title=f"prompt: {args.prompt!r}")
        for col in ("model", "continuation (greedy)", "prompt NLL", "prompt ppl"):
            table.add_column(col)
        for name, text, nll in rows:
            table.add_row(name, text.strip(), f"{nll:.4f}", f"{math.exp(nll):.2f}")
        console.print(table)
    if args.save:
        path = save_surgery(handle, args.save)
        console.print(f"saved surgery to {path} (load with attnsurgery.load_surgery(model, {str(path)!r}))")
    return 0


def _sink_stats(maps, threshold: float) -> list[dict[str, float]]:
    """Per layer: attention mass on the first token, and the share of (head, key) pairs that are sinks.

    A key is a sink in a head when the mean attention it receives from the queries that can see it exceeds
    ``threshold`` (ACT's score; the sail-sg Sink metric uses the same normalisation).
    """
    import torch

    rows = []
    for layer, probs in maps.items():
        p = probs[0]  # (H, Tq, Tk), batch row 0
        t = p.shape[-1]
        seen_by = torch.arange(t, 0, -1, dtype=p.dtype)  # causal: key j is seen by t - j queries
        score = p.sum(1) / seen_by  # (H, Tk)
        sinks = score > threshold
        rows.append(
            {
                "layer": layer,
                "first_token_mass": float(p[:, 1:, 0].mean()) if p.shape[1] > 1 else float(p[:, :, 0].mean()),
                "sink_fraction": float(sinks[:, 1:].float().mean()) if t > 1 else 0.0,
                "max_non_first_score": float(score[:, 1:].max()) if t > 1 else 0.0,
            }
        )
    return rows


def _num_layers(model) -> int:
    from .engine import discover

    return discover(model).num_layers


def _outlier_comparison(stats: dict[str, Any]) -> str:
    """Markdown: per layer, each metric of every labelled stats side by side (``base / patched``)."""
    from .eval.outliers import _fmt

    labels = list(stats)
    cols = [
        ("kurt attn", "attn_kurtosis", 2),
        ("kurt mlp", "mlp_kurtosis", 2),
        ("kurt resid", "residual_kurtosis", 2),
        ("inf attn", "attn_inf_norm", 2),
        ("inf mlp", "mlp_inf_norm", 2),
        ("inf resid", "residual_inf_norm", 2),
        ("sink share", "sink_share", 3),
    ]
    lines = [
        f"**side by side** ({' / '.join(labels)})",
        "",
        "| layer | " + " | ".join(name for name, _, _ in cols) + " |",
        "|---:|" + "---:|" * len(cols),
    ]
    for i, row in enumerate(stats[labels[0]].layers):
        cells = [
            " / ".join(_fmt(getattr(stats[label].layers[i], key), digits) for label in labels)
            for _, key, digits in cols
        ]
        lines.append(f"| {row.layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _inspect_outliers(args: argparse.Namespace) -> int:
    """``inspect --outliers``: per-layer outlier statistics on calibration windows, baseline (and patched)."""
    import json

    from rich.markdown import Markdown

    from .api import patch
    from .errors import AttnSurgeryError
    from .eval.outliers import outlier_stats, plot_outliers, render_outlier_table
    from .eval.text import calibration_windows

    if args.windows < 1 or args.seq_len < 2:
        raise AttnSurgeryError("--windows must be at least 1 and --seq-len at least 2.")
    request = _surgery_request(args, args.model) if (args.recipe or args.surgery) else None
    model, tokenizer = _load(args.model, args)
    max_context = getattr(model.config, "max_position_embeddings", None)
    if max_context is not None and args.seq_len > max_context:
        raise AttnSurgeryError(
            f"--seq-len {args.seq_len} is longer than the model's context ({max_context} positions)."
        )
    windows = calibration_windows(tokenizer, args.data, args.windows, args.seq_len)
    batches = list(windows.split(args.batch_size))
    err = _console(stderr=True)
    stats = {}
    with err.status(f"measuring the unpatched model on {len(windows)} windows ..."):
        stats["baseline"] = outlier_stats(model, batches, label="baseline")
    if request is not None:
        what, kwargs = request
        name = getattr(what, "name", None) or str(what)
        with patch(model, what, **kwargs) as handle:
            with err.status(f"measuring the model patched with {handle} ..."):
                stats[name] = outlier_stats(model, batches, label=name)
    out = Path(args.out or "outliers")
    out.mkdir(parents=True, exist_ok=True)
    data = args.data if ":" in args.data or Path(args.data).exists() else f"{args.data}:calibration"
    title = f"{args.model}: {len(windows)} windows x {windows.shape[1]} tokens of {data}"
    markdown = f"## outliers, {title}\n\n" + render_outlier_table(stats)
    if len(stats) > 1:
        markdown += "\n" + _outlier_comparison(stats)
    payload = {
        "model": args.model,
        "data": data,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "stats": {label: s.to_dict() for label, s in stats.items()},
    }
    paths = {"json": out / "outliers.json", "md": out / "outliers.md", "png": out / "outliers.png"}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    paths["md"].write_text(markdown)
    plot_outliers(stats, paths["png"], title=title)
    console = _console()
    console.print(Markdown(markdown))
    console.print(f"wrote {paths['json']}, {paths['md']} and {paths['png']}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from .api import attention_maps, patch
    from .plotting import plot_attention_grid

    if args.outliers:
        return _inspect_outliers(args)
    model, tokenizer = _load(args.model, args)
    handle = None
    if args.recipe or args.surgery:
        what, kwargs = _surgery_request(args, args.model)
        handle = patch(model, what, **kwargs)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    with _console(stderr=True).status("recording attention ..."):
        show = args.show_layers
        if show is None:
            n = _num_layers(model)
            show = sorted({round(i * (n - 1) / 5) for i in range(6)})
        maps = attention_maps(model, inputs, layers=show)
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    out = Path(args.out or "attention.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{args.model}" + (f" + {handle}" if handle else " (unpatched)")
    plot_attention_grid(maps, tokens, out, heads=args.heads_shown, title=title)
    stats = _sink_stats(maps, args.threshold)
    table = Table(title=f"sink statistics (threshold {args.threshold})")
    for col in ("layer", "mass on first token", "sink fraction", "max non-first score"):
        table.add_column(col)
    for row in stats:
        table.add_row(
            str(row["layer"]),
            f"{row['first_token_mass']:.3f}",
            f"{row['sink_fraction']:.3f}",
            f"{row['max_non_first_score']:.3f}",
        )
    console = _console()
    console.print(table)
    out.with_suffix(".json").write_text(
        json.dumps({"prompt": args.prompt, "tokens": tokens, "layers": stats}, indent=2)
    )
    console.print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _print_report(markdown: str, paths: dict[str, Path]) -> None:
    from rich.markdown import Markdown

    console = _console()
    console.print(Markdown(markdown))
    console.print(f"wrote {paths['json']}, {paths['md']} and {paths['png']}")


def _arm_progress(model: str, arm: str, status: str) -> None:
    style = {"cached": "dim", "running": "bold", "done": "green"}.get(status, "")
    _console(stderr=True).print(f"[{style}]{model} · {arm}: {status}[/{style}]")


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.text import check_tasks, evaluate_arms, make_arms, task_manager, write_report

    tasks = check_tasks([t for item in args.tasks for t in item.split(",") if t], task_manager())
    for recipe in (
        args.recipe or []
    ):  # `--recipe act MODEL` without a recipe for MODEL: calibrate one (cached)
        _ensure_recipe(recipe, args.model, args)
    arms = make_arms(args.recipe or [], model=args.model)  # bad recipes fail before the model loads
    if args.quant == "int8":
        from .errors import AttnSurgeryError
        from .eval.quant import int8_unavailable_reason

        reason = int8_unavailable_reason()
        if reason is not None:
            raise AttnSurgeryError(f"--quant int8: {reason}")
    report = evaluate_arms(
        args.model,
        arms,
        tasks,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        dtype=args.dtype,
        cache_dir=Path(args.out) / "cache",
        force=args.force,
        on_arm=lambda arm, status: _arm_progress(args.model, arm, status),
        quant=args.quant,
    )
    paths = write_report([report], args.out)
    _print_report(paths["md"].read_text(), paths)
    return 0 if all(a.valid for a in report.arms) else 1


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .eval.text_tables import load_table, reproduce
    from .eval.vision_tables import is_vlm_table

    if is_vlm_table(args.table):  # POPE / CHAIR tables of the VLM surgeries: their own runner, one model
        from .eval.vision import run_vlm_table
        from .eval.vision_tables import load_vlm_table

        vlm = load_vlm_table(args.table)
        if vlm.requires:
            _console(stderr=True).print(f"[yellow]this table needs: {vlm.requires}[/yellow]")
        paths = run_vlm_table(
            args.table, out_dir=args.out, limit=int(args.limit) if args.limit else None, force=args.force
        )
        _print_report(paths["md"].read_text(), paths)
        return 0
    from .eval.training_table import is_training_table

    if is_training_table(args.table):  # arms that train (gates, LoRA ...), scored on outliers and W8A8
        from .eval.training_table import run_training_table

        out = run_training_table(args.table, out_dir=args.out, models=args.model)
        _print_report(
            (out / "table.md").read_text(),
            {"json": out / "table.json", "md": out / "table.md", "png": out / "outliers-<model>.png"},
        )
        return 0
    table = load_table(args.table)
    if table.requires:
        _console(stderr=True).print(f"[yellow]this table needs: {table.requires}[/yellow]")
    reports, paths = reproduce(
        table, out_dir=args.out, models=args.model, limit=args.limit, force=args.force, on_arm=_arm_progress
    )
    _print_report(paths["md"].read_text(), paths)
    return 0 if all(a.valid for r in reports for a in r.arms) else 1


def _calibration_records(data: list[str], limit: int | None, kind: str) -> tuple[list[dict], str]:
    """Calibration splits of offline tasks (or JSON-lines files): never the test split a table reports on."""
    import itertools
    import json

    from .errors import AttnSurgeryError

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
            per_source.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
            continue
        from .tasks import load_split, task_info

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


# --------------------------------------------------------------------------------------------- calibrate
# A surgery gets `attnsurgery calibrate <name>` by holding patches/<name>/calibrate.py with
#   - a module docstring whose first line is the subcommand's help,
#   - add_arguments(parser): its options (MODEL, --dtype and --device-map are added here),
#   - run(args, tools: CalibrateTools) -> int: the exit code.
# The file is read (not imported) to list the subcommands, and imported only when its subcommand is parsed:
# importing a surgery loads torch, and `attnsurgery --help` must stay instant.


@dataclass
class CalibrateTools:
    """What ``attnsurgery calibrate <surgery>`` hands the surgery's ``calibrate.run(args, tools)``."""

    console: Any  # rich Console: print results here (progress goes to stderr)
    load: Callable[
        [str], tuple[Any, Any]
    ]  # model name -> (model, tokenizer), honouring --dtype / --device-map
    records: Callable[[list[str] | None, int | None, str], tuple[list[dict], str]]  # see _calibration_records

    def wrote_recipe(self, path: Path, model: str) -> None:
        """Say where a calibrated recipe went and how to apply it."""
        self.console.print(f"wrote {path} (use: attnsurgery apply --recipe {path} {model})")


def _calibrate_commands() -> dict[str, str]:
    """``{surgery: help line}`` for every surgery folder with a ``calibrate.py``."""
    import ast
    import importlib.resources

    out = {}
    for entry in sorted(importlib.resources.files("attnsurgery.patches").iterdir(), key=lambda e: e.name):
        source = entry / "calibrate.py"
        if entry.is_dir() and not entry.name.startswith("_") and source.is_file():
            doc = ast.get_docstring(ast.parse(source.read_text())) or ""
            out[entry.name] = doc.strip().split("\n")[0].rstrip(".")
    return out


class _CalibrateParser(argparse.ArgumentParser):
    """The parser of ``calibrate <surgery>``: its options come from the surgery's ``calibrate.add_arguments``,
    imported the first time this subcommand is parsed."""

    def __init__(
        self, *args: Any, surgery: str, common: Callable[[argparse.ArgumentParser], None], **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.surgery, self.common, self.module = surgery, common, None
        self.add_argument("model")

    def parse_known_args(self, args: Any = None, namespace: Any = None):
        if self.module is None:
            import importlib

            self.module = importlib.import_module(f"attnsurgery.patches.{self.surgery}.calibrate")
            self.module.add_arguments(self)
            self.common(self)
            self.set_defaults(func=cmd_calibrate, calibrate=self.module)
        return super().parse_known_args(args, namespace)


def cmd_calibrate(args: argparse.Namespace) -> int:
    tools = CalibrateTools(
        console=_console(), load=lambda name: _load(name, args), records=_calibration_records
    )
    return args.calibrate.run(args, tools)


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model alias (smollm2-135m, gemma3-270m), hub id or local path")
    p.add_argument(
        "surgery", nargs="?", help="surgery to train (gated_attention, head_scale ...); or --recipe"
    )
    p.add_argument(
        "--out", required=True, help="run folder (a recipe once finished: patch(model, DIR), --recipe DIR)"
    )
    p.add_argument(
        "--data", default="gutenberg_ppl", help="offline task (calibration split), .jsonl/.txt file or Hub id"
    )
    p.add_argument(
        "--objective",
        default="lm",
        help="lm, kd (KL to the unpatched model), transfer (attention-output MSE) or a weighted sum: 'lm+0.5*kd'",
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate of the surgery's own parameters")
    p.add_argument("--batch-size", type=int, default=4, help="global windows per optimiser step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=float, default=0.0, help="fraction of steps with a linear warm-up")
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--val-windows", type=int, default=32, help="held-back windows scored at each validation")
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument(
        "--keep", choices=("last", "best"), default="last", help="ship the last or the best-validation state"
    )
    p.add_argument("--patience", type=int, default=None, help="stop after N validations without improvement")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=0, help="add LoRA adapters of this rank (peft); 0: none")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x r)")
    p.add_argument(
        "--lora-targets",
        default=None,
        help="projections that get adapters (default: every projection of the attention)",
    )
    p.add_argument("--lora-layers", default=None, help="layers that get adapters (default: the surgery's)")
    p.add_argument("--lora-lr", type=float, default=1e-4)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def cmd_train(args: argparse.Namespace) -> int:
    from .api import SurgeryHandle, patch
    from .errors import AttnSurgeryError
    from .train import TrainConfig, prepare_data, train

    if not args.surgery and not args.recipe and not args.lora_r:
        raise AttnSurgeryError("train: name a SURGERY, a --recipe, or --lora-r N (LoRA alone).")
    config = TrainConfig(
        objective=args.objective,
        steps=args.steps,
        lr=args.lr,
        lora_lr=args.lora_lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        warmup=args.warmup,
        val_every=args.val_every,
        save_every=args.save_every,
        keep=args.keep,
        patience=args.patience,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
    )
    config.validate()  # bad settings fail before the slow model load, and nothing is written
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise AttnSurgeryError(
            f"{out} already exists; pass --resume to continue that run or --overwrite to replace it."
        )
    lora_args = None
    if args.lora_r:
        from .registry import get_surgery_class

        lora_args = {
            "r": args.lora_r,
            "alpha": args.lora_alpha or 2.0 * args.lora_r,
            "targets": args.lora_targets,
        }
        cls = get_surgery_class("lora")
        cls.config_class.from_kwargs("lora", lora_args)
    request = _surgery_request(args, args.model) if (args.surgery or args.recipe) else None
    model, tokenizer = _load(args.model, args)
    max_context = getattr(model.config, "max_position_embeddings", None)
    data = prepare_data(
        tokenizer, args.data, args.seq_len, max_context=max_context, max_val_windows=args.val_windows
    )
    surgeries = []
    if request is not None:
        what, kwargs = request
        surgeries += patch(model, what, **kwargs).surgeries
    if lora_args is not None:
        layers = args.lora_layers if args.lora_layers is not None else args.layers
        surgeries += patch(model, "lora", layers=layers, **lora_args).surgeries
    handle = SurgeryHandle(model, surgeries)
    console = _console(stderr=True)
    d = data.describe()
    console.print(
        f"training {', '.join(s.name for s in surgeries)} on {d['source']} ({d['train_windows']} windows of "
        f"{d['seq_len']} tokens, {d['val_windows']} held back for validation), objective {config.objective}, "
        f"{config.steps} steps -> {out}"
    )
    result = train(
        model,
        handle,
        data,
        config,
        out_dir=out,
        resume=args.resume,
        overwrite=args.overwrite,
        model_name=args.model,
    )
    first, last = result.val_history[0], result.final_val
    console.print(
        f"done: {result.steps} steps, {result.tokens:,} tokens, {result.seconds / 60:.1f} min; validation lm loss "
        f"{first['lm']:.4f} -> {last['lm']:.4f} (ppl {first['ppl']:.2f} -> {last['ppl']:.2f}); "
        f"recipe: {out / 'recipe.yaml'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnsurgery", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="surgeries, shipped recipes and model aliases, one line each")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every surgery's arguments")
    p.set_defaults(func=cmd_list)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dtype", default="float32", help="float32 | bfloat16 | float16 | auto (default float32)"
        )
        p.add_argument("--device-map", default=None, help="accelerate device map, e.g. auto")

    def surgery_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--recipe", help="shipped recipe (temperature, temperature/sharpen) or a YAML path")
        p.add_argument("--arg", action="append", metavar="NAME=VALUE", help="surgery argument (repeatable)")
        p.add_argument("--layers", help="layers to act on, e.g. 2:30, -14:, 1,18:32")
        p.add_argument("--heads", help="heads, e.g. '[0, 3]' or '{10: [0, 3]}'")

    p = sub.add_parser(
        "apply",
        help="patch a model, compare baseline vs patched generation, optionally save",
        description="attnsurgery apply --recipe temperature smollm2-135m --prompt '...'\n"
        "attnsurgery apply temperature smollm2-135m --arg tau=0.8 --save out/",
    )
    p.add_argument(
        "targets", nargs="+", metavar="[SURGERY] MODEL", help="surgery name (unless --recipe) and model"
    )
    surgery_options(p)
    p.add_argument(
        "--prompt",
        default=None,
        help="prompt to generate from (default: a short demo prompt unless --save is given)",
    )
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--save", metavar="DIR", help="save the surgery (config + state) to DIR")
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="--recipe act MODEL with no recipe made for MODEL: refuse instead of calibrating one (ACT's head "
        "sweep, cached per model under ~/.cache/attnsurgery/recipes, or $ATTNSURGERY_CACHE/recipes)",
    )
    model_options(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser(
        "inspect",
        help="attention maps (PNG heatmap grid) and per-layer sink statistics; --outliers: kurtosis, inf-norm, "
        "sink share per layer",
        description="attnsurgery inspect smollm2-135m --out maps.png\n"
        "attnsurgery inspect smollm2-135m --outliers --recipe act --windows 8 --out outliers/",
    )
    p.add_argument("model")
    p.add_argument("--surgery", help="inspect the model patched with this surgery")
    surgery_options(p)
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. The dog sleeps.")
    p.add_argument("--show-layers", default=None, help="layers to plot (default: six spread over the depth)")
    p.add_argument("--heads-shown", type=int, default=4, help="heads per layer in the plot")
    p.add_argument("--threshold", type=float, default=0.1, help="sink score threshold (ACT's 0.1)")
    p.add_argument(
        "--out",
        default=None,
        help="PNG file (default attention.png); with --outliers a folder (default outliers)",
    )
    p.add_argument(
        "--outliers",
        action="store_true",
        help="per layer kurtosis and inf-norm of attention output, FFN output and residual stream, first-token "
        "share and the largest activation, on calibration windows (baseline, and patched with a surgery/recipe)",
    )
    p.add_argument(
        "--data",
        default="gutenberg_ppl",
        help="--outliers text: an offline task (its calibration split) or a .jsonl/.txt file",
    )
    p.add_argument("--windows", type=int, default=8, help="--outliers: windows measured")
    p.add_argument("--seq-len", type=int, default=256, help="--outliers: tokens per window")
    p.add_argument("--batch-size", type=int, default=4, help="--outliers: windows per forward")
    model_options(p)
    p.set_defaults(func=cmd_inspect)

    def eval_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--limit", type=float, default=None, help="docs per task (a quick look; same docs per arm)"
        )
        p.add_argument("--force", action="store_true", help="re-run arms even if their results are cached")

    p = sub.add_parser(
        "eval",
        help="baseline vs patched with lm-eval: table (JSON, markdown, PNG) with deltas and paired p-values",
        description="attnsurgery eval smollm2-135m --recipe act --recipe temperature/fitted --tasks offline",
    )
    p.add_argument("model")
    p.add_argument("--recipe", action="append", help="a patched arm (repeatable); the baseline always runs")
    p.add_argument(
        "--tasks",
        action="append",
        required=True,
        help="lm-eval tasks, comma-separated; 'offline' is the shipped offline suite",
    )
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="attnsurgery-eval", help="output folder (results + per-arm cache)")
    p.add_argument(
        "--quant",
        choices=("w8a8", "int8"),
        default=None,
        help="w8a8: simulated static per-tensor W8A8 in every arm after its surgery (calibrated on "
        "gutenberg_ppl:calibration with the surgery active); int8: bitsandbytes LLM.int8 for all arms",
    )
    eval_options(p)
    model_options(p)
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="--recipe act MODEL with no recipe made for MODEL: refuse instead of calibrating one (as in apply)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("reproduce", help="run a table definition (evals/*.yaml): models x arms x tasks")
    p.add_argument("table", help="table YAML, e.g. evals/mini.yaml")
    p.add_argument("--model", action="append", help="only this model of the table (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default evals/results/<table name>)")
    eval_options(p)
    p.set_defaults(func=cmd_reproduce)

    commands = _calibrate_commands()
    p = sub.add_parser(
        "calibrate",
        help="calibrate a surgery on calibration data: " + ", ".join(commands),
        description="attnsurgery calibrate SURGERY MODEL [options]: one subcommand per surgery folder with a "
        "calibrate.py (e.g. attnsurgery calibrate act smollm2-135m --data bb_general_knowledge --out act.yaml)",
    )
    methods = p.add_subparsers(dest="method", required=True, parser_class=_CalibrateParser)
    for name, help_text in commands.items():
        methods.add_parser(name, help=help_text, surgery=name, common=model_options)

    p = sub.add_parser(
        "train",
        help="train a surgery's parameters and/or LoRA (model frozen); the output folder is a recipe",
        description="attnsurgery train smollm2-135m gated_attention --arg form=headwise --objective kd "
        "--steps 200 --out runs/gates   (multi-process: accelerate launch -m attnsurgery train ...)",
    )
    _add_train_arguments(p)
    surgery_options(p)
    model_options(p)
    p.set_defaults(func=cmd_train)

    sub.add_parser(
        "lm-eval",
        help="lm-eval's own CLI with `--model attnsurgery` registered and the offline tasks included",
        add_help=False,
    )
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # everything after it belongs to lm-eval's own parser
        from .eval.lmeval import harness_main

        return harness_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "apply" and args.prompt is None and not args.save:
        args.prompt = DEMO_PROMPT
    from .errors import AttnSurgeryError

    try:
        return args.func(args)
    except AttnSurgeryError as err:
        _console(stderr=True).print(f"[bold red]error:[/bold red] {err}")
        return err.exit_code
    except KeyboardInterrupt:
        _console(stderr=True).print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
