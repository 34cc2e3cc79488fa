"""Low-precision error of every text surgery on a real model, relative to the stock model's own.

    python evals/lowprec.py --phase after     # writes docs/lowprec.json (this phase) and docs/lowprec.md

For each dtype (bf16, fp16) the error of an arm is ``max |logits(dtype) - logits(fp32)|`` over one prompt,
where both runs use the same weights (the fp32 model cast down) and the same surgery settings; the ratio is an
arm's error over the stock model's error in the same dtype. Surgeries run at their most extreme documented
settings on layers 2+ (ACT: beta 0, where the correction divides by 1 - P). ``--phase before`` was run once on
the code before the fp32-statistics fix; each phase is kept in the JSON and both are tabulated.
VAR and VHR act on vision-language models only and are measured on tiny VLMs in tests/test_lowprec.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
from pathlib import Path

import torch

import attnsurgery
import attnsurgery.engine as engine
from attnsurgery import load_model, patch

#: (label, surgery, arguments): the most extreme documented settings, on layers 2+
ARMS = [
    ("act beta=0 threshold=0.1", "act", {"beta": 0.0, "threshold": 0.1}),
    ("act beta=0 threshold=0.03", "act", {"beta": 0.0, "threshold": 0.03}),
    ("act beta=0.4 threshold=0.1 (shipped)", "act", {"beta": 0.4, "threshold": 0.1}),
    ("clipped_softmax gamma=-1 zeta=2", "clipped_softmax", {"gamma": -1.0, "zeta": 2.0}),
    ("head_scale scale=0", "head_scale", {"scale": 0.0}),
    ("reweight p=15 offset=1", "reweight", {"p": 15.0, "offset": 1.0}),
    ("temperature tau=0.5 c=0.1", "temperature", {"tau": 0.5, "c": 0.1}),
]
TEXT = (
    "The history of the lighthouse begins in the ancient world, where fires were lit on hilltops to guide "
    "ships into harbour. The most famous of these, the Pharos of Alexandria, stood for more than a thousand "
    "years before earthquakes brought it down. Later builders learned to focus the light with lenses and "
    "mirrors, so that a single lamp could be seen from many miles out at sea."
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def fp32_attention_core():
    """Every patched layer's attention computed in fp32 from the low-precision q / k / v (and cast back): what
    any implementation of the attention arithmetic could at best achieve inside a low-precision model."""
    run = engine.LayerPlan.run

    def upcast(self, module, query, key, value, mask, scaling, dropout, kwargs):
        if self.idle:  # layers no surgery touches keep the model's own kernel
            return run(self, module, query, key, value, mask, scaling, dropout, kwargs)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.float()
        out, weights = run(
            self, module, query.float(), key.float(), value.float(), mask, scaling, dropout, kwargs
        )
        return out.to(query.dtype), weights

    engine.LayerPlan.run = upcast
    try:
        yield
    finally:
        engine.LayerPlan.run = run


def measure(name: str, tokens: int, layers: str) -> dict:
    model, tok = load_model(name)
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :tokens]
    assert ids.shape[1] == tokens, f"the text has only {ids.shape[1]} tokens"
    models = {"fp32": model, **{k: copy.deepcopy(model).to(v) for k, v in DTYPES.items()}}

    def run(surgery, args, ideal=False):
        out = {}
        for key, m in models.items():
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if ideal:
                    stack.enter_context(fp32_attention_core())
                stack.enter_context(patch(m, surgery, layers=layers, **args))
                out[key] = m(ids).logits.float()
        return {k: float((out[k] - out["fp32"]).abs().max()) for k in DTYPES}

    def row(err, ideal, stock):
        return {k: {"error": err[k], "ratio": err[k] / stock[k], "ideal": ideal[k]} for k in DTYPES}

    with torch.no_grad():
        stock = {
            k: float((models[k](ids).logits.float() - models["fp32"](ids).logits.float()).abs().max())
            for k in DTYPES
        }
    # the stock model with its attention routed through the engine (an exact identity) and an fp32 core
    stock_ideal = run("head_scale", {"scale": 1.0, "trainable": True}, ideal=True)
    rows = {"stock": row(stock, stock_ideal, stock)}
    for label, surgery, args in ARMS:
        rows[label] = row(run(surgery, args), run(surgery, args, ideal=True), stock)
        print(
            label,
            {
                k: f"{v['error']:.3f} ({v['ratio']:.2f}x, ideal {v['ideal']:.3f})"
                for k, v in rows[label].items()
            },
            flush=True,
        )
    return rows


def render(data: dict) -> str:
    phases = [p for p in ("before", "after") if p in data["phases"]]
    latest = data["phases"][phases[-1]]
    lines = [
        "# Low-precision error of each surgery (SmolLM2-135M)",
        "",
        f"Regenerate: `{data['command']} --phase after` (`--phase before` was run once on the code before the fp32 "
        "output / correction fix, commit 7638d0e's kernels; each phase is kept in docs/lowprec.json).",
        "",
        f"{data['tokens']} tokens of English text, surgeries on layers `{data['layers']}`. Error = max-abs logit "
        "difference of the model cast to bf16 / fp16 against the same model and settings in fp32; the ratio is that "
        "error over the stock model's own error in the same dtype. *fp32 core* = the same surgery with every patched "
        "layer's attention computed in fp32 from the low-precision q / k / v (the floor for any attention "
        "arithmetic inside a low-precision model; measured in the latest phase). VAR / VHR need a vision-language "
        "model: their tiny-VLM check is in tests/test_lowprec.py.",
        "",
    ]
    cols = [f"{d} {p}" for d in DTYPES for p in phases] + [f"{d} fp32 core" for d in DTYPES]
    lines += ["| arm | " + " | ".join(cols) + " |", "|" + "---|" * (1 + len(cols))]
    for arm, last in latest["rows"].items():
        cells = []
        for d in DTYPES:
            for p in phases:
                row = data["phases"][p]["rows"].get(arm)
                cells.append("-" if row is None else f"{row[d]['error']:.3f} ({row[d]['ratio']:.2f}x)")
        stock = latest["rows"]["stock"]
        cells += [f"{last[d]['ideal']:.3f} ({last[d]['ideal'] / stock[d]['error']:.2f}x)" for d in DTYPES]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", *NOTES, "", "Environment: " + ", ".join(f"{k} {v}" for k, v in latest["env"].items()), ""]
    return "\n".join(lines)


NOTES = [
    "Reading the table: the arithmetic fix (ACT's unedited output, its correction and the fused kernels' output kept "
    "in fp32 until the end, so that `(o - u) / (1 - P)` no longer amplifies a bf16-rounded `o`) matters where a "
    "correction divides by a small `1 - P`; on this prompt the shipped and extreme settings are dominated by "
    "another effect. Most arms stay above 2x the stock error even with an fp32 attention core: the modified "
    "network itself is more sensitive to bf16 / fp16 weights and activations than the stock one (silencing every "
    "head of layers 2+, sharpening with p=15 or renormalising attention away from sinks changes how rounding in "
    "q / k propagates), which no attention kernel can win back. The target that the code can meet, and that "
    "tests/test_lowprec.py holds on every tiny architecture, is an error within 2x of max(stock, fp32 core).",
    "",
    "ACT at threshold 0.03 also flips sink sets between dtypes (mean received attention near the threshold), a "
    "discontinuity of the method that no arithmetic removes; it is reported, not held to the target.",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--layers", default="2:")
    parser.add_argument("--phase", choices=("before", "after"), default="after")
    parser.add_argument("--out", default="docs/lowprec")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = measure(args.model, args.tokens, args.layers)
    path = Path(args.out + ".json")
    data = json.loads(path.read_text()) if path.exists() else {"phases": {}}
    data.update(
        model=args.model,
        tokens=args.tokens,
        layers=args.layers,
        command=f"python evals/lowprec.py --model {args.model} --tokens {args.tokens} --layers {args.layers}",
    )
    env = {
        "attnsurgery": attnsurgery.__version__ if hasattr(attnsurgery, "__version__") else "?",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
    data["phases"][args.phase] = {"rows": rows, "env": env}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    Path(args.out + ".md").write_text(render(data))
    print(f"wrote {path} and {args.out}.md")


if __name__ == "__main__":
    main()
