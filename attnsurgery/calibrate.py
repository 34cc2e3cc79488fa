"""Calibration: ACT head selection (the paper's offline sweep) and Selective-Attention temperature fitting.

Two library entry points, both usable from Python and wired into ``attnsurgery calibrate``:

* :func:`calibrate_act_heads` applies ACT to one head at a time, scores every head on multiple-choice calibration
  records and keeps the heads that help beyond noise; :func:`write_act_recipe` turns the selection into a recipe.
  The sweep is resumable (``state_path``) and has an exact fast mode (cached layer inputs, heads batched).
* :func:`fit_temperature` fits the ``temperature`` surgery's position coefficients ``c`` (per layer or per head)
  by next-token loss on calibration text with every model weight frozen; :func:`write_temperature_recipe`
  ships the fitted table as a recipe with a ``state:`` file.

Calibration records are plain dicts: multiple choice ``{"id", "query", "choices": [str], "gold": int}`` for ACT,
text (``str`` or ``{"id", "text"}``) for temperature fitting (``attnsurgery.tasks.load_split`` returns both).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import SurgeryHandle, patch, save_surgery
from .engine import Engine, discover
from .errors import AttnSurgeryError, SurgeryConfigError, UnsupportedModelError
from .recipe import parse_recipe
from .registry import get_surgery_class
from .targeting import LayerHeads, _compact, resolve_targets

#: per-record scores ACT calibration can rank heads by (see :func:`calibrate_act_heads`)
METRICS = ("choice_logprob", "acc", "margin")
STATE_VERSION = 1

# ----------------------------------------------------------------------------------------------------------
# Multiple-choice records -> token sequences (the lm-eval way)
# ----------------------------------------------------------------------------------------------------------


def _special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts in front of every text by default (BOS for Llama/Gemma, none for SmolLM2).

    Context and continuation are encoded without special tokens (so an EOS suffix never lands inside a
    sequence) and this prefix is added once, in front of the context.
    """
    with_special = list(tokenizer("a").input_ids)
    plain = list(tokenizer("a", add_special_tokens=False).input_ids)
    if plain and with_special[len(with_special) - len(plain) :] == plain:
        return with_special[: len(with_special) - len(plain)]
    return []


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


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
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
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
        prefix = _special_prefix(tokenizer)
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


class _HeadGather:
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
    def installed(self) -> Iterator[_HeadGather]:
        handle = self.head.register_forward_pre_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            self.index = None


def _device(model: nn.Module) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except AttributeError:
        return next(model.parameters()).device


def _continuation_ll(
    model: nn.Module, gather: _HeadGather, batch: _Batch, copies: int = 1, **forward: Any
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
    return scorer.per_record(_run_plain(model, scorer))


def _run_plain(
    model: nn.Module, scorer: ChoiceScorer, tick: Callable[[float], None] | None = None
) -> torch.Tensor:
    out = torch.zeros(len(scorer.sequences), dtype=torch.float64)
    gather = _HeadGather(model)
    device = _device(model)
    with torch.no_grad(), gather.installed():
        for batch in scorer.batches:
            out[batch.seq_index] = _continuation_ll(model, gather, batch.to(device))
            if tick is not None:
                tick(1 / len(scorer.batches))
    return out


# ----------------------------------------------------------------------------------------------------------
# Per-record metrics and head selection
# ----------------------------------------------------------------------------------------------------------


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


def _bootstrap_p(deltas: torch.Tensor, n_boot: int, seed: int = 0) -> torch.Tensor:
    """(heads,) share of paired bootstrap resamples of the records whose mean delta is > 0 (deterministic)."""
    n = deltas.shape[-1]
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (n_boot, n), generator=g)
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_boot, n, dtype=torch.float64)
    )
    means = deltas @ counts.T / n  # (heads, n_boot): every head resampled on the same records (paired)
    return (means > 0).double().mean(-1)


@dataclass
class HeadScore:
    layer: int
    head: int
    score: float  # mean per-record metric with ACT on this head alone
    delta: float  # score - baseline score
    acc: float  # accuracy with ACT on this head alone
    p_improve: float  # paired-bootstrap share of resamples with a positive mean delta
    kept: bool


@dataclass
class CalibrationResult:
    """Per-head scores of an ACT sweep and the heads selected from them.

    Choice log-likelihoods are kept per record, so :meth:`select` can re-rank with another metric or rule
    without running the model again.
    """

    act_args: dict[str, Any]  # beta, threshold or alpha: the ACT arguments the heads were scored with
    num_layers: int
    num_heads: int
    golds: list[int]
    baseline_ll: list[list[float]]
    head_ll: dict[tuple[int, int], list[list[float]]]
    metric: str = "choice_logprob"
    min_delta: float = 0.0
    confidence: float = 0.95
    n_boot: int = 2000
    rule: str = "bootstrap"  # "bootstrap" (per head) or "fdr" (Benjamini-Hochberg over all swept heads)
    model_name: str = ""
    data: str | None = None
    fast: bool = True
    seconds: float = 0.0  # wall time of this call (resumed heads cost nothing)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    combined_ll: list[list[float]] | None = None  # the kept heads together, from :meth:`score_selection`
    combined_heads: dict[int, list[int]] | None = None

    @property
    def n_records(self) -> int:
        return len(self.golds)

    def baseline_score(self, metric: str | None = None) -> float:
        return float(record_scores(self.baseline_ll, self.golds, metric or self.metric).mean())

    @property
    def baseline_acc(self) -> float:
        return float(record_scores(self.baseline_ll, self.golds, "acc").mean())

    def table(
        self,
        *,
        metric: str | None = None,
        min_delta: float | None = None,
        confidence: float | None = None,
        rule: str | None = None,
    ) -> list[HeadScore]:
        """One row per swept head (layer, head order) with its score, delta, bootstrap p and kept flag.

        ``rule="bootstrap"``: keep a head when ``delta > min_delta`` and its paired bootstrap P(mean delta > 0)
        is at least ``confidence`` — a per-head test, so ~(1 - confidence) of the swept heads pass by chance.
        ``rule="fdr"``: Benjamini-Hochberg at level ``q = 1 - confidence`` over the one-sided p-values of a paired
        z-test of every swept head's mean delta (normal approximation of the mean, fine from ~30 records; the
        bootstrap's 1/n_boot resolution is too coarse for the BH thresholds ``q k / m``), plus ``delta >
        min_delta``: the expected share of false heads among the kept ones is at most q.
        """
        metric = metric or self.metric
        min_delta = self.min_delta if min_delta is None else min_delta
        confidence = self.confidence if confidence is None else confidence
        rule = rule or self.rule
        _check_selection(metric, min_delta, confidence, rule)
        keys = sorted(self.head_ll)
        if not keys:
            return []
        base = record_scores(self.baseline_ll, self.golds, metric)
        scores = torch.stack([record_scores(self.head_ll[k], self.golds, metric) for k in keys])
        deltas = scores - base
        p = _bootstrap_p(deltas, self.n_boot)
        passed = _bh_pass(_ztest_p(deltas), 1.0 - confidence) if rule == "fdr" else p >= confidence
        rows = []
        for i, (layer, head) in enumerate(keys):
            delta = float(deltas[i].mean())
            acc = float(record_scores(self.head_ll[(layer, head)], self.golds, "acc").mean())
            kept = delta > min_delta and bool(passed[i])
            rows.append(HeadScore(layer, head, float(scores[i].mean()), delta, acc, float(p[i]), kept))
        return rows

    def select(
        self,
        *,
        metric: str | None = None,
        min_delta: float | None = None,
        confidence: float | None = None,
        rule: str | None = None,
    ) -> dict[int, list[int]]:
        """``{layer: [heads]}`` of the kept heads, in the form ``patch(model, "act", heads=...)`` takes."""
        out: dict[int, list[int]] = {}
        for row in self.table(metric=metric, min_delta=min_delta, confidence=confidence, rule=rule):
            if row.kept:
                out.setdefault(row.layer, []).append(row.head)
        return out

    @property
    def heads(self) -> dict[int, list[int]]:
        """The selection under this result's metric / min_delta / confidence."""
        return self.select()

    def score_selection(
        self,
        model: nn.Module,
        tokenizer: Any,
        records: Sequence[Mapping[str, Any]],
        *,
        heads: Mapping[int, Sequence[int]] | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> dict[str, float]:
        """Score the kept heads *together* on the calibration records (one more pass) and remember it.

        The sweep scores each head alone; their effects need not add up (two heads can redistribute the same
        mass), so this is the check that the recipe as shipped helps on the data it was chosen on. It is not a
        held-out number: the heads were selected on these records, so the delta is optimistic — report
        held-out effects from the test split (``attnsurgery eval``). Returns :meth:`combined`.
        """
        heads = {int(k): sorted(v) for k, v in (self.heads if heads is None else heads).items() if v}
        if len(records) != self.n_records:
            raise AttnSurgeryError(
                f"score_selection got {len(records)} records; the sweep used {self.n_records}. Pass the same records."
            )
        with self.patch(model, heads):
            self.combined_ll = score_choices(
                model, tokenizer, records, batch_size=batch_size, max_length=max_length
            )
        self.combined_heads = heads
        return self.combined()

    def combined(self) -> dict[str, float]:
        """Score, delta, accuracy and paired p of the kept heads together ({} before :meth:`score_selection`)."""
        if self.combined_ll is None:
            return {}
        base = record_scores(self.baseline_ll, self.golds, self.metric)
        delta = record_scores(self.combined_ll, self.golds, self.metric) - base
        return {
            "score": float(base.mean() + delta.mean()),
            "delta": float(delta.mean()),
            "stderr": float(delta.std() / math.sqrt(len(delta))) if len(delta) > 1 else float("nan"),
            "p_improve": float(_bootstrap_p(delta[None], self.n_boot)[0]),
            "acc": float(record_scores(self.combined_ll, self.golds, "acc").mean()),
        }

    def patch(self, model: nn.Module, heads: Mapping[int, Sequence[int]] | None = None) -> SurgeryHandle:
        """Apply ACT with the selected heads (or ``heads``) and the calibration's beta/threshold."""
        heads = self.heads if heads is None else heads
        if not any(heads.values()):
            raise AttnSurgeryError(_NOTHING_KEPT.format(n=len(self.head_ll)))
        return patch(model, "act", heads={k: list(v) for k, v in heads.items() if v}, **self.act_args)

    def summary(self, top: int = 10) -> str:
        rows = self.table()
        kept = [r for r in rows if r.kept]
        lines = [
            f"ACT calibration ({', '.join(f'{k}={v}' for k, v in self.act_args.items())}) on {self.n_records} "
            f"records, metric {self.metric}: baseline {self.baseline_score():.4f} (acc {self.baseline_acc:.3f}); "
            f"{len(rows)} heads swept, {len(kept)} kept ({self.rule_text()})",
        ]
        if rows:
            d = torch.tensor([r.delta for r in rows])
            lines.append(
                f"delta: min {float(d.min()):+.4f}, median {float(d.median()):+.4f}, max {float(d.max()):+.4f}; "
                f"{int((d > 0).sum())} heads > 0, {int((d == 0).sum())} exactly 0 (no sinks found)"
            )
            for r in sorted(rows, key=lambda r: -r.delta)[:top]:
                lines.append(
                    f"  L{r.layer:>2} H{r.head:>2}: delta {r.delta:+.4f}  acc {r.acc:.3f}  p {r.p_improve:.3f}"
                    + ("  kept" if r.kept else "")
                )
        c = self.combined()
        if c:
            lines.append(
                f"kept heads together (selected on these records, so optimistic): delta {c['delta']:+.4f} "
                f"+- {c['stderr']:.4f}, acc {self.baseline_acc:.3f} -> {c['acc']:.3f}, P(delta > 0) {c['p_improve']:.3f}"
            )
        return "\n".join(lines)

    def rule_text(self) -> str:
        """The selection rule in words, with what it lets through by chance."""
        if self.rule == "fdr":
            return (
                f"delta > {self.min_delta:g} and Benjamini-Hochberg over paired z-test p-values at false discovery "
                f"rate {1 - self.confidence:g}"
            )
        return (
            f"delta > {self.min_delta:g}, bootstrap P(delta > 0) >= {self.confidence:g}; "
            f"~{(1 - self.confidence) * len(self.head_ll):.0f} expected by chance if no head helped"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "act_args": self.act_args,
            "metric": self.metric,
            "min_delta": self.min_delta,
            "confidence": self.confidence,
            "rule": self.rule,
            "n_records": self.n_records,
            "baseline": {"score": self.baseline_score(), "acc": self.baseline_acc},
            "heads": {str(k): v for k, v in self.heads.items()},
            "table": [vars(r) for r in self.table()],
            "combined": self.combined(),
            "seconds": self.seconds,
            "fingerprint": self.fingerprint,
        }


_NOTHING_KEPT = (
    "no head passed the selection ({n} swept): ACT with an empty head set is the identity. Loosen the rule "
    "(lower confidence / min_delta), use more calibration records, or try another beta/threshold."
)


SELECTION_RULES = ("bootstrap", "fdr")


def _ztest_p(deltas: torch.Tensor) -> torch.Tensor:
    """(heads,) one-sided p-value of a paired z-test that a head's mean delta is > 0 (1 when it has no spread)."""
    n = deltas.shape[-1]
    se = deltas.std(-1) / math.sqrt(n)
    z = deltas.mean(-1) / se
    p = 0.5 * torch.erfc(z / math.sqrt(2.0))
    return torch.where(se > 0, p, torch.ones_like(p))


def _bh_pass(p: torch.Tensor, q: float) -> torch.Tensor:
    """Benjamini-Hochberg: which p-values are discoveries at false discovery rate ``q``."""
    m = p.numel()
    order = p.argsort()
    below = p[order] <= q * torch.arange(1, m + 1, dtype=p.dtype) / m
    k = int(below.nonzero().max()) + 1 if below.any() else 0
    passed = torch.zeros(m, dtype=torch.bool)
    passed[order[:k]] = True
    return passed


def _check_selection(metric: str, min_delta: float, confidence: float, rule: str = "bootstrap") -> None:
    if rule not in SELECTION_RULES:
        raise AttnSurgeryError(f"unknown selection rule {rule!r}; choose one of {', '.join(SELECTION_RULES)}.")
    if metric not in METRICS:
        raise AttnSurgeryError(f"unknown calibration metric {metric!r}; choose one of {', '.join(METRICS)}.")
    if not 0.0 <= confidence < 1.0:
        raise AttnSurgeryError(
            f"confidence must lie in [0, 1), got {confidence!r} (0 keeps every head with delta > min_delta)."
        )
    if math.isnan(min_delta):
        raise AttnSurgeryError("min_delta is NaN.")


# ----------------------------------------------------------------------------------------------------------
# Resumable state
# ----------------------------------------------------------------------------------------------------------


def _model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Name, shape and a weight checksum: resuming on other weights must be refused, not silently mixed."""
    config = model.config
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        try:
            h.update(f"{float(p.detach().sum(dtype=torch.float64)):.10e}".encode())
        except (RuntimeError, NotImplementedError):  # meta / offloaded tensors: shapes only
            pass
    return {
        "name": str(getattr(config, "_name_or_path", "") or type(model).__name__),
        "model_type": getattr(config, "model_type", None),
        "weights": h.hexdigest()[:16],
    }


class _StateFile:
    """JSON lines: a header with the fingerprint, then the baseline and one line per finished head."""

    def __init__(self, path: str | Path | None, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path) if path is not None else None
        self.baseline: list[list[float]] | None = None
        self.heads: dict[tuple[int, int], list[list[float]]] = {}
        if self.path is None:
            return
        if self.path.is_file() and self.path.stat().st_size > 0:
            self._read(fingerprint)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"type": "header", "version": STATE_VERSION, "fingerprint": fingerprint})

    def _read(self, fingerprint: dict[str, Any]) -> None:
        lines = self.path.read_text().splitlines()
        entries = []
        for i, line in enumerate(lines):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # a write cut short by an interrupt: that head is simply redone
                    break
                raise AttnSurgeryError(
                    f"{self.path}: line {i + 1} is not JSON; the state file is corrupt."
                ) from None
        if not entries or entries[0].get("type") != "header":
            raise AttnSurgeryError(f"{self.path} is not an ACT calibration state file (no header line).")
        saved = entries[0].get("fingerprint", {})
        if saved != fingerprint:
            diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            raise AttnSurgeryError(
                f"{self.path} was written for a different calibration ({', '.join(diff)} differ: saved "
                f"{ {k: saved.get(k) for k in diff} }, now { {k: fingerprint.get(k) for k in diff} }). Resuming "
                "would mix incomparable scores; pass another state path or delete this file."
            )
        for e in entries[1:]:
            if e.get("type") == "baseline":
                self.baseline = e["ll"]
            elif e.get("type") == "head":
                self.heads[(int(e["layer"]), int(e["head"]))] = e["ll"]
        # a truncated last line is rewritten away so later appends start on a fresh line
        good = "".join(json.dumps(e) + "\n" for e in entries)
        if good != self.path.read_text():
            self.path.write_text(good)

    def _append(self, entry: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_baseline(self, ll: list[list[float]]) -> None:
        self.baseline = ll
        self._append({"type": "baseline", "ll": ll})

    def add_head(self, layer: int, head: int, ll: list[list[float]], seconds: float) -> None:
        self.heads[(layer, head)] = ll
        self._append({"type": "head", "layer": layer, "head": head, "ll": ll, "seconds": round(seconds, 3)})


# ----------------------------------------------------------------------------------------------------------
# The fast sweep: cached layer inputs, one single-head ACT per batch copy
# ----------------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted hidden states are captured."""


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, index-aligned with the engine's attention modules (one ModuleList)."""
    info = discover(model)
    for module in info.decoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) == info.num_layers:
            if all(
                any(sub is info.attention[i] for sub in module[i].modules()) for i in range(info.num_layers)
            ):
                return list(module)
    raise UnsupportedModelError(
        f"{type(model).__name__}: the decoder layers are not one ModuleList holding attention layer i at index i, "
        "so the fast sweep cannot cache layer inputs; use fast=False (exact, about twice as slow)."
    )


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextmanager
def _start_at(
    blocks: list[nn.Module], start: int, hidden: torch.Tensor | None, stop_at: int | None
) -> Iterator[dict]:
    """Run a forward from layer ``start``: layers below return their input untouched (their output is replaced
    anyway), layer ``start`` gets ``hidden``; with ``stop_at``, the input of that layer is captured into the
    yielded dict and the pass ends there (raise :class:`_Stop`).

    Exact because a decoder's per-layer inputs besides the hidden states (mask, position embeddings) are built
    before the layer loop from the ids and attention mask, which the caller passes unchanged.
    """
    captured: dict[str, torch.Tensor] = {}
    saved: list[tuple[nn.Module, Any]] = []
    handles = []

    def skip(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _hidden_of(args, kwargs)

    def substitute(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _with_hidden(args, kwargs, hidden)

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = _hidden_of(args, kwargs).detach()
        raise _Stop

    try:
        for block in blocks[:start]:
            # an instance-level forward (accelerate's offload hooks) must come back afterwards, not be deleted
            saved.append((block, block.__dict__.get("forward")))
            block.forward = skip
        if hidden is not None:
            handles.append(blocks[start].register_forward_pre_hook(substitute, with_kwargs=True))
        if stop_at is not None:
            handles.append(blocks[stop_at].register_forward_pre_hook(capture, with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for block, original in saved:
            if original is None:
                del block.forward
            else:
                block.forward = original


_ROW_ACT: type | None = None


def _row_head_act_class() -> type:
    """ACT on one layer at a time with a different single head per batch row (built on first use, so importing
    this module does not import the surgery)."""
    global _ROW_ACT
    if _ROW_ACT is None:
        base = get_surgery_class("act")

        class RowHeadAct(base):  # type: ignore[misc, valid-type]
            """``row_heads`` (rows, H) bool masks the sink set per batch row: copy j of a stacked batch gets ACT
            on its own head only, which is exactly single-head ACT on that copy (detection is per row and head)."""

            def setup(self, model: Any, engine: Any) -> None:
                super().setup(model, engine)
                self.active_layer: int | None = None
                self.row_heads: torch.Tensor | None = None

            def active_stages(self, layer_idx: int) -> frozenset:
                return self.stages if layer_idx == self.active_layer else frozenset()

            def detect(self, call: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                out, lse, sinks = super().detect(call)
                return out, lse, sinks & self.row_heads.to(sinks.device)[:, :, None]

        _ROW_ACT = RowHeadAct
    return _ROW_ACT


# ----------------------------------------------------------------------------------------------------------
# ACT head calibration
# ----------------------------------------------------------------------------------------------------------


def _act_args(beta: float, threshold: float | None, alpha: float | None) -> dict[str, Any]:
    """Validated ACT arguments as a recipe writes them (the effective threshold made explicit)."""
    config = get_surgery_class("act").config_class.from_kwargs(
        "act",
        {k: v for k, v in {"beta": beta, "threshold": threshold, "alpha": alpha}.items() if v is not None},
    )
    if config.alpha is not None:
        return {"beta": config.beta, "alpha": config.alpha}
    return {"beta": config.beta, "threshold": config.absolute_threshold}


def calibrate_act_heads(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    beta: float = 0.4,
    threshold: float | None = None,
    alpha: float | None = None,
    layers: Any = None,
    heads: Any = None,
    fast: bool = True,
    batch_size: int = 16,
    head_batch: int | None = None,
    max_length: int | None = None,
    metric: str = "choice_logprob",
    min_delta: float = 0.0,
    confidence: float = 0.95,
    rule: str = "bootstrap",
    n_boot: int = 2000,
    state_path: str | Path | None = None,
    progress: bool = True,
    data: str | None = None,
) -> CalibrationResult:
    """The ACT paper's offline head sweep: ACT on one (layer, head) at a time, keep the heads that help.

    **Scoring.** Every choice of every record is scored by its summed continuation log-likelihood (lm-eval's
    ``loglikelihood``: context and continuation encoded separately, trailing context whitespace moved to the
    continuation; right-padded batches). The per-record score is ``metric``:

    * ``choice_logprob`` (default): ``log softmax(choice lls)[gold]``, the log-probability the model gives the
      right answer among the choices. Unlike accuracy it moves when a head shifts confidence without flipping an
      argmax, so on ~50 records it separates helpful from harmful heads where accuracy deltas are mostly 0 or
      +-1/50; it is a proper scoring rule, so it cannot be gamed by overconfidence, and a gain in it is a gain in
      the probability of the gold answer, which is what accuracy thresholds. Accuracy is reported beside it.
    * ``acc`` (the paper's criterion) and ``margin`` (``ll[gold] - max other``) are available.

    **Selection.** A head is kept when its mean per-record delta over the baseline exceeds ``min_delta`` *and* a
    paired bootstrap over records (``n_boot`` resamples, fixed seed) finds a positive mean delta in at least
    ``confidence`` of resamples. Sweeping 270 heads, ~(1 - confidence) x heads pass by chance even if none helps
    (the summary prints that number); the paper's rule (any accuracy gain) has no such guard. ``rule="fdr"``
    controls the false discovery rate over all swept heads instead (Benjamini-Hochberg at ``1 - confidence``).
    Re-select without rerunning via ``result.select(...)``; :meth:`CalibrationResult.score_selection` scores the
    kept heads together.

    **ACT detection** uses every query token of the input, including the choice tokens, so each choice sees a
    slightly different sink set: the paper's behaviour (it scores prompts in one forward). Inputs are fed
    without their last token, as lm-eval does.

    **Fast mode** (default) is exact, not an approximation: ACT on layer ``l`` leaves layers below ``l``
    untouched, so the hidden states entering layer ``l`` are computed once per batch and only layers ``l..L-1``
    run per head; and the batch is stacked once per head of the layer with copy ``j`` applying ACT on head ``j``
    only. The first batch of each layer carries one extra copy with no ACT, checked against the baseline, so a
    decoder the cache shortcut does not fit fails loudly instead of scoring wrongly. ``fast=False`` patches one
    head at a time and runs the full model (the reference procedure; same scores to float rounding).

    **Resuming.** With ``state_path`` the baseline and every finished head are appended to a JSON-lines file as
    they finish; running again with the same model weights, data, tokenizer and ACT arguments skips them, and a
    different fingerprint is refused. ``layers``/``heads`` may differ between runs (the sweep just grows).

    ``layers``/``heads`` choose the heads to sweep with the usual targeting (the paper sweeps layers 2..30 of 32:
    ``layers="2:-1"``); ``beta``/``threshold``/``alpha`` are ACT's own (validated like ``patch``). ``batch_size``
    sequences per forward; ``head_batch`` heads stacked per forward in fast mode (default: all heads of a layer).
    The model is scored as it is: surgeries already on it stay active during the sweep.
    """
    started = time.perf_counter()
    act_args = _act_args(beta, threshold, alpha)
    _check_selection(metric, min_delta, confidence, rule)
    check_choice_records(records)
    info = discover(model)
    targets: LayerHeads = resolve_targets(layers, heads, info.num_layers, info.num_heads)
    pairs = [
        (layer, h)
        for layer in sorted(targets.layers)
        for h in (targets.heads_of(layer) or range(info.num_heads))
    ]
    if not pairs:
        raise AttnSurgeryError(f"layers={layers!r}, heads={heads!r} select no head to calibrate.")
    if head_batch is not None and head_batch < 1:
        raise AttnSurgeryError(f"head_batch must be at least 1, got {head_batch}.")
    scorer = ChoiceScorer(tokenizer, records, batch_size, max_length)
    fingerprint = {
        "model": _model_fingerprint(model),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "data": scorer.digest(),
        "n_records": scorer.n_records,
        "act": act_args,
    }
    state = _StateFile(state_path, fingerprint)
    todo = [p for p in pairs if p not in state.heads]

    from tqdm import tqdm

    bar = tqdm(
        total=len(todo) + (state.baseline is None),
        disable=not progress or not todo and state.baseline is not None,
        desc="ACT calibration",
        unit="head",
        bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} heads [{elapsed}<{remaining}{postfix}]",
    )
    was_training = model.training
    model.eval()
    try:
        if state.baseline is None:
            bar.set_description("ACT calibration: baseline")
            state.add_baseline(scorer.per_record(_run_plain(model, scorer, bar.update)))
        base_scores = record_scores(state.baseline, scorer.golds, metric)
        best = [-math.inf]

        def done(layer: int, head: int, values: torch.Tensor, seconds: float) -> None:
            ll = scorer.per_record(values)
            state.add_head(layer, head, ll, seconds)
            delta = float((record_scores(ll, scorer.golds, metric) - base_scores).mean())
            if delta > best[0]:
                best[0] = delta
                bar.set_postfix_str(f"best L{layer} H{head} {delta:+.4f}", refresh=False)

        if todo:
            sweep = _sweep_fast if fast else _sweep_slow
            sweep(model, scorer, todo, act_args, head_batch or info.num_heads, state.baseline, bar, done)
    finally:
        bar.close()
        model.train(was_training)
    return CalibrationResult(
        act_args=act_args,
        num_layers=info.num_layers,
        num_heads=info.num_heads,
        golds=scorer.golds,
        baseline_ll=state.baseline,
        head_ll={p: state.heads[p] for p in pairs},
        metric=metric,
        min_delta=min_delta,
        confidence=confidence,
        rule=rule,
        n_boot=n_boot,
        model_name=fingerprint["model"]["name"],
        data=data,
        fast=fast,
        seconds=time.perf_counter() - started,
        fingerprint=fingerprint,
    )


def _sweep_slow(
    model: nn.Module,
    scorer: ChoiceScorer,
    todo: list[tuple[int, int]],
    act_args: dict[str, Any],
    head_batch: int,
    baseline: list[list[float]],
    bar: Any,
    done: Callable[[int, int, torch.Tensor, float], None],
) -> None:
    for layer, head in todo:
        bar.set_description(f"ACT calibration: L{layer} H{head}")
        t0 = time.perf_counter()
        with patch(model, "act", layers=[layer], heads={layer: [head]}, **act_args):
            values = _run_plain(model, scorer, bar.update)
        done(layer, head, values, time.perf_counter() - t0)


def _sweep_fast(
    model: nn.Module,
    scorer: ChoiceScorer,
    todo: list[tuple[int, int]],
    act_args: dict[str, Any],
    head_batch: int,
    baseline: list[list[float]],
    bar: Any,
    done: Callable[[int, int, torch.Tensor, float], None],
) -> None:
    blocks = _decoder_blocks(model)
    engine = Engine.of(model)
    info = engine.info
    by_layer: dict[int, list[int]] = {}
    for layer, head in todo:
        by_layer.setdefault(layer, []).append(head)
    cls = _row_head_act_class()
    surgery = cls(
        cls.config_class.from_kwargs("act", act_args),
        resolve_targets(sorted(by_layer), None, info.num_layers, info.num_heads),
    )
    engine.add(surgery)
    base = torch.tensor([x for rec in baseline for x in rec], dtype=torch.float64)
    gather = _HeadGather(model)
    device = _device(model)
    batches = [b.to(device) for b in scorer.batches]
    cache: list[torch.Tensor] = []
    at: int | None = None  # layer whose input the cache holds
    try:
        with torch.no_grad(), gather.installed():
            for layer in sorted(by_layer):
                bar.set_description(f"ACT calibration: layer {layer}")
                t0 = time.perf_counter()
                surgery.active_layer = None
                engine.refresh()  # idle: stock kernels while the cache moves to this layer's input
                for i, batch in enumerate(batches):
                    start = 0 if at is None else at
                    with _start_at(blocks, start, None if at is None else cache[i], layer) as captured:
                        try:
                            model(
                                input_ids=batch.input_ids,
                                attention_mask=batch.attention_mask,
                                use_cache=False,
                            )
                        except _Stop:
                            pass
                    if "hidden" not in captured:
                        raise UnsupportedModelError(
                            f"{type(model).__name__}: decoder layer {layer} was never called with hidden states; "
                            "use fast=False."
                        )
                    if at is None:
                        cache.append(captured["hidden"])
                    else:
                        cache[i] = captured["hidden"]
                at = layer
                surgery.active_layer = layer
                engine.refresh()
                heads = by_layer[layer]
                results = {h: torch.zeros(len(scorer.sequences), dtype=torch.float64) for h in heads}
                for i, batch in enumerate(batches):
                    for g in range(0, len(heads), head_batch):
                        group: list[int | None] = list(heads[g : g + head_batch])
                        check = i == 0 and g == 0
                        if check:
                            group.append(None)  # a copy without ACT: must reproduce the baseline
                        rows = batch.input_ids.shape[0]
                        mask = torch.zeros(len(group), info.num_heads, dtype=torch.bool)
                        for j, h in enumerate(group):
                            if h is not None:
                                mask[j, h] = True
                        surgery.row_heads = mask.repeat_interleave(rows, 0).to(device)
                        hidden = cache[i].repeat(len(group), *([1] * (cache[i].dim() - 1)))
                        with _start_at(blocks, layer, hidden, None):
                            values = _continuation_ll(model, gather, batch, copies=len(group))
                        values = values.view(len(group), rows)
                        for j, h in enumerate(group):
                            if h is not None:
                                results[h][batch.seq_index] = values[j]
                        if check:
                            _check_fast(values[-1], base[batch.seq_index], layer, model)
                        bar.update((len(group) - check) / len(batches))
                seconds = (time.perf_counter() - t0) / len(heads)
                for h in heads:
                    done(layer, h, results[h], seconds)
    finally:
        engine.remove(surgery)


def _check_fast(got: torch.Tensor, want: torch.Tensor, layer: int, model: nn.Module) -> None:
    # float32 noise from a different batch shape and ACT's tiled kernel is ~1e-5 per sequence; a decoder whose
    # layers depend on more than the hidden states (extra per-layer state) is off by whole nats
    err = float((got - want).abs().max())
    if err > 1e-3 + 1e-4 * float(want.abs().max()):
        raise UnsupportedModelError(
            f"{type(model).__name__}: the fast sweep's no-ACT copy differs from the baseline by {err:.2e} nats at "
            f"layer {layer}, so this decoder's layers depend on more than the cached hidden states; use fast=False."
        )


# ----------------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------------


def _dump_recipe(data: dict[str, Any], path: str | Path) -> Path:
    import yaml

    path = Path(path)
    parse_recipe(data, str(path), path.parent)  # never write a recipe that would not load
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110))
    return path


def write_act_recipe(
    result: CalibrationResult,
    path: str | Path,
    model_alias: str,
    *,
    name: str | None = None,
    description: str | None = None,
    data: str | None = None,
    notes: str | None = None,
    eval_tasks: Sequence[str] | None = None,
    heads: Mapping[int, Sequence[int]] | None = None,
) -> Path:
    """Write an ``act`` recipe (the schema of ``recipes/act/llama2-7b-chat.yaml``) for the selected heads.

    ``calibration:`` records the data, record count, metric, selection rule, the baseline and each swept head's
    delta (``scores: {layer: [delta per head]}``, null for heads not swept). Loads with
    ``patch(model, path)`` / ``find_recipe``; save it as ``recipes/act/<model_alias>.yaml`` to ship it (then
    ``patch(model, "act")`` picks it for that model alias via ``find_recipe("act", model=...)``).
    """
    heads = {
        int(k): sorted(int(h) for h in v) for k, v in (result.heads if heads is None else heads).items() if v
    }
    if not heads:
        raise AttnSurgeryError(_NOTHING_KEPT.format(n=len(result.head_ll)))
    table = result.table()
    scores: dict[int, list[float | None]] = {}
    for row in table:
        scores.setdefault(row.layer, [None] * result.num_heads)[row.head] = round(row.delta, 5)
    n_pairs = sum(len(v) for v in heads.values())
    data_name = data or result.data or "unspecified"
    recipe: dict[str, Any] = {
        "name": name or f"act/{model_alias}",
        "description": description
        or f"ACT on {model_alias} with {n_pairs} calibrated heads (layers {_compact(sorted(heads))}), "
        + ", ".join(f"{k} {v:g}" for k, v in result.act_args.items())
        + ".",
        "model": model_alias,
        "surgeries": [
            {"surgery": "act", "args": dict(result.act_args), "layers": sorted(heads), "heads": heads}
        ],
        "calibration": {
            "data": data_name,
            "n": result.n_records,
            "metric": result.metric,
            "selection": {
                "rule": (
                    "mean delta > min_delta and Benjamini-Hochberg (paired z-test p-values) at FDR 1 - confidence"
                    if result.rule == "fdr"
                    else "mean delta > min_delta and paired-bootstrap P(mean delta > 0) >= confidence"
                ),
                "min_delta": result.min_delta,
                "confidence": result.confidence,
                "n_boot": result.n_boot,
            },
            "baseline": {"score": round(result.baseline_score(), 5), "acc": round(result.baseline_acc, 5)},
            "swept": len(table),
            "kept": n_pairs,
            "scores": scores,
        },
    }
    c = result.combined()
    if c and result.combined_heads == heads:
        recipe["calibration"]["together"] = {
            k: round(c[k], 5) for k in ("score", "delta", "stderr", "p_improve", "acc")
        }
    if eval_tasks:
        recipe["eval"] = {"tasks": list(eval_tasks)}
    recipe["notes"] = notes or (
        f"Heads from `attnsurgery calibrate act` on {data_name} ({result.n_records} records): ACT on one head at "
        f"a time, per-record {result.metric} delta over the unpatched model; `scores` lists every swept head's "
        "mean delta (per layer, by head index)."
    )
    return _dump_recipe(recipe, path)


# ----------------------------------------------------------------------------------------------------------
# Temperature fitting
# ----------------------------------------------------------------------------------------------------------


def _texts(items: Sequence[Any], what: str) -> list[str]:
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


def text_windows(tokenizer: Any, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """(N, seq_len) token windows: texts joined with EOS and cut into consecutive windows (the remainder is
    dropped unless no full window exists). The tokenizer's default prefix (BOS) starts every window, since
    models that expect it score text without it badly."""
    prefix = _special_prefix(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in texts:
        stream += _encode(tokenizer, text) + ([eos] if eos is not None else [])
    body = seq_len - len(prefix)
    n = len(stream) // body
    if n == 0:
        if len(stream) < 2:
            raise AttnSurgeryError("the calibration text tokenises to fewer than two tokens.")
        return torch.tensor([prefix + stream])
    return torch.tensor([prefix + stream[i * body : (i + 1) * body] for i in range(n)])


def _mean_nll(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token NLL over the windows."""
    total, count = 0.0, 0
    device = _device(model)
    with torch.no_grad():
        for s in range(0, len(windows), batch_size):
            ids = windows[s : s + batch_size].to(device)
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * n
            count += n
    return total / count


@dataclass
class FitResult:
    """Fitted Selective-Attention position coefficients and what they do to held-out perplexity.

    ``coef`` is what ships (the best table on the validation windows, or zeros, the identity, if no table beat
    the identity there); ``fitted_coef`` is the table at the last step, shipped or not, with its held-out loss in
    ``heldout_loss_fitted``.
    """

    coef: torch.Tensor  # (L, H)
    fitted_coef: torch.Tensor  # (L, H)
    per: str
    layers: list[int]
    seq_len: int
    steps: int  # optimiser steps run
    lr: float
    train_loss: list[float]  # per step
    val_history: list[tuple[int, float]]  # (step, validation NLL)
    identity_val_loss: float
    best_val_loss: float
    heldout_loss_before: float  # identity
    heldout_loss_after: float  # with ``coef``
    heldout_loss_fitted: float  # with ``fitted_coef`` (the last step's table)
    n_train_windows: int
    n_val_windows: int
    n_heldout_windows: int
    seconds: float
    data: str | None = None

    @property
    def improved(self) -> bool:
        """Whether the fit beat the identity on the validation windows (so ``coef`` is not all zeros)."""
        return self.best_val_loss < self.identity_val_loss

    @property
    def heldout_ppl_before(self) -> float:
        return math.exp(self.heldout_loss_before)

    @property
    def heldout_ppl_after(self) -> float:
        return math.exp(self.heldout_loss_after)

    @property
    def heldout_worse(self) -> bool:
        """The shipped table makes held-out loss worse than the identity (reported, never hidden)."""
        return self.heldout_loss_after > self.heldout_loss_before

    def apply(self, model: nn.Module) -> SurgeryHandle:
        """Patch ``model`` with the shipped table (a plain, non-trainable ``temperature`` surgery)."""
        handle = patch(model, "temperature", layers=self.layers)
        surgery = handle.surgeries[0]
        with torch.no_grad():
            surgery.coef.copy_(self.coef.to(surgery.coef))
        Engine.of(model).refresh()  # the loaded table switches layers on
        return handle

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        """``save_surgery`` of the shipped table; ``load_surgery(model, directory)`` restores it exactly."""
        with self.apply(model) as handle:
            return save_surgery(handle, directory)

    def summary(self) -> str:
        c = self.coef[self.layers]
        verdict = (
            "" if self.improved else " (no table beat the identity on validation: shipping the identity)"
        )
        worse = " WORSE than identity on held-out text" if self.heldout_worse else ""
        return (
            f"temperature fit ({self.per}, {len(self.layers)} layers, seq_len {self.seq_len}, {self.steps} steps, "
            f"{self.seconds:.0f}s): held-out ppl {self.heldout_ppl_before:.4f} -> {self.heldout_ppl_after:.4f}"
            f"{worse} ({self.n_heldout_windows} windows); validation NLL {self.identity_val_loss:.5f} -> "
            f"{self.best_val_loss:.5f}{verdict}; c in [{float(c.min()):.4f}, {float(c.max()):.4f}], "
            f"mean {float(c.mean()):.4f}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "per": self.per,
            "layers": self.layers,
            "seq_len": self.seq_len,
            "steps": self.steps,
            "lr": self.lr,
            "improved": self.improved,
            "heldout": {
                "loss_before": self.heldout_loss_before,
                "loss_after": self.heldout_loss_after,
                "ppl_before": self.heldout_ppl_before,
                "ppl_after": self.heldout_ppl_after,
                "loss_fitted": self.heldout_loss_fitted,
                "windows": self.n_heldout_windows,
            },
            "validation": {
                "identity": self.identity_val_loss,
                "best": self.best_val_loss,
                "history": self.val_history,
            },
            "coef": self.coef.tolist(),
            "seconds": self.seconds,
        }


def fit_temperature(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[Any],
    *,
    per: str = "layer",
    steps: int = 200,
    lr: float = 0.01,
    seq_len: int = 256,
    batch_size: int = 1,
    layers: Any = None,
    heldout_texts: Sequence[Any] | None = None,
    heldout_fraction: float = 0.2,
    val_fraction: float = 0.1,
    max_val_windows: int = 32,
    eval_every: int = 25,
    patience: int = 3,
    min_c: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    data: str | None = None,
) -> FitResult:
    """Fit the Selective-Attention position coefficients ``c`` of ``temperature`` (``logits_i *= 1 + c log n_i``).

    Only ``c`` is trained (``per="layer"``: one scalar per layer shared by its heads, the reference code's
    choice; ``per="head"``: one per head); every model weight has ``requires_grad=False`` during the fit (flags
    restored after). Adam on next-token loss over random ``seq_len`` windows of ``texts`` (joined with EOS), from
    the identity ``c = 0`` (``batch_size`` windows per step in shuffled epochs; all of them when it is at least
    the number of training windows), projected onto ``c >= min_c`` (0: the paper's range, attention only sharpens with
    position; a negative bound lets it flatten, and must keep ``1 + c log n > 0`` up to the model's
    ``max_position_embeddings``). Every ``eval_every`` steps the loss on held-back validation windows (the last ``val_fraction``
    of the training windows, at most ``max_val_windows``) is measured; the best table is kept and the fit stops after ``patience`` evaluations
    without improvement. If no table beats the identity on validation, the identity ships (``result.improved``
    is False).

    Held-out perplexity before/after is measured on ``heldout_texts`` or, if None, on the last
    ``heldout_fraction`` of ``texts`` (split by text, never used for training or selection). The model is left
    unpatched; apply the result with ``result.apply(model)``, save it with ``result.save(model, dir)`` or
    :func:`write_temperature_recipe`.
    """
    started = time.perf_counter()
    if per not in ("layer", "head"):
        raise AttnSurgeryError(f"per must be 'layer' or 'head', got {per!r}.")
    for label, value, ok in (
        ("steps", steps, isinstance(steps, int) and steps >= 1),
        ("lr", lr, isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)),
        ("seq_len", seq_len, isinstance(seq_len, int) and seq_len >= 8),
        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
        ("eval_every", eval_every, isinstance(eval_every, int) and eval_every >= 1),
        ("patience", patience, isinstance(patience, int) and patience >= 1),
        ("heldout_fraction", heldout_fraction, 0 < heldout_fraction < 1),
        ("val_fraction", val_fraction, 0 < val_fraction < 1),
        ("max_val_windows", max_val_windows, isinstance(max_val_windows, int) and max_val_windows >= 1),
        ("min_c", min_c, math.isfinite(min_c)),
    ):
        if not ok:
            raise SurgeryConfigError(f"fit_temperature: {label}={value!r} is out of range.")
    train_texts = _texts(texts, "text")
    if heldout_texts is None:
        if len(train_texts) < 2:
            raise AttnSurgeryError(
                "need at least two texts to hold some out for perplexity, or pass heldout_texts explicitly."
            )
        n_held = max(1, round(heldout_fraction * len(train_texts)))
        train_texts, held = train_texts[:-n_held], train_texts[-n_held:]
    else:
        held = _texts(heldout_texts, "held-out text")
    if not train_texts or not held:
        raise AttnSurgeryError("fit_temperature needs non-empty training and held-out texts.")
    overlap = set(train_texts) & set(held)
    if overlap:
        raise AttnSurgeryError(
            f"{len(overlap)} held-out text(s) also appear in the training texts; held-out perplexity must be "
            "measured on unseen text."
        )
    windows = text_windows(tokenizer, train_texts, seq_len)
    heldout = text_windows(tokenizer, held, seq_len)
    if len(windows) < 2:
        raise AttnSurgeryError(
            f"the training text gives {len(windows)} window of {seq_len} tokens; need at least 2 (one for "
            "validation). Give more text or a shorter seq_len."
        )
    # validation compares tables on the same windows (paired), so a few dozen suffice and keep evaluations cheap
    n_val = min(max_val_windows, max(1, round(val_fraction * len(windows))))
    train, val = windows[:-n_val], windows[-n_val:]

    info = discover(model)
    # c < 0 flattens attention with position; below -1/log(n) the factor 1 + c log n reaches 0 and then flips the
    # sign of the logits, so the bound must keep it positive over the whole context the model supports
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if min_c < 0 and isinstance(max_pos, int) and max_pos > 1 and 1 + min_c * math.log(max_pos) <= 0:
        raise SurgeryConfigError(
            f"fit_temperature: min_c={min_c} lets 1 + c log(n) reach 0 within the model's {max_pos} positions "
            f"(attention would invert); use min_c > {-1 / math.log(max_pos):.4f}."
        )
    handle = patch(model, "temperature", layers=layers, trainable=True)
    surgery = handle.surgeries[0]
    coef: nn.Parameter = surgery.coef
    targeted = torch.stack([surgery.targets.head_mask(i) for i in range(info.num_layers)]).to(coef.device)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    from tqdm import tqdm

    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        model.eval()  # no dropout: the loss the coefficients see is the one inference sees
        identity_val = _mean_nll(model, val, batch_size)
        before = _mean_nll(model, heldout, batch_size)
        best_val, best = identity_val, torch.zeros_like(coef.detach())
        history: list[tuple[int, float]] = [(0, identity_val)]
        losses: list[float] = []
        optimiser = torch.optim.Adam([coef], lr=lr)
        g = torch.Generator().manual_seed(seed)
        device = _device(model)
        stale = 0
        bar = tqdm(range(1, steps + 1), disable=not progress, desc="temperature fit", unit="step")
        step = 0
        queue: list[int] = []
        for step in bar:
            if batch_size >= len(train):  # full batch: every step sees the whole training objective
                ids = train.to(device)
            else:  # shuffled epochs: every window is seen once before any is seen twice
                if len(queue) < batch_size:
                    queue += torch.randperm(len(train), generator=g).tolist()
                ids, queue = train[queue[:batch_size]].to(device), queue[batch_size:]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                grad = coef.grad * targeted
                if per == "layer":  # one scalar per layer: the heads' gradients sum, and the heads stay tied
                    grad = grad.sum(-1, keepdim=True).expand_as(grad) * targeted
                coef.grad = grad.contiguous()
            optimiser.step()
            with torch.no_grad():
                coef.clamp_(min=min_c).mul_(targeted)
            losses.append(float(loss.detach()))
            if step % eval_every == 0 or step == steps:
                v = _mean_nll(model, val, batch_size)
                history.append((step, v))
                if v < best_val:
                    best_val, best, stale = v, coef.detach().clone(), 0
                else:
                    stale += 1
                bar.set_postfix_str(f"val {v:.4f} (identity {identity_val:.4f})", refresh=False)
                if stale >= patience:
                    break
        bar.close()
        final = coef.detach().clone()
        final_heldout = _mean_nll(model, heldout, batch_size) if final.any() else before
        improved = best_val < identity_val
        if improved and not torch.equal(best, final):
            with torch.no_grad():
                coef.copy_(best)
            after = _mean_nll(model, heldout, batch_size)
        else:
            after = final_heldout if improved else before
    finally:
        handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return FitResult(
        coef=best.float().cpu() if improved else torch.zeros_like(best).float().cpu(),
        fitted_coef=final.float().cpu(),
        per=per,
        layers=sorted(surgery.targets.layers),
        seq_len=seq_len,
        steps=step,
        lr=lr,
        train_loss=losses,
        val_history=history,
        identity_val_loss=identity_val,
        best_val_loss=best_val,
        heldout_loss_before=before,
        heldout_loss_after=after,
        heldout_loss_fitted=final_heldout,
        n_train_windows=len(train),
        n_val_windows=len(val),
        n_heldout_windows=len(heldout),
        seconds=time.perf_counter() - started,
        data=data,
    )


def write_temperature_recipe(
    result: FitResult,
    path: str | Path,
    model_alias: str,
    *,
    name: str | None = None,
    description: str | None = None,
    data: str | None = None,
    notes: str | None = None,
    force: bool = False,
) -> Path:
    """Write a ``temperature`` recipe plus its ``state:`` file (``<path stem>.safetensors`` beside it).

    Refuses (unless ``force``) when the shipped table is the identity or makes held-out perplexity worse than
    the identity: such a recipe would only mislead.
    """
    from safetensors.torch import save_file

    if not force and not result.improved:
        raise AttnSurgeryError(
            "the fit did not beat the identity on validation text, so there is no table worth shipping "
            f"({result.summary()}); pass force=True to write it anyway."
        )
    if not force and result.heldout_worse:
        raise AttnSurgeryError(
            f"the fitted table makes held-out perplexity worse ({result.heldout_ppl_before:.4f} -> "
            f"{result.heldout_ppl_after:.4f}); not writing it (force=True overrides)."
        )
    path = Path(path)
    state = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    coef = result.coef.float().contiguous()
    save_file({"inv_tau": torch.ones_like(coef), "coef": coef}, str(state), metadata={"format": "pt"})
    c = coef[result.layers]
    recipe = {
        "name": name or f"temperature/{model_alias}",
        "description": description
        or f"Selective Attention position temperature fitted on {model_alias} ({result.per}-wise c, "
        f"layers {_compact(result.layers)}): held-out ppl {result.heldout_ppl_before:.3f} -> "
        f"{result.heldout_ppl_after:.3f}.",
        "model": model_alias,
        "surgeries": [{"surgery": "temperature", "layers": list(result.layers), "state": state.name}],
        "calibration": {
            "data": data or result.data or "unspecified",
            "per": result.per,
            "seq_len": result.seq_len,
            "steps": result.steps,
            "lr": result.lr,
            "train_windows": result.n_train_windows,
            "validation": {
                "identity_nll": round(result.identity_val_loss, 5),
                "nll": round(result.best_val_loss, 5),
            },
            "heldout": {
                "windows": result.n_heldout_windows,
                "ppl_before": round(result.heldout_ppl_before, 4),
                "ppl_after": round(result.heldout_ppl_after, 4),
            },
            "c": {
                "min": round(float(c.min()), 6),
                "max": round(float(c.max()), 6),
                "mean": round(float(c.mean()), 6),
            },
        },
        "notes": notes
        or "Fitted by `attnsurgery calibrate temperature`: c (logits_i *= 1 + c log n_i) trained on next-token loss "
        "with all model weights frozen; the (layers, heads) table is the state file.",
    }
    return _dump_recipe(recipe, path)


# ----------------------------------------------------------------------------------------------------------
# Command-line helpers (``attnsurgery calibrate act|temperature``)
# ----------------------------------------------------------------------------------------------------------
