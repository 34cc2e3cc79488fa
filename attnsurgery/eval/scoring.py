"""Scoring a model as it is (patched or not) on plain records: the shared measuring stick of tables and calibration.

* Multiple choice: :class:`ChoiceScorer` / :func:`score_choices` give each choice's summed continuation
  log-likelihood exactly as lm-evaluation-harness's ``loglikelihood`` does (:func:`encode_pair`, right-padded
  batches, inputs fed without their last token), and :func:`record_scores` turns them into a per-record score
  (``choice_logprob``, ``acc``, ``margin``). ACT's head sweep (``patches/act/calibrate.py``) ranks heads with it.
* Text: :func:`text_windows` cuts texts into fixed-length token windows (:mod:`attnsurgery.windows`, the packing
  training uses too) and :func:`mean_nll` is their
  token-weighted next-token loss (the temperature fit's validation and held-out perplexity).

Records are plain dicts: multiple choice ``{"id", "query", "choices": [str], "gold": int}``, text ``str`` or
``{"id", "text"}`` (``attnsurgery.tasks.load_split`` returns both).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AttnSurgeryError, UnsupportedModelError
from ..windows import encode, pack_windows, special_prefix

#: per-record scores of multiple-choice records (see :func:`record_scores`)
METRICS = ("choice_logprob", "acc", "margin")

# ----------------------------------------------------------------------------------------------------------
# Multiple-choice records -> token sequences (the lm-eval way)
# ----------------------------------------------------------------------------------------------------------


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-evaluation-harness's ``_encode_pair``.

    Trailing whitespace of the context moves to the front of the continuation ("Answer: " + "yes" scores
    " yes"), and the continuation's ids are the tail of ``encode(context + continuation)`` after
    ``len(encode(context))`` ids, so a tokenizer that merges tokens across the boundary scores the continuation
    the way the model would actually see it in one string.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


@dataclass
class _Batch:
    input_ids: torch.Tensor  # (b, T) right-padded
    attention_mask: torch.Tensor  # (b, T)
    pred_pos: torch.Tensor  # (b, C) positions whose logits predict the continuation tokens
    targets: torch.Tensor  # (b, C) continuation tokens
    target_mask: torch.Tensor  # (b, C) bool
    seq_index: torch.Tensor  # (b,) index of each row among all sequences

    def to(self, device: torch.device) -> _Batch:
        return _Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.pred_pos.to(device),
            self.targets.to(device),
            self.target_mask.to(device),
            self.seq_index,  # indexes CPU result tensors
        )


def check_choice_records(records: Sequence[Mapping[str, Any]]) -> None:
    """Raise a clear :class:`AttnSurgeryError` unless ``records`` are usable multiple-choice records."""
    if records is None or len(records) == 0:
        raise AttnSurgeryError(
            "no calibration records: ACT calibration needs multiple-choice records "
            "{'id', 'query', 'choices': [...], 'gold': int} (e.g. attnsurgery.tasks.load_split(task, 'calibration'))."
        )
    for i, rec in enumerate(records):
        where = (
            f"calibration record {i} (id {rec.get('id', '?')!r})"
            if isinstance(rec, Mapping)
            else f"record {i}"
        )
        if not isinstance(rec, Mapping):
            raise AttnSurgeryError(
                f"{where}: expected a dict with query/choices/gold, got {type(rec).__name__}."
            )
        choices = rec.get("choices")
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            hint = " It looks like a perplexity record; those calibrate temperature." if "text" in rec else ""
            raise AttnSurgeryError(
                f"{where}: needs a 'choices' list of at least two strings (ACT calibration scores multiple choice)."
                + hint
            )
        if not all(isinstance(c, str) and c for c in choices):
            raise AttnSurgeryError(f"{where}: every choice must be a non-empty string.")
        if not isinstance(rec.get("query"), str):
            raise AttnSurgeryError(f"{where}: needs a 'query' string (the context the choices continue).")
        gold = rec.get("gold")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise AttnSurgeryError(
                f"{where}: 'gold' must be the index of the right choice (0..{len(choices) - 1}), got {gold!r}."
            )


class ChoiceScorer:
    """Log-likelihood of every choice continuation of every record, batched with right padding.

    Each (record, choice) is one sequence ``prefix + context + continuation`` fed without its last token (as
    lm-eval does); ``max_length`` truncates from the left. Only the positions that predict continuation tokens
    go through the output embedding (a pre-hook gathers them), so large vocabularies cost little memory.
    """

    def __init__(
        self,
        tokenizer: Any,
        records: Sequence[Mapping[str, Any]],
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> None:
        check_choice_records(records)
        if batch_size < 1:
            raise AttnSurgeryError(f"batch_size must be at least 1, got {batch_size}.")
        prefix = special_prefix(tokenizer)
        self.golds = [int(r["gold"]) for r in records]
        self.n_choices = [len(r["choices"]) for r in records]
        self.offsets = [0]
        seqs: list[tuple[list[int], int]] = []  # (tokens fed + the last target, continuation length)
        for i, rec in enumerate(records):
            for choice in rec["choices"]:
                ctx, cont = encode_pair(tokenizer, rec["query"], choice)
                ctx = prefix + ctx
                if not cont:
                    raise AttnSurgeryError(f"calibration record {i}: choice {choice!r} tokenises to nothing.")
                if not ctx:
                    raise AttnSurgeryError(
                        f"calibration record {i}: the query is empty and the tokenizer adds no BOS token, so the "
                        "first choice token would have no context; give a non-empty query."
                    )
                tokens = ctx + cont
                if max_length is not None and len(tokens) - 1 > max_length:
                    tokens = tokens[-(max_length + 1) :]
                seqs.append((tokens, min(len(cont), len(tokens) - 1)))
            self.offsets.append(len(seqs))
        self.sequences = seqs
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None) or 0
        # longest first: similar lengths share a batch (little padding), and an out-of-memory shows at once
        order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k][0]))
        self.batches = [
            self._batch([*order[s : s + batch_size]], pad) for s in range(0, len(order), batch_size)
        ]

    def _batch(self, index: list[int], pad: int) -> _Batch:
        width = max(len(self.sequences[k][0]) - 1 for k in index)
        cmax = max(self.sequences[k][1] for k in index)
        ids = torch.full((len(index), width), pad, dtype=torch.long)
        mask = torch.zeros(len(index), width, dtype=torch.long)
        pred = torch.zeros(len(index), cmax, dtype=torch.long)
        targets = torch.zeros(len(index), cmax, dtype=torch.long)
        tmask = torch.zeros(len(index), cmax, dtype=torch.bool)
        for row, k in enumerate(index):
            tokens, n_cont = self.sequences[k]
            fed = tokens[:-1]
            ids[row, : len(fed)] = torch.tensor(fed)
            mask[row, : len(fed)] = 1
            start = len(fed) - n_cont  # logits at start .. len(fed)-1 predict the continuation
            pred[row, :n_cont] = torch.arange(start, len(fed))
            targets[row, :n_cont] = torch.tensor(tokens[-n_cont:])
            tmask[row, :n_cont] = True
        return _Batch(ids, mask, pred, targets, tmask, torch.tensor(index))

    @property
    def n_records(self) -> int:
        return len(self.golds)

    def per_record(self, values: torch.Tensor) -> list[list[float]]:
        """(n_sequences,) log-likelihoods -> one list of choice log-likelihoods per record."""
        flat = values.tolist()
        return [flat[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def digest(self) -> str:
        """Fingerprint of the tokenised data (records, tokenizer and max_length together)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.sequences, self.offsets, self.golds]).encode())
        return h.hexdigest()[:16]


class HeadGather:
    """Forward pre-hook on the output embedding: only ``index`` (B, C) positions of each row reach it."""

    def __init__(self, model: nn.Module) -> None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no output embedding (lm_head); calibration scores causal LMs."
            )
        self.head = head
        self.index: torch.Tensor | None = None

    def _hook(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.index is None or not args:
            return None
        hidden = args[0]
        idx = self.index.to(hidden.device)
        return (hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1])), *args[1:])

    @contextmanager
    def installed(self) -> Iterator[HeadGather]:
        handle = self.head.register_forward_pre_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            self.index = None


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's device (the first parameter's when it has none)."""
    try:
        return model.get_input_embeddings().weight.device
    except AttributeError:
        return next(model.parameters()).device


def continuation_ll(
    model: nn.Module, gather: HeadGather, batch: _Batch, copies: int = 1, **forward: Any
) -> torch.Tensor:
    """Summed continuation log-likelihood of each row (batch stacked ``copies`` times), float64 on CPU."""
    ids, mask = batch.input_ids, batch.attention_mask
    if copies > 1:
        ids, mask = ids.repeat(copies, 1), mask.repeat(copies, 1)
    gather.index = batch.pred_pos.repeat(copies, 1)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **forward).logits.float()
    targets = batch.targets.repeat(copies, 1).to(logits.device)
    # log p(target) = logit[target] - logsumexp(logits): no (rows, C, V) log_softmax copy
    lp = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (lp.double() * batch.target_mask.repeat(copies, 1).to(lp.device)).sum(-1).cpu()


def score_choices(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[list[float]]:
    """Log-likelihood of each choice of each record under ``model`` as it is (patched or not)."""
    scorer = ChoiceScorer(tokenizer, records, batch_size, max_length)
    return scorer.per_record(choice_lls(model, scorer))


def choice_lls(
    model: nn.Module, scorer: ChoiceScorer, tick: Callable[[float], None] | None = None
) -> torch.Tensor:
    """(n_sequences,) float64 summed continuation log-likelihood of every sequence of ``scorer``; ``tick(share)``
    after each batch (progress bars)."""
    out = torch.zeros(len(scorer.sequences), dtype=torch.float64)
    gather = HeadGather(model)
    device = input_device(model)
    with torch.no_grad(), gather.installed():
        for batch in scorer.batches:
            out[batch.seq_index] = continuation_ll(model, gather, batch.to(device))
            if tick is not None:
                tick(1 / len(scorer.batches))
    return out


def record_scores(lls: Sequence[Sequence[float]], golds: Sequence[int], metric: str) -> torch.Tensor:
    """(n_records,) float64 per-record score from choice log-likelihoods.

    ``choice_logprob``: log-probability of the gold choice after normalising the choice log-likelihoods over the
    choices (``ll[g] - logsumexp(ll)``), the cross-entropy of the multiple-choice classifier; ``acc``: 1 if the
    gold choice has the highest log-likelihood (first of ties, like lm-eval's argmax); ``margin``:
    ``ll[g] - max(other ll)``.
    """
    if metric not in METRICS:
        raise AttnSurgeryError(f"unknown calibration metric {metric!r}; choose one of {', '.join(METRICS)}.")
    out = torch.empty(len(golds), dtype=torch.float64)
    for i, (ll, g) in enumerate(zip(lls, golds)):
        t = torch.tensor(ll, dtype=torch.float64)
        if metric == "choice_logprob":
            out[i] = t[g] - torch.logsumexp(t, 0)
        elif metric == "acc":
            out[i] = float(int(t.argmax()) == g)
        else:
            out[i] = t[g] - torch.cat([t[:g], t[g + 1 :]]).max()
    return out


# ----------------------------------------------------------------------------------------------------------
# Text -> windows -> next-token loss
# ----------------------------------------------------------------------------------------------------------


def text_windows(tokenizer: Any, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """:func:`attnsurgery.windows.pack_windows` keeping a text shorter than one window as one short window."""
    windows = pack_windows(tokenizer, texts, seq_len, keep_short=True)
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise AttnSurgeryError("the calibration text tokenises to fewer than two tokens.")
    return windows


def mean_nll(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token NLL over the windows."""
    total, count = 0.0, 0
    device = input_device(model)
    with torch.no_grad():
        for s in range(0, len(windows), batch_size):
            ids = windows[s : s + batch_size].to(device)
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * n
            count += n
    return total / count
