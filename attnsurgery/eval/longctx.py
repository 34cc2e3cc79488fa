"""Long-context evaluation: what a linearized (or windowed) model keeps beyond its softmax window.

The offline multiple-choice prompts are shorter than a 64-token window, so a sliding-window hybrid scores exactly as
softmax on them and says nothing. Two measures that do:

* **perplexity at 1k / 2k / 4k-token windows** of ``gutenberg_ppl``'s test split (never trained on);
* **passkey retrieval** (Mohtashami & Jaggi, *Landmark Attention*, 2023): a five-digit key hidden at a given depth of
  1k-4k tokens of filler, then asked for at the end. Deterministic: keys and depths come from a seeded generator,
  the filler is fixed, decoding is greedy; a trial passes when the model's next tokens spell the key.

::

    python -m attnsurgery.eval.longctx smollm2-135m --recipe runs/hybrid --lengths 1024 2048 4096 \\
        --out evals/results/longctx/hybrid

writes ``longctx.json`` / ``.md`` / ``.png``: every arm (the baseline first) at every length.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import AttnSurgeryError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer: Any, length: int, key: int, depth: float) -> str:
    """A prompt of about ``length`` tokens: filler with "The pass key is KEY. Remember it." at ``depth`` (0 = start,
    1 = end) of it, then the question. The filler is cut at sentence boundaries to fit."""
    intro = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    fixed = len(tokenizer(intro + needle + QUESTION, add_special_tokens=False)["input_ids"])
    repeats = max(1, (length - fixed) // max(per, 1))
    before = round(depth * repeats)
    return intro + FILLER * before + needle + FILLER * (repeats - before) + QUESTION


def passkey_trials(n: int, seed: int = 0) -> list[tuple[int, float]]:
    """``n`` (key, depth) pairs, the same for every arm and length: five-digit keys, depths spread over [0.05, 0.95]."""
    rng = random.Random(seed)
    return [(rng.randint(10000, 99999), 0.05 + 0.9 * (i + 0.5) / n) for i in range(n)]


@torch.no_grad()
def passkey_accuracy(
    model: Any, tokenizer: Any, length: int, trials: list[tuple[int, float]]
) -> dict[str, Any]:
    """Fraction of trials whose greedy continuation (at most 8 new tokens) starts with the key."""
    hits = []
    device = next(model.parameters()).device
    for key, depth in trials:
        ids = tokenizer(passkey_prompt(tokenizer, length, key, depth), return_tensors="pt")["input_ids"].to(
            device
        )
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        hits.append(text.strip().startswith(str(key)))
    return {"accuracy": sum(hits) / len(hits), "trials": len(hits), "prompt_tokens": int(ids.shape[1])}


def long_windows(tokenizer: Any, length: int, n: int, source: str = "gutenberg_ppl") -> torch.Tensor:
    """Up to ``n`` windows of ``length`` tokens of ``source``'s test split (fewer when the split is shorter)."""
    from .training_table import _test_windows

    return _test_windows(tokenizer, source, length, n)


def evaluate_long_context(
    model: Any,
    tokenizer: Any,
    arms: list[tuple[str, Any]],
    lengths: list[int],
    *,
    ppl_windows: int = 8,
    passkey: int = 10,
    seed: int = 0,
    source: str = "gutenberg_ppl",
) -> dict[str, Any]:
    """``{"lengths", "arms": {arm: {length: {"ppl", "windows", "passkey", ...}}}}`` for ``arms`` = [(name, apply)],
    where ``apply(model)`` patches the model and returns a handle (None: the unpatched baseline)."""
    from .quant import perplexity

    limit = getattr(model.config, "max_position_embeddings", None)
    too_long = [n for n in lengths if limit is not None and n > limit]
    if too_long:
        raise AttnSurgeryError(
            f"lengths {too_long} exceed the model's context ({limit} positions); use <= {limit}."
        )
    trials = passkey_trials(passkey, seed) if passkey else []
    windows = {n: long_windows(tokenizer, n, ppl_windows, source) for n in lengths}
    results: dict[str, Any] = {"lengths": lengths, "source": source, "seed": seed, "arms": {}}
    for name, apply in arms:
        handle = apply(model) if apply is not None else None
        try:
            row = {}
            for n in lengths:
                cell: dict[str, Any] = {"windows": int(len(windows[n]))}
                if len(windows[n]):
                    with torch.no_grad():
                        cell["ppl"] = perplexity(model, windows[n])
                if trials:
                    cell.update(
                        {f"passkey_{k}": v for k, v in passkey_accuracy(model, tokenizer, n, trials).items()}
                    )
                row[str(n)] = cell
            results["arms"][name] = row
        finally:
            if handle is not None:
                handle.remove()
    return results


def render(results: dict[str, Any]) -> str:
    lengths = [str(n) for n in results["lengths"]]
    lines = [
        "# Long context",
        "",
        f"Perplexity on {results['source']}'s test split at each window length, and passkey retrieval (greedy, "
        f"seed {results['seed']}). Regenerate: `python -m attnsurgery.eval.longctx`.",
        "",
        "| arm | "
        + " | ".join(f"ppl @{n}" for n in lengths)
        + " | "
        + " | ".join(f"passkey @{n}" for n in lengths)
        + " |",
        "|---|" + "---:|" * (2 * len(lengths)),
    ]
    for arm, row in results["arms"].items():
        ppl = [f"{row[n]['ppl']:.2f}" if "ppl" in row[n] else "-" for n in lengths]
        keys = [f"{row[n]['passkey_accuracy']:.0%}" if "passkey_accuracy" in row[n] else "-" for n in lengths]
        lines.append(f"| {arm} | " + " | ".join(ppl) + " | " + " | ".join(keys) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = results["lengths"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, row in results["arms"].items():
        a.plot(lengths, [row[str(n)].get("ppl", math.nan) for n in lengths], "o-", label=arm)
        b.plot(lengths, [row[str(n)].get("passkey_accuracy", math.nan) for n in lengths], "o-", label=arm)
    a.set(
        xscale="log",
        xlabel="window (tokens)",
        ylabel="test perplexity ↓",
        title="perplexity by window length",
    )
    b.set(
        xscale="log",
        xlabel="prompt (tokens)",
        ylabel="passkey accuracy ↑",
        ylim=(0, 1.05),
        title="passkey retrieval",
    )
    for ax in (a, b):
        ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
        ax.grid(True, alpha=0.3)
    a.set_ylim(bottom=0)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from ..cli import route_library_noise

    route_library_noise()

    parser = argparse.ArgumentParser(
        prog="python -m attnsurgery.eval.longctx", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model", help="model alias, hub id or path")
    parser.add_argument(
        "--recipe", action="append", default=[], help="an arm: recipe name or folder (repeatable)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--ppl-windows", type=int, default=8, help="test windows per length")
    parser.add_argument("--passkey", type=int, default=10, help="passkey trials per length (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder (longctx.json / .md / .png)")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    out = Path(args.out)
    try:
        if any(n < 16 for n in args.lengths) or args.ppl_windows < 1 or args.passkey < 0:
            raise AttnSurgeryError("--lengths must be >= 16 tokens, --ppl-windows >= 1 and --passkey >= 0.")
        if (out / "longctx.json").exists() and not args.overwrite:
            raise AttnSurgeryError(
                f"{out}/longctx.json exists; pass --overwrite to replace it or name another --out."
            )
        from ..api import patch
        from ..models import load_model
        from ..recipe import find_recipe

        recipes = [find_recipe(r) for r in args.recipe]  # a bad recipe fails before the model loads
        model, tokenizer = load_model(args.model)
        arms = [("baseline", None)] + [
            (r.name or str(path), lambda m, r=r: patch(m, r)) for r, path in zip(recipes, args.recipe)
        ]
        results = evaluate_long_context(
            model,
            tokenizer,
            arms,
            args.lengths,
            ppl_windows=args.ppl_windows,
            passkey=args.passkey,
            seed=args.seed,
        )
    except AttnSurgeryError as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "longctx.json").write_text(json.dumps({"model": args.model, **results}, indent=2) + "\n")
    (out / "longctx.md").write_text(render(results))
    plot(results, out / "longctx.png")
    console.print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
