from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnsurgery.errors import SurgeryConfigError
from attnsurgery.surgery import Stage, Surgery
from attnsurgery.targeting import find_projections

from .config import FinetuneConfig


class FinetuneSurgery(Surgery):
    """Full fine-tuning of chosen base projections, as a surgery that ``remove()`` undoes.

    Training the attention weights themselves (Bondarenko et al. fine-tune all weights under clipped softmax;
    ``attnsurgery train --train-base attention``) must not cost the toolkit's promise that removing a surgery
    gives back the model exactly. So the weights that train are *copies*: ``setup`` puts a trainable copy of each
    targeted projection's weight (and bias) in the module's place, keeps the original ``nn.Parameter`` objects
    aside, and ``teardown`` puts them back — the original tensors are never written to. The copies are this
    surgery's state: they save with the recipe (full-size tensors: the price of full fine-tuning; LoRA is the
    small alternative), load onto a fresh model, and switch off for the trainer's ``kd`` teacher
    (:meth:`set_enabled`). Quantised projections (bitsandbytes) are refused: train LoRA on those.

    >>> patch(model, "finetune", targets="q_proj,k_proj,v_proj,o_proj", layers="2:")
    """

    name = "finetune"
    config_class = FinetuneConfig
    summary = "Train copies of chosen base projections (full fine-tuning that remove() undoes exactly)"
    paper = "Full fine-tuning of attention weights (Bondarenko et al. 2023 fine-tune all weights under clipped softmax)"
    stages = frozenset({Stage.WEIGHTS})
    example_args = {"init": "random"}

    def setup(self, model: nn.Module, engine: Any) -> None:
        names = find_projections(
            model, engine.info, self.targets.layers, self.config.target_names(), "finetune"
        )
        self.weights = nn.ModuleDict()
        self._swaps: list[
            tuple[nn.Module, str, nn.Parameter, nn.Parameter]
        ] = []  # module, slot, original, copy
        generator = torch.Generator().manual_seed(0)
        for full in names:
            module = model.get_submodule(full)
            if type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
                raise SurgeryConfigError(
                    f"finetune: {full} is quantised ({type(module).__name__}); its weights cannot train. Train "
                    "LoRA adapters on a quantised model (`lora`, --lora-r)."
                )
            copies = nn.ParameterDict()
            for slot in ("weight", "bias") if self.config.bias else ("weight",):
                original = module._parameters.get(slot)
                if original is None:
                    continue
                copy = original.detach().clone()
                if self.config.init == "random" and copy.is_floating_point():
                    noise = torch.randn(copy.shape, generator=generator).to(copy)
                    copy += noise * 0.1 * copy.float().std().clamp(min=1e-3).to(copy)
                copies[slot] = nn.Parameter(copy, requires_grad=True)
                self._swaps.append((module, slot, original, copies[slot]))
            self.weights[full.replace(".", "__")] = copies
        self.set_enabled(True)

    def set_enabled(self, enabled: bool) -> None:
        """Copies in (patched) or originals back (the unpatched model, for the ``kd``/``transfer`` teacher)."""
        for module, slot, original, copy in getattr(self, "_swaps", []):
            module._parameters[slot] = copy if enabled else original

    def teardown(self, model: nn.Module, engine: Any) -> None:
        self.set_enabled(False)
        self._swaps = []

    def active_stages(self, layer_idx: int) -> frozenset[Stage]:
        return frozenset()  # nothing for the attention function: the weights live in the projections
