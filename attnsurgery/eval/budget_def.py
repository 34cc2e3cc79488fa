"""Budget tables: the YAML a budget curve is run from (``kind: budget``, e.g. ``evals/budget.yaml``), its checks,
and the arms and stages it defines. :mod:`attnsurgery.eval.budget` runs them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import AttnSurgeryError, did_you_mean
from ..recipe import RecipeError

_TABLE_KEYS = {"name", "kind", "description", "data", "test_data", "budgets", "arms", "dtype"}
_ARM_KEYS = {"name", "model", "note", "goal_pct", "seq_len", "eval", "stages", "recipe", "data"}
# a shipped recipe's state files together (issue 23: small states ship in the repository, each at most 20 MB)
_STAGE_KEYS = {"name", "surgeries", "train", "share"}
_EVAL_KEYS = {"seq_len", "windows", "w8a8_calib_windows"}


class BudgetError(RecipeError):
    """A budget table that cannot run as written (exit code 5, like any bad recipe)."""


@dataclass
class Stage:
    name: str
    surgeries: list[dict[str, Any]]
    train: dict[str, Any]
    share: float


@dataclass
class BudgetArm:
    name: str
    model: str
    goal_pct: float
    stages: list[Stage]
    seq_len: int = 256  # training windows
    eval_seq_len: int = 256  # test windows
    eval_windows: int = 24
    note: str = ""
    recipe: str | None = (
        None  # the shipped recipe its longest-trained state becomes (`--ship`), e.g. moh/smollm2-135m-x
    )
    # with it: each point also scores static W8A8 (attnsurgery.eval.quant) calibrated on this many windows of the
    # calibration split, and reports the W8A8 gap (W8A8 minus FP perplexity) against the unpatched model's
    w8a8_calib_windows: int | None = None
    data: str | None = None  # the arm's training text; None: the table's

    @property
    def tokens_per_step(self) -> int:
        return int(self.stages[0].train.get("batch_size", 4)) * self.seq_len

    def stage_steps(self, budget: int) -> list[int]:
        """Optimiser steps of each stage at ``budget`` tokens (each at least 1)."""
        tps = [int(s.train.get("batch_size", 4)) * self.seq_len for s in self.stages]
        return [max(1, round(s.share * budget / t)) for s, t in zip(self.stages, tps)]

    def tokens(self, budget: int) -> int:
        tps = [int(s.train.get("batch_size", 4)) * self.seq_len for s in self.stages]
        return sum(n * t for n, t in zip(self.stage_steps(budget), tps))


@dataclass
class BudgetTable:
    name: str
    arms: list[BudgetArm]
    budgets: list[int]
    data: str = "gutenberg_ppl"
    test_data: str = "gutenberg_ppl"
    dtype: str = "float32"
    description: str = ""
    path: Path = field(default_factory=Path)


def is_budget_table(path: str | Path) -> bool:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("kind") == "budget"


def _check(where: str, data: Any, allowed: set[str]) -> None:
    if not isinstance(data, dict):
        raise BudgetError(f"{where}: expected a mapping, got {type(data).__name__}.")
    for key in data:
        if key not in allowed:
            raise BudgetError(
                f"{where}: unknown key {key!r}.{did_you_mean(str(key), allowed)} Allowed: {', '.join(sorted(allowed))}."
            )


def _data_source(where: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BudgetError(
            f"{where}: 'data' is the arm's training text, a source name such as 'gutenberg_ppl+pdbooks'; got {value!r}."
        )
    return value.strip()


def _positive_int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BudgetError(f"{where}: {value!r} must be a whole number >= 1.")
    return value


def _recipe_name(where: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9_]+/[a-z0-9][a-z0-9._-]*", value):
        raise BudgetError(
            f"{where}: 'recipe' is a shipped recipe name <surgery>/<name> in lower case, e.g. "
            f"moh/smollm2-135m-learned-75; got {value!r}."
        )
    return value


def load_budget_table(path: str | Path) -> BudgetTable:
    """Read and check a budget table: every key, surgery and training setting fails here, before a model loads."""
    from ..recipe import parse_recipe
    from ..train import TrainConfig

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise BudgetError(f"{path}: cannot read the budget table ({err}).") from None
    _check(str(path), data, _TABLE_KEYS)
    budgets = data.get("budgets")
    if not isinstance(budgets, list) or not budgets:
        raise BudgetError(
            f"{path}: 'budgets' is a non-empty list of token counts, e.g. [25000, 100000, 400000]."
        )
    budgets = [_positive_int(f"{path}: budgets[{i}]", b) for i, b in enumerate(budgets)]
    if budgets != sorted(set(budgets)):
        raise BudgetError(f"{path}: 'budgets' must be increasing without repeats; got {budgets}.")
    train_fields = (set(TrainConfig.__dataclass_fields__) | {"lora"}) - {"steps", "seq_len", "keep"}
    arms, names = [], set()
    for i, raw in enumerate(data.get("arms") or []):
        where = f"{path}: arms[{i}]"
        _check(where, raw, _ARM_KEYS)
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise BudgetError(f"{where}: each arm needs a 'name'.")
        if name in names:
            raise BudgetError(f"{where}: duplicate arm name {name!r}.")
        names.add(name)
        if not isinstance(raw.get("model"), str):
            raise BudgetError(f"{where} ({name}): 'model' names the model (an alias, hub id or path).")
        goal = raw.get("goal_pct")
        if isinstance(goal, bool) or not isinstance(goal, (int, float)) or not math.isfinite(goal):
            raise BudgetError(
                f"{where} ({name}): 'goal_pct' is the goal's relative perplexity change in %, e.g. 5."
            )
        eval_cfg = raw.get("eval") or {}
        _check(f"{where}.eval", eval_cfg, _EVAL_KEYS)
        stages_raw = raw.get("stages")
        if not isinstance(stages_raw, list) or not stages_raw:
            raise BudgetError(
                f"{where} ({name}): 'stages' is a non-empty list of {{surgeries, train, share}}."
            )
        stages = []
        for k, st in enumerate(stages_raw):
            swhere = f"{where}.stages[{k}]"
            _check(swhere, st, _STAGE_KEYS)
            train = dict(st.get("train") or {})
            _check(f"{swhere}.train", train, train_fields)
            if k == 0 and not st.get("surgeries") and not train.get("lora"):
                raise BudgetError(f"{swhere}: the first stage needs 'surgeries' (or 'train: {{lora: ...}}').")
            if st.get("surgeries"):
                try:
                    parse_recipe({"surgeries": st["surgeries"]}, swhere)
                except AttnSurgeryError as err:  # unknown surgery, bad argument: a bad table
                    raise BudgetError(str(err)) from None
            config = TrainConfig(**{k2: v for k2, v in train.items() if k2 != "lora"})
            try:
                config.validate()
            except AttnSurgeryError as err:
                raise BudgetError(f"{swhere}: {err}") from None
            if config.warmup or config.schedule != "constant":
                raise BudgetError(
                    f"{swhere}: budget curves continue one run to each budget, which needs a constant learning rate "
                    "(no warmup, schedule: constant)."
                )
            share = st.get("share", 1.0 / len(stages_raw))
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise BudgetError(
                    f"{swhere}: 'share' is the stage's fraction of each budget, in (0, 1]; got {share!r}."
                )
            stages.append(
                Stage(
                    str(st.get("name") or f"stage{k + 1}"),
                    list(st.get("surgeries") or []),
                    train,
                    float(share),
                )
            )
        if abs(sum(s.share for s in stages) - 1) > 1e-6:
            raise BudgetError(
                f"{where} ({name}): the stages' shares must add up to 1; got {[s.share for s in stages]}."
            )
        arms.append(
            BudgetArm(
                name=name,
                model=raw["model"],
                goal_pct=float(goal),
                stages=stages,
                seq_len=_positive_int(f"{where}.seq_len", raw.get("seq_len", 256)),
                eval_seq_len=_positive_int(f"{where}.eval.seq_len", eval_cfg.get("seq_len", 256)),
                eval_windows=_positive_int(f"{where}.eval.windows", eval_cfg.get("windows", 24)),
                note=str(raw.get("note") or ""),
                recipe=_recipe_name(f"{where} ({name})", raw.get("recipe")),
                w8a8_calib_windows=(
                    None
                    if eval_cfg.get("w8a8_calib_windows") is None
                    else _positive_int(f"{where}.eval.w8a8_calib_windows", eval_cfg["w8a8_calib_windows"])
                ),
                data=_data_source(f"{where} ({name})", raw.get("data")),
            )
        )
    if not arms:
        raise BudgetError(f"{path}: 'arms' is a non-empty list.")
    return BudgetTable(
        name=str(data.get("name") or path.stem),
        arms=arms,
        budgets=budgets,
        data=str(data.get("data", "gutenberg_ppl")),
        test_data=str(data.get("test_data", "gutenberg_ppl")),
        dtype=str(data.get("dtype", "float32")),
        description=str(data.get("description") or ""),
        path=path,
    )
