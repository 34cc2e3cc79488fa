"""``kind: vlm`` table definitions (``evals/vlm/*.yaml``: one model x arms x POPE/CHAIR benchmarks) and the
documents they name: POPE question files and COCO val2014 images and annotations, checked before any model loads.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import did_you_mean
from ..recipe import find_recipe
from .text_results import Arm, arm_mappings
from .vision_metrics import (
    COCO_HELP,
    VLMEvalError,
    chair_record,
    load_coco_objects,
    pope_answered,
    pope_parse,
)

#: LLaVA-1.5's own POPE prompt (``llava_pope_test.jsonl``: the question + "\nAnswer the question using a single
#: word or phrase.") in the llava-hf chat format
POPE_PROMPT = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"
#: the CHAIR prompt of VHR (and OPERA / VCD before it), max 512 new tokens
CHAIR_PROMPT = "USER: <image>\nPlease describe this image in detail. ASSISTANT:"

POPE_SPLITS = ("random", "popular", "adversarial")

POPE_HELP = (
    "download the POPE question files from the POPE repository (github.com/AoiDragon/POPE, "
    "output/coco/coco_pope_{random,popular,adversarial}.json) into one folder and set POPE_ROOT to it"
)


# ========================================================================================== tables
_TABLE_KEYS = {
    "kind", "name", "description", "requires", "notes", "model", "dtype", "batch_size", "arms", "benchmarks",
    "published", "published_model",
}  # fmt: skip
_ARM_KEYS = {"name", "recipe", "setting"}
_BENCH_KEYS = {
    "pope": {"name", "type", "questions", "images", "prompt", "max_new_tokens", "batch_size", "limit"},
    "chair": {
        "name", "type", "images", "annotations", "prompt", "max_new_tokens", "batch_size", "limit", "n_images",
        "seeds", "use_captions",
    },
}  # fmt: skip
_BENCH_DEFAULTS = {
    "pope": {"prompt": POPE_PROMPT, "max_new_tokens": 16},
    "chair": {
        "prompt": CHAIR_PROMPT,
        "max_new_tokens": 512,
        "n_images": 500,
        "seeds": [0],
        "use_captions": True,
    },
}


@dataclass
class Benchmark:
    name: str
    type: str  # "pope" | "chair"
    settings: dict[str, Any]


@dataclass
class VLMTable:
    """A ``kind: vlm`` table: one model x arms x POPE/CHAIR benchmarks (schema in ``docs/vlm.md``)."""

    name: str
    model: str
    arms: list[dict[str, Any]]  # {"name", "recipe": str | None, "setting": str}
    benchmarks: list[Benchmark]
    dtype: str = "float16"
    batch_size: int = 8
    published: list[dict[str, Any]] = field(default_factory=list)
    published_files: list[str] = field(default_factory=list)
    published_model: str | None = None
    description: str = ""
    requires: str = ""
    notes: str = ""
    path: Path | None = None

    def resolve_arms(self) -> list[Arm]:
        return [Arm(a["name"], None if a["recipe"] is None else find_recipe(a["recipe"])) for a in self.arms]


def _err(source: str, problem: str) -> VLMEvalError:
    return VLMEvalError(f"VLM table {source}: {problem}")


def _unknown(source: str, where: str, data: dict, allowed: set[str]) -> None:
    bad = sorted(set(data) - allowed)
    if bad:
        raise _err(
            source,
            f"{where} has unknown key {bad[0]!r}.{did_you_mean(bad[0], allowed)} Allowed: {', '.join(sorted(allowed))}.",
        )


def parse_vlm_table(data: Any, source: str = "<table>", base_dir: Path | None = None) -> VLMTable:
    """Validate a ``kind: vlm`` table (keys, arms, benchmarks, published files) with errors naming the fix."""
    if not isinstance(data, dict):
        raise _err(source, "must be a YAML mapping with kind: vlm, name, model, arms, benchmarks.")
    if data.get("kind") != "vlm":
        raise _err(
            source, f"`kind` must be 'vlm' (got {data.get('kind')!r}); text tables go to evaluate.reproduce."
        )
    _unknown(source, "the table", data, _TABLE_KEYS)
    for key in ("name", "model", "arms", "benchmarks"):
        if key not in data:
            raise _err(source, f"missing required key {key!r}.")
    if not isinstance(data["model"], str) or not data["model"]:
        raise _err(source, "`model` must be one hub id, local path or alias (e.g. llava-hf/llava-1.5-7b-hf).")
    parsed_arms = []
    for arm in arm_mappings(data["arms"], lambda problem: _err(source, problem)):
        _unknown(source, f"arm {arm['name']!r}", arm, _ARM_KEYS)
        recipe = arm.get("recipe")
        if recipe is not None and not isinstance(recipe, str):
            raise _err(source, f"arm {arm['name']!r}: `recipe` must be a recipe name or YAML path.")
        if recipe is not None and base_dir is not None and recipe.endswith((".yaml", ".yml")):
            if not Path(recipe).is_absolute() and (base_dir / recipe).is_file():
                recipe = str(base_dir / recipe)
        name = str(arm["name"])
        parsed_arms.append({"name": name, "recipe": recipe, "setting": str(arm.get("setting", name))})
    if parsed_arms[0]["recipe"] is not None:
        raise _err(source, "the first arm must be the baseline (`- name: baseline`, no recipe).")
    names = [a["name"] for a in parsed_arms]
    if len(set(names)) != len(names):
        raise _err(source, f"arm names must be unique, got {names}.")
    benches = data["benchmarks"]
    if not isinstance(benches, list) or not benches:
        raise _err(source, "`benchmarks` must be a non-empty list of {name, type: pope|chair, ...}.")
    parsed: list[Benchmark] = []
    for i, b in enumerate(benches):
        if not isinstance(b, dict) or "type" not in b:
            raise _err(source, f"benchmark #{i + 1} must be a mapping with `type: pope` or `type: chair`.")
        kind = str(b["type"]).lower()
        if kind not in _BENCH_KEYS:
            raise _err(
                source,
                f"benchmark #{i + 1}: unknown type {b['type']!r}{did_you_mean(kind, _BENCH_KEYS)} (pope or chair).",
            )
        _unknown(source, f"benchmark #{i + 1} ({kind})", b, _BENCH_KEYS[kind])
        required = ("questions", "images") if kind == "pope" else ("images", "annotations")
        for key in required:
            if key not in b:
                raise _err(source, f"benchmark #{i + 1} ({kind}) needs `{key}` (a path; $VARS are expanded).")
        settings = {**_BENCH_DEFAULTS[kind], **{k: v for k, v in b.items() if k not in ("name", "type")}}
        if "{question}" not in settings["prompt"] and kind == "pope":
            raise _err(source, f"benchmark #{i + 1}: the POPE `prompt` must contain {{question}}.")
        if "<image>" not in settings["prompt"]:
            raise _err(source, f"benchmark #{i + 1}: `prompt` must contain the <image> placeholder.")
        for key in ("max_new_tokens", "batch_size", "limit", "n_images"):
            v = settings.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise _err(source, f"benchmark #{i + 1}: `{key}` must be a positive integer.")
        if kind == "chair":
            seeds = settings["seeds"]
            if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
                raise _err(source, f"benchmark #{i + 1}: `seeds` must be a non-empty list of integers.")
        parsed.append(Benchmark(str(b.get("name") or kind.upper()), kind, settings))
    bnames = [b.name for b in parsed]
    if len(set(bnames)) != len(bnames):
        raise _err(source, f"benchmark names must be unique, got {bnames}.")
    files = data.get("published") or []
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise _err(
            source, "`published` must be a list of YAML files with published rows (evals/published/*.yaml)."
        )
    rows: list[dict[str, Any]] = []
    for f in files:
        path = Path(f)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise _err(source, f"published file {path} does not exist.")
        import yaml

        loaded = yaml.safe_load(path.read_text()) or []
        if not isinstance(loaded, list) or not all(
            isinstance(r, dict) and {"benchmark", "setting", "metric", "value"} <= set(r) for r in loaded
        ):
            raise _err(
                source,
                f"published file {path} must be a list of rows with benchmark, setting, metric, value.",
            )
        rows.extend(loaded)
    batch_size = data.get("batch_size", 8)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise _err(source, "`batch_size` must be a positive integer.")
    return VLMTable(
        name=str(data["name"]),
        model=data["model"],
        arms=parsed_arms,
        benchmarks=parsed,
        dtype=str(data.get("dtype", "float16")),
        batch_size=batch_size,
        published=rows,
        published_files=[str(f) for f in files],
        published_model=data.get("published_model"),
        description=str(data.get("description", "")),
        requires=str(data.get("requires", "")),
        notes=str(data.get("notes", "")),
    )


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise _err(str(path), f"is not valid YAML: {e}") from None


def is_vlm_table(path: str | Path) -> bool:
    """Whether ``path`` is a table definition with ``kind: vlm`` (False for a missing or non-YAML file)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        data = _read_yaml(path)
    except VLMEvalError:
        return False
    return isinstance(data, dict) and data.get("kind") == "vlm"


def load_vlm_table(path: str | Path) -> VLMTable:
    path = Path(path)
    if not path.is_file():
        raise VLMEvalError(f"VLM table file {path} does not exist (shipped ones are in evals/vlm/).")
    table = parse_vlm_table(_read_yaml(path), str(path), path.parent)
    table.path = path
    return table


# ============================================================================================ data
_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def _expand(value: str, what: str, fix: str) -> Path:
    """``value`` with ``$VARS`` expanded; an unset variable is an error that names the fix."""
    for m in _VAR.finditer(value):
        var = m.group(1) or m.group(2)
        if not os.environ.get(var):
            raise VLMEvalError(f"{what}: ${var} is not set (path {value!r}). To fix: {fix}.")
    return Path(os.path.expanduser(os.path.expandvars(value)))


def pope_docs(bench: Benchmark, limit: int | None = None) -> list[dict[str, Any]]:
    """The POPE questions of ``bench`` (the first ``limit``), with image paths and prompts; checks the data."""
    s = bench.settings
    qpath = _expand(str(s["questions"]), f"{bench.name} questions", POPE_HELP)
    images = _expand(str(s["images"]), f"{bench.name} images", COCO_HELP)
    if not qpath.is_file():
        raise VLMEvalError(f"POPE data not found at {qpath}: {POPE_HELP}.")
    if not images.is_dir():
        raise VLMEvalError(f"{bench.name}: COCO images folder {images} does not exist. To fix: {COCO_HELP}.")
    docs = []
    for i, line in enumerate(qpath.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            label = str(q["label"]).strip().lower()
            doc = {"id": str(q["question_id"]), "image": images / q["image"], "question": q["text"]}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise VLMEvalError(
                f"{qpath} line {i + 1} is not an official POPE record "
                f'{{"question_id", "image", "text", "label"}}: {e!r}'
            ) from None
        if label not in ("yes", "no"):
            raise VLMEvalError(f"{qpath} line {i + 1}: label must be yes or no, got {q['label']!r}.")
        doc.update(label=label, prompt=s["prompt"].replace("{question}", doc["question"]))
        docs.append(doc)
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise VLMEvalError(f"{qpath} has no questions.")
    missing = [d["image"] for d in docs if not d["image"].is_file()]
    if missing:
        raise VLMEvalError(
            f"{bench.name}: {len(missing)} of {len(docs)} images are missing, e.g. {missing[0]}. To fix: {COCO_HELP}."
        )
    return docs


def chair_docs(
    bench: Benchmark, limit: int | None = None
) -> tuple[list[dict[str, Any]], dict[int, set[str]]]:
    """``n_images`` random val2014 images per seed (docs ``"<seed>:<image_id>"``) and their ground truth."""
    s = bench.settings
    ann = _expand(str(s["annotations"]), f"{bench.name} annotations", COCO_HELP)
    images = _expand(str(s["images"]), f"{bench.name} images", COCO_HELP)
    inst = ann / "instances_val2014.json"
    if not inst.is_file():
        raise VLMEvalError(f"CHAIR data not found: {inst} does not exist. To fix: {COCO_HELP}.")
    if not images.is_dir():
        raise VLMEvalError(f"{bench.name}: COCO images folder {images} does not exist. To fix: {COCO_HELP}.")
    meta = json.loads(inst.read_text())["images"]
    files = {int(im["id"]): im["file_name"] for im in meta}
    ids = sorted(files)
    n = min(s["n_images"], len(ids), limit or s["n_images"])
    docs = []
    for seed in s["seeds"]:
        for imid in random.Random(seed).sample(ids, n):
            docs.append(
                {
                    "id": f"{seed}:{imid}",
                    "group": seed,
                    "image_id": imid,
                    "image": images / files[imid],
                    "prompt": s["prompt"],
                }
            )
    missing = [d["image"] for d in docs if not d["image"].is_file()]
    if missing:
        raise VLMEvalError(
            f"{bench.name}: {len(missing)} of {len(docs)} images are missing, e.g. {missing[0]}. To fix: {COCO_HELP}."
        )
    gt = load_coco_objects(ann, sorted({d["image_id"] for d in docs}), use_captions=s["use_captions"])
    return docs, gt


def score(
    bench: Benchmark, docs: Sequence[dict[str, Any]], texts: dict[str, str], gt: Any = None
) -> dict[str, dict]:
    """Per-document records (what the metrics aggregate) from generated ``texts``."""
    out = {}
    for d in docs:
        text = texts[d["id"]]
        if bench.type == "pope":
            pred = pope_parse(text)
            out[d["id"]] = {
                "label": int(d["label"] == "yes"),
                "pred": int(pred == "yes"),
                "correct": int(pred == d["label"]),
                "answered": int(pope_answered(text)),
            }
        else:
            out[d["id"]] = {"group": d["group"], **chair_record(text, gt[d["image_id"]])}
    return out
