"""``attnsurgery linearize``: convert a model to Hedgehog / LoLCATs linear attention (stage 1 attention transfer on
the feature maps, stage 2 LoRA); the code lives with the surgery in ``patches/hedgehog/linearize.py``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..patches.hedgehog import linearize  # torch-free at import: --help stays instant

    p = sub.add_parser(
        "linearize",
        help="convert a model to Hedgehog/LoLCATs linear attention (stage 1 transfer, stage 2 LoRA)",
        description="attnsurgery linearize smollm2-135m --out runs/lin --window 64 --stage1-steps 100 "
        "--stage2-steps 100   (DIR loads with patch(model, DIR) / --recipe DIR)",
    )
    linearize.add_arguments(p)
    p.set_defaults(func=linearize.run)
