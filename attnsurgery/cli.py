"""``attnsurgery`` command line: list, apply, inspect, eval, reproduce, calibrate, train, linearize, lm-eval.

Each command is a module of :mod:`attnsurgery.commands` with ``add_parser(subparsers)`` and the function it sets
as ``func``. Heavy imports (torch, transformers) happen inside the commands, so ``attnsurgery --help`` is instant.
Exit codes: 0 success, 1 unexpected error, 2 bad input in general, 3 unknown surgery, 4 bad surgery argument,
5 bad recipe, 6 unsupported model, 7 model not found, 8 training diverged, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .commands import apply, calibrate, evaluate, inspect, linearize, listing, train
from .commands._common import make_console
from .plugins import CalibrateTools

__all__ = ["CalibrateTools", "build_parser", "main"]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their lines (raw description); every option with a real default shows it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = default not in (None, False, argparse.SUPPRESS) and not isinstance(default, list)
        if shown and action.option_strings and "%(default)" not in text and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnsurgery", description=__doc__.split("\n")[0], formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (listing, apply, inspect, evaluate, calibrate, train, linearize):
        command.add_parser(sub)
    for child in sub.choices.values():
        child.formatter_class = _HelpFormatter
    sub.add_parser(
        "lm-eval",
        help="lm-eval's own CLI with `--model attnsurgery` registered and the offline tasks included",
        add_help=False,
    )
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def route_library_noise() -> Path:
    """Messages a user can do nothing about (weight-loading bars, bitsandbytes' and kernels' offline notices,
    lm-eval's per-task hints) go to a log file instead of the console; our own progress and results stay.
    ATTNSURGERY_VERBOSE=1 keeps everything on the console. Every entry point calls it first, `python -m` runners
    included (the budget runner's LoRA arms printed bitsandbytes' offline kernel notice on every run)."""
    import logging

    root = os.environ.get("ATTNSURGERY_CACHE")
    folder = (Path(root).expanduser() if root else Path.home() / ".cache" / "attnsurgery") / "logs"
    path = folder / "libraries.log"
    if os.environ.get("ATTNSURGERY_VERBOSE"):
        return path
    os.environ.setdefault(
        "HF_HUB_DISABLE_PROGRESS_BARS", "1"
    )  # transformers' "Loading weights", datasets' splits
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    class LazyFileHandler(logging.FileHandler):
        """Opens (and creates the folder of) its file at the first message only: a command that logs nothing, or is
        refused, leaves no cache folder behind."""

        def _open(self):  # type: ignore[override]
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            return super()._open()

        # an unwritable cache: drop the noise, never fail
        def handleError(self, record: logging.LogRecord) -> None:
            pass

    handler: logging.Handler = LazyFileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for name in (
        "bitsandbytes",
        "kernels",
        "lm_eval",
        "lm-eval",
        "datasets",
        "accelerate",
        "peft",
        "huggingface_hub",
    ):
        logger = logging.getLogger(name)
        if not any(
            getattr(h, "baseFilename", None) == getattr(handler, "baseFilename", 0) for h in logger.handlers
        ):
            logger.addHandler(handler)
        logger.propagate = False
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    route_library_noise()
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
    except Exception as err:  # a bug, not a user error: one line here, the traceback in a log file
        if os.environ.get("ATTNSURGERY_DEBUG"):
            raise
        log = _write_traceback(argv)
        make_console(stderr=True).print(
            f"[bold red]unexpected error[/bold red] ({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}). "
            f"This is a bug in attnsurgery or a library it calls; the traceback is in {log} (ATTNSURGERY_DEBUG=1 "
            "shows it here). Please report it with that file."
        )
        return 1


def _write_traceback(argv: list[str]) -> Path:
    import traceback

    root = os.environ.get("ATTNSURGERY_CACHE")
    folder = (Path(root).expanduser() if root else Path.home() / ".cache" / "attnsurgery") / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "last-error.log"
    path.write_text(f"attnsurgery {' '.join(argv)}\n\n{traceback.format_exc()}")
    return path


if __name__ == "__main__":
    sys.exit(main())
