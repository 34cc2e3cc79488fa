from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnsurgery.surgery import SurgeryConfig, arg
from attnsurgery.targeting import name_list


@dataclass
class LoraSurgeryConfig(SurgeryConfig):
    """Arguments of ``lora``. ``layers=`` picks the decoder layers whose projections get adapters."""

    r: int = arg(8, doc="LoRA rank.", low=1)
    alpha: float = arg(
        16.0, doc="LoRA scaling numerator: the update is (alpha / r) * B A x.", low=0.0, low_open=True
    )
    dropout: float = arg(
        0.0, doc="Dropout on the adapter's input while training.", low=0.0, high=1.0, high_open=True
    )
    targets: Any = arg(
        None,
        doc="Projection modules that get adapters, by their name inside a decoder layer (comma-separated or a "
        "list): q_proj,k_proj,v_proj,o_proj on Llama-likes, c_attn,c_proj on GPT-2, out_proj on OPT; MLP names "
        "(gate_proj, up_proj, down_proj ...) work too. Default: every projection of the attention module.",
        kind="names",
    )
    seed: int = arg(
        0,
        doc="Seed of the adapters' random init (A; B too with init='random'): the same seed gives the same "
        "adapters, so a training run repeats, and patching leaves torch's global random state as it was.",
        low=0,
    )
    init: str = arg(
        "identity",
        doc="'identity': B = 0, so the adapted model starts exactly as the base model (peft's default); "
        "'random': A and B both random (a visibly different model; for tests).",
        choices=("identity", "random"),
    )

    def target_names(self) -> list[str] | None:
        """The names asked for, or None for every projection of the attention module."""
        return name_list(self.targets)
