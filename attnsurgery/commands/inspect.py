"""``attnsurgery inspect``: attention maps and sink statistics, or (``--outliers``) per-layer outlier statistics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import bounded, load, make_console, model_options, surgery_options, surgery_request


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="attention maps (PNG heatmap grid) and per-layer sink statistics; --outliers: kurtosis, inf-norm, "
        "sink share per layer",
        description="attnsurgery inspect smollm2-135m --out maps.png\n"
        "attnsurgery inspect smollm2-135m --outliers --recipe act --windows 8 --out outliers/",
    )
    p.add_argument("model")
    p.add_argument("--surgery", help="inspect the model patched with this surgery")
    surgery_options(p)
    p.add_argument(
        "--prompt",
        default="The quick brown fox jumps over the lazy dog. The dog sleeps.",
        help="text whose attention maps are drawn",
    )
    p.add_argument("--show-layers", default=None, help="layers to plot (default: six spread over the depth)")
    p.add_argument("--heads-shown", type=bounded(int, 1), default=4, help="heads per layer in the plot")
    p.add_argument(
        "--threshold",
        type=bounded(float, 0, 1, low_open=True),
        default=0.1,
        help="sink score threshold (ACT's 0.1)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="PNG file (default attention.png); with --outliers a folder (default outliers)",
    )
    p.add_argument(
        "--outliers",
        action="store_true",
        help="per layer kurtosis and inf-norm of attention output, FFN output and residual stream, first-token "
        "share and the largest activation, on calibration windows (baseline, and patched with a surgery/recipe)",
    )
    p.add_argument(
        "--data",
        default="gutenberg_ppl",
        help="--outliers text, and the text a surgery's own diagnostics (MoH head usage) run on: an offline "
        "task (its calibration split) or a .jsonl/.txt file",
    )
    p.add_argument("--windows", type=bounded(int, 1), default=8, help="windows of --data measured")
    p.add_argument("--seq-len", type=bounded(int, 8), default=256, help="tokens per window of --data")
    p.add_argument("--batch-size", type=bounded(int, 1), default=4, help="windows of --data per forward")
    p.add_argument("--overwrite", action="store_true", help="replace the files an earlier run wrote to --out")
    model_options(p)
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    """What ``inspect`` refuses before the model loads: surgery options without a surgery, a surgery named twice,
    an empty prompt, and outputs that cannot be written or would replace an earlier run's without --overwrite."""
    from ..errors import AttnSurgeryError
    from ._common import check_output_path

    if args.surgery is not None and args.recipe is not None:
        raise AttnSurgeryError(
            f"--surgery {args.surgery} and --recipe {args.recipe} both name what to patch; give one of them."
        )
    if args.surgery is None and args.recipe is None:
        given = [f"--{name}" for name in ("arg", "layers", "heads") if getattr(args, name) is not None]
        if given:
            raise AttnSurgeryError(
                f"{', '.join(given)} configure a surgery, but no surgery is named (the model would be "
                "inspected unpatched); add --surgery NAME or --recipe R, or drop them."
            )
    if not args.outliers and not args.prompt.strip():
        raise AttnSurgeryError(
            f"--prompt {args.prompt!r} is empty; give the text whose attention maps are drawn."
        )
    if args.outliers:
        out = Path(args.out or "outliers")
        check_output_path(str(out), "--out", folder=True)
        written = [out / name for name in ("outliers.json", "outliers.md", "outliers.png")]
    else:
        out = Path(args.out or "attention.png")
        check_output_path(str(out), "--out", folder=False)
        written = [out, out.with_suffix(".json")]
    existing = [str(p) for p in written if p.exists()]
    if existing and not args.overwrite:
        raise AttnSurgeryError(
            f"--out: {', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} (an earlier run); pass "
            "--overwrite to replace, or name another --out."
        )


def _sink_stats(maps, threshold: float) -> list[dict[str, float]]:
    """Per layer: attention mass on the first token, and the share of (head, key) pairs that are sinks.

    A key is a sink in a head when the mean attention it receives from the queries that can see it exceeds
    ``threshold`` (ACT's score; the sail-sg Sink metric uses the same normalisation).
    """
    import torch

    rows = []
    for layer, probs in maps.items():
        p = probs[0]  # (H, Tq, Tk), batch row 0
        t = p.shape[-1]
        seen_by = torch.arange(t, 0, -1, dtype=p.dtype)  # causal: key j is seen by t - j queries
        score = p.sum(1) / seen_by  # (H, Tk)
        sinks = score > threshold
        rows.append(
            {
                "layer": layer,
                "first_token_mass": float(p[:, 1:, 0].mean()) if p.shape[1] > 1 else float(p[:, :, 0].mean()),
                "sink_fraction": float(sinks[:, 1:].float().mean()) if t > 1 else 0.0,
                "max_non_first_score": float(score[:, 1:].max()) if t > 1 else 0.0,
            }
        )
    return rows


def _num_layers(model) -> int:
    from ..discovery import discover

    return discover(model).num_layers


def _outlier_comparison(stats: dict[str, Any]) -> str:
    """Markdown: per layer, each metric of every labelled stats side by side (``base / patched``)."""
    from ..eval.outliers import _fmt

    labels = list(stats)
    cols = [
        ("kurt attn", "attn_kurtosis", 2),
        ("kurt mlp", "mlp_kurtosis", 2),
        ("kurt resid", "residual_kurtosis", 2),
        ("inf attn", "attn_inf_norm", 2),
        ("inf mlp", "mlp_inf_norm", 2),
        ("inf resid", "residual_inf_norm", 2),
        ("sink share", "sink_share", 3),
    ]
    lines = [
        f"**side by side** ({' / '.join(labels)})",
        "",
        "| layer | " + " | ".join(name for name, _, _ in cols) + " |",
        "|---:|" + "---:|" * len(cols),
    ]
    for i, row in enumerate(stats[labels[0]].layers):
        cells = [
            " / ".join(_fmt(getattr(stats[label].layers[i], key), digits) for label in labels)
            for _, key, digits in cols
        ]
        lines.append(f"| {row.layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _inspect_outliers(args: argparse.Namespace) -> int:
    """``inspect --outliers``: per-layer outlier statistics on calibration windows, baseline (and patched)."""
    import json

    from rich.markdown import Markdown

    from ..api import patch
    from ..errors import AttnSurgeryError
    from ..eval.outliers import outlier_stats, plot_outliers, render_outlier_table
    from ..eval.text import calibration_windows

    if args.windows < 1 or args.seq_len < 2:
        raise AttnSurgeryError("--windows must be at least 1 and --seq-len at least 2.")
    request = surgery_request(args, args.model) if (args.recipe is not None or args.surgery) else None
    model, tokenizer = load(args.model, args)
    max_context = getattr(model.config, "max_position_embeddings", None)
    if max_context is not None and args.seq_len > max_context:
        raise AttnSurgeryError(
            f"--seq-len {args.seq_len} is longer than the model's context ({max_context} positions)."
        )
    windows = calibration_windows(tokenizer, args.data, args.windows, args.seq_len)
    batches = list(windows.split(args.batch_size))
    err = make_console(stderr=True)
    stats = {}
    with err.status(f"measuring the unpatched model on {len(windows)} windows ..."):
        stats["baseline"] = outlier_stats(model, batches, label="baseline")
    if request is not None:
        what, kwargs = request
        name = getattr(what, "name", None) or str(what)
        with patch(model, what, **kwargs) as handle:
            with err.status(f"measuring the model patched with {handle} ..."):
                stats[name] = outlier_stats(model, batches, label=name)
    out = Path(args.out or "outliers")
    out.mkdir(parents=True, exist_ok=True)
    data = args.data if ":" in args.data or Path(args.data).exists() else f"{args.data}:calibration"
    title = f"{args.model}: {len(windows)} windows x {windows.shape[1]} tokens of {data}"
    markdown = f"## outliers, {title}\n\n" + render_outlier_table(stats)
    if len(stats) > 1:
        markdown += "\n" + _outlier_comparison(stats)
    payload = {
        "model": args.model,
        "data": data,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "stats": {label: s.to_dict() for label, s in stats.items()},
    }
    paths = {"json": out / "outliers.json", "md": out / "outliers.md", "png": out / "outliers.png"}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    paths["md"].write_text(markdown)
    plot_outliers(stats, paths["png"], title=title)
    console = make_console()
    console.print(Markdown(markdown))
    console.print(f"wrote {paths['json']}, {paths['md']} and {paths['png']}")
    return 0


def run(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from ..api import attention_maps, patch
    from ..plotting import plot_attention_grid

    _check(args)
    if args.outliers:
        return _inspect_outliers(args)
    request = surgery_request(args, args.model) if (args.recipe is not None or args.surgery) else None
    model, tokenizer = load(args.model, args)  # after every argument is checked
    handle = None
    if request is not None:
        what, kwargs = request
        handle = patch(model, what, **kwargs)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    with make_console(stderr=True).status("recording attention ..."):
        show = args.show_layers
        if show is None:
            n = _num_layers(model)
            show = sorted({round(i * (n - 1) / 5) for i in range(6)})
        maps = attention_maps(model, inputs, layers=show)
    # each token as text ("Ġthe" is " the"): byte-level BPE markers mean nothing to a reader of the plot or JSON
    tokens = [tokenizer.decode([int(i)]) for i in inputs["input_ids"][0]]
    out = Path(args.out or "attention.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not maps:  # every shown layer runs a surgery's own attention kernel: no probabilities to draw
        make_console().print(
            f"no attention maps: {handle} computes attention with its own kernel on layers {show}"
        )
        if handle is not None:
            _surgery_inspections(model, tokenizer, handle, out.parent, args)
        return 0
    title = f"{args.model}" + (f" + {handle}" if handle else " (unpatched)")
    plot_attention_grid(maps, tokens, out, heads=args.heads_shown, title=title)
    stats = _sink_stats(maps, args.threshold)
    table = Table(title=f"sink statistics (threshold {args.threshold})")
    for col in ("layer", "mass on first token", "sink fraction", "max non-first score"):
        table.add_column(col)
    for row in stats:
        table.add_row(
            str(row["layer"]),
            f"{row['first_token_mass']:.3f}",
            f"{row['sink_fraction']:.3f}",
            f"{row['max_non_first_score']:.3f}",
        )
    console = make_console()
    console.print(table)
    out.with_suffix(".json").write_text(
        json.dumps({"prompt": args.prompt, "tokens": tokens, "layers": stats}, indent=2)
    )
    console.print(f"wrote {out} and {out.with_suffix('.json')}")
    if handle is not None:
        _surgery_inspections(model, tokenizer, handle, out.parent, args)
    return 0


def _surgery_inspections(
    model: Any, tokenizer: Any, handle: Any, out_dir: Path, args: argparse.Namespace
) -> None:
    """Surgeries with their own diagnostics (MoH's head usage ...) define ``write_inspection(out_dir) -> [paths]``,
    written from what they recorded on ``--windows`` calibration windows of ``--data`` run through the patched
    model (a single prompt is too few tokens for a usage histogram)."""
    import torch

    from ..eval.text import calibration_windows

    inspecting = [s for s in handle.surgeries if callable(getattr(s, "write_inspection", None))]
    if not inspecting:
        return
    windows = calibration_windows(tokenizer, args.data, args.windows, args.seq_len)
    with make_console(stderr=True).status(f"running {len(windows)} windows of {args.data} for {handle} ..."):
        with torch.no_grad():
            for batch in windows.split(args.batch_size):
                model(input_ids=batch.to(model.device), use_cache=False)
    for surgery in inspecting:
        paths = surgery.write_inspection(out_dir)
        make_console().print(f"{surgery.name}: wrote {', '.join(str(p) for p in paths)}")
