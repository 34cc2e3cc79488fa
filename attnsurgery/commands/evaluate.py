"""``attnsurgery eval`` (baseline vs patched arms with lm-eval) and ``attnsurgery reproduce`` (table YAMLs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (
    arm_progress,
    bounded,
    ensure_recipe,
    eval_options,
    make_console,
    model_options,
    print_report,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="baseline vs patched with lm-eval: table (JSON, markdown, PNG) with deltas and paired p-values",
        description="attnsurgery eval smollm2-135m --recipe act --recipe temperature/position --tasks offline",
    )
    p.add_argument("model")
    p.add_argument("--recipe", action="append", help="a patched arm (repeatable); the baseline always runs")
    p.add_argument(
        "--tasks",
        action="append",
        required=True,
        help="lm-eval tasks, comma-separated; 'offline' is the shipped offline suite",
    )
    p.add_argument("--num-fewshot", type=bounded(int, 0), default=None)
    p.add_argument("--batch-size", type=bounded(int, 1), default=16, help="lm-eval batch size")
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
    p.set_defaults(func=run_eval)

    p = sub.add_parser("reproduce", help="run a table definition (evals/*.yaml): models x arms x tasks")
    p.add_argument("table", help="table YAML, e.g. evals/mini.yaml")
    p.add_argument("--model", action="append", help="only this model of the table (repeatable)")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default evals/results/<table name>; a --limit or --model run: its own folder beside it)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results in --out made with another --limit or models",
    )
    eval_options(p)
    p.set_defaults(func=run_reproduce)


def run_eval(args: argparse.Namespace) -> int:
    from ..eval.text import check_tasks, evaluate_arms, make_arms, task_manager, write_report
    from ._common import check_output_path

    check_output_path(
        args.out, "--out", folder=True
    )  # a run that cannot write its table fails before it runs
    tasks = check_tasks([t for item in args.tasks for t in item.split(",") if t], task_manager())
    loaded = None
    for recipe in (
        args.recipe or []
    ):  # `--recipe act MODEL` without a recipe for MODEL: calibrate one (cached)
        # the model a calibration loaded is the one the arms run on (int8 loads its own), not a second load
        loaded = ensure_recipe(recipe, args.model, args, loaded) or loaded
    if args.quant == "int8":
        loaded = None
    arms = make_arms(args.recipe or [], model=args.model)  # bad recipes fail before the model loads
    if args.quant == "int8":
        from ..errors import AttnSurgeryError
        from ..eval.quant import int8_unavailable_reason

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
        on_arm=lambda arm, status: arm_progress(args.model, arm, status),
        quant=args.quant,
        loaded=loaded,
    )
    paths = write_report([report], args.out)
    print_report(paths["md"].read_text(), paths)
    return 0 if all(a.valid for a in report.arms) else 1


def _check_table_file(table: str) -> None:
    """Before the table kinds are told apart (each reader opens the file): a table is a readable YAML text file."""
    from ..errors import AttnSurgeryError

    path = Path(table)
    if not path.exists():
        raise AttnSurgeryError(
            f"table file {table} does not exist (tables: evals/*.yaml, e.g. evals/mini.yaml)."
        )
    if not path.is_file():
        raise AttnSurgeryError(f"table {table} is a folder; name a table YAML file, e.g. evals/mini.yaml.")
    try:
        path.read_text()
    except UnicodeDecodeError:
        raise AttnSurgeryError(
            f"table {table} is not a text file (not UTF-8); a table is a YAML file."
        ) from None
    except OSError as err:
        raise AttnSurgeryError(f"cannot read table {table}: {err.strerror}.") from None


def run_reproduce(args: argparse.Namespace) -> int:
    from ..eval.text_tables import load_table, reproduce
    from ..eval.vision_tables import is_vlm_table

    _check_table_file(args.table)

    if is_vlm_table(args.table):  # POPE / CHAIR tables of the VLM surgeries: their own runner, one model
        from ..eval.vision import run_vlm_table
        from ..eval.vision_tables import load_vlm_table

        vlm = load_vlm_table(args.table)
        if vlm.requires:
            make_console(stderr=True).print(f"[yellow]this table needs: {vlm.requires}[/yellow]")
        paths = run_vlm_table(
            args.table, out_dir=args.out, limit=int(args.limit) if args.limit else None, force=args.force
        )
        print_report(paths["md"].read_text(), paths)
        return 0
    from ..eval.budget import is_budget_table

    if is_budget_table(args.table):  # trained arms against their training budget: curve.json / .md / .png
        from ..eval.budget import run_budget_table

        out = run_budget_table(args.table, out_dir=args.out)
        print_report(
            (out / "curve.md").read_text(),
            {"json": out / "curve.json", "md": out / "curve.md", "png": out / "curve.png"},
        )
        return 0
    from ..eval.training_table import is_training_table

    if is_training_table(args.table):  # arms that train (gates, LoRA ...), scored on outliers and W8A8
        from ..eval.training_table import run_training_table

        out = run_training_table(args.table, out_dir=args.out, models=args.model)
        # the plots this table has: outliers-<model>.png when outliers are measured, tasks.png with tasks
        plots = ", ".join(str(p) for p in sorted(out.glob("*.png"))) or "no plot"
        print_report(
            (out / "table.md").read_text(), {"json": out / "table.json", "md": out / "table.md", "png": plots}
        )
        return 0
    table = load_table(args.table)
    if table.requires:
        make_console(stderr=True).print(f"[yellow]this table needs: {table.requires}[/yellow]")
    reports, paths = reproduce(
        table,
        out_dir=args.out,
        models=args.model,
        limit=args.limit,
        force=args.force,
        on_arm=arm_progress,
        overwrite=args.overwrite,
    )
    print_report(paths["md"].read_text(), paths)
    return 0 if all(a.valid for r in reports for a in r.arms) else 1
