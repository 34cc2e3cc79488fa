"""ACT head selection: per-head scores of a sweep, the statistical rules that keep a head, and a heatmap.

:class:`CalibrationResult` keeps every swept head's choice log-likelihoods per record, so :meth:`~CalibrationResult.
select` can re-rank with another metric or rule without running the model again. ``rule="bootstrap"`` keeps a head
whose paired bootstrap P(mean delta > 0) reaches ``confidence``; ``rule="fdr"`` holds the false discovery rate over
all swept heads at ``1 - confidence`` (Benjamini-Hochberg on paired z-test p-values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnsurgery.api import SurgeryHandle, patch
from attnsurgery.errors import AttnSurgeryError
from attnsurgery.eval.report import save_figure
from attnsurgery.eval.scoring import METRICS, record_scores, score_choices


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
        check_selection(metric, min_delta, confidence, rule)
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
            raise AttnSurgeryError(NOTHING_KEPT.format(n=len(self.head_ll)))
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


NOTHING_KEPT = (
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


def check_selection(metric: str, min_delta: float, confidence: float, rule: str = "bootstrap") -> None:
    if rule not in SELECTION_RULES:
        raise AttnSurgeryError(
            f"unknown selection rule {rule!r}; choose one of {', '.join(SELECTION_RULES)}."
        )
    if metric not in METRICS:
        raise AttnSurgeryError(f"unknown calibration metric {metric!r}; choose one of {', '.join(METRICS)}.")
    if not 0.0 <= confidence < 1.0:
        raise AttnSurgeryError(
            f"confidence must lie in [0, 1), got {confidence!r} (0 keeps every head with delta > min_delta)."
        )
    if math.isnan(min_delta):
        raise AttnSurgeryError("min_delta is NaN.")


def plot_head_sweep(result: CalibrationResult, out: str | Path, label: str = "") -> Path:
    """Heatmap of an ACT head sweep: each swept (layer, head)'s mean delta, kept heads boxed, unswept blank.

    ``result`` is a :class:`CalibrationResult`. The colour scale is symmetric around 0
    (red helps, blue hurts), so noise looks like a speckle of both colours and a real effect stands out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = result.table()
    if not rows:
        raise ValueError("the sweep has no scored heads to plot.")
    layers = sorted({r.layer for r in rows})
    grid = torch.full((len(layers), result.num_heads), float("nan"))
    for r in rows:
        grid[layers.index(r.layer), r.head] = r.delta
    limit = float(grid.nan_to_num(0).abs().max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 0.45 * result.num_heads), 1.6 + 0.28 * len(layers)))
    image = ax.imshow(grid.numpy(), cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
    for r in rows:
        if r.kept:
            ax.add_patch(
                Rectangle((r.head - 0.5, layers.index(r.layer) - 0.5), 1, 1, fill=False, lw=1.8, ec="black")
            )
    ax.set_xticks(range(result.num_heads))
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label=f"mean delta {result.metric}")
    kept = sum(r.kept for r in rows)
    ax.set_title(
        f"{label + ': ' if label else ''}ACT head sweep on {result.n_records} records\n"
        f"{kept}/{len(rows)} heads kept (boxed; rule {result.rule})",
        fontsize=9,
    )
    return save_figure(fig, out, dpi=120)
