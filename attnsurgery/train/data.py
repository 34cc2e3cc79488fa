"""Training text through ``datasets``: shipped offline corpora, local files or Hub ids, packed into windows.

A source is one of

* an offline task name (``gutenberg_ppl``, ``bb_general_knowledge`` ...): its *calibration* split only. The
  test splits are what tables report; asking for one (``gutenberg_ppl:test``, or the test JSONL by path) is
  refused, so a trained surgery is never scored on text it saw;
* a local ``.jsonl`` / ``.json`` file (a ``text`` field, or multiple-choice ``query`` + ``choices`` + ``gold``)
  or a ``.txt`` file (one document per blank-line-separated block);
* a Hub dataset id (``wikitext:wikitext-2-raw-v1`` with an optional config after ``:``) for users with the Hub;
* a corpus built from registry packages (``pydocs``, the Python documentation; ``pdbooks``, public-domain novels:
  :mod:`attnsurgery.train.corpora`), for longer budgets;
* several of these joined with ``+`` (``gutenberg_ppl+pydocs``): their documents evenly interleaved.

Texts are joined with EOS and cut into fixed windows, each starting with the tokenizer's own prefix (BOS),
as perplexity evaluation sees them (:func:`attnsurgery.windows.pack_windows`, one packing for both). The validation slice is held back *by text* (whole documents), so no
window straddles training and validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import AttnSurgeryError, did_you_mean
from ..windows import pack_windows  # noqa: F401  (re-exported: attnsurgery.train.pack_windows)


class DataError(AttnSurgeryError):
    """Training data that is missing, empty, or a split tables report."""


@dataclass
class TrainingData:
    """Packed windows for training and validation, and where they came from."""

    train: torch.Tensor  # (N, seq_len) token ids
    val: torch.Tensor  # (M, seq_len)
    source: str
    n_texts: int
    n_val_texts: int

    def describe(self) -> dict[str, Any]:
        seq_len = int(self.train.shape[1])
        return {
            "source": self.source,
            "seq_len": seq_len,
            "texts": self.n_texts,
            "val_texts": self.n_val_texts,
            "train_windows": int(self.train.shape[0]),
            "val_windows": int(self.val.shape[0]),
            "train_tokens": int(self.train.numel()),
        }


def _record_text(record: dict[str, Any]) -> str | None:
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("query"), str) and isinstance(record.get("choices"), list):
        gold = record.get("gold", 0)
        return record["query"] + record["choices"][gold]  # the question with its right answer
    return None


def _offline_tasks() -> list[str]:
    from attnsurgery.tasks import offline_tasks

    return offline_tasks()


def _refuse_test_file(path: Path) -> None:
    from attnsurgery.tasks import include_path

    data_dir = (Path(include_path()) / "data").resolve()
    if path.resolve().parent == data_dir and path.name.endswith(".test.jsonl"):
        raise DataError(
            f"{path} is the test split of an offline task: tables report it, so training on it is refused. "
            f"Train on the calibration split instead: {path.name.replace('.test.jsonl', '')}."
        )


def load_texts(source: str) -> list[str]:
    """The non-empty texts of a source (see the module docstring), loaded with ``datasets``."""
    import datasets

    path = Path(source)
    if "+" in str(source) and not path.exists():  # a mixture: every part's documents, evenly interleaved
        return _interleave([load_texts(part) for part in str(source).split("+")])
    name, _, option = str(source).partition(":")
    if name in _corpora():
        from .corpora import build

        kind, files = "json", str(build(name))
    elif name in _offline_tasks():
        if option and option != "calibration":
            raise DataError(
                f"{source!r}: only the calibration split of offline tasks can be trained on; the {option!r} split "
                f"is what tables report. Use {name!r} (the calibration split)."
            )
        from attnsurgery.tasks import include_path

        path = Path(include_path()) / "data" / f"{name}.calibration.jsonl"
        kind, files = "json", str(path)
    elif path.exists():
        _refuse_test_file(path)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            kind, files = "json", str(path)
        elif suffix == ".txt":
            kind, files = "text", str(path)
        else:
            raise DataError(f"{path}: training data must be a .jsonl, .json or .txt file.")
    elif "/" in name or name in ("wikitext", "c4", "openwebtext"):
        try:
            ds = datasets.load_dataset(name, option or None, split="train")
        except Exception as err:  # offline, unknown id, ...: say what was tried
            raise DataError(
                f"cannot load the Hub dataset {source!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
                "Without Hub access, use an offline task (gutenberg_ppl) or a local .jsonl/.txt file."
            ) from None
        texts = _texts_of(ds, source)
        refuse_test_content(texts, source)
        return texts
    else:
        raise DataError(
            f"unknown training data {source!r}: not an offline task, a corpus, a file, or a Hub dataset id."
            f"{did_you_mean(name, _offline_tasks() + _corpora())} Offline tasks: {', '.join(_offline_tasks())}; "
            f"corpora: {', '.join(_corpora())}; join sources with '+'."
        )
    if Path(files).is_file() and not Path(files).read_bytes().strip():
        raise DataError(
            f"{source}: the file is empty; no text to train on. Name a file with text, or an offline task."
        )
    try:
        if kind == "text":
            # one document per blank-line-separated block, so validation can hold back whole documents
            ds = datasets.load_dataset("text", data_files=files, split="train", sample_by="paragraph")
        else:
            ds = datasets.load_dataset("json", data_files=files, split="train")
    except Exception as err:  # datasets' DatasetGenerationError around a JSON or encoding error
        cause = err.__cause__ or err.__context__ or err
        raise DataError(
            f"{source} cannot be read as {'text' if kind == 'text' else 'JSON lines (one object per line)'} "
            f"({type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''})."
        ) from None
    texts = _texts_of(ds, source)
    if name not in _offline_tasks():  # a file (or corpus) holding a test split under another name
        refuse_test_content(texts, source)
    return texts


def refuse_test_content(texts: list[str], source: str) -> None:
    """Refuse data that holds a record of an offline task's test split (the splits tables report), by content."""
    from attnsurgery.tasks import test_split_overlap

    hit = test_split_overlap(texts)
    if hit is not None:
        task, record = hit
        raise DataError(
            f"{source} holds record {record!r} of the test split of {task} (tables report that split, so no surgery "
            f"may learn from it). Remove the test records, or use the calibration split: {task}."
        )


def _corpora() -> list[str]:
    from .corpora import CORPORA

    return list(CORPORA)


def _interleave(parts: list[list[str]]) -> list[str]:
    """Documents of several sources in one list, each source spread evenly over it (document i of a source with n
    sits at i / n), so the held-back tail that validation takes draws from every source."""
    keyed = [
        ((i + 0.5) / len(texts), k, text) for k, texts in enumerate(parts) for i, text in enumerate(texts)
    ]
    return [text for _, _, text in sorted(keyed, key=lambda item: (item[0], item[1]))]


def _texts_of(ds: Any, source: str) -> list[str]:
    texts = []
    for record in ds:
        text = _record_text(record)
        if text is None:
            raise DataError(
                f"{source}: records need a 'text' field (or 'query' + 'choices' + 'gold'); got keys "
                f"{sorted(record)}."
            )
        if text.strip():
            texts.append(text)
    if not texts:
        raise DataError(f"{source}: no non-empty text to train on.")
    return texts


def prepare_data(
    tokenizer: Any,
    source: str,
    seq_len: int,
    *,
    val_fraction: float = 0.1,
    max_val_windows: int = 32,
    max_context: int | None = None,
) -> TrainingData:
    """Load, split by text into training / validation, and pack. Errors name the problem and the fix."""
    if max_context is not None and seq_len > max_context:
        raise DataError(
            f"seq_len {seq_len} is longer than the model's context ({max_context} positions); use --seq-len "
            f"{max_context} or less."
        )
    if seq_len < 8:
        raise DataError(f"seq_len {seq_len} is too short to learn from; use at least 8 tokens.")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction}.")
    texts = load_texts(source)
    if len(texts) >= 2:
        n_val = max(1, round(val_fraction * len(texts)))
        train_texts, val_texts = texts[:-n_val], texts[-n_val:]
        train, val = (
            pack_windows(tokenizer, train_texts, seq_len),
            pack_windows(tokenizer, val_texts, seq_len),
        )
    else:  # one document: hold back its last windows instead
        train_texts, val_texts = texts, []
        windows = pack_windows(tokenizer, texts, seq_len)
        n_val = max(1, round(val_fraction * len(windows)))
        train, val = windows[:-n_val], windows[-n_val:]
    if len(val) == 0 and len(train) >= 2:  # validation texts too short for a window: take the last train ones
        train, val = train[:-1], train[-1:]
    if len(train) == 0 or len(val) == 0:
        raise DataError(
            f"{source}: the text gives {len(train)} training and {len(val)} validation windows of {seq_len} "
            "tokens; give more text or a shorter --seq-len."
        )
    return TrainingData(train, val[:max_val_windows], str(source), len(train_texts), len(val_texts))
