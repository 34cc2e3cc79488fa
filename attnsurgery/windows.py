"""Text -> token ids -> fixed-length windows: the one packing that training, calibration and every perplexity
score share, so a window scored in a table is cut exactly like a window trained on.

* :func:`special_prefix` -- the ids a tokenizer puts before any text (BOS for Llama/Gemma, none for SmolLM2);
* :func:`encode` -- a text's ids without special tokens;
* :func:`pack_windows` -- texts joined with EOS and cut into consecutive windows, each starting with the prefix;
* :func:`texts_of` -- the non-blank texts of strings or ``{"text": ...}`` records, with an error naming the bad one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import AttnSurgeryError


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts in front of every text by default (BOS for Llama/Gemma, none for SmolLM2).

    Texts are encoded without special tokens (so an EOS suffix never lands inside a sequence) and this prefix is
    added once per sequence; models that expect a BOS score text without it badly.
    """
    with_special = list(tokenizer("a").input_ids)
    plain = list(tokenizer("a", add_special_tokens=False).input_ids)
    if plain and with_special[len(with_special) - len(plain) :] == plain:
        return with_special[: len(with_special) - len(plain)]
    return []


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def pack_windows(
    tokenizer: Any, texts: Sequence[str], seq_len: int, *, keep_short: bool = False
) -> torch.Tensor:
    """(N, seq_len) windows: texts joined with EOS, cut into consecutive windows of ``seq_len`` tokens, each
    starting with the tokenizer's prefix; the remainder is dropped.

    When the text is shorter than one window the result is empty, or with ``keep_short`` one shorter window of all
    of it (a calibration on a few sentences still has something to score).
    """
    prefix = special_prefix(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in texts:
        stream += encode(tokenizer, text) + ([eos] if eos is not None else [])
    body = seq_len - len(prefix)
    n = len(stream) // body
    if n == 0:
        if keep_short and stream:
            return torch.tensor([prefix + stream], dtype=torch.long)
        return torch.empty(0, seq_len, dtype=torch.long)
    return torch.tensor([prefix + stream[i * body : (i + 1) * body] for i in range(n)], dtype=torch.long)


def texts_of(items: Sequence[Any], what: str) -> list[str]:
    """The non-blank texts of ``items`` (strings or ``{"text": ...}`` records); ``what`` names them in errors."""
    out = []
    for i, item in enumerate(items or []):
        text = item.get("text") if isinstance(item, Mapping) else item
        if not isinstance(text, str):
            raise AttnSurgeryError(
                f"{what} {i}: expected a string or a {{'text': ...}} record, got {type(item).__name__}."
            )
        if text.strip():
            out.append(text)
    return out
