"""Text table definitions (``evals/*.yaml``: models x arms x tasks, optional published numbers) and
:func:`reproduce`, which runs one with :func:`~attnsurgery.eval.text.evaluate_arms` and writes JSON, markdown and
a PNG bar chart (``attnsurgery reproduce``; ``kind: vlm`` tables go to :mod:`.vision`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import did_you_mean
from ..recipe import find_recipe
from .text import check_tasks, evaluate_arms, load_tasks, slug, task_manager
from .text_report import write_report
from .text_results import Arm, EvalError, EvalReport, arm_mappings

_TABLE_KEYS = {
    "name",
    "description",
    "models",
    "arms",
    "tasks",
    "num_fewshot",
    "limit",
    "batch_size",
    "dtype",
    "metrics",
    "published",
    "notes",
    "requires",
}
_ARM_KEYS = {"name", "recipe"}
_PUBLISHED_KEYS = {"model", "arm", "task", "metric", "value", "source", "note"}


@dataclass
class TableDef:
    """A table definition: ``models`` x ``arms`` x ``tasks`` (see ``evals/README.md`` for the schema)."""

    name: str
    models: list[str]
    arms: list[dict[str, Any]]  # {"name": str, "recipe": None | str | {model: str}}
    tasks: list[str]
    num_fewshot: int | None = None
    limit: int | float | None = None
    batch_size: int = 16
    dtype: str = "float32"
    metrics: dict[str, str] = field(default_factory=dict)  # task -> the metric shown in the plot
    published: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    notes: str = ""
    requires: str = ""  # e.g. "GPU with 16 GB and the Llama-2-7B-chat weights": printed before running
    path: Path | None = None

    def arms_for(self, model: str) -> list[Arm]:
        arms: list[Arm] = []
        for spec in self.arms:
            recipe = spec.get("recipe")
            if isinstance(recipe, dict):
                recipe = recipe.get(model)
                if recipe is None:
                    continue  # this arm has no recipe for this model: the cell stays empty
            arms.append(Arm(spec["name"], None if recipe is None else find_recipe(recipe, model=model)))
        if not arms or arms[0].recipe is not None:
            raise EvalError(
                f"table {self.name!r}: the first arm must be the baseline (an arm without `recipe`)."
            )
        return arms


def _table_error(where: str, problem: str) -> EvalError:
    return EvalError(f"table {where}: {problem}")


def parse_table(data: Any, source: str = "<table>") -> TableDef:
    """Validate a table definition (unknown keys, types, arms, published rows) with errors naming the fix."""
    if not isinstance(data, dict):
        raise _table_error(source, "must be a YAML mapping with at least `name`, `models`, `arms`, `tasks`.")
    unknown = set(data) - _TABLE_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise _table_error(
            source,
            f"unknown key {key!r}.{did_you_mean(key, sorted(_TABLE_KEYS))} "
            f"Allowed: {', '.join(sorted(_TABLE_KEYS))}.",
        )
    for key in ("name", "models", "arms", "tasks"):
        if key not in data:
            raise _table_error(source, f"missing required key {key!r}.")
    models, tasks, arms = data["models"], data["tasks"], data["arms"]
    if isinstance(models, str):
        models = [models]
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise _table_error(source, "`models` must be a non-empty list of model aliases, paths or hub ids.")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise _table_error(source, "`tasks` must be a non-empty list of lm-eval task names.")
    parsed_arms = []
    for arm in arm_mappings(arms, lambda problem: _table_error(source, problem)):
        bad = set(arm) - _ARM_KEYS
        if bad:
            raise _table_error(
                source, f"arm {arm['name']!r} has unknown key {sorted(bad)[0]!r} (allowed: name, recipe)."
            )
        recipe = arm.get("recipe")
        if recipe is not None and not isinstance(recipe, (str, dict)):
            raise _table_error(
                source,
                f"arm {arm['name']!r}: `recipe` must be a recipe name/path or a mapping model -> recipe.",
            )
        parsed_arms.append({"name": str(arm["name"]), "recipe": recipe})
    if parsed_arms[0]["recipe"] is not None:
        raise _table_error(source, "the first arm must be the baseline (`- name: baseline`, no recipe).")
    published = data.get("published") or []
    if not isinstance(published, list):
        raise _table_error(source, "`published` must be a list of {model, arm, task, metric, value, source}.")
    for row in published:
        if not isinstance(row, dict) or not {"model", "arm", "task", "value"} <= set(row):
            raise _table_error(source, f"published row {row!r} needs at least model, arm, task and value.")
        bad = set(row) - _PUBLISHED_KEYS
        if bad:
            raise _table_error(source, f"published row has unknown key {sorted(bad)[0]!r}.")
    metrics = data.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise _table_error(source, "`metrics` must map task -> metric name (the one plotted).")
    limit = data.get("limit")
    if limit is not None and (not isinstance(limit, (int, float)) or limit <= 0):
        raise _table_error(source, "`limit` must be a positive number of docs (or a fraction < 1).")
    return TableDef(
        name=str(data["name"]),
        models=models,
        arms=parsed_arms,
        tasks=tasks,
        num_fewshot=data.get("num_fewshot"),
        limit=limit,
        batch_size=int(data.get("batch_size", 16)),
        dtype=str(data.get("dtype", "float32")),
        metrics={str(k): str(v) for k, v in metrics.items()},
        published=published,
        description=str(data.get("description", "")),
        notes=str(data.get("notes", "")),
        requires=str(data.get("requires", "")),
    )


def load_table(path: str | Path) -> TableDef:
    import yaml

    path = Path(path)
    if not path.is_file():
        shipped = Path(__file__).resolve().parent.parent / "evals" / path.name
        hint = f" A table with that name is at {shipped}." if shipped.is_file() else ""
        raise EvalError(f"table file {path} does not exist.{hint}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise _table_error(str(path), f"is not valid YAML: {e}") from None
    table = parse_table(data, str(path))
    table.path = path
    return table


def check_metrics(table: TableDef, manager: Any = None) -> None:
    """Every metric a table names must exist in its task's config (checked before any model runs)."""
    if not table.metrics:
        return
    manager = manager or task_manager()
    unknown_tasks = set(table.metrics) - set(check_tasks(table.tasks, manager))
    if unknown_tasks:
        raise _table_error(
            table.name, f"`metrics` names task {sorted(unknown_tasks)[0]!r}, which is not in `tasks`."
        )
    tasks = load_tasks(list(table.metrics), manager)
    for task_name, metric in table.metrics.items():
        task = tasks[task_name]
        known = sorted(task.aggregation())
        if metric.split(" (")[0] not in known:
            raise _table_error(
                table.name,
                f"task {task_name!r} has no metric {metric!r}."
                f"{did_you_mean(metric, known)} Its metrics: {', '.join(known)}.",
            )


def reproduce(
    table: TableDef | str | Path,
    *,
    out_dir: str | Path | None = None,
    models: Sequence[str] | None = None,
    limit: int | float | None = None,
    force: bool = False,
    on_arm: Callable[[str, str, str], None] | None = None,
    overwrite: bool = False,
) -> tuple[list[EvalReport], dict[str, Path]]:
    """Run a whole table; results go to ``out_dir`` (default ``evals/results/<name>``), cached per arm."""
    if not isinstance(table, TableDef):
        table = load_table(table)
    manager = task_manager()
    tasks = check_tasks(table.tasks, manager)
    check_metrics(table, manager)
    chosen = list(models) if models else table.models
    for m in chosen:
        if m not in table.models:
            raise _table_error(table.name, f"model {m!r} is not in the table.{did_you_mean(m, table.models)}")
    plans = [(m, table.arms_for(m)) for m in chosen]  # resolves every recipe before any model loads
    effective_limit = limit if limit is not None else table.limit
    run = {"limit": effective_limit, "models": chosen}
    if out_dir is None:
        # a quick look (--limit) or a subset of the models never lands on the full table's results
        suffix = []
        if effective_limit != table.limit:
            suffix.append(f"limit{effective_limit:g}")
        if chosen != table.models:
            suffix += [slug(m) for m in chosen]
        out_dir = Path("evals") / "results" / "-".join([slug(table.name), *suffix])
    out_dir = Path(out_dir)
    refuse_other_settings(out_dir / "table.json", run, overwrite)
    reports = []
    for model, arms in plans:
        report = evaluate_arms(
            model,
            arms,
            tasks,
            limit=effective_limit,
            num_fewshot=table.num_fewshot,
            batch_size=table.batch_size,
            dtype=table.dtype,
            cache_dir=out_dir / "cache",
            force=force,
            on_arm=(lambda arm, status, _m=model: on_arm(_m, arm, status)) if on_arm else None,
        )
        reports.append(report)
    paths = write_report(reports, out_dir, table.published, table.metrics, name="table", run=run)
    return reports, paths


def refuse_other_settings(path: Path, run: dict[str, Any], overwrite: bool) -> None:
    """A results file made under other settings (another --limit, other models) is not replaced without
    ``overwrite``: a quick look must never overwrite a full table."""
    if overwrite or not path.is_file():
        return
    try:
        previous = (json.loads(path.read_text()) or {}).get("run")
    except json.JSONDecodeError:
        previous = None
    if previous is None:  # written before runs recorded their settings: judge by the reports' own limit
        try:
            reports = json.loads(path.read_text()).get("reports") or []
        except json.JSONDecodeError:
            reports = []
        previous = {
            "limit": next((r.get("settings", {}).get("limit") for r in reports), None),
            "models": [r.get("model") for r in reports],
        }
    if previous != run:
        raise EvalError(
            f"{path} holds results made with {_describe_run(previous)}; this run is {_describe_run(run)}. Pass --out "
            "DIR to write elsewhere, or --overwrite to replace them."
        )


def _describe_run(run: dict[str, Any]) -> str:
    limit = run.get("limit")
    return f"models {', '.join(map(str, run.get('models') or []))} and " + (
        f"--limit {limit:g}" if isinstance(limit, (int, float)) else "every document"
    )
