"""VAR (and VHR) on a LLaVA model: ``patch(model, "var")``, generate, compare, restore.

With the weights (a GPU and ``llava-hf/llava-1.5-7b-hf`` in the Hugging Face cache)::

    python examples/var_llava.py --model llava-hf/llava-1.5-7b-hf --image photo.jpg

Without them (no VLM weights are available offline), ``--tiny`` builds a random-weight LLaVA from a config and
shows the same calls; its text is noise, but the mechanics (image spans per row, sink detection, the fused
VAR kernel, VHR's text-only pass, cached generation) are the real ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from attnsurgery import patch


def tiny_llava() -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, object]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from vlm_tiny import prompt, tiny_vlm, vlm_inputs

    model = tiny_vlm("llava", layers=6)
    inputs = vlm_inputs(model, [prompt(model, 4, 8)])
    # random weights have no massive activations: a low threshold on two channels stands in for the
    # real LLaVA-1.5-7B setting (tau 20 on channels 2533 and 1415, picked automatically for that backbone)
    return model, inputs, {"sink_dims": [0, 1], "tau": 1.5, "summ": 0.05}


def real_llava(
    name: str, image_path: str
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, object]]:
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(name, dtype=torch.float16, device_map="auto")
    processor = AutoProcessor.from_pretrained(name)
    text = "USER: <image>\nPlease describe this image in detail. ASSISTANT:"
    inputs = processor(images=Image.open(image_path), text=text, return_tensors="pt").to(model.device)
    return model, inputs, {}  # the recipe's setting: tau 20, rho 0.5, p 0.6, summ 0.2, sink dims known


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-hf/llava-1.5-7b-hf")
    parser.add_argument("--image", help="an image file (real model)")
    parser.add_argument("--tiny", action="store_true", help="random-weight LLaVA built from a config")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.tiny or not args.image:
        model, inputs, var_args = tiny_llava()
    else:
        model, inputs, var_args = real_llava(args.model, args.image)
    width = inputs["input_ids"].shape[1]

    def generate() -> list[int]:
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0
            )
        return out[0, width:].tolist()

    baseline = generate()
    with patch(model, "var", **var_args) as handle:  # p=0.6: sinks keep 60% of their attention
        print(handle)
        with_var = generate()
    with patch(model, "vhr", alpha=2.0):  # layer 1 + the last 14/32 of the layers
        with_vhr = generate()
    assert generate() == baseline, "leaving the with-blocks restores the model exactly"
    print("baseline:", baseline)
    print("var:     ", with_var)
    print("vhr:     ", with_vhr)


if __name__ == "__main__":
    main()
