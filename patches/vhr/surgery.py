from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from attnsurgery.errors import UnsupportedModelError
from attnsurgery.request import key_valid_from_mask
from attnsurgery.surgery import AttentionCall, Stage, Surgery

from .config import VhrConfig, paper_layers

#: the forward arguments that carry images (pixels, grids, or the features generate pre-encodes in transformers
#: >= 5.x): a forward with other ones is a new prompt
_IMAGE_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "image_sizes",
    "pixel_values_videos",
    "video_grid_thw",
    "mm_encoder_outputs",
)


def _image_inputs(kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """The tensors that carry a forward's images, flattened with their names."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(name: str, x: Any) -> None:
        if isinstance(x, torch.Tensor):
            found.append((name, x))
        elif isinstance(x, Mapping):  # a dict of ModelOutputs (mm_encoder_outputs)
            for k, v in x.items():
                walk(f"{name}.{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{name}.{i}", v)

    for key in _IMAGE_INPUTS:
        walk(key, kwargs.get(key))
    return found


def _same_images(a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        na == nb and (ta is tb or (ta.shape == tb.shape and torch.equal(ta, tb.to(ta.device))))
        for (na, ta), (nb, tb) in zip(a, b)
    )


class VhrSurgery(Surgery):
    """VHR: scale the attention heads that react most to the image, chosen per prompt.

    At the first generation step (the prefill forward) a text-only forward of the same prompt, with the image
    placeholders (and Qwen2-VL's vision start/end tokens) and the pixels removed, gives each head's output for the
    last prompt token without the image. During the with-image prefill, layer by layer (earlier layers already
    reinforced), each targeted layer computes the vision-aware head divergence ``VHD = ||A_img - A_txt||_2`` per
    head at the last prompt token, zeroes outliers (Eq. 6), and multiplies the heads above the layer median by
    ``alpha`` at every position; the chosen heads stay fixed for the rest of generation (KV-cached decode steps
    reuse them, and so do the full forwards of ``generate(use_cache=False)``, recognised as continuations of the
    prompt: same image inputs, every row the prompt's tokens followed by new text). Paper: He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
    Divergence", ACL 2025 (arXiv 2412.13949).

    Runs after the model's own SDPA kernel (a per-head output stage); the cost is the text-only forward, once per
    prompt. Per batch row: each row gets its own heads; a row without image tokens is left unchanged. The
    text-only branch runs once, before the with-image pass, without VHR's own reinforcement (the paper leaves this
    open, docs/vlm.md) but with every other active surgery: the with-image pass runs with them too, so the
    divergence compares the same model with and without the image, the model as it is used (image-token surgeries
    such as VAR have nothing to act on without the image).

    >>> patch(model, "vhr", alpha=2.0)                    # layer 1 + the last 14/32 of the layers
    >>> patch(model, "vhr", alpha=2.0, layers="1,18:32")  # the same on a 32-layer LLaVA, explicitly
    """

    name = "vhr"
    config_class = VhrConfig
    summary = "VHR vision-aware head reinforcement: scale heads whose output depends most on the image"
    paper = "He et al., Cracking the Code of Hallucination in LVLMs with VHD, ACL 2025 (arXiv 2412.13949)"
    stages = frozenset({Stage.HEAD_OUTPUT})
    example_args = {"alpha": 2.0}
    identity_args = {"alpha": 1.0}
    #: decisions use the last prompt token (heads are chosen once per prompt)
    prompt_adaptive = True
    #: needs image tokens: the shared text-model contract skips it; tests/test_vlm.py covers VLMs
    requires_vision = True

    def setup(self, model: Any, engine: Any) -> None:
        info = engine.info
        if not info.is_vision_language:
            raise UnsupportedModelError(
                f"vhr acts on vision-language models (LLaVA, LLaVA-NeXT, Qwen2-VL ...): {type(model).__name__} has "
                "no image token id in its config (image_token_id / image_token_index), so the image cannot be "
                "removed for the text-only pass. Load the full VLM, not its language model."
            )
        layers = self.targets.layers
        if self.config.paper_layers and len(layers) == info.num_layers:
            layers = frozenset(paper_layers(info.num_layers))
        self._layers = layers
        self._heads = {layer: self.targets.head_mask(layer) for layer in layers}
        self._engine = engine
        self._vision_ids = torch.tensor(info.vision_token_ids)
        self._visual_ids = torch.tensor(info.visual_token_ids)  # image and video placeholders
        self._text: dict[int, torch.Tensor] | None = None  # layer -> (B, H, Dh) text-only head outputs
        self._text_rows: torch.Tensor | None = None  # (B,) rows that had image tokens
        self._in_text_pass = False
        # the prompt whose heads were chosen last, to keep them for its continuations without a KV cache
        self._prompt: dict[str, Any] | None = None  # ids, mask, image inputs, heads {layer: (B, H)}
        self._reuse: torch.Tensor | None = None  # (B,) prompt row each row of this forward continues
        if self.config.alpha != 1.0:
            engine.register_hook(
                self, model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            )

    def active_stages(self, layer_idx: int) -> frozenset[Stage]:
        if layer_idx in self._layers and self.config.alpha != 1.0:
            return self.stages
        return frozenset()

    def _slot(self, layer_idx: int) -> tuple:
        return ("vhr", id(self), layer_idx)

    # -- the text-only pass ------------------------------------------------------------------------------------
    def _before_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Top-level pre-hook: at a prefill with image tokens, run the text-only forward first."""
        if self._in_text_pass:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "get_seq_length") and int(cache.get_seq_length()) > 0:
            return  # a decode step: the heads chosen at prefill stay
        self._text = self._text_rows = self._reuse = None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or not bool(self._is_visual(ids).any()):
            self._prompt = None
            warnings.warn(
                "vhr: no image tokens in this prompt (nor video tokens, or no input_ids to find them in), so no vision-aware heads "
                "can be chosen; the model runs unchanged. Pass the processor's input_ids and pixel values.",
                stacklevel=2,
            )
            return
        # generate passes a 4D mask with a static cache; the engine reads real tokens from 2D and 4D masks alike
        mask = key_valid_from_mask(kwargs.get("attention_mask"), ids.shape[0], ids.shape[1])
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device)
        self._reuse = self._continues(ids, mask, kwargs)
        if self._reuse is not None:
            return  # a step of generate(use_cache=False): the heads chosen at its first step stay
        self._prompt = {"ids": ids, "mask": mask, "images": _image_inputs(kwargs), "heads": {}}
        keep = mask & ~torch.isin(ids, self._vision_ids.to(ids.device))
        lengths = keep.sum(-1)
        width = int(lengths.max())
        text_ids = ids.new_zeros(ids.shape[0], width)
        text_mask = torch.zeros(ids.shape[0], width, dtype=torch.long, device=ids.device)
        for b in range(ids.shape[0]):  # left-padded, so every row's last token sits in the last column
            n = int(lengths[b])
            text_ids[b, width - n :] = ids[b][keep[b]]
            text_mask[b, width - n :] = 1
        position_ids = (text_mask.cumsum(-1) - 1).clamp(min=0)
        self._text = {}
        self._in_text_pass = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # other surgeries' "no image" notices about this internal pass
                self._engine.side_forward(
                    input_ids=text_ids,
                    attention_mask=text_mask,
                    position_ids=position_ids,
                    use_cache=False,
                    logits_to_keep=1,  # only the head outputs are wanted, not the vocabulary
                )
        finally:
            self._in_text_pass = False
        self._text_rows = self._is_visual(ids).any(-1)

    def _is_visual(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(ids, self._visual_ids.to(ids.device))

    def _continues(self, ids: torch.Tensor, mask: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """(B,) the row of the remembered prompt that each row of this forward extends, or None for a new prompt.

        Without a KV cache every step of ``generate`` is a full forward that looks like a first step; the paper
        fixes the heads at the first step for the rest of the generation. A forward continues the prompt when it
        has the same image inputs and every row is a remembered row (tokens and mask) followed by new text tokens.
        Rows are matched, not assumed in place, because beam search reorders them between steps."""
        prompt = self._prompt
        if prompt is None or not prompt["heads"] or ids.shape[1] <= prompt["ids"].shape[1]:
            return None
        if not _same_images(_image_inputs(kwargs), prompt["images"]):
            return None
        width = prompt["ids"].shape[1]
        if bool(torch.isin(ids[:, width:], self._vision_ids.to(ids.device)).any()):
            return None  # new image tokens: a new prompt
        same = (ids[:, None, :width] == prompt["ids"][None].to(ids.device)).all(-1)  # (B, B_prompt)
        same &= (mask[:, None, :width] == prompt["mask"][None].to(mask.device)).all(-1)
        if not bool(same.any(-1).all()):
            return None
        return same.int().argmax(-1)

    # -- the head-output stage ---------------------------------------------------------------------------------
    def head_output(self, attn_output: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """attn_output (B, Tq, H, Dh): record (text-only pass), choose (prefill) or reuse (decode) and scale."""
        bsz, q_len = attn_output.shape[:2]
        if self._in_text_pass:
            if self._text is not None:
                self._text[call.layer_idx] = attn_output[:, -1].detach().float()  # left-padded: last = real
            return attn_output
        slot = self._slot(call.layer_idx)
        if call.request.past_len == 0 and self._reuse is not None:
            chosen = self._prompt["heads"].get(call.layer_idx)
            if chosen is None:
                return attn_output
            chosen = chosen[self._reuse.to(chosen.device)]
            call.request.extras[slot] = chosen
        elif call.request.past_len == 0:
            text = None if self._text is None else self._text.get(call.layer_idx)
            if text is None or text.shape[0] != bsz:
                return attn_output
            valid = call.query_valid.to(attn_output.device).expand(bsz, -1)
            columns = torch.arange(q_len, device=attn_output.device)
            last = torch.where(valid, columns, -1).amax(-1).clamp(min=0)  # the last prompt token of each row
            with_image = attn_output[torch.arange(bsz), last].float()  # (B, H, Dh)
            chosen = self._select(with_image, text.to(with_image.device))
            chosen &= self._text_rows.to(chosen.device)[:, None]
            chosen &= self._heads[call.layer_idx].to(chosen.device)[None, :]
            call.request.extras[slot] = chosen
            if self._prompt is not None and self._prompt["ids"].shape[0] == bsz:
                self._prompt["heads"][call.layer_idx] = chosen
        else:
            chosen = call.request.extras.get(slot)
            if chosen is None or chosen.shape[0] != bsz:
                return attn_output
        scale = torch.where(chosen, self.config.alpha, 1.0).to(attn_output.dtype)  # (B, H)
        return attn_output * scale[:, None, :, None]

    def _select(self, with_image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, H) bool: heads above their layer's median vision-aware head divergence (Eqs. 4, 6, 7), per row."""
        vhd = (with_image - text).norm(dim=-1)  # (B, H)
        if self.config.outlier_filter:
            ta = text.pow(2).sum(-1)
            high_vhd = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, unbiased=False, keepdim=True)
            high_ta = ta > ta.mean(-1, keepdim=True) + ta.std(-1, unbiased=False, keepdim=True)
            vhd = torch.where(high_vhd & high_ta, torch.zeros_like(vhd), vhd)
        # strictly above the median: at most floor(H / 2) heads
        return vhd > vhd.median(dim=-1, keepdim=True).values
