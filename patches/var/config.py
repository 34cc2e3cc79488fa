from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnsurgery.errors import SurgeryConfigError
from attnsurgery.surgery import SurgeryConfig, arg

#: Sink dimensions D_sink of the language backbones the paper evaluates: the residual-stream channels in which
#: sink tokens carry massive activations. They are inherited from the base LLM, so a backbone is matched on its
#: text model type, hidden size, depth *and* vocabulary size: the shape alone does not tell Llama-2-7B (LLaVA-1.5)
#: from Llama-3-8B (LLaVA-NeXT-8B ...), both llama with 4096 hidden and 32 layers. ``vocab`` is the inclusive range
#: of text vocabulary sizes the base LLM's checkpoints have (Llama-2: 32,000 ids, LLaVA's conversions add the image
#: and pad tokens and round up to 32,064; Qwen2: 151,643 ids plus specials, padded to 152,064).
#: LLaVA-1.5 values are from the reference code (MICV-yonsei/VisAttnSink ``src/logic/constants.py``); Qwen2-VL-7B
#: from a secondary copy of the paper (verify with ``attnsurgery calibrate var`` before trusting them).
KNOWN_SINK_DIMS: dict[str, dict[str, Any]] = {
    "llava-1.5-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "layers": 32,
        "vocab": (32000, 32064),
        "base": "Llama-2-7B / Vicuna-7B",
        "dims": [2533, 1415],
    },
    "llava-1.5-13b": {
        "model_type": "llama",
        "hidden_size": 5120,
        "layers": 40,
        "vocab": (32000, 32064),
        "base": "Llama-2-13B / Vicuna-13B",
        "dims": [2100, 4743],
    },
    "qwen2-vl-7b": {
        "model_type": "qwen2_vl_text",
        "hidden_size": 3584,
        "layers": 28,
        "vocab": (151643, 152064),
        "base": "Qwen2-7B",
        "dims": [458, 2570],
    },
}


def _same_shape(entry: dict[str, Any], model_type: str, hidden_size: int, layers: int) -> bool:
    family = {"qwen2_vl": "qwen2_vl_text", "qwen2": "qwen2_vl_text"}.get(model_type, model_type)
    return (entry["model_type"], entry["hidden_size"], entry["layers"]) == (family, hidden_size, layers)


def lookup_sink_dims(
    model_type: str, hidden_size: int, layers: int, vocab_size: int | None
) -> tuple[str, list[int]] | None:
    """(backbone name, D_sink) of a known language backbone matched on shape and vocabulary, or None."""
    for name, entry in KNOWN_SINK_DIMS.items():
        lo, hi = entry["vocab"]
        if (
            _same_shape(entry, model_type, hidden_size, layers)
            and vocab_size is not None
            and lo <= vocab_size <= hi
        ):
            return name, list(entry["dims"])
    return None


def near_sink_dims(model_type: str, hidden_size: int, layers: int) -> str | None:
    """The known backbone with this shape but another vocabulary (a partial match), or None."""
    return next(
        (
            name
            for name, entry in KNOWN_SINK_DIMS.items()
            if _same_shape(entry, model_type, hidden_size, layers)
        ),
        None,
    )


@dataclass
class VarConfig(SurgeryConfig):
    """Arguments of ``var`` (the paper's names). Defaults are the released LLaVA-1.5-7B setting
    (``A_exps/lv1.5_7b.yml``: tau 20, rho 0.5, p 0.6, summ 0.2); ``p=1`` is the identity.

    Conventions (see docs/vlm.md): ``p`` is the fraction of sink attention *kept*, as in the reference code
    (p=0.6 moves 40% of the sinks' attention to visual tokens; the paper's summary writes the moved fraction as p,
    i.e. ``p_paper = 1 - p``). ``rho`` is the code's test: a (head, query) is image-centric when the visual sinks'
    share of its visual attention is at most ``rho`` (the paper's ``r >= rho_paper`` with ``rho_paper = 1 - rho``;
    both read the same at 0.5).
    """

    tau: float = arg(
        20.0,
        doc="Sink threshold on phi(x) = max over sink_dims of |x[d] / RMS(x)| of a token's layer input; tokens "
        "with phi >= tau are sinks (the paper's >=; the code uses >).",
        low=0.0,
        low_open=True,
    )
    rho: float = arg(
        0.5,
        doc="Image-centric test (code convention): redistribute a (head, query) only when the visual sinks hold "
        "at most rho of its visual attention. rho = 1 - the paper's rho.",
        low=0.0,
        high=1.0,
    )
    p: float = arg(
        0.6,
        doc="Fraction of the sinks' attention kept (reference-code convention; 1 = identity). The removed "
        "1 - p goes to the non-sink visual tokens in proportion to their attention.",
        low=0.0,
        high=1.0,
    )
    summ: float = arg(
        0.2,
        doc="Only (head, query) pairs that give at least summ of their attention to image tokens are edited.",
        low=0.0,
        high=1.0,
    )
    sink_dims: list[int] | None = arg(
        None,
        doc="Residual-stream channels D_sink where sinks carry massive activations. None: the known value for "
        "this backbone (LLaVA-1.5-7B/13B, Qwen2-VL-7B: matched on shape and vocabulary), else an error; find "
        "them with `attnsurgery calibrate var`.",
        low=0,
    )
    skip_last_layer: bool = arg(
        True,
        doc="Leave the last layer unmodified, as the paper says (the released code modifies it: False).",
    )
    decode: str = arg(
        "frozen",
        doc="Sinks at cached decode steps: 'frozen' (the reference code) detects only at prefill, so generated "
        "tokens are never sinks; 'detect' also tests each new token, which makes cached decoding equal one full "
        "forward.",
        choices=("frozen", "detect"),
    )

    def validate(self) -> None:
        super().validate()
        if self.sink_dims is not None:
            dims = self.sink_dims
            if isinstance(dims, int) and not isinstance(dims, bool):
                dims = [dims]
            if not isinstance(dims, (list, tuple)) or not dims:
                raise SurgeryConfigError(
                    f"sink_dims={self.sink_dims!r}: give a non-empty list of hidden-state channel indices."
                )
            if any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
                raise SurgeryConfigError(f"sink_dims={self.sink_dims!r}: channel indices must be integers.")
            object.__setattr__(self, "sink_dims", sorted(set(dims)))
