"""Trainer throughput: tokens/s of `attnsurgery.train` steps vs a plain forward+backward of the same model.

    python evals/bench_train.py --out docs/benchmarks-train.json     # rewrites docs/benchmarks-train.{json,md}

Arms (SmolLM2-135M, fp32): the plain step (forward, next-token loss, backward through every weight: what full
fine-tuning pays, without the optimiser), and trainer steps of every trainable surgery with its real objective (kd:
the teacher's forward plus the student's forward and backward; transfer: per-layer attention MSE): gates (headwise,
elementwise), MoH's learned router (alone and with LoRA), Hedgehog's two stages, clipped softmax with LoRA. The trainer's steps include its optimiser step, gradient
clipping, and its two one-window validation passes (before the first step and after the last). Each arm runs ``--steps`` timed steps after one warm-up step, interleaved ``--repeats`` times;
the best run counts. Ratios are against the plain step in the same run (machine noise hits all arms alike).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

from attnsurgery import load_model, patch
from attnsurgery.api import SurgeryHandle
from attnsurgery.train.heap import keep_freed_memory


@contextlib.contextmanager
def _all_weights_trainable(model):
    """Every weight takes a gradient inside (what full fine-tuning pays); frozen again after."""
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(False)


def _plain(model, windows, steps):
    with _all_weights_trainable(model), keep_freed_memory():  # as the trainer runs its steps
        start = time.perf_counter()
        for i in range(steps):
            ids = windows[i % len(windows)]
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def _plain_kd(model, windows, steps):
    """The issue's plain step: the teacher's forward (no grad), then the student's forward and backward through every
    weight on the kd loss: what distilling into the whole model pays per step, without the optimiser."""
    from attnsurgery.train.objectives import kd_loss

    with _all_weights_trainable(model), keep_freed_memory():  # as the trainer runs its steps
        start = time.perf_counter()
        for i in range(steps):
            ids = windows[i % len(windows)]
            with torch.no_grad():
                teacher = model(input_ids=ids, use_cache=False).logits
            kd_loss(model(input_ids=ids, use_cache=False).logits, teacher).backward()
            model.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def _run(model, windows, steps, arm):
    if arm is None:
        return _plain(model, windows, steps)
    if arm == "kd":
        return _plain_kd(model, windows, steps)
    return _trainer(model, windows, steps, arm)


def _trainer(model, windows, steps, arm):
    """Trainer steps of one arm: its surgeries (those in ``frozen`` patched but not trained, as a later stage sees an
    earlier one) under its real objective."""
    from attnsurgery.train import TrainConfig, TrainingData, train

    handles = [patch(model, name, **args) for name, args in arm["surgeries"]]
    for handle, (name, _) in zip(handles, arm["surgeries"]):
        if name in arm.get("frozen", ()):
            for p in handle.parameters():
                p.requires_grad_(False)
    handle = SurgeryHandle(model, [s for h in handles for s in h.surgeries])
    batch = windows[0].shape[0]
    data = TrainingData(torch.cat(list(windows)), windows[0][:1], "bench", 0, 0)
    config = TrainConfig(
        objective=arm["objective"],
        steps=steps,
        batch_size=batch,
        seq_len=windows[0].shape[1],
        val_every=10**9,
        save_every=10**9,
    )
    try:
        start = time.perf_counter()
        train(model, handle, data, config, progress=False)
        return time.perf_counter() - start
    finally:
        handle.remove()


PLAIN = "plain forward+backward (all weights)"
PLAIN_KD = "plain kd step (teacher fwd + fwd+bwd, all weights)"
# every trainable surgery with the objective it trains on (issue 23): a surgery trains a tiny fraction of the weights,
# so each should cost about one plain step (the kd teacher's forward replaces the weight gradients' backward)
ARMS = {
    PLAIN: None,
    PLAIN_KD: "kd",
    "gates headwise (kd)": {"surgeries": [("gated_attention", {"form": "headwise"})], "objective": "kd"},
    "gates elementwise (kd)": {
        "surgeries": [("gated_attention", {"form": "elementwise"})],
        "objective": "kd",
    },
    "MoH learned router, skipping (kd)": {
        "surgeries": [("moh", {"router": "learned", "active": 0.75})],
        "objective": "kd",
    },
    "MoH learned router + LoRA r 8 (kd)": {
        "surgeries": [("moh", {"router": "learned", "active": 0.75}), ("lora", {"r": 8})],
        "objective": "kd",
    },
    "Hedgehog stage 1 (transfer)": {
        "surgeries": [("hedgehog", {"linear_only": True, "feature_dim": 64})],
        "objective": "1000*transfer",
    },
    "Hedgehog stage 2 (LoRA r 8, kd)": {
        "surgeries": [
            ("hedgehog", {"linear_only": True, "feature_dim": 64}),
            ("lora", {"r": 8, "alpha": 16}),
        ],
        "frozen": ("hedgehog",),
        "objective": "kd",
    },
    "clipped softmax + LoRA r 8 (kd)": {
        "surgeries": [("clipped_softmax", {"gamma": -0.03}), ("lora", {"r": 8})],
        "objective": "kd",
    },
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write results JSON here (and a .md beside it)")
    parser.add_argument(
        "--arms", nargs="+", default=None, help="only the arms whose names contain these words"
    )
    args = parser.parse_args(argv)
    arms = {
        name: arm
        for name, arm in ARMS.items()
        if arm is None or not args.arms or any(w.lower() in name.lower() for w in args.arms)
    }
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype="float32")
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    windows = [
        torch.randint(100, tokenizer.vocab_size - 1, (args.batch, args.seq_len), generator=g)
        for _ in range(2)
    ]
    best: dict[str, float] = {}
    for arm in arms.values():  # warm-up
        _run(model, windows, 1, arm)
    for r in range(args.repeats):
        for name, arm in arms.items():
            t = _run(model, windows, args.steps, arm)
            best[name] = min(best.get(name, float("inf")), t)
            print(f"run {r + 1}/{args.repeats} {name:<40} {t:.2f}s", file=sys.stderr, flush=True)
    tokens = args.steps * args.batch * args.seq_len
    base, base_kd = best[PLAIN], best[PLAIN_KD]
    rows = [
        {
            "arm": n,
            "seconds": t,
            "tokens_per_s": tokens / t,
            "ratio_vs_plain": t / base,
            "ratio_vs_plain_kd": t / base_kd,
        }
        for n, t in best.items()
    ]
    command = "python evals/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = [
        "# Trainer throughput",
        "",
        f"`{command}` — {args.model}, fp32, {args.threads} threads, batch {args.batch} x {args.seq_len} tokens, "
        f"{args.steps} steps per arm, best of {args.repeats} interleaved runs ({platform.machine()}, torch "
        f"{torch.__version__}). Ratios: time per step over the plain kd step's (the teacher's forward, then the "
        "student's forward and backward through every weight: issue 23's reference, goal <= 1.2x) and over a plain "
        "forward+backward's, same run.",
        "",
        "| arm | tokens/s | time vs plain kd step | time vs plain fwd+bwd |",
        "|---|---:|---:|---:|",
        *[
            f"| {r['arm']} | {r['tokens_per_s']:.0f} | {r['ratio_vs_plain_kd']:.2f}x | {r['ratio_vs_plain']:.2f}x |"
            for r in rows
        ],
    ]
    print("\n".join(md))
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
        out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
