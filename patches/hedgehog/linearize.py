"""``attnsurgery linearize MODEL --out DIR``: the two-stage LoLCATs conversion on the shared trainer.

Stage 1, attention transfer (LoLCATs, Zhang et al., ICLR 2025, arXiv 2410.10254; Hedgehog's softmax mimicry,
Zhang et al., ICLR 2024, arXiv 2402.04347): ``hedgehog`` patched on, only its feature maps and window factors
train, on ``1000*transfer`` — per layer, the MSE between the linearized and the softmax attention outputs, each
layer fed the softmax model's inputs. Stage 2, low-rank linearizing: the stage-1 maps frozen, LoRA (peft, r 8,
alpha 16) on the attention projections trained on next-token loss (``lm``) or distillation (``kd``).

The folder::

    DIR/stage1/        the stage-1 run (a recipe: hedgehog alone)
    DIR/stage2/        the stage-2 run (hedgehog + lora)
    DIR/recipe.yaml    the finished conversion (copied from the last stage): patch(model, DIR), --recipe DIR

``--resume`` continues where a run stopped (a finished stage is reused, an unfinished one resumes from its
checkpoint); ``handle.remove()`` on the loaded recipe gives back the softmax model exactly.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

STAGES = ("stage1", "stage2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from attnsurgery.commands._common import (  # checked as parsed: a bad flag fails before any load
        bounded,
        device_map_name,
        dtype_name,
    )

    p.add_argument("model", help="model alias (smollm2-135m ...), hub id or local path")
    p.add_argument("--out", required=True, help="conversion folder (a recipe once finished)")
    p.add_argument(
        "--window",
        type=int,  # range-checked in run(), before any load
        default=None,
        help="softmax window of the hybrid (default 64, LoLCATs')",
    )
    p.add_argument(
        "--linear-only", action="store_true", help="pure Hedgehog linear attention, no softmax window"
    )
    p.add_argument("--feature-dim", type=int, default=64, help="feature map width F (phi has 2F dims)")
    p.add_argument("--layers", default=None, help="layers to linearize (default: every full-attention layer)")
    p.add_argument(
        "--data", default="gutenberg_ppl", help="offline task (calibration split), .jsonl/.txt or Hub id"
    )
    p.add_argument("--seq-len", type=bounded(int, 8), default=256, help="tokens per training window")
    p.add_argument(
        "--batch-size", type=bounded(int, 1), default=4, help="windows per optimiser step (both stages)"
    )
    p.add_argument(
        "--val-windows", type=bounded(int, 1), default=16, help="held-back windows scored at each validation"
    )
    p.add_argument("--stage1-steps", type=bounded(int, 1), default=100, help="attention-transfer steps")
    p.add_argument(
        "--stage1-lr",
        type=bounded(float, 0, low_open=True),
        default=1e-2,
        help="feature maps' learning rate (LoLCATs: 1e-2)",
    )
    p.add_argument(
        "--stage2-steps", type=bounded(int, 0), default=100, help="LoRA steps (0: stop after stage 1)"
    )
    p.add_argument("--stage2-objective", default="lm", help="lm (next token, LoLCATs), kd, or a sum: 'lm+kd'")
    p.add_argument("--lora-r", type=bounded(int, 1), default=8, help="stage-2 LoRA rank")
    p.add_argument(
        "--lora-alpha", type=bounded(float, 0, low_open=True), default=16.0, help="stage-2 LoRA alpha"
    )
    p.add_argument(
        "--lora-lr", type=bounded(float, 0, low_open=True), default=1e-4, help="stage-2 LoRA learning rate"
    )
    p.add_argument("--val-every", type=bounded(int, 1), default=25, help="steps between validations")
    p.add_argument("--save-every", type=bounded(int, 1), default=25, help="steps between checkpoints")
    p.add_argument(
        "--keep", choices=("last", "best"), default="best", help="ship the last or best-validation state"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", type=dtype_name, default="float32", help="float32 | bfloat16 | float16 | auto")
    p.add_argument(
        "--device-map", type=device_map_name, default=None, help="accelerate device map, e.g. auto"
    )
    p.add_argument("--resume", action="store_true", help="continue the conversion in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def linearize(
    model: Any,
    data: Any,
    out: str | Path,
    *,
    surgery_args: dict[str, Any] | None = None,
    layers: Any = None,
    stage1: Any = None,
    stage2: Any = None,
    lora_args: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    log: Any = None,
) -> Any:
    """Convert ``model`` in place (stage 1, then stage 2 unless ``stage2`` is None) and return the handle of the
    finished conversion (hedgehog, plus lora after stage 2), as ``patch(model, out)`` would load it.

    ``stage1`` / ``stage2`` are :class:`attnsurgery.train.TrainConfig` s (their ``objective`` is set here: stage 1
    ``1000*transfer``; stage 2 keeps the one given, ``lm`` by default).
    """
    from attnsurgery.api import SurgeryHandle, patch
    from attnsurgery.train import TrainConfig, check_run_folder, train

    say = log or (lambda msg: None)
    out = Path(out)
    check_run_folder(out, resume=resume, overwrite=overwrite, checkpoint=None)  # each stage resumes its own
    if overwrite and not resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stage1 = stage1 or TrainConfig()
    stage1.objective = "1000*transfer"  # LoLCATs' MSE x 1000 (their xent weight 0: output matching only)
    stage1.validate()
    if stage2 is not None:
        stage2.validate()

    def run_stage(name: str, handle: Any, config: Any) -> None:
        folder = out / name
        if (folder / "recipe.yaml").is_file():
            return
        again = resume and (folder / "checkpoint.pt").is_file()
        say(
            f"{name}: {'resuming' if again else 'training'} {config.steps} steps ({config.objective}) -> {folder}"
        )
        train(
            model,
            handle,
            data,
            config,
            out_dir=folder,
            resume=again,
            overwrite=not again,
            model_name=model_name,
            progress=progress,
            label=f"{name} ({config.objective})",
        )

    if stage2 is not None and (out / "stage2" / "recipe.yaml").is_file():
        say(f"stage2: finished run found in {out / 'stage2'}, reusing it")
        handle = patch(model, out / "stage2")
        _publish(out / "stage2", out)
        return handle
    # stage 1: feature maps and window factors only
    first = out / "stage1"
    if (first / "recipe.yaml").is_file():
        say(f"stage1: finished run found in {first}, reusing it")
        hedgehog = patch(model, first)
    else:
        hedgehog = patch(model, "hedgehog", layers=layers, **(surgery_args or {}))
        try:
            run_stage("stage1", hedgehog, stage1)
        except BaseException:
            hedgehog.remove()
            raise
    final = first
    handle = hedgehog
    if stage2 is not None:
        for p in hedgehog.parameters():  # frozen: the trainer trains only what requires grad
            p.requires_grad_(False)
        lora = patch(model, "lora", **{"r": 8, "alpha": 16.0, **(lora_args or {})})
        handle = SurgeryHandle(model, hedgehog.surgeries + lora.surgeries)
        try:
            run_stage("stage2", handle, stage2)
        except BaseException:
            handle.remove()
            raise
        final = out / "stage2"
    _publish(final, out)
    return handle


def _publish(run: Path, out: Path) -> None:
    """Copy the last stage's recipe and state next to the stage folders (recipe.yaml last: a folder with it is a
    finished conversion)."""
    for item in run.iterdir():
        if item.name in ("checkpoint.pt", "recipe.yaml") or item.name.endswith(".tmp"):
            continue
        target = out / item.name
        if item.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
    # the published recipe names the conversion and both of its stages, not the last stage alone
    import yaml

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    parts = []
    for i, name in enumerate(("stage1", "stage2")):
        path = out / name / "recipe.yaml"
        if not path.is_file():
            continue
        t = yaml.safe_load(path.read_text()).get("training") or {}
        val = t.get("validation") or {}
        what = "attention transfer" if i == 0 else "LoRA"
        lm = ""
        if val.get("before") and val.get("kept"):
            lm = f", validation lm {val['before']['lm']:.4f} -> {val['kept']['lm']:.4f}"
        parts.append(f"stage {i + 1}, {what} ({t.get('objective')}, {t.get('steps')} steps{lm})")
    recipe["name"] = out.name
    recipe["description"] = f"Linearized with `attnsurgery linearize`: {'; then '.join(parts)}."
    tmp = out / "recipe.yaml.tmp"
    tmp.write_text(yaml.safe_dump(recipe, sort_keys=False, width=110))
    tmp.replace(out / "recipe.yaml")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from attnsurgery.errors import AttnSurgeryError
    from attnsurgery.models import load_model
    from attnsurgery.train import TrainConfig, check_run_folder, prepare_data

    console = Console(stderr=True)
    if args.linear_only and args.window is not None:
        raise AttnSurgeryError(
            f"linearize: --linear-only has no softmax window, so --window {args.window} would be ignored; give one "
            "of them."
        )
    if args.window is None:
        args.window = 64
    if args.window < 1:
        raise AttnSurgeryError(f"linearize: --window must be at least 1, got {args.window}.")
    if args.feature_dim < 1:
        raise AttnSurgeryError(f"linearize: --feature-dim must be at least 1, got {args.feature_dim}.")
    if args.stage1_steps < 1:
        raise AttnSurgeryError(
            "linearize: --stage1-steps must be at least 1 (stage 1 is what makes the maps work)."
        )
    common = dict(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        val_every=args.val_every,
        save_every=args.save_every,
        keep=args.keep,
        seed=args.seed,
    )
    stage1 = TrainConfig(objective="1000*transfer", steps=args.stage1_steps, lr=args.stage1_lr, **common)
    stage2 = (
        TrainConfig(objective=args.stage2_objective, steps=args.stage2_steps, lora_lr=args.lora_lr, **common)
        if args.stage2_steps > 0
        else None
    )
    for config in (stage1, stage2):
        if config is not None:
            config.validate()  # bad settings fail before the slow model load
    surgery_args = {"feature_dim": args.feature_dim}
    surgery_args.update({"linear_only": True} if args.linear_only else {"window": args.window})
    from attnsurgery.registry import get_surgery_class

    get_surgery_class("hedgehog").config_class.from_kwargs("hedgehog", surgery_args)
    get_surgery_class("lora").config_class.from_kwargs("lora", {"r": args.lora_r, "alpha": args.lora_alpha})
    from attnsurgery.commands._common import check_output_path

    check_output_path(args.out, "--out", folder=True)
    out = Path(args.out)
    check_run_folder(out, resume=args.resume, overwrite=args.overwrite, checkpoint=None)
    with console.status(f"loading {args.model} ..."):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device_map=args.device_map)
    data = prepare_data(
        tokenizer,
        args.data,
        args.seq_len,
        max_context=getattr(model.config, "max_position_embeddings", None),
        max_val_windows=args.val_windows,
    )
    d = data.describe()
    console.print(
        f"linearizing {args.model}: {'linear only' if args.linear_only else f'hybrid, window {args.window}'}, "
        f"feature_dim {args.feature_dim}; data {d['source']} ({d['train_windows']} windows of {d['seq_len']} "
        f"tokens); stage 1 {args.stage1_steps} steps, stage 2 {args.stage2_steps} steps -> {out}"
    )
    handle = linearize(
        model,
        data,
        out,
        surgery_args=surgery_args,
        layers=args.layers,
        stage1=stage1,
        stage2=stage2,
        lora_args={"r": args.lora_r, "alpha": args.lora_alpha},
        resume=args.resume,
        overwrite=args.overwrite,
        model_name=args.model,
        log=console.print,
    )
    skipped = handle.surgeries[0].skipped
    note = f" (sliding-window layers {skipped} kept as they are)" if skipped else ""
    console.print(f"done{note}: patch(model, {str(out)!r}) or --recipe {out}")
    return 0
