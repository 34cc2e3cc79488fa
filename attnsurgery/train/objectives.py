"""Training objectives: what the trainer minimises, as a weighted sum of terms from one table, :data:`TERMS`.

* ``lm`` — next-token cross-entropy of the patched model.
* ``kd`` — KL(teacher || student) over the vocabulary, per token, where the teacher is the *same model with its
  surgeries switched off* (:meth:`Engine.disabled`, under ``no_grad``): no second copy in memory.
* ``transfer`` — per-layer MSE between the patched and the unpatched attention outputs, each layer fed the
  teacher's inputs (LoLCATs' attention transfer; Hedgehog's stage 1). Only layers a surgery acts on count.
* ``sink`` — the patched model's first-token (attention-sink) share, mean over layers >= 2, as the outlier tables
  report it, with gradients (:mod:`attnsurgery.train.sink`): a penalty that moves attention off the first token.
* ``outlier`` — mean over decoder layers of ``log(max|x| / rms(x))`` of the residual stream
  (:mod:`attnsurgery.train.outlier`): a penalty on the activation outliers a static 8-bit quantiser suffers from.

Weights: ``"lm"``, ``"kd"``, ``"lm+kd"``, ``"0.5*lm+kd"``, ``"1000*transfer"``, ``"kd+0.5*sink"``, ``"kd+sink+0.1*outlier"``. Surgery regularisers
(:meth:`Surgery.regularizer`, e.g. MoH's load balance) are always added.

A term is a row of :data:`TERMS`: which passes it needs (the teacher's logits, the teacher's attention inputs and
outputs, the student's forward) and a function of one step's :class:`StepOutputs`. The trainer runs each pass at
most once per step, whatever the mix, so ``kd+sink+0.1*outlier`` costs one teacher and one student forward.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import AttnSurgeryError, did_you_mean

_TERM = re.compile(r"^\s*(?:(\d+(?:\.\d*)?(?:e-?\d+)?)\s*\*\s*)?([a-z_]+)\s*$")


@dataclass
class StepOutputs:
    """What one training step's passes produced, for the terms to read."""

    student: Any = None  # the student's ModelOutput (``loss`` is set when a term asked for labels)
    teacher_logits: Any = None  # (B, T, V), no gradient
    transfer: Any = None  # a callable: the per-layer attention-transfer MSE (see the trainer)
    sink_share: Any = None  # the first-token share the sink probe read during the student pass, or None
    crest: Any = None  # the residual crest factor the outlier reader took during the student pass, or None
    kd_temperature: float = 1.0


@dataclass(frozen=True)
class Term:
    name: str
    compute: Callable[[StepOutputs], Any]
    teacher_logits: bool = False  # the unpatched model's logits (one no-grad pass)
    teacher_attention: bool = False  # the unpatched attention layers' inputs and outputs (same pass)
    student: bool = True  # the patched model's forward with gradients
    labels: bool = False  # the student pass computes the lm loss


def _zero_if_none(value: Any, out: StepOutputs) -> Any:
    return value if value is not None else out.student.logits.new_zeros(())


TERMS: dict[str, Term] = {
    t.name: t
    for t in (
        Term("lm", lambda o: o.student.loss, labels=True),
        Term(
            "kd", lambda o: kd_loss(o.student.logits, o.teacher_logits, o.kd_temperature), teacher_logits=True
        ),
        Term("transfer", lambda o: o.transfer(), teacher_attention=True, student=False),
        Term("sink", lambda o: _zero_if_none(o.sink_share, o)),
        Term("outlier", lambda o: _zero_if_none(o.crest, o)),
    )
}
OBJECTIVES = tuple(TERMS)


class ObjectiveError(AttnSurgeryError):
    """An objective string that does not parse or names an unknown objective."""


def parse_objective(text: str) -> dict[str, float]:
    """``"0.5*lm+kd"`` -> ``{"lm": 0.5, "kd": 1.0}``; unknown names get a did-you-mean."""
    weights: dict[str, float] = {}
    for term in str(text).split("+"):
        match = _TERM.match(term)
        if not match:
            raise ObjectiveError(
                f"cannot parse objective term {term.strip()!r} in {text!r}; write e.g. 'lm', 'kd', '0.5*lm+kd'."
            )
        weight, name = float(match.group(1) or 1.0), match.group(2)
        if name not in OBJECTIVES:
            raise ObjectiveError(
                f"unknown objective {name!r}.{did_you_mean(name, OBJECTIVES)} Objectives: {', '.join(OBJECTIVES)}."
            )
        if weight <= 0:
            raise ObjectiveError(f"objective weight of {name!r} must be positive, got {weight}.")
        weights[name] = weights.get(name, 0.0) + weight
    return weights


# -- kd, fused ----------------------------------------------------------------------------------------------------
# KL(softmax(t) || softmax(s)) per row = sum_v p_v (t_v - s_v) - (logsumexp(t) - logsumexp(s)), p = softmax(t); its
# gradient in s is softmax(s) - p. Written out, over SmolLM2's 49,152-word vocabulary and 1,024 tokens a step, the
# textbook form (two log_softmax, exp, subtract, multiply, sum, and their backward) makes ~10 passes over a
# 50M-element tensor; this form makes three forward (logsumexp, t - s, one row-wise dot) and keeps no log-probability
# tensor for autograd (the student logits are kept anyway). Written with t - s rather than as entropy minus cross
# entropy, it is exactly 0 when the student equals the teacher, and accurate near it, where those two would cancel.
class _KLToTeacher:
    """Lazily built autograd.Function (torch imported on first use, so parsing objectives stays light)."""

    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            import torch

            class KLToTeacher(torch.autograd.Function):
                @staticmethod
                def forward(ctx, student, teacher, probs, teacher_lse):  # (N, V), (N, V), (N, V), (N,)
                    lse = torch.logsumexp(student, dim=-1)  # (N,)
                    gap = torch.bmm(probs[:, None, :], (teacher - student)[:, :, None])[
                        :, 0, 0
                    ]  # sum_v p_v (t - s)
                    ctx.save_for_backward(student, probs, lse)
                    return gap - (teacher_lse - lse)

                @staticmethod
                def backward(ctx, grad):  # grad (N,)
                    student, probs, lse = ctx.saved_tensors
                    out = torch.sub(student, lse[:, None]).exp_()  # softmax(s)
                    out.sub_(probs).mul_(grad[:, None])
                    return out, None, None, None

            cls.fn = KLToTeacher
        return cls.fn


def kd_loss(student_logits, teacher_logits, temperature: float = 1.0):
    """Mean over next-token positions (all but the last of each row) of KL(teacher || student) at ``temperature``,
    times ``temperature**2`` (Hinton et al.'s scaling); logits (B, T, V), the teacher's without a gradient."""
    import torch

    def wide(x):  # bf16 / fp16 logits in fp32; fp32 (and fp64, for tests) as they are
        return x if x.dtype in (torch.float32, torch.float64) else x.float()

    b, t, v = student_logits.shape
    student = wide(student_logits).reshape(b * t, v)  # a view for fp32 logits: nothing copied
    if temperature != 1.0:
        student = student / temperature
    with torch.no_grad():
        teacher = wide(teacher_logits).reshape(b * t, v)
        if temperature != 1.0:
            teacher = teacher / temperature
        teacher_lse = torch.logsumexp(teacher, dim=-1)  # (N,)
        probs = torch.sub(teacher, teacher_lse[:, None]).exp_()  # softmax(t)
    kl = _KLToTeacher.get().apply(student, teacher, probs, teacher_lse).view(b, t)
    # every position but the last predicts a next token; computing the last row too keeps the logits a view
    return kl[:, :-1].mean() * temperature * temperature
