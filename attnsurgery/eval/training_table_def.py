"""A training table's definition: the ``kind: training`` YAML (models, arms, measures, goals; the schema is in
:mod:`.training_table`'s docstring), checked key by key before any model is loaded, as a :class:`TrainingTable`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError, did_you_mean

_TABLE_KEYS = {
    "name", "description", "kind", "models", "dtype", "data", "seq_len", "eval", "arms", "goals",
    "measure", "tasks", "batch_size", "limit",
}  # fmt: skip
_ARM_KEYS = {"name", "surgeries", "train", "note", "from", "models"}
#: what a training table can score on the test split (``measure:``)
MEASURES = ("perplexity", "ood", "w8a8", "outliers")
DEFAULT_MEASURES = ("perplexity", "w8a8", "outliers")
#: the row key that says a measure was taken
_MEASURED = {"perplexity": "ppl_fp", "ood": "ppl_ood", "w8a8": "ppl_w8a8", "outliers": "max_kurtosis"}
#: the offline multiple-choice tasks whose test prompts make the ``ood`` text
OOD_TASKS = ("bb_general_knowledge", "bb_emoji_movie", "bb_similarities_abstraction", "bb_phrase_relatedness",
             "mmlu_subset")  # fmt: skip
_EVAL_KEYS = {"test_windows", "calib_windows", "outlier_windows", "ood_windows"}


@dataclass
class TrainingTable:
    name: str
    models: list[str]
    arms: list[dict[str, Any]]
    data: str = "gutenberg_ppl"
    seq_len: int = 256
    dtype: str = "float32"
    eval: dict[str, int] = field(
        default_factory=lambda: {"test_windows": 24, "calib_windows": 4, "outlier_windows": 8}
    )
    description: str = ""
    goals: dict[str, Any] = field(default_factory=dict)
    measure: tuple[str, ...] = DEFAULT_MEASURES
    tasks: list[str] = field(default_factory=list)  # offline lm-eval tasks scored after training ([]: none)
    batch_size: int = 4  # lm-eval batch size for ``tasks``
    limit: int | None = None  # lm-eval docs per task (None: all)


def _check(where: str, data: dict, allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise RecipeError(
                f"{where}: unknown key {key!r}.{did_you_mean(str(key), allowed)} Allowed: {', '.join(sorted(allowed))}."
            )


def is_training_table(path: str | Path) -> bool:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("kind") == "training"


def load_training_table(path: str | Path) -> TrainingTable:
    from ..train import TrainConfig

    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a training table is a YAML mapping.")
    _check(str(path), data, _TABLE_KEYS)
    arms = data.get("arms") or []
    if not arms or not isinstance(arms, list):
        raise RecipeError(f"{path}: 'arms' must be a non-empty list.")
    train_fields = set(TrainConfig.__dataclass_fields__) | {"lora"}
    names = set()
    for i, arm in enumerate(arms):
        where = f"{path}: arms[{i}]"
        if not isinstance(arm, dict) or "name" not in arm:
            raise RecipeError(f"{where}: each arm needs a 'name'.")
        _check(where, arm, _ARM_KEYS)
        _check(f"{where}.train", arm.get("train") or {}, train_fields)
        if arm["name"] in names:
            raise RecipeError(f"{where}: duplicate arm name {arm['name']!r}.")
        source = arm.get("from")
        if source is not None:
            if source not in names:
                raise RecipeError(
                    f"{where}: 'from: {source}' must name an earlier arm.{did_you_mean(str(source), names)}"
                )
            if not arm.get("train"):
                raise RecipeError(f"{where}: an arm 'from' another trains on top of it; give it 'train'.")
        arm_models = arm.get("models")
        if arm_models is not None:
            unknown = [m for m in arm_models if m not in (data.get("models") or [])]
            if not isinstance(arm_models, list) or unknown:
                raise RecipeError(
                    f"{where}: 'models' lists models of the table ({', '.join(data.get('models') or [])}); "
                    f"got {unknown or arm_models!r}."
                )
            if source is not None and set(arm_models) - set(_arm_models(arms, source, data)):
                raise RecipeError(
                    f"{where}: arm {source!r} it starts from does not run on all of its models."
                )
        names.add(arm["name"])
        if arm.get("surgeries"):
            from ..recipe import parse_recipe

            parse_recipe({"surgeries": arm["surgeries"]}, where)  # names and arguments, before any training
        elif arm.get("train") and source is None and not (arm["train"] or {}).get("lora"):
            raise RecipeError(f"{where}: 'train' needs 'surgeries' (or 'from', or 'lora') to train.")
    eval_cfg = {
        "test_windows": 24, "calib_windows": 4, "outlier_windows": 8, "ood_windows": 24, **(data.get("eval") or {})
    }  # fmt: skip
    _check(f"{path}: eval", eval_cfg, _EVAL_KEYS)
    measure = data.get("measure", list(DEFAULT_MEASURES))
    if not isinstance(measure, list) or not measure:
        raise RecipeError(f"{path}: 'measure' is a non-empty list of {', '.join(MEASURES)}.")
    for m in measure:
        if m not in MEASURES:
            raise RecipeError(
                f"{path}: unknown measure {m!r}.{did_you_mean(str(m), MEASURES)} Measures: {', '.join(MEASURES)}."
            )
    if "w8a8" in measure and "perplexity" not in measure:
        raise RecipeError(f"{path}: 'w8a8' reports the gap to FP perplexity; add 'perplexity' to 'measure'.")
    tasks = data.get("tasks") or []
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise RecipeError(f"{path}: 'tasks' is a list of lm-eval task names (see `attnsurgery list`).")
    if tasks and arms[0].get("name") != "baseline":
        raise RecipeError(f"{path}: with 'tasks', the first arm must be '- name: baseline' (paired deltas).")
    return TrainingTable(
        name=str(data.get("name") or path.stem),
        models=list(data.get("models") or []),
        arms=arms,
        data=str(data.get("data", "gutenberg_ppl")),
        seq_len=int(data.get("seq_len", 256)),
        dtype=str(data.get("dtype", "float32")),
        eval=eval_cfg,
        description=str(data.get("description") or ""),
        goals=dict(data.get("goals") or {}),
        measure=tuple(m for m in MEASURES if m in measure),
        tasks=list(tasks),
        batch_size=int(data.get("batch_size", 4)),
        limit=data.get("limit"),
    )


def _arm_models(arms: list[dict], name: str, data: dict) -> list[str]:
    arm = next(a for a in arms if a["name"] == name)
    return list(arm.get("models") or data.get("models") or [])


def _runs_on(arm: dict, model_name: str) -> bool:
    return not arm.get("models") or model_name in arm["models"]
