"""Baseline vs patched, scored by lm-evaluation-harness, side by side: the runs.

:func:`evaluate_arms` runs one model under several *arms* (the unpatched baseline and one per recipe) on the
same tasks and the same examples, and returns an :class:`~.text_results.EvalReport`: per metric the value and
stderr of each arm, the delta against the baseline and a *paired* significance estimate (:mod:`.text_results`).

Every finished arm is cached as JSON keyed by a fingerprint of everything that changes its numbers (model,
recipe content and state file, tasks, shots, limit, dtype, quantisation, library versions), so a re-run skips
it. ``quant="w8a8"`` scores every arm (the baseline too) under simulated static W8A8
(:func:`.quant.quantize_w8a8`), its activation ranges calibrated with the arm's surgery active;
``quant="int8"`` loads the model through bitsandbytes LLM.int8 for all arms. Results are checked for NaN/inf
logits and degenerate choices (all log-likelihoods tied, which lm-eval silently scores as "first choice") and
such arms are marked INVALID in every table.

:func:`~.text_tables.reproduce` runs a table definition (``evals/*.yaml``: models x arms x tasks, optional
published numbers to print beside ours; :mod:`.text_tables`); :mod:`.text_report` writes JSON, markdown and the
PNG plots.

The names of :mod:`.text_results` and :mod:`.text_report` are re-exported here, so
``from attnsurgery.eval.text import evaluate_arms, make_arms, write_report`` keeps working.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import did_you_mean
from .text_report import describe_quant, plot_forest, plot_report, render_markdown, write_report
from .text_results import (
    Arm,
    ArmResult,
    EvalError,
    EvalReport,
    _arm_from_lm_eval,
    arm_mappings,
    make_arms,
    paired_delta,
)

__all__ = [  # the runs, then the names re-exported from text_results and text_report
    "INT8_THRESHOLD",
    "QUANT_CHOICES",
    "W8A8_CALIBRATION",
    "calibration_windows",
    "check_tasks",
    "evaluate_arms",
    "load_tasks",
    "quant_setting",
    "run_arm",
    "slug",
    "task_manager",
    "Arm",
    "ArmResult",
    "EvalError",
    "EvalReport",
    "arm_mappings",
    "make_arms",
    "paired_delta",
    "describe_quant",
    "plot_forest",
    "plot_report",
    "render_markdown",
    "write_report",
]

CACHE_FORMAT = 1
#: ``quant=`` values: simulated static W8A8 after each arm's surgery, or bitsandbytes LLM.int8 for every arm
QUANT_CHOICES = ("w8a8", "int8")
#: what ``quant="w8a8"`` calibrates its activation ranges on, per arm with the arm's surgery active: the first
#: windows of an offline task's *calibration* split (never a split the tables report), in small batches
W8A8_CALIBRATION = {"data": "gutenberg_ppl", "windows": 8, "seq_len": 256, "batch_size": 2}
INT8_THRESHOLD = 6.0


def task_manager(extra: Sequence[str | Path] = ()):
    """lm-eval's TaskManager with the offline suite, ``extra`` folders and ``$ATTNSURGERY_INCLUDE_PATH``
    (``os.pathsep``-separated folders of your own task YAMLs)."""
    from lm_eval.tasks import TaskManager

    from .lmeval import include_path

    paths = [str(p) for p in extra]
    paths += [p for p in os.environ.get("ATTNSURGERY_INCLUDE_PATH", "").split(os.pathsep) if p]
    if include_path():
        paths.append(include_path())
    for p in paths:
        if not Path(p).is_dir():
            raise EvalError(
                f"task folder {p} does not exist (from --include-path / ATTNSURGERY_INCLUDE_PATH)."
            )
    key = tuple(paths)
    if key not in _MANAGERS:  # indexing lm-eval's few thousand task YAMLs takes seconds: do it once
        _MANAGERS[key] = TaskManager(include_path=paths or None)
    return _MANAGERS[key]


_MANAGERS: dict[tuple[str, ...], Any] = {}


def load_tasks(names: list[str], manager: Any) -> dict[str, Any]:
    """lm-eval task objects by name (for their configs and metrics)."""
    if hasattr(manager, "load"):  # lm-eval >= 0.4.10
        return manager.load(names)["tasks"]
    from lm_eval.tasks import get_task_dict

    return get_task_dict(names, manager)


def check_tasks(tasks: Sequence[str], manager: Any = None) -> list[str]:
    """Expand and validate task names before any model is loaded (unknown names get "did you mean")."""
    if not tasks:
        raise EvalError(
            "no tasks given: pass --tasks (e.g. `--tasks offline` for the shipped offline suite)."
        )
    manager = manager or task_manager()
    known = set(manager.all_tasks)
    out: list[str] = []
    for name in tasks:
        if name == "offline":
            from ..tasks import offline_tasks

            out.extend(offline_tasks())
            continue
        if name not in known:
            raise EvalError(
                f"unknown lm-eval task {name!r}.{did_you_mean(name, sorted(known))} "
                "Offline tasks shipped with attnsurgery: `attnsurgery lm-eval ls tasks`; standard lm-eval tasks "
                "(hellaswag, arc_easy, mmlu, ...) need the Hugging Face Hub or a local datasets cache."
            )
        out.append(name)
    return list(dict.fromkeys(out))


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    from .. import __version__

    return {
        "attnsurgery": __version__,
        "lm_eval": version("lm_eval"),
        "transformers": version("transformers"),
    }


def quant_setting(quant: str | None) -> dict[str, Any] | None:
    """The settings a ``quant=`` choice runs with (they enter the arm fingerprint: FP and quantised results, or
    two quantisation setups, never share a cache entry); None for full precision."""
    if quant is None:
        return None
    if quant == "w8a8":
        import inspect

        from .quant import quantize_w8a8

        defaults = {
            name: p.default
            for name, p in inspect.signature(quantize_w8a8).parameters.items()
            if p.kind is p.KEYWORD_ONLY
        }
        return {"scheme": "w8a8", "calibration": dict(W8A8_CALIBRATION), "setup": defaults}
    if quant == "int8":
        return {"scheme": "int8", "threshold": INT8_THRESHOLD}
    raise EvalError(f"unknown quantisation {quant!r}; choose one of {', '.join(QUANT_CHOICES)}.")


def calibration_windows(tokenizer: Any, source: str, windows: int, seq_len: int) -> Any:
    """The first ``windows`` packed windows (``(N, seq_len)`` token ids) of ``source``'s texts: an offline task's
    *calibration* split (test splits are refused by :func:`attnsurgery.train.data.load_texts`) or a local file.
    Texts are tokenised only until enough windows are packed."""
    from ..train.data import load_texts
    from ..windows import pack_windows

    texts = load_texts(source)
    used = min(len(texts), 1)
    packed = pack_windows(tokenizer, texts[:used], seq_len)
    while used < len(texts) and len(packed) < windows:
        used = min(len(texts), 2 * used)
        packed = pack_windows(tokenizer, texts[:used], seq_len)
    if len(packed) == 0:
        raise EvalError(
            f"{source}: its text gives no window of {seq_len} tokens; use a shorter sequence length."
        )
    return packed[:windows]


def _w8a8_batches(model: Any, tokenizer: Any) -> list[Any]:
    cal = W8A8_CALIBRATION
    seq_len = min(cal["seq_len"], getattr(model.config, "max_position_embeddings", None) or cal["seq_len"])
    windows = calibration_windows(tokenizer, cal["data"], cal["windows"], seq_len)
    return list(windows.split(cal["batch_size"]))


def _fingerprint(model: str, arm: Arm, settings: dict[str, Any]) -> str:
    key = {"format": CACHE_FORMAT, "model": model, "arm": arm.fingerprint(), **settings, **_versions()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """``text`` as a safe file name (cache entries, result folders)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def evaluate_arms(
    model: str,
    arms: Sequence[Arm],
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    force: bool = False,
    loaded: tuple[Any, Any] | None = None,
    on_arm: Callable[[str, str], None] | None = None,
    quant: str | None = None,
) -> EvalReport:
    """Run every arm on the same docs; cached arms (same fingerprint under ``cache_dir``) are read back.

    ``loaded`` passes an already loaded ``(model, tokenizer)`` (otherwise ``model`` is loaded with
    :func:`attnsurgery.load_model` only if some arm is not cached). ``on_arm(arm_name, status)`` reports
    progress ("cached", "running", "done"). ``quant``: None (full precision), ``"w8a8"`` (simulated static
    W8A8 in every arm after its surgery, calibrated with the surgery active; :data:`W8A8_CALIBRATION`) or
    ``"int8"`` (the model loaded through bitsandbytes LLM.int8; a ``loaded`` model must already be).
    """
    if not arms or arms[0].recipe is not None:
        raise EvalError("the first arm must be the unpatched baseline (make_arms() puts it there).")
    manager = task_manager()
    tasks = check_tasks(tasks, manager)
    settings: dict[str, Any] = {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "dtype": dtype}
    quant_set = quant_setting(quant)
    if quant_set is not None:  # only when set, so full-precision fingerprints (and caches) stay as they were
        settings["quant"] = quant_set
    if quant == "int8" and loaded is not None and not getattr(loaded[0], "is_loaded_in_8bit", False):
        raise EvalError(
            "quant='int8' with a loaded model: load it with attnsurgery.eval.quant.load_int8 first."
        )
    cache = Path(cache_dir) / slug(model) if cache_dir else None
    results: list[ArmResult] = []
    for arm in arms:
        fp = _fingerprint(model, arm, settings)
        path = cache / f"{slug(arm.name)}-{fp}.json" if cache else None
        if path is not None and path.is_file() and not force:
            results.append(ArmResult.from_json(json.loads(path.read_text())))
            if on_arm:
                on_arm(arm.name, "cached")
            continue
        if loaded is None:
            if quant == "int8":
                from .quant import load_int8

                loaded = load_int8(model, threshold=INT8_THRESHOLD, dtype=dtype)
            else:
                from ..models import load_model

                loaded = load_model(model, dtype=dtype)
        if on_arm:
            on_arm(arm.name, "running")
        result = run_arm(
            loaded,
            arm,
            tasks,
            manager,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            quant=quant,
        )
        if quant_set is not None:
            result.quant = {**quant_set, **result.quant}
        result.fingerprint = fp
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result.to_json()))
            os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written cache entry
        results.append(result)
        if on_arm:
            on_arm(arm.name, "done")
    return EvalReport(model=model, tasks=tasks, arms=results, settings=settings)


@contextmanager
def _quiet_int8_casts() -> Iterator[None]:
    """bitsandbytes LLM.int8 logs a warning on every float32 matmul that it casts the inputs to float16 (expected
    here): silence that one message while an arm runs."""
    import logging

    log = logging.getLogger("bitsandbytes.autograd._functions")

    def keep(record: logging.LogRecord) -> bool:
        return "MatMul8bitLt" not in record.getMessage()

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


@contextmanager
def _quiet_git_probe() -> Iterator[None]:
    """lm-eval records the git commit of the working directory by running ``git describe`` with the console as its
    stderr: outside a repository every arm printed "fatal: not a git repository". Same probe, stderr discarded
    (None outside a repository, as lm-eval's own fallback gives); left alone if lm-eval no longer has it."""
    import subprocess

    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)

    def quiet() -> str | None:
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
        except (subprocess.CalledProcessError, OSError):
            return None
        return done.stdout.strip() or None

    if original is not None:
        evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        if original is not None:
            evaluator.get_git_commit_hash = original


def run_arm(
    loaded: tuple[Any, Any],
    arm: Arm,
    tasks: Sequence[str],
    manager: Any,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    quant: str | None = None,
) -> ArmResult:
    """One lm-eval run of ``arm`` on the loaded model; the surgery (and, with ``quant="w8a8"``, the simulated
    W8A8 calibrated on top of it) is removed again afterwards."""
    import lm_eval

    from ..api import patch
    from .lmeval import SurgeryLM

    model, tokenizer = loaded
    handle = patch(model, arm.recipe) if arm.recipe is not None else None
    quantized = None
    quant_info: dict[str, Any] = {}
    try:
        if quant == "w8a8":  # after the surgery: it changes the activations the ranges are calibrated on
            from .quant import quantize_w8a8

            batches = _w8a8_batches(model, tokenizer)
            quantized = quantize_w8a8(model, batches)
            quant_info = {
                "num_quantized_linears": len(quantized.weight_ranges),
                "num_act_quantizers": len(quantized.act_quantizers),
                "calibration_windows": int(sum(b.shape[0] for b in batches)),
                "calibration_seq_len": int(batches[0].shape[1]),
            }
        lm = SurgeryLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        start = time.perf_counter()
        with _quiet_int8_casts(), _quiet_git_probe():
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=True,
                random_seed=0,
                numpy_random_seed=1234,
                torch_random_seed=1234,
                fewshot_random_seed=1234,
            )
        seconds = time.perf_counter() - start
    finally:
        if quantized is not None:
            quantized.remove()
        if handle is not None:
            handle.remove()
    result = _arm_from_lm_eval(arm, raw, lm, seconds, "")
    result.quant = quant_info
    return result
