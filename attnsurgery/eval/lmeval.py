"""The lm-evaluation-harness bridge: a patched model as an lm-eval ``LM``.

Two ways in:

* Python: ``SurgeryLM(pretrained=model, tokenizer=tok)`` wraps a model you already patched (``patch()`` edits
  the model in place, so lm-eval's log-likelihood, rolling-perplexity and ``generate_until`` requests all run
  through the surgery), or ``SurgeryLM(pretrained="smollm2-135m", recipe="act")`` loads and patches it.
* lm-eval's own CLI: importing this module registers the model name ``attnsurgery``; ``attnsurgery lm-eval``
  (or ``python -m attnsurgery lm-eval``) is lm-eval's CLI with that registration and the offline task suite's
  ``--include_path`` added::

      attnsurgery lm-eval run --model attnsurgery \\
          --model_args pretrained=smollm2-135m,recipe=act/smollm2-135m --tasks bb_general_knowledge
      accelerate launch --cpu --num_processes 2 -m attnsurgery lm-eval run --model attnsurgery ...

``SurgeryLM`` is lm-eval's ``HFLM`` with three additions: model names resolve through attnsurgery's aliases
(packaged GGUF models, local paths, hub ids), the recipe/surgery is applied after loading, and every forward's
logits are checked for NaN/inf: a broken surgery must not *score well* because lm-eval picks the first choice
when all log-likelihoods are NaN or tied (see :func:`degenerate_fraction`).

Data parallel on CPU: HFLM only turns on data parallelism when it sees several GPUs, so under
``accelerate launch --cpu --num_processes N`` every process would evaluate everything. ``SurgeryLM`` takes
rank and world size from the accelerator instead, so N CPU processes split the requests (tested: the metrics
equal a single-process run).

About ACT (or any ``prompt_adaptive`` surgery) under log-likelihood scoring: lm-eval feeds context and
continuation in one forward, so the sink set is detected over both, as the paper's code does; a choice's
own tokens can nudge its score through detection. Generation detects at prefill and freezes (see ``act``).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..errors import AttnSurgeryError

log = logging.getLogger("attnsurgery")


def _parse_surgery_args(text: Any) -> dict[str, Any]:
    """``"beta:0.4;threshold:0.1"`` (lm-eval's ``--model_args`` splits on commas) -> a dict of YAML values."""
    import yaml

    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    out: dict[str, Any] = {}
    for item in str(text).split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise AttnSurgeryError(
                f"surgery_args item {item!r} is not 'name:value'. Write e.g. surgery_args=beta:0.4;threshold:0.1 "
                "(';' between items, because lm-eval splits --model_args on commas)."
            )
        out[key.strip()] = yaml.safe_load(value)
    return out


#: HFLM's warnings about passing a loaded model object, which is how attnsurgery's own ``eval`` wires it in (one
#: process, no accelerate launch): they concern our wiring, not the user's run, and came twice per arm.
_WIRING_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


class _DropWiringWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_WIRING_WARNINGS)


def _refuse_surgery_arguments(kwargs: dict[str, Any], surgery: str | None) -> None:
    """``--model_args surgery=temperature,tau=0.8``: ``tau`` would go to ``from_pretrained`` and fail deep inside the
    model; say where surgery arguments go instead (before the model loads)."""
    from ..registry import get_surgery_class

    if not surgery:
        return
    try:
        fields = get_surgery_class(surgery).config_class.__dataclass_fields__
    except AttnSurgeryError:
        return  # an unknown surgery name: patch() says so with its did-you-mean
    for key in kwargs:
        if key in fields:
            raise AttnSurgeryError(
                f"--model_args {key}={kwargs[key]!r} is an argument of the {surgery} surgery; pass it as "
                f"surgery_args={key}:{kwargs[key]} (items separated by ';', because lm-eval splits "
                "--model_args on commas)."
            )


@register_model("attnsurgery")
class SurgeryLM(HFLM):
    """lm-eval's ``HFLM`` on an attnsurgery-patched model (see the module docstring)."""

    def __init__(
        self,
        pretrained: Any = None,
        recipe: str | None = None,
        surgery: str | None = None,
        surgery_args: Any = None,
        layers: Any = None,
        check_outputs: bool = True,
        **kwargs: Any,
    ) -> None:
        from ..models import model_location

        if recipe and surgery:
            raise AttnSurgeryError("Pass either recipe=... or surgery=..., not both.")
        if pretrained is None or isinstance(pretrained, str) and not pretrained.strip():
            raise AttnSurgeryError(
                "--model attnsurgery needs the model: --model_args pretrained=MODEL (an alias such as smollm2-135m, "
                "a local folder or a hub id), e.g. --model_args pretrained=smollm2-135m,recipe=act."
            )
        _refuse_surgery_arguments(kwargs, surgery)
        model_name = pretrained if isinstance(pretrained, str) else None
        if isinstance(pretrained, str):
            pretrained = str(model_location(pretrained))
        kwargs.setdefault("device", "cpu" if not torch.cuda.is_available() else "cuda")
        # only while HFLM is built, only those two messages; the rest of lm-eval's logging is untouched
        hf_log, quiet = logging.getLogger(HFLM.__module__), _DropWiringWarnings()
        hf_log.addFilter(quiet)
        try:
            super().__init__(pretrained=pretrained, **kwargs)
        except TypeError as err:  # an unknown model_args key reaches from_pretrained and the model's __init__
            bad = [k for k in kwargs if f"'{k}'" in str(err)]
            if "unexpected keyword argument" not in str(err) or not bad:
                raise
            raise AttnSurgeryError(
                f"--model_args {bad[0]}={kwargs[bad[0]]!r}: not an argument of --model attnsurgery (recipe, surgery, "
                "surgery_args, layers, check_outputs) nor of lm-eval's hf model (batch_size, dtype, device, "
                "max_length ...); the model's loader refuses it too. Surgery arguments go in "
                "surgery_args=name:value;name:value."
            ) from None
        finally:
            hf_log.removeFilter(quiet)
        self.check_outputs = check_outputs
        self.nonfinite_batches = 0
        self.forward_batches = 0
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
            # HFLM only shards requests when it counts several GPUs; on CPU processes do it ourselves.
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        self.handle = None
        if recipe or surgery:
            from ..api import patch

            if isinstance(layers, str):
                layers = layers.replace(";", ",")
            from ..recipe import find_recipe

            # a recipe name can equal a surgery name ("temperature"): resolve it as a recipe explicitly
            target = find_recipe(recipe, model=model_name) if recipe else surgery
            self.handle = patch(self.model, target, layers=layers, **_parse_surgery_args(surgery_args))
            # say what was resolved (a recipe folder picks the file made for the model; heads come from it)
            where = f" (recipe {target.name}: {target.path})" if recipe else ""
            print(f"attnsurgery: patched{where}: {self.handle!r}", file=sys.stderr, flush=True)

    def _loglikelihood_tokens(self, *args: Any, **kwargs: Any):
        """Record each right-padded row's length so :meth:`_model_call` can pass a real attention mask.

        HFLM scores causal models on right-padded batches *without* a mask: harmless for stock attention (pads
        sit after every real token), but a prompt-adaptive surgery such as ACT would count the pad queries in
        its detection and a row's score would depend on its batch mates.
        """
        import lm_eval.models.huggingface as hf

        original = hf.pad_and_concat

        def recording(max_length: int, tensors: list[torch.Tensor], padding_side: str = "right"):
            if padding_side == "right":
                self._row_lengths = [int(t.shape[-1]) for t in tensors]
            return original(max_length, tensors, padding_side=padding_side)

        hf.pad_and_concat = recording
        try:
            return super()._loglikelihood_tokens(*args, **kwargs)
        finally:
            hf.pad_and_concat = original
            self._row_lengths = None

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: Any = None):
        lengths = getattr(self, "_row_lengths", None)
        self._row_lengths = None
        if attn_mask is None and labels is None and lengths is not None and len(lengths) == inps.shape[0]:
            mask = (
                torch.arange(inps.shape[1], device=inps.device)[None, :]
                < torch.tensor(lengths, device=inps.device)[:, None]
            )
            with (
                torch.no_grad(),
                torch.autocast(
                    device_type=self.device.type,
                    dtype=self.mixed_precision_dtype,
                    enabled=self.mixed_precision_dtype is not None,
                ),
            ):
                logits = self.model(inps, attention_mask=mask.long()).logits
        else:
            logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        self.forward_batches += 1
        if self.check_outputs and not torch.isfinite(logits).all():
            self.nonfinite_batches += 1
            if self.nonfinite_batches == 1:
                log.error(
                    "attnsurgery: the model produced NaN/inf logits; these results are INVALID. "
                    "Check the surgery's arguments (e.g. with `attnsurgery apply`)."
                )
        return logits

    @property
    def outputs_finite(self) -> bool:
        return self.nonfinite_batches == 0


def degenerate_fraction(samples: Sequence[dict[str, Any]]) -> float | None:
    """Fraction of multiple-choice docs whose choice log-likelihoods are all equal or not finite.

    lm-eval breaks such ties by picking the first choice, which can look like real accuracy. ``None`` when the
    samples are not multiple-choice (no per-choice log-likelihoods to compare).
    """
    bad = total = 0
    for sample in samples:
        resps = sample.get("filtered_resps") or sample.get("resps")
        if not resps or len(resps) < 2:
            continue
        try:
            lls = [float(r[0] if isinstance(r, (list, tuple)) else r) for r in resps]
        except (TypeError, ValueError):
            return None
        total += 1
        finite = [x for x in lls if math.isfinite(x)]
        if len(finite) < len(lls) or max(finite) - min(finite) <= 1e-9 * max(1.0, abs(max(finite))):
            bad += 1
    return bad / total if total else None


def include_path() -> str | None:
    """The offline task suite's folder for lm-eval's ``include_path`` (None if it is not installed)."""
    try:
        from ..tasks import include_path as tasks_include_path
    except ImportError:
        return None
    return tasks_include_path()


def harness_main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the ``attnsurgery`` model registered and the offline tasks included."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = include_path()
    if extra and argv and argv[0] in ("run", "ls") and "--include_path" not in argv:
        argv = [*argv, "--include_path", extra]
    old = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else 2
    except (
        AttnSurgeryError
    ) as err:  # our refusal (unknown surgery, bad argument): its message, not a traceback
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {err}")
        return err.exit_code
    finally:
        sys.argv = old
    return 0
