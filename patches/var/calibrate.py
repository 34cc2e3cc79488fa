"""VAR sink dimensions: find a backbone's sink dimensions (massive activations).

D_sink are the residual-stream channels in which sink tokens (BOS, a few image tokens) carry massive
activations. VAR needs them per language backbone; the paper notes they are inherited from the base LLM, so text
prompts are enough, and image prompts work too. ``attnsurgery calibrate var`` is :func:`add_arguments` +
:func:`run`.

>>> from attnsurgery.patches.var.calibrate import find_sink_dims
>>> dims = find_sink_dims(model, processor, ["Describe the image.", "What is shown?"], images=[img, img])
>>> patch(model, "var", sink_dims=dims)
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from attnsurgery.errors import SurgeryConfigError
from attnsurgery.targeting import parse_layers

if TYPE_CHECKING:
    from attnsurgery.plugins import CalibrateTools

#: what ``attnsurgery calibrate var`` scores when no --prompt is given
DEFAULT_PROMPTS = (
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Describe the picture in one sentence.",
    "A quick brown fox jumps over the lazy dog.",
)


def _encode(processor: Any, prompt: Any, image: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(prompt, Mapping):  # already tokenised (input_ids, attention_mask, pixel_values ...)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prompt.items()}
    if processor is None:
        raise SurgeryConfigError(
            "find_sink_dims: text prompts need a processor or tokenizer; or pass tokenised input dicts."
        )
    if image is not None:
        encoded = processor(text=prompt, images=image, return_tensors="pt")
    else:
        try:
            encoded = processor(text=prompt, return_tensors="pt")
        except TypeError:  # a plain tokenizer's first argument
            encoded = processor(prompt, return_tensors="pt")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(encoded).items()}


@torch.no_grad()
def sink_dim_scores(
    model: Any,
    processor_or_tokenizer: Any = None,
    prompts: Sequence[str | Mapping[str, torch.Tensor]] = (),
    images: Sequence[Any] | None = None,
    *,
    tau: float = 20.0,
    layers: Any = None,
) -> torch.Tensor:
    """(hidden,) fraction of (prompt, layer) pairs in which some token has ``|x[d] / RMS(x)| >= tau`` on channel d,
    over the layer inputs of ``layers`` (default: 2 .. L-1, where VAR detects sinks)."""
    if not prompts:
        raise SurgeryConfigError("find_sink_dims: give at least one prompt (a few are enough).")
    if images is not None and len(images) != len(prompts):
        raise SurgeryConfigError(
            f"find_sink_dims: {len(images)} images for {len(prompts)} prompts; give one per prompt (or None)."
        )
    device = next(model.parameters()).device
    hits: torch.Tensor | None = None
    pairs = 0
    for i, prompt in enumerate(prompts):
        inputs = _encode(processor_or_tokenizer, prompt, None if images is None else images[i], device)
        hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        num_layers = len(hidden) - 1  # hidden_states[l] is the input of layer l; the last is the final output
        chosen = parse_layers(layers if layers is not None else "2:", num_layers)
        mask = inputs.get("attention_mask")
        for layer in sorted(chosen):
            x = hidden[layer].float()
            z = x.abs() / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()  # (B, T, hidden)
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                z = z * mask[..., None].to(z)  # padding never counts
            peak = z.flatten(0, 1).amax(0)  # (hidden,) strongest token per channel
            hit = (peak >= tau).float()
            hits = hit if hits is None else hits + hit
            pairs += 1
    return hits / max(1, pairs)


def find_sink_dims(
    model: Any,
    processor_or_tokenizer: Any = None,
    prompts: Sequence[str | Mapping[str, torch.Tensor]] = (),
    images: Sequence[Any] | None = None,
    *,
    tau: float = 20.0,
    layers: Any = None,
    min_fraction: float = 0.5,
    max_dims: int = 4,
) -> list[int]:
    """The sink dimensions of ``model``'s language backbone, for ``patch(model, "var", sink_dims=...)``.

    Runs the prompts (strings through ``processor_or_tokenizer``, with ``images`` when given, or tokenised input
    dicts) with hidden states, and keeps the channels where a token's ``|x / RMS(x)|`` reaches ``tau`` in at least
    ``min_fraction`` of the (prompt, layer) pairs over ``layers`` (default 2..L-1), most frequent first, at most
    ``max_dims``. Raises when no channel qualifies (lower ``tau`` for small models; massive activations of a
    7B model are far above 20).
    """
    scores = sink_dim_scores(model, processor_or_tokenizer, prompts, images, tau=tau, layers=layers)
    return select_sink_dims(scores, tau=tau, min_fraction=min_fraction, max_dims=max_dims)


def select_sink_dims(
    scores: torch.Tensor, *, tau: float = 20.0, min_fraction: float = 0.5, max_dims: int = 4
) -> list[int]:
    """:func:`find_sink_dims`'s choice from :func:`sink_dim_scores` (to show the scores without a second pass)."""
    order = torch.argsort(scores, descending=True, stable=True)
    dims = [int(d) for d in order[:max_dims] if scores[d] >= min_fraction]
    if not dims:
        raise SurgeryConfigError(
            f"find_sink_dims: no channel reaches |x/RMS(x)| >= {tau} in {min_fraction:.0%} of the (prompt, layer) "
            f"pairs (best: channel {int(order[0])} in {float(scores[order[0]]):.0%}). This backbone may have no "
            "massive activations at that threshold: lower tau or min_fraction, or check the prompts."
        )
    return dims


# ----------------------------------------------------------------------------------------------------------
# ``attnsurgery calibrate var``
# ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``attnsurgery calibrate var`` (the CLI adds MODEL, --dtype and --device-map)."""
    parser.add_argument("--prompt", action="append", help="prompt (repeatable; a few defaults otherwise)")
    from attnsurgery.commands._common import bounded  # a bad flag names itself before the model loads

    parser.add_argument(
        "--tau", type=bounded(float, 0, low_open=True), default=20.0, help="|x/RMS(x)| threshold (VAR's tau)"
    )
    parser.add_argument(
        "--min-fraction",
        type=bounded(float, 0, 1, low_open=True),
        default=0.5,
        help="share of (prompt, layer) pairs a channel must pass --tau in",
    )
    parser.add_argument("--max-dims", type=bounded(int, 1), default=4, help="most sink dimensions kept")


def run(args: argparse.Namespace, tools: CalibrateTools) -> int:
    """Print the channels' hit fractions and the chosen ``sink_dims``."""
    model, tokenizer = tools.load(args.model)
    scores = sink_dim_scores(model, tokenizer, args.prompt or list(DEFAULT_PROMPTS), tau=args.tau)
    top = scores.argsort(descending=True)[:8].tolist()
    tools.console.print("channels by hit fraction: " + ", ".join(f"{d}: {scores[d]:.0%}" for d in top))
    dims = select_sink_dims(scores, tau=args.tau, min_fraction=args.min_fraction, max_dims=args.max_dims)
    tools.console.print(f"sink_dims: {dims}")
    return 0
