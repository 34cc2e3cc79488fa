"""Model discovery: which modules of a transformers model are its decoder layers and their self-attention, and the
config facts the engine and surgeries need (:class:`ModelInfo`, :func:`discover`). Architecture-agnostic: no
model class is named."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import UnsupportedModelError


@dataclass
class ModelInfo:
    """What the engine needs to know about a model's decoder."""

    model: nn.Module
    decoder: nn.Module
    attention: list[nn.Module]  # self-attention modules indexed by layer
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: list[nn.Module] = field(default_factory=list)  # decoder layers (each attention module's parent)
    hidden_size: int = 0
    #: vision-language models: the placeholder id the processor expands into one token per image feature; the
    #: placeholders the model fills with vision features (images and videos: VAR/VHR treat both as visual tokens);
    #: and every id that belongs to an image or video in the prompt (those plus Qwen2-VL's vision start/end)
    image_token_id: int | None = None
    vision_token_ids: tuple[int, ...] = ()
    visual_token_ids: tuple[int, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.attention)

    @property
    def is_vision_language(self) -> bool:
        """Surgeries act on the language model inside a VLM; image positions come from ``input_ids``."""
        return self.image_token_id is not None and self.decoder is not self.model


def _is_self_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return (
        name.endswith("Attention")
        and isinstance(getattr(module, "layer_idx", None), int)
        and not getattr(module, "is_cross_attention", False)
    )


def discover(model: nn.Module) -> ModelInfo:
    """Find the decoder and its self-attention modules, or explain why this model is not supported."""
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers PreTrainedModel; attnsurgery patches models loaded "
            "with transformers (e.g. attnsurgery.load_model or AutoModelForCausalLM.from_pretrained)."
        )
    if getattr(model.config, "is_encoder_decoder", False):  # T5, BART, Whisper: two stacks, cross-attention
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model ({model.config.model_type}); attnsurgery patches "
            "decoder-only language models (Llama, Mistral, Qwen2, Gemma, GPT-2, OPT ...) and LLaVA-style "
            "vision-language models."
        )
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if decoder is None:
        decoder = model
    attention = [m for m in decoder.modules() if _is_self_attention(m)]
    if not attention:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no self-attention modules with a layer index. attnsurgery works "
            "through transformers' AttentionInterface; this architecture does not route attention through it."
        )
    by_layer = {m.layer_idx: m for m in attention}
    if sorted(by_layer) != list(range(len(attention))):
        raise UnsupportedModelError(
            f"{type(model).__name__}: attention layer indices {sorted(by_layer)} are not 0..{len(attention) - 1}."
        )
    config = getattr(decoder, "config", model.config)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    ordered = [by_layer[i] for i in range(len(attention))]
    names = {m: n for n, m in decoder.named_modules()}
    layers = [decoder.get_submodule(names[m].rpartition(".")[0]) for m in ordered]
    image_token_id, visual_ids, vision_ids = _image_tokens(model.config)
    return ModelInfo(
        model,
        decoder,
        ordered,
        num_heads,
        num_kv_heads,
        head_dim,
        layers=layers,
        hidden_size=int(getattr(config, "hidden_size", num_heads * head_dim)),
        image_token_id=image_token_id,
        vision_token_ids=vision_ids,
        visual_token_ids=visual_ids,
    )


def _config_id(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _image_tokens(config: Any) -> tuple[int | None, tuple[int, ...], tuple[int, ...]]:
    """The image placeholder id of a VLM config (LLaVA: ``image_token_index``/``image_token_id``, Qwen2-VL:
    ``image_token_id``), the visual placeholders (the image one plus a video one: Qwen2-VL ``video_token_id``,
    LLaVA-NeXT-Video ``video_token_index``), and those plus the ids that bracket them (Qwen2-VL's vision
    start/end); or (None, (), ())."""
    image = _config_id(config, "image_token_id", "image_token_index")
    if image is None:
        return None, (), ()
    video = _config_id(config, "video_token_id", "video_token_index")
    visual = (image,) if video is None or video == image else (image, video)
    extra = [_config_id(config, k) for k in ("vision_start_token_id", "vision_end_token_id")]
    return image, visual, (*visual, *(x for x in extra if x is not None))
