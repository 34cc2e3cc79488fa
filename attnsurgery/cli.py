"""``attnsurgery`` command line: list, apply, inspect, eval, reproduce, lm-eval.

Heavy imports (torch, transformers) happen inside the commands, so ``attnsurgery --help`` is instant.
Exit codes: 0 success, 1 unexpected error, 2 bad input in general, 3 unknown surgery, 4 bad surgery argument,
5 bad recipe, 6 unsupported model, 7 model not found, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
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
    what, kwargs = _surgery_request(args, model_name)  # validate before the slow model load
    model, tokenizer = _load(model_name, args)
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


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from .api import attention_maps, patch
    from .plotting import plot_attention_grid

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
    out = Path(args.out)
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
    from .evaluate import check_tasks, evaluate_arms, make_arms, task_manager, write_report

    tasks = check_tasks([t for item in args.tasks for t in item.split(",") if t], task_manager())
    arms = make_arms(args.recipe or [], model=args.model)  # bad recipes fail before the model loads
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
    )
    paths = write_report([report], args.out)
    _print_report(paths["md"].read_text(), paths)
    return 0 if all(a.valid for a in report.arms) else 1


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .evaluate import load_table, reproduce
    from .vlm_eval import is_vlm_table

    if is_vlm_table(args.table):  # POPE / CHAIR tables of the VLM surgeries: their own runner, one model
        from .vlm_eval import load_vlm_table, run_vlm_table

        vlm = load_vlm_table(args.table)
        if vlm.requires:
            _console(stderr=True).print(f"[yellow]this table needs: {vlm.requires}[/yellow]")
        paths = run_vlm_table(
            args.table, out_dir=args.out, limit=int(args.limit) if args.limit else None, force=args.force
        )
        _print_report(paths["md"].read_text(), paths)
        return 0
    table = load_table(args.table)
    if table.requires:
        _console(stderr=True).print(f"[yellow]this table needs: {table.requires}[/yellow]")
    reports, paths = reproduce(
        table, out_dir=args.out, models=args.model, limit=args.limit, force=args.force, on_arm=_arm_progress
    )
    _print_report(paths["md"].read_text(), paths)
    return 0 if all(a.valid for r in reports for a in r.arms) else 1


def _add_act_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``attnsurgery calibrate act`` (model and --data are the caller's)."""
    parser.add_argument(
        "--beta", type=float, default=0.4, help="ACT beta (default 0.4, the reference code's)"
    )
    parser.add_argument("--threshold", type=float, default=None, help="absolute sink threshold (default 0.1)")
    parser.add_argument("--alpha", type=float, default=None, help="sink threshold as alpha / N instead")
    parser.add_argument("--layers", default=None, help="layers to sweep, e.g. 2:-1 (default all)")
    parser.add_argument("--heads", default=None, help="heads to sweep, e.g. '[0, 3]' or '{10: [0, 3]}'")
    parser.add_argument("--slow", action="store_true", help="full forward per head (the reference procedure)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")
    parser.add_argument(
        "--head-batch", type=int, default=None, help="heads stacked per forward (default all)"
    )
    parser.add_argument("--max-length", type=int, default=None, help="truncate sequences from the left")
    parser.add_argument(
        "--metric",
        choices=("choice_logprob", "acc", "margin"),
        default="choice_logprob",
        help="per-record score",
    )
    parser.add_argument(
        "--min-delta", type=float, default=0.0, help="keep heads whose mean delta exceeds this"
    )
    parser.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="bootstrap P(delta > 0) needed to keep (--rule fdr: false discovery rate 1 - confidence)",
    )
    parser.add_argument(
        "--rule",
        choices=("bootstrap", "fdr"),
        default="bootstrap",
        help="per-head bootstrap test, or Benjamini-Hochberg over all swept heads (default bootstrap)",
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N calibration records")
    parser.add_argument("--state", default=None, help="JSON-lines state file: resume an interrupted sweep")
    parser.add_argument("--out", default=None, help="write the recipe YAML here")
    parser.add_argument("--plot", default=None, help="save a layer x head heatmap of the deltas (PNG) here")


def _act_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``calibrate_act_heads`` keyword arguments from :func:`_add_act_arguments` options."""
    import yaml

    return {
        "beta": args.beta,
        "threshold": args.threshold,
        "alpha": args.alpha,
        "layers": args.layers,
        "heads": yaml.safe_load(args.heads) if args.heads else None,
        "fast": not args.slow,
        "batch_size": args.batch_size,
        "head_batch": args.head_batch,
        "max_length": args.max_length,
        "metric": args.metric,
        "min_delta": args.min_delta,
        "confidence": args.confidence,
        "rule": args.rule,
        "state_path": args.state,
    }


def _add_temperature_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``attnsurgery calibrate temperature`` (model and --data are the caller's)."""
    parser.add_argument(
        "--per", choices=("layer", "head"), default="layer", help="one c per layer or per head"
    )
    parser.add_argument("--steps", type=int, default=200, help="maximum optimiser steps (default 200)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training window (default 256)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per step (default 1)")
    parser.add_argument("--layers", default=None, help="layers to fit, e.g. 2: (default all)")
    parser.add_argument("--eval-every", type=int, default=25, help="validation every N steps (default 25)")
    parser.add_argument("--patience", type=int, default=3, help="stop after N validations without gain")
    parser.add_argument(
        "--min-c", type=float, default=0.0, help="lower bound of c (default 0, the paper's range)"
    )
    parser.add_argument("--heldout-fraction", type=float, default=0.2, help="texts held out for perplexity")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N texts")
    parser.add_argument("--save", default=None, metavar="DIR", help="save_surgery the fitted table to DIR")
    parser.add_argument("--out", default=None, help="write the recipe YAML (+ .safetensors state) here")


def _temperature_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``fit_temperature`` keyword arguments from :func:`_add_temperature_arguments` options."""
    return {
        "per": args.per,
        "steps": args.steps,
        "lr": args.lr,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "layers": args.layers,
        "eval_every": args.eval_every,
        "patience": args.patience,
        "heldout_fraction": args.heldout_fraction,
        "min_c": args.min_c,
    }


# argparse lives here, not in calibrate.py: importing that module loads torch, and --help must stay instant
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


def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import calibrate

    console = _console()
    if args.method == "var":
        from .patches.var.calibrate import select_sink_dims, sink_dim_scores

        prompts = args.prompt or [
            "The capital of France is Paris, and the capital of Italy is Rome.",
            "Describe the picture in one sentence.",
            "A quick brown fox jumps over the lazy dog.",
        ]
        model, tokenizer = _load(args.model, args)
        scores = sink_dim_scores(model, tokenizer, prompts, tau=args.tau)
        top = scores.argsort(descending=True)[:8].tolist()
        console.print("channels by hit fraction: " + ", ".join(f"{d}: {scores[d]:.0%}" for d in top))
        dims = select_sink_dims(scores, tau=args.tau, min_fraction=args.min_fraction, max_dims=args.max_dims)
        console.print(f"sink_dims: {dims}")
        return 0
    if args.method == "act":
        records, data = _calibration_records(args.data, args.limit, "multiple_choice")
        kwargs = _act_kwargs(args)
        model, tokenizer = _load(args.model, args)
        result = calibrate.calibrate_act_heads(model, tokenizer, records, data=data, **kwargs)
        if result.heads:  # one more pass: do the kept heads help together, not just one at a time?
            result.score_selection(
                model, tokenizer, records, batch_size=args.batch_size, max_length=args.max_length
            )
        console.print(result.summary())
        if args.plot:
            from .plotting import plot_head_sweep

            console.print(f"saved {plot_head_sweep(result, args.plot, label=args.model)}")
        if args.out:
            path = calibrate.write_act_recipe(result, args.out, args.model, data=data)
            console.print(f"wrote {path} (use: attnsurgery apply --recipe {path} {args.model})")
        return 0
    records, data = _calibration_records(args.data, args.limit, "perplexity")
    model, tokenizer = _load(args.model, args)
    result = calibrate.fit_temperature(model, tokenizer, records, data=data, **_temperature_kwargs(args))
    console.print(result.summary())
    if args.save:
        console.print(f"saved to {result.save(model, args.save)}")
    if args.out:
        path = calibrate.write_temperature_recipe(result, args.out, args.model, data=data)
        console.print(f"wrote {path} (use: attnsurgery apply --recipe {path} {args.model})")
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
    model_options(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("inspect", help="attention maps (PNG heatmap grid) and per-layer sink statistics")
    p.add_argument("model")
    p.add_argument("--surgery", help="inspect the model patched with this surgery")
    surgery_options(p)
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. The dog sleeps.")
    p.add_argument("--show-layers", default=None, help="layers to plot (default: six spread over the depth)")
    p.add_argument("--heads-shown", type=int, default=4, help="heads per layer in the plot")
    p.add_argument("--threshold", type=float, default=0.1, help="sink score threshold (ACT's 0.1)")
    p.add_argument("--out", default="attention.png")
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
    eval_options(p)
    model_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("reproduce", help="run a table definition (evals/*.yaml): models x arms x tasks")
    p.add_argument("table", help="table YAML, e.g. evals/mini.yaml")
    p.add_argument("--model", action="append", help="only this model of the table (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default evals/results/<table name>)")
    eval_options(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "calibrate",
        help="ACT head selection, temperature fitting, VAR sink dimensions",
        description="attnsurgery calibrate act smollm2-135m --data bb_general_knowledge --out act.yaml\n"
        "attnsurgery calibrate temperature smollm2-135m --data gutenberg_ppl --out temp.yaml\n"
        "attnsurgery calibrate var llava-1.5-7b",
    )
    methods = p.add_subparsers(dest="method", required=True)
    for name, add, help_text in (
        ("act", _add_act_arguments, "the paper's single-head sweep on multiple-choice calibration data"),
        ("temperature", _add_temperature_arguments, "fit Selective-Attention position temperatures on text"),
    ):
        m = methods.add_parser(name, help=help_text)
        m.add_argument("model")
        m.add_argument("--data", action="append", help="offline task(s) (their calibration split) or .jsonl")
        add(m)
        model_options(m)
        m.set_defaults(func=cmd_calibrate)
    m = methods.add_parser("var", help="find a backbone's sink dimensions (massive activations)")
    m.add_argument("model")
    m.add_argument("--prompt", action="append", help="prompt (repeatable; a few defaults otherwise)")
    m.add_argument("--tau", type=float, default=20.0, help="|x/RMS(x)| threshold (VAR's tau)")
    m.add_argument("--min-fraction", type=float, default=0.5)
    m.add_argument("--max-dims", type=int, default=4)
    model_options(m)
    m.set_defaults(func=cmd_calibrate)

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
        from .lmeval import harness_main

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
