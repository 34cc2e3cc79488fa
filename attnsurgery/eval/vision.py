"""POPE and CHAIR for vision-language models: baseline vs patched arms, side by side with published numbers.

lm-eval has neither benchmark, so this is a small evaluator of its own, kept close to the official scripts:

- **POPE** (Li et al. 2023): yes/no questions "Is there a <object> in the image?" over COCO val2014, in the
  official JSONL format (``{"question_id", "image", "text", "label"}``), greedy decoding, answers parsed like the
  official script (first sentence; ``no``/``No``/``not`` as a word means "no", anything else "yes"), metrics
  accuracy, precision, recall, F1 (positive class "yes") and the ratio of "yes" predictions, all in percent.
- **CHAIR** (Rohrbach et al. 2018): a detailed caption per COCO val2014 image, object mentions found through the
  standard synonym list (80 COCO categories), compared with the image's ground-truth objects (instance
  annotations plus objects mentioned in its reference captions, as in the original ``chair.py``).
  ``CHAIR_S`` = % of captions with a hallucinated object, ``CHAIR_I`` = % of object mentions that are
  hallucinated, ``recall`` = % of ground-truth objects mentioned, ``length`` = words per caption.

A table definition is a YAML file with ``kind: vlm`` (``evals/vlm/*.yaml``). :func:`run_vlm_table` loads the
model once, runs every arm (the baseline, then each recipe patched and removed again) on every benchmark, caches
each (arm, benchmark) generation run by a fingerprint, and writes ``table.json``, ``table.md`` and ``table.png``.
Deltas against the baseline are paired (the same questions / images): a paired bootstrap over documents.
See ``docs/vlm.md`` ("Evaluating: POPE and CHAIR").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError
from .report import Panel, Table, fmt_percent, plot_panels, write_files
from .text import slug
from .text_results import Arm
from .vision_metrics import (
    BOOTSTRAP_ITERS,
    CHAIR_METRICS,
    LOWER_IS_BETTER,
    POPE_METRICS,
    VLMEvalError,
    paired_bootstrap,
    summarize,
)
from .vision_tables import Benchmark, VLMTable, chair_docs, load_vlm_table, pope_docs, score

CACHE_FORMAT = 1
_PRIMARY = {"pope": ["F1"], "chair": ["CHAIR_S", "CHAIR_I"]}


# ======================================================================================== running
def _device(model: Any) -> Any:
    return next(model.parameters()).device


def generate_texts(
    loaded: tuple[Any, Any],
    items: Sequence[tuple[str, Path]],
    max_new_tokens: int,
    batch_size: int = 1,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy continuations of ``(prompt, image path)`` pairs, batched with left padding."""
    import torch
    from PIL import Image

    model, processor = loaded
    tok = getattr(processor, "tokenizer", processor)
    side = getattr(tok, "padding_side", None)
    tok.padding_side = "left"
    device, dtype = _device(model), next(model.parameters()).dtype
    out: list[str] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images = []
            for _, path in chunk:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            inputs = processor(
                images=images, text=[p for p, _ in chunk], return_tensors="pt", padding=len(chunk) > 1
            )
            inputs = {k: v.to(device) for k, v in inputs.items()}
            if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            new = gen[:, inputs["input_ids"].shape[1] :]
            out.extend(t.strip() for t in processor.batch_decode(new, skip_special_tokens=True))
            if on_batch:
                on_batch(len(out), len(items))
    finally:
        if side is not None:
            tok.padding_side = side
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    from .. import __version__

    return {"attnsurgery": __version__, "transformers": version("transformers"), "torch": version("torch")}


def _fingerprint(
    table: VLMTable, arm: Arm, bench: Benchmark, docs: Sequence[dict[str, Any]], batch: int
) -> str:
    doc_key = hashlib.sha256(
        json.dumps([[d["id"], Path(d["image"]).name, d["prompt"]] for d in docs]).encode()
    ).hexdigest()
    key = {
        "format": CACHE_FORMAT,
        "model": table.model,
        "dtype": table.dtype,
        "arm": arm.fingerprint(),
        "benchmark": bench.type,
        "max_new_tokens": bench.settings["max_new_tokens"],
        "batch_size": batch,  # padding can move fp16 logits in the last digits
        "docs": doc_key,
        **_versions(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_vlm(model: str, dtype: str = "float16") -> tuple[Any, Any]:
    """``(model, processor)`` of an image-text-to-text model (hub id, local folder or attnsurgery alias)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..models import _ALIASES

    target = _ALIASES[model.lower()].target if model.lower() in _ALIASES else model
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise VLMEvalError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}.")
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    try:
        processor = AutoProcessor.from_pretrained(target)
        vlm = AutoModelForImageTextToText.from_pretrained(target, **kwargs)
    except OSError as e:
        raise ModelNotFoundError(
            f"cannot load {target!r} ({e}). Download the weights first (`huggingface-cli download {target}`) or "
            "point `model:` at a local folder."
        ) from None
    return vlm.eval(), processor


def _run_one(
    loaded: tuple[Any, Any],
    arm: Arm,
    bench: Benchmark,
    docs: Sequence[dict[str, Any]],
    batch: int,
    on_batch: Any,
) -> tuple[dict[str, str], float]:
    from ..api import patch

    handle = patch(loaded[0], arm.recipe) if arm.recipe is not None else None
    try:
        # CHAIR seeds can draw the same image twice: greedy decoding gives it the same caption, generate once
        unique: dict[tuple[str, str], list[str]] = {}
        for d in docs:
            unique.setdefault((d["prompt"], str(d["image"])), []).append(d["id"])
        start = time.perf_counter()
        texts = generate_texts(
            loaded, [(p, Path(i)) for p, i in unique], bench.settings["max_new_tokens"], batch, on_batch
        )
        seconds = time.perf_counter() - start
    finally:
        if handle is not None:
            handle.remove()
    return {doc_id: t for ids, t in zip(unique.values(), texts) for doc_id in ids}, seconds


def _problems(bench: Benchmark, texts: dict[str, str], records: dict[str, dict]) -> list[str]:
    n = len(records)
    if bench.type == "pope":
        unanswered = sum(1 - r["answered"] for r in records.values())
        if unanswered > n / 2:
            return [
                f"{bench.name}: {unanswered}/{n} answers say neither yes nor no (the official parsing counts them as yes)"
            ]
        return []
    empty = sum(1 for t in texts.values() if not t.strip())
    return [f"{bench.name}: {empty}/{len(texts)} captions are empty"] if empty > len(texts) / 2 else []


def evaluate_vlm(
    table: VLMTable | str | Path,
    *,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    force: bool = False,
    loaded: tuple[Any, Any] | None = None,
    on_arm: Callable[[str, str, str], None] | None = None,
) -> dict[str, Any]:
    """Run a VLM table and return its report (``table.json``'s content); see :func:`run_vlm_table`."""
    if not isinstance(table, VLMTable):
        table = load_vlm_table(table)
    arms = table.resolve_arms()  # every recipe resolves before any data or model is touched
    out_dir = Path(out_dir) if out_dir else Path("evals") / "results" / slug(table.name)
    cache = out_dir / "cache"
    prepared = []  # (bench, docs, gt): all data checked before the model loads
    for bench in table.benchmarks:
        if bench.type == "pope":
            prepared.append((bench, pope_docs(bench, limit or bench.settings.get("limit")), None))
        else:
            docs, gt = chair_docs(bench, limit or bench.settings.get("limit"))
            prepared.append((bench, docs, gt))
    results: dict[str, dict[str, Any]] = {a.name: {} for a in arms}
    for arm in arms:
        for bench, docs, gt in prepared:
            batch = bench.settings.get("batch_size") or table.batch_size
            fp = _fingerprint(table, arm, bench, docs, batch)
            path = cache / f"{slug(arm.name)}-{slug(bench.name)}-{fp}.json"
            if path.is_file() and not force:
                entry = json.loads(path.read_text())
                status = "cached"
            else:
                if loaded is None:
                    loaded = load_vlm(table.model, table.dtype)
                if on_arm:
                    on_arm(arm.name, bench.name, "running")
                texts, seconds = _run_one(loaded, arm, bench, docs, batch, None)
                entry = {
                    "arm": arm.name,
                    "benchmark": bench.name,
                    "fingerprint": fp,
                    "seconds": seconds,
                    "texts": texts,
                }
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(entry))
                os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written entry
                status = "done"
            records = score(bench, docs, entry["texts"], gt)  # scoring is cheap: always from the texts
            results[arm.name][bench.name] = {
                "records": records,
                "texts": entry["texts"],
                "seconds": entry["seconds"],
                "fingerprint": entry["fingerprint"],
                "problems": _problems(bench, entry["texts"], records),
            }
            if on_arm:
                on_arm(arm.name, bench.name, status)
    return _report(table, arms, prepared, results, limit)


def _report(
    table: VLMTable, arms: list[Arm], prepared: list, results: dict, limit: int | None
) -> dict[str, Any]:
    import numpy as np

    base = arms[0].name
    rows: list[dict[str, Any]] = []
    pope_rows: dict[str, list[dict[str, Any]]] = {}
    for bench, docs, _ in prepared:
        summaries = {
            a.name: summarize(bench.type, list(results[a.name][bench.name]["records"].values())) for a in arms
        }
        deltas = {
            a.name: paired_bootstrap(
                bench.type, results[base][bench.name]["records"], results[a.name][bench.name]["records"]
            )
            for a in arms[1:]
        }
        for metric in POPE_METRICS if bench.type == "pope" else CHAIR_METRICS:
            row = {"benchmark": bench.name, "type": bench.type, "metric": metric, "n": len(docs), "arms": {}}
            for a in arms:
                entry = dict(summaries[a.name][metric])
                if a.name != base:
                    entry.update(deltas[a.name].get(metric, {}))
                entry["valid"] = not results[a.name][bench.name]["problems"]
                row["arms"][a.name] = entry
            rows.append(row)
            if bench.type == "pope":
                pope_rows.setdefault(metric, []).append(row)
    if len(pope_rows.get("F1", [])) > 1:  # the papers report POPE as the mean over its splits
        for metric, split_rows in pope_rows.items():
            k = len(split_rows)
            row = {
                "benchmark": "POPE",
                "type": "pope-mean",
                "metric": metric,
                "n": sum(r["n"] for r in split_rows),
            }
            row["arms"] = {}
            for a in arms:
                es = [r["arms"][a.name] for r in split_rows]
                entry: dict[str, Any] = {
                    "value": float(np.mean([e["value"] for e in es])),
                    "stderr": _combine([e.get("stderr") for e in es], k),
                    "valid": all(e["valid"] for e in es),
                }
                if a.name != base and all(e.get("delta") is not None for e in es):
                    se = _combine([e.get("delta_stderr") for e in es], k)
                    delta = float(np.mean([e["delta"] for e in es]))
                    p = 1.0 if not se else math.erfc(abs(delta / se) / math.sqrt(2))
                    entry.update(delta=delta, delta_stderr=se, p=p, n=row["n"])
                row["arms"][a.name] = entry
            rows.append(row)
    published = _match_published(table, rows)
    return {
        "name": table.name,
        "model": table.model,
        "description": table.description,
        "settings": {
            "dtype": table.dtype,
            "limit": limit,
            "benchmarks": {b.name: {"type": b.type, **b.settings} for b in table.benchmarks},
            "arms": table.arms,
            "bootstrap_iters": BOOTSTRAP_ITERS,
        },
        "table": rows,
        "published": published,
        "arms": {
            a.name: {
                "recipe": None if a.recipe is None else a.recipe.name,
                "benchmarks": {
                    b: {k: v for k, v in r.items() if k not in ("records", "texts")}
                    for b, r in results[a.name].items()
                },
            }
            for a in arms
        },
        "versions": _versions(),
    }


def _combine(stderrs: list[float | None], k: int) -> float | None:
    if any(s is None for s in stderrs):
        return None
    return math.sqrt(sum(s * s for s in stderrs)) / k  # independent splits


def _match_published(table: VLMTable, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Published rows for this model whose (benchmark, setting, metric) is one of ours, tagged with the arm."""
    settings = {a["setting"]: a["name"] for a in table.arms}
    want = table.published_model
    keys = {(r["benchmark"], r["metric"]) for r in rows}
    out = []
    for p in table.published:
        if want is not None and p.get("model") != want:
            continue
        if (p["benchmark"], p["metric"]) in keys and p["setting"] in settings:
            out.append({**p, "arm": settings[p["setting"]]})
    return out


# ====================================================================================== rendering
def render_vlm_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: value ± stderr (seed spread) per arm, paired delta per patched arm, published."""
    arm_names = list(report["arms"])
    pub = report["published"]
    out = [f"### {report['name']}: {report['model']}\n"]
    if report.get("description"):
        out.append(report["description"].strip() + "\n")
    rows = [
        (
            [row["benchmark"], row["metric"] + (" ↓" if row["metric"] in LOWER_IS_BETTER else "")],
            row["arms"],
            [p for p in pub if p["benchmark"] == row["benchmark"] and p["metric"] == row["metric"]],
        )
        for row in report["table"]
    ]
    out += Table(
        arm_names,
        ["benchmark", "metric"],
        rows,
        num=fmt_percent,
        delta_digits=2,
        published=True,
        extra=lambda e: f" (seed std {fmt_percent(e['seed_std'])})" if e.get("seed_std") is not None else "",
    ).lines()
    out.append("")
    n = {r["benchmark"]: r["n"] for r in report["table"]}
    out.append(f"documents per benchmark: {n}.")
    secs = "; ".join(
        f"{a}: " + ", ".join(f"{b} {v['seconds']:.0f} s" for b, v in info["benchmarks"].items())
        for a, info in report["arms"].items()
    )
    out.append(f"generation time: {secs}.")
    out.append(
        "Values in percent (length: words per caption), ± bootstrap stderr over documents; Δ is paired "
        "(same documents, same bootstrap resamples); POPE = mean of its splits."
    )
    for a, info in report["arms"].items():
        problems = [p for b in info["benchmarks"].values() for p in b["problems"]]
        if problems:
            out.append(f"\n**{a} is INVALID** on: " + "; ".join(problems))
    sources = sorted({str(p.get("source", "")) for p in pub} - {""})
    if sources:
        out.append("\nPublished: " + " | ".join(sources))
    out.append("")
    return "\n".join(out)


def plot_vlm(report: dict[str, Any], out: str | Path) -> Path:
    """One panel per (benchmark, primary metric): a bar per arm with stderr, published values as black ticks."""
    names = list(report["arms"])
    panels = [
        Panel(
            title=row["benchmark"],
            ylabel=f"{row['metric']} {'↓' if row['metric'] in LOWER_IS_BETTER else '↑'}",
            values=[row["arms"][n]["value"] for n in names],
            errors=[row["arms"][n].get("stderr") or 0.0 for n in names],
            valid=[row["arms"][n]["valid"] for n in names],
            labels=names,
            marks=[
                (names.index(p["arm"]), p["value"])
                for p in report["published"]
                if p["benchmark"] == row["benchmark"] and p["metric"] == row["metric"] and p["arm"] in names
            ],
        )
        for row in report["table"]
        if row["metric"] in _PRIMARY["chair" if row["type"] == "chair" else "pope"]
    ]
    if not panels:
        raise VLMEvalError("nothing to plot: the report has no rows.")
    return plot_panels(
        panels,
        out,
        panel_size=(3.2, 3.0),
        title_size=9,
        tick_style={"rotation": 30, "ha": "right", "fontsize": 8},
        suptitle=f"{report['model']} (black: published)",
    )


def write_vlm_report(report: dict[str, Any], out_dir: str | Path, name: str = "table") -> dict[str, Path]:
    """``<name>.json`` (the report), ``<name>.md`` and ``<name>.png`` in ``out_dir``."""
    return write_files(out_dir, name, report, render_vlm_markdown(report), lambda png: plot_vlm(report, png))


def run_vlm_table(
    path: str | Path,
    *,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    force: bool = False,
    loaded: tuple[Any, Any] | None = None,
    on_arm: Callable[[str, str, str], None] | None = None,
) -> dict[str, Path]:
    """Run a ``kind: vlm`` table; write ``table.json``, ``table.md`` and ``table.png`` to ``out_dir``
    (default ``evals/results/<name>``) and return their paths (keys ``json``, ``md``, ``png``).

    Every recipe resolves and every data file is checked before the model loads. ``limit`` caps the POPE
    questions per split and the CHAIR images per seed. Each (arm, benchmark) generation run is cached under
    ``out_dir/cache`` by a fingerprint (model, dtype, recipe content, documents, prompt, max_new_tokens, batch
    size, versions); ``force`` reruns. ``loaded`` passes an already loaded ``(model, processor)``.
    ``on_arm(arm, benchmark, status)`` reports progress ("running", "done", "cached").
    """
    table = load_vlm_table(path) if not isinstance(path, VLMTable) else path
    report = evaluate_vlm(table, out_dir=out_dir, limit=limit, force=force, loaded=loaded, on_arm=on_arm)
    out_dir = Path(out_dir) if out_dir else Path("evals") / "results" / slug(table.name)
    return write_vlm_report(report, out_dir)
