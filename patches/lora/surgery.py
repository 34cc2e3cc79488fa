from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnsurgery.errors import SurgeryConfigError
from attnsurgery.surgery import Stage, Surgery
from attnsurgery.targeting import find_projections

from .config import LoraSurgeryConfig

ADAPTER = "attnsurgery"  # peft adapter name; also the name inside the exported peft adapter folder's config


class LoraSurgery(Surgery):
    """LoRA adapters on chosen projections of chosen decoder layers, injected by peft and removable.

    The trainable half of the toolkit trains surgery state (gates, routers, feature maps) and, where quality has
    to be recovered, LoRA (Hu et al. 2021). Keeping LoRA a surgery gives it everything else a surgery has: it
    composes with attention surgeries in one handle or recipe, saves with them (its A/B matrices are this
    module's state), and ``remove()`` swaps the original projection modules back and restores every
    ``requires_grad`` flag, so the model is bit-for-bit what it was. peft does the injection
    (``inject_adapter_in_model``; bitsandbytes 8/4-bit layers and GPT-2's Conv1D included);
    :func:`export_peft_adapter` writes a standard peft adapter folder (``PeftModel.from_pretrained`` loads it).

    >>> patch(model, "lora", r=8, targets="q_proj,v_proj", layers="2:")
    """

    name = "lora"
    config_class = LoraSurgeryConfig
    summary = (
        "LoRA adapters (peft) on attention/MLP projections; trainable, removable, saved with the surgery"
    )
    paper = "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022"
    stages = frozenset({Stage.WEIGHTS})
    example_args = {"init": "random", "r": 2}

    def setup(self, model: nn.Module, engine: Any) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        if hasattr(model, "peft_config"):
            raise SurgeryConfigError(
                "lora: this model already carries peft adapters (it has `peft_config`); merge or unload them "
                "first (`model.merge_and_unload()`), or patch a plain model."
            )
        names = find_projections(model, engine.info, self.targets.layers, self.config.target_names(), "lora")
        conv1d = any(type(model.get_submodule(n)).__name__ == "Conv1D" for n in names)
        self._grad_flags = [(p, p.requires_grad) for p in model.parameters()]
        self._names = names
        config = LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=names,
            fan_in_fan_out=conv1d,
            init_lora_weights=self.config.init == "identity",
        )
        try:
            # peft draws A from torch's global generator; fork it so that patching does not move the caller's
            # random stream (A is redrawn from this surgery's seed below)
            with torch.random.fork_rng(devices=[]):
                inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        finally:
            # peft freezes everything but the adapters; which weights train is the trainer's business
            for p, flag in self._grad_flags:
                p.requires_grad_(flag)
        self.peft_config = config
        # the adapters' matrices become this surgery's state: they save, load and train with it
        self.adapters = nn.ModuleDict()
        self._lora: list[nn.Module] = []  # a plain list: the wrapped projections are the model's, not ours
        for n in names:
            layer = model.get_submodule(n)
            self._lora.append(layer)
            self.adapters[n.replace(".", "__")] = nn.ModuleDict(
                {"A": layer.lora_A[ADAPTER], "B": layer.lora_B[ADAPTER]}
            )
        self._seeded_init()

    def _seeded_init(self) -> None:
        """A from ``seed``, with peft's distribution (``kaiming_uniform_(a=sqrt(5))``, i.e. U(+-1/sqrt(fan_in)));
        B stays 0 (the identity) or, with ``init='random'``, is drawn visibly large. peft's own draw comes from the
        unseeded global generator, so two runs of one recipe started from different adapters and ended apart
        (two identical 25.6k-token MoH + LoRA runs: +17.4% and +18.1% test perplexity). Drawn on the CPU in
        fp32: the same adapters on every device and dtype."""
        g = torch.Generator().manual_seed(self.config.seed)
        with torch.no_grad():
            for pair in self.adapters.values():
                a = pair["A"].weight  # (r, fan_in)
                bound = 1.0 / a.shape[-1] ** 0.5
                a.copy_((torch.rand(a.shape, generator=g) * 2 - 1) * bound)
            if self.config.init == "random":
                for pair in self.adapters.values():
                    b = pair["B"].weight
                    b.copy_(torch.randn(b.shape, generator=g) * 0.1)

    def set_enabled(self, enabled: bool) -> None:
        for layer in self._lora:
            layer.enable_adapters(enabled)

    def teardown(self, model: nn.Module, engine: Any) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for n in getattr(self, "_names", []):
            parent_name, _, leaf = n.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapped = getattr(parent, leaf)
            if isinstance(wrapped, BaseTunerLayer):
                setattr(parent, leaf, wrapped.get_base_layer())
        if getattr(self, "peft_config", None) is not None and hasattr(model, "peft_config"):
            del model.peft_config
        for p, flag in getattr(self, "_grad_flags", []):
            p.requires_grad_(flag)
        self._names, self._lora = [], []

    def active_stages(self, layer_idx: int) -> frozenset[Stage]:
        return frozenset()  # nothing for the attention function: the adapters live in the projections

    def export(self, model: nn.Module, directory: Any) -> str:
        """A trained run also ships its adapters as a standard peft adapter folder (``adapter/``)."""
        export_peft_adapter(self, model, directory)
        return "adapter"


def export_peft_adapter(surgery: LoraSurgery, model: nn.Module, directory: Any) -> None:
    """Write ``surgery``'s adapters as a standard peft adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``), loadable on the unpatched model with ``PeftModel.from_pretrained``."""
    from pathlib import Path

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    # PeftModel wraps the base model twice (PeftModel.base_model -> LoraModel.model): its keys carry that prefix
    tensors = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    surgery.peft_config.save_pretrained(str(directory))
