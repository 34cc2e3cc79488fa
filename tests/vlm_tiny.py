"""Tiny random-weight vision-language models (LLaVA, Qwen2-VL) built from configs, and prompts for them.

No VLM weights exist offline, so the VLM surgeries are tested on these. Shapes are small but keep the parts
that matter: a vision tower that fills image placeholder tokens, a Llama / Qwen2 language model with GQA, and
per-row image spans under padding.
"""

from __future__ import annotations

import inspect

import torch
from tiny import padded_batch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VOCAB = 128
IMAGE_TOKEN = 100  # placeholder id the "processor" expands into one token per image feature
VISION_START, VISION_END = 101, 102
PAD = 0
VLM_ARCHS = ["llava", "qwen2_vl"]


def _llava_config(layers: int, hidden: int, heads: int, kv_heads: int, image_size: int) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=4,
        projection_dim=32,
    )
    # 'default' strategy drops CLIP's CLS token: (image_size / 4)^2 image tokens per image
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // 4) ** 2,
    )


def _qwen2_vl_config(layers: int, hidden: int, heads: int, kv_heads: int) -> Qwen2VLConfig:
    head_dim = hidden // heads
    # mrope sections split head_dim / 2 rotary frequencies over (temporal, height, width)
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    text = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=hidden,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=103,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )


def tiny_vlm(
    arch: str,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    image_size: int = 16,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llava":
        model = LlavaForConditionalGeneration(_llava_config(layers, hidden, heads, kv_heads, image_size))
    elif arch == "qwen2_vl":
        model = Qwen2VLForConditionalGeneration(_qwen2_vl_config(layers, hidden, heads, kv_heads))
    else:
        raise ValueError(arch)
    model.set_attn_implementation(attn_implementation)
    # random init leaves attention nearly uniform; widen q/k so heads are peaked and edits show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and any(k in name for k in ("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model.eval()


def image_tokens_per_image(model: torch.nn.Module, grid: int = 8) -> int:
    if model.config.model_type == "llava":
        return int(model.config.image_seq_length)
    return grid * grid // model.config.vision_config.spatial_merge_size**2


def pixels(model: torch.nn.Module, n_images: int, grid: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixel inputs for ``n_images`` images, in the layout each model's processor produces."""
    g = torch.Generator().manual_seed(seed)
    if model.config.model_type == "llava":
        size = model.config.vision_config.image_size
        return {"pixel_values": torch.randn(n_images, 3, size, size, generator=g)}
    vc = model.config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    return {
        "pixel_values": torch.randn(n_images * grid * grid, patch_dim, generator=g),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * n_images),
    }


def prompt(model: torch.nn.Module, before: int, after: int, seed: int = 0) -> torch.Tensor:
    """One row: BOS, ``before`` text tokens, the image placeholders, ``after`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    n = image_tokens_per_image(model)
    image = [IMAGE_TOKEN] * n
    if model.config.model_type == "qwen2_vl":
        image = [VISION_START, *image, VISION_END]
    text = lambda k: torch.randint(3, 99, (k,), generator=g).tolist()  # noqa: E731
    return torch.tensor([1, *text(before), *image, *text(after)])


def text_prompt(length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([1, *torch.randint(3, 99, (length - 1,), generator=g).tolist()])


def vlm_inputs(model: torch.nn.Module, rows: list[torch.Tensor], side: str = "left", seed: int = 0) -> dict:
    """Padded batch with one image per row that has image tokens (in row order, as processors emit them)."""
    ids, mask = padded_batch(rows, side, pad_id=PAD)
    n_images = sum(int((r == IMAGE_TOKEN).any()) for r in rows)
    out = {"input_ids": ids, "attention_mask": mask}
    if n_images:
        # one image per image row, seeded by the row's seed so one-by-one runs see the same pixels
        per_row = [pixels(model, 1, seed=seed + i) for i, r in enumerate(rows) if (r == IMAGE_TOKEN).any()]
        out.update({k: torch.cat([p[k] for p in per_row]) for k in per_row[0]})
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            # transformers >= 5.x Qwen2-VL: processors mark image tokens 1 for M-RoPE
            out["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int()
    return out
