"""``attnsurgery train``: train a surgery's parameters and/or LoRA with the shared trainer; the run folder is a recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (
    bounded,
    load,
    make_console,
    model_options,
    surgery_options,
    surgery_request,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a surgery's parameters and/or LoRA (model frozen); the output folder is a recipe",
        description="attnsurgery train smollm2-135m gated_attention --arg form=headwise --objective kd "
        "--steps 200 --out runs/gates   (multi-process: accelerate launch -m attnsurgery train ...)",
    )
    add_train_arguments(p)
    surgery_options(p)
    model_options(p)
    p.set_defaults(func=run)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model alias (smollm2-135m, gemma3-270m), hub id or local path")
    p.add_argument(
        "surgery", nargs="?", help="surgery to train (gated_attention, head_scale ...); or --recipe"
    )
    p.add_argument(
        "--out", required=True, help="run folder (a recipe once finished: patch(model, DIR), --recipe DIR)"
    )
    p.add_argument(
        "--data", default="gutenberg_ppl", help="offline task (calibration split), .jsonl/.txt file or Hub id"
    )
    p.add_argument(
        "--objective",
        default="lm",
        help="lm, kd (KL to the unpatched model), transfer (attention-output MSE), sink (first-token attention share), "
        "outlier (residual-stream log crest factor) or a weighted sum: 'lm+0.5*kd', 'kd+sink+0.1*outlier'",
    )
    p.add_argument("--steps", type=bounded(int, 1), default=200, help="optimiser steps")
    p.add_argument(
        "--lr",
        type=bounded(float, 0, low_open=True),
        default=1e-2,
        help="learning rate of the surgery's own parameters",
    )
    p.add_argument("--batch-size", type=bounded(int, 1), default=4, help="global windows per optimiser step")
    p.add_argument(
        "--grad-accum", type=bounded(int, 1), default=1, help="micro-batches accumulated per optimiser step"
    )
    p.add_argument("--seq-len", type=bounded(int, 8), default=256, help="tokens per training window")
    p.add_argument(
        "--warmup",
        type=bounded(float, 0, 1, high_open=True),
        default=0.0,
        help="fraction of steps with a linear warm-up",
    )
    p.add_argument(
        "--schedule",
        choices=("constant", "cosine", "linear"),
        default="constant",
        help="learning rate after the warm-up: constant, or a cosine / linear decay to 0 at the last step",
    )
    p.add_argument("--val-every", type=bounded(int, 1), default=25, help="steps between validations")
    p.add_argument(
        "--val-windows", type=bounded(int, 1), default=32, help="held-back windows scored at each validation"
    )
    p.add_argument("--save-every", type=bounded(int, 1), default=25, help="steps between checkpoints")
    p.add_argument(
        "--keep", choices=("last", "best"), default="last", help="ship the last or the best-validation state"
    )
    p.add_argument(
        "--patience", type=bounded(int, 1), default=None, help="stop after N validations without improvement"
    )
    p.add_argument(
        "--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="accelerate mixed precision"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lora-r", type=bounded(int, 0), default=0, help="add LoRA adapters of this rank (peft); 0: none"
    )
    p.add_argument(
        "--lora-alpha", type=bounded(float, 0, low_open=True), default=None, help="LoRA alpha (default 2 x r)"
    )
    p.add_argument(
        "--lora-targets",
        default=None,
        help="projections that get adapters (default: every projection of the attention)",
    )
    p.add_argument("--lora-layers", default=None, help="layers that get adapters (default: the surgery's)")
    p.add_argument(
        "--lora-lr",
        type=bounded(float, 0, low_open=True),
        default=1e-4,
        help="learning rate of model weights: LoRA adapters, --train-base",
    )
    p.add_argument(
        "--train-base",
        default=None,
        metavar="attention|NAMES",
        help="also train base weights ('attention': every attention projection, or names like q_proj,o_proj) "
        "in the surgery's layers, as trainable copies that remove() swaps back (the finetune surgery)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run(args: argparse.Namespace) -> int:
    from ..errors import AttnSurgeryError
    from ..train import TrainConfig, check_run_folder, prepare_data, train
    from ..train.compose import compose_for_training

    if not args.surgery and not args.recipe and not args.lora_r and not args.train_base:
        raise AttnSurgeryError(
            "train: name a SURGERY, a --recipe, --lora-r N (LoRA alone) or --train-base attention."
        )
    if args.surgery and args.recipe is not None:
        raise AttnSurgeryError(
            f"train: SURGERY {args.surgery} and --recipe {args.recipe} both name what to train; give one of them."
        )
    if not args.lora_r:  # LoRA options without LoRA would be ignored without a word
        given = [
            f"--{name.replace('_', '-')}"
            for name in ("lora_alpha", "lora_targets", "lora_layers")
            if getattr(args, name) is not None
        ]
        if given:
            raise AttnSurgeryError(
                f"{', '.join(given)} configure LoRA adapters, but --lora-r is 0 (no LoRA); add --lora-r N or drop them."
            )
    from ._common import check_output_path

    check_output_path(args.out, "--out", folder=True)
    config = TrainConfig(
        objective=args.objective,
        steps=args.steps,
        lr=args.lr,
        lora_lr=args.lora_lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        warmup=args.warmup,
        schedule=args.schedule,
        val_every=args.val_every,
        save_every=args.save_every,
        keep=args.keep,
        patience=args.patience,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
    )
    config.validate()  # bad settings fail before the slow model load, and nothing is written
    out = Path(args.out)
    check_run_folder(out, resume=args.resume, overwrite=args.overwrite)
    lora_args = None
    if args.lora_r:
        from ..registry import get_surgery_class

        lora_args = {
            "r": args.lora_r,
            "alpha": args.lora_alpha or 2.0 * args.lora_r,
            "targets": args.lora_targets,
        }
        cls = get_surgery_class("lora")
        cls.config_class.from_kwargs("lora", lora_args)
    base_args = None
    if args.train_base:
        from ..registry import get_surgery_class

        base_args = {"targets": None if args.train_base == "attention" else args.train_base}
        get_surgery_class("finetune").config_class.from_kwargs("finetune", base_args)
    request = surgery_request(args, args.model) if (args.surgery or args.recipe) else None
    model, tokenizer = load(args.model, args)
    max_context = getattr(model.config, "max_position_embeddings", None)
    data = prepare_data(
        tokenizer, args.data, args.seq_len, max_context=max_context, max_val_windows=args.val_windows
    )
    handle = compose_for_training(
        model,
        surgery=request[0] if request is not None else None,
        surgery_args=request[1] if request is not None else None,
        lora=None
        if lora_args is None
        else {"layers": args.lora_layers if args.lora_layers is not None else args.layers, **lora_args},
        finetune=None if base_args is None else {"layers": args.layers, **base_args},
    )
    surgeries = handle.surgeries
    console = make_console(stderr=True)
    d = data.describe()
    console.print(
        f"training {', '.join(s.name for s in surgeries)} on {d['source']} ({d['train_windows']} windows of "
        f"{d['seq_len']} tokens, {d['val_windows']} held back for validation), objective {config.objective}, "
        f"{config.steps} steps -> {out}"
    )
    result = train(
        model,
        handle,
        data,
        config,
        out_dir=out,
        resume=args.resume,
        overwrite=args.overwrite,
        model_name=args.model,
    )
    first, last = result.val_history[0], result.final_val
    console.print(
        f"done: {result.steps} steps, {result.tokens:,} tokens, {result.seconds / 60:.1f} min; validation lm loss "
        f"{first['lm']:.4f} -> {last['lm']:.4f} (ppl {first['ppl']:.2f} -> {last['ppl']:.2f}); "
        f"recipe: {out / 'recipe.yaml'}"
    )
    return 0
