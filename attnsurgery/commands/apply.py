"""``attnsurgery apply``: patch a model, compare baseline vs patched generation, optionally save the surgery."""

from __future__ import annotations

import argparse

from ._common import (
    bounded,
    ensure_recipe,
    load,
    make_console,
    model_options,
    surgery_options,
    surgery_request,
)

DEMO_PROMPT = "The capital of France is"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "apply",
        help="patch a model, compare baseline vs patched generation, optionally save",
        description="attnsurgery apply --recipe temperature smollm2-135m --prompt '...'\n"
        "attnsurgery apply temperature smollm2-135m --arg tau=0.8 --save out/",
    )
    p.add_argument(
        "targets", nargs="+", metavar="[SURGERY] MODEL", help="surgery name (unless --recipe) and model"
    )
    surgery_options(p)
    p.add_argument(
        "--prompt",
        default=None,
        help="prompt to generate from (default: a short demo prompt unless --save is given)",
    )
    p.add_argument("--max-new-tokens", type=bounded(int, 1), default=20, help="tokens generated per arm")
    p.add_argument("--save", metavar="DIR", help="save the surgery (config + state) to DIR")
    p.add_argument("--overwrite", action="store_true", help="replace a surgery already saved in --save DIR")
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="--recipe act MODEL with no recipe made for MODEL: refuse instead of calibrating one (ACT's head "
        "sweep, cached per model under ~/.cache/attnsurgery/recipes, or $ATTNSURGERY_CACHE/recipes)",
    )
    model_options(p)
    p.set_defaults(func=run)


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    """Greedy continuation and the prompt's mean next-token NLL (nats)."""
    import torch

    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
        gen = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    text = tokenizer.decode(gen[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return text, float(out.loss)


def run(args: argparse.Namespace) -> int:
    import math

    from rich.table import Table

    from ..api import patch, save_surgery
    from ..errors import AttnSurgeryError

    if args.prompt is None and not args.save:
        args.prompt = DEMO_PROMPT
    if args.prompt is not None and not args.prompt.strip():
        raise AttnSurgeryError(
            f"--prompt {args.prompt!r} is empty; give text to generate from, or leave --prompt out for the demo "
            "prompt."
        )
    if args.overwrite and not args.save:
        raise AttnSurgeryError(
            "--overwrite replaces a surgery saved in --save DIR; without --save nothing is written. Add --save DIR "
            "or drop --overwrite."
        )
    if args.save is not None:  # before any model loads: a run that cannot save its result is refused first
        from ..api import check_save_folder

        check_save_folder(args.save, overwrite=args.overwrite, option="--save ")
    positional = args.targets
    if args.recipe is not None:
        if len(positional) != 1:
            raise AttnSurgeryError(
                f"apply --recipe {args.recipe} needs exactly one MODEL, got {len(positional)}: "
                f"{' '.join(repr(p) for p in positional)}. The recipe names the surgery; give SURGERY MODEL or "
                "--recipe R MODEL, not both (e.g. `attnsurgery apply --recipe temperature smollm2-135m`)."
            )
        args.surgery, model_name = None, positional[0]
    else:
        if len(positional) != 2:
            raise AttnSurgeryError(
                "apply needs SURGERY MODEL (or --recipe R MODEL), e.g. `attnsurgery apply "
                "temperature smollm2-135m --arg tau=0.8`."
            )
        args.surgery, model_name = positional
    # no recipe made for this model: calibrate one (ACT), or refuse with --no-calibrate
    loaded = ensure_recipe(args.recipe, model_name, args) if args.recipe is not None else None
    what, kwargs = surgery_request(args, model_name)  # validate before the slow model load
    model, tokenizer = loaded or load(model_name, args)
    console = make_console()
    rows = []
    if args.prompt is not None:
        with make_console(stderr=True).status("baseline ..."):
            rows.append(("baseline", *_generate(model, tokenizer, args.prompt, args.max_new_tokens)))
    handle = patch(model, what, **kwargs)
    console.print(f"[bold]patched:[/bold] {handle}")
    if args.prompt is not None:
        with make_console(stderr=True).status("patched ..."):
            rows.append(("patched", *_generate(model, tokenizer, args.prompt, args.max_new_tokens)))
        table = Table(title=f"prompt: {args.prompt!r}")
        for col in ("model", "continuation (greedy)", "prompt NLL", "prompt ppl"):
            table.add_column(col)
        for name, text, nll in rows:
            table.add_row(name, text.strip(), f"{nll:.4f}", f"{math.exp(nll):.2f}")
        console.print(table)
    if args.save:
        path = save_surgery(handle, args.save, overwrite=args.overwrite)
        console.print(f"saved surgery to {path} (load with attnsurgery.load_surgery(model, {str(path)!r}))")
    return 0
