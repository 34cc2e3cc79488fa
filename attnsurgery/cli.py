"""``attnsurgery`` command line: list, apply, inspect, eval, reproduce, calibrate, train, linearize, lm-eval.

Each command is a module of :mod:`attnsurgery.commands` with ``add_parser(subparsers)`` and the function it sets
as ``func``. Heavy imports (torch, transformers) happen inside the commands, so ``attnsurgery --help`` is instant.
Exit codes: 0 success, 1 unexpected error, 2 bad input in general, 3 unknown surgery, 4 bad surgery argument,
5 bad recipe, 6 unsupported model, 7 model not found, 8 training diverged, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from .commands import apply, calibrate, evaluate, inspect, linearize, listing, train
from .commands._common import CalibrateTools, make_console

__all__ = ["CalibrateTools", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnsurgery", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (listing, apply, inspect, evaluate, calibrate, train, linearize):
        command.add_parser(sub)
    sub.add_parser(
        "lm-eval",
        help="lm-eval's own CLI with `--model attnsurgery` registered and the offline tasks included",
        add_help=False,
    )
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # everything after it belongs to lm-eval's own parser
        from .eval.lmeval import harness_main

        return harness_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import AttnSurgeryError

    try:
        return args.func(args)
    except AttnSurgeryError as err:
        make_console(stderr=True).print(f"[bold red]error:[/bold red] {err}")
        return err.exit_code
    except KeyboardInterrupt:
        make_console(stderr=True).print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
