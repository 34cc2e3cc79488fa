"""Patch SmolLM2-135M three ways, look at what changed, and restore it.

python examples/quickstart.py
"""

from __future__ import annotations

import torch

from attnsurgery import attention_maps, load_model, patch

model, tokenizer = load_model("smollm2-135m")
inputs = tokenizer("The capital of France is", return_tensors="pt")


def continuation() -> str:
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


print("baseline:            ", continuation())
with patch(model, "temperature", tau=0.7):
    print("temperature tau=0.7: ", continuation())
with patch(model, "head_scale", layers="10:20", scale=0.0, heads=[0, 1, 2]):
    print("3 heads silenced x10:", continuation())
with patch(model, "clipped_softmax", gamma=-12 / 512):
    maps = attention_maps(model, inputs, layers=[15])
    zeros = (maps[15][0].tril() == 0).float().mean() - 0.5 * (1 - 1 / maps[15].shape[-1])
    print(
        "clipped softmax:     ", continuation(), f"(layer 15: {zeros:.0%} of visible weights are exact zeros)"
    )
print("restored:            ", continuation())
