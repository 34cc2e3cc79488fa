"""``attnsurgery calibrate <surgery>``: one subcommand per surgery folder that holds a ``calibrate.py``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ._common import CalibrateTools, calibration_records, load, make_console, model_options

# A surgery gets `attnsurgery calibrate <name>` by holding patches/<name>/calibrate.py: the contract is in
# attnsurgery/plugins.py. The file is read (not imported) to list the subcommands, and imported only when its
# subcommand is parsed: importing a surgery loads torch, and `attnsurgery --help` must stay instant.


def add_parser(sub: argparse._SubParsersAction) -> None:
    commands = calibrate_commands()
    p = sub.add_parser(
        "calibrate",
        help="calibrate a surgery on calibration data: " + ", ".join(commands),
        description="attnsurgery calibrate SURGERY MODEL [options]: one subcommand per surgery folder with a "
        "calibrate.py (e.g. attnsurgery calibrate act smollm2-135m --data bb_general_knowledge --out act.yaml)",
    )
    methods = p.add_subparsers(dest="method", required=True, parser_class=CalibrateParser)
    for name, help_text in commands.items():
        methods.add_parser(name, help=help_text, surgery=name, common=common_options)


def common_options(p: argparse.ArgumentParser) -> None:
    """What every ``calibrate <surgery>`` gets besides its own options: --dtype, --device-map, --overwrite."""
    model_options(p)
    if not any("--overwrite" in a.option_strings for a in p._actions):
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace an existing --out / --plot file or --save folder",
        )


#: options that several calibrate plugins share, checked here before the model loads (a plugin's own ``type=``
#: may be a plain int/float): name -> (lowest value, highest value, open below)
_RANGES = {
    "limit": (1, None, False),
    "batch_size": (1, None, False),
    "head_batch": (1, None, False),
    "max_length": (1, None, False),
    "confidence": (0.0, 1.0, False),
}


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any model loads: numbers outside their range, a --heads that is not YAML, and outputs that
    exist (without --overwrite) or cannot be written. Each message names the option and the value."""
    import math

    import yaml

    from ..api import check_save_folder
    from ..errors import AttnSurgeryError, SurgeryConfigError
    from ._common import check_output_path

    for name, (low, high, low_open) in _RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        bad = not math.isfinite(value) or value < low or (low_open and value == low)
        if bad or (high is not None and value > high):
            span = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
            raise AttnSurgeryError(f"{flag} {value} is out of range: it must lie in {span}.")
    heads = getattr(args, "heads", None)
    if isinstance(heads, str):
        try:
            parsed = yaml.safe_load(heads)
        except yaml.YAMLError:
            parsed = None
        if parsed is None or isinstance(parsed, (bool, float)):
            raise SurgeryConfigError(
                f"--heads {heads!r} is not a list or mapping of head indices; write '[0, 3]', '0,3' or "
                "'{10: [0, 3]}' (brackets and braces closed)."
            )
    overwrite = getattr(args, "overwrite", False)
    for name in ("out", "plot"):
        check_output_path(getattr(args, name, None), f"--{name}", folder=False, overwrite=overwrite)
    if getattr(args, "save", None) is not None:
        check_save_folder(args.save, overwrite=overwrite, option="--save ")


def calibrate_commands() -> dict[str, str]:
    """``{surgery: help line}`` for every surgery folder with a ``calibrate.py``."""
    import ast
    import importlib.resources

    out = {}
    for entry in sorted(importlib.resources.files("attnsurgery.patches").iterdir(), key=lambda e: e.name):
        source = entry / "calibrate.py"
        if entry.is_dir() and not entry.name.startswith("_") and source.is_file():
            doc = ast.get_docstring(ast.parse(source.read_text())) or ""
            out[entry.name] = doc.strip().split("\n")[0].rstrip(".")
    return out


class CalibrateParser(argparse.ArgumentParser):
    """The parser of ``calibrate <surgery>``: its options come from the surgery's ``calibrate.add_arguments``,
    imported the first time this subcommand is parsed."""

    def __init__(
        self, *args: Any, surgery: str, common: Callable[[argparse.ArgumentParser], None], **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.surgery, self.common, self.module = surgery, common, None
        self.add_argument("model")

    def parse_known_args(self, args: Any = None, namespace: Any = None):
        if self.module is None:
            import importlib

            self.module = importlib.import_module(f"attnsurgery.patches.{self.surgery}.calibrate")
            self.module.add_arguments(self)
            self.common(self)
            self.set_defaults(func=run, calibrate=self.module)
        return super().parse_known_args(args, namespace)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    tools = CalibrateTools(
        console=make_console(), load=lambda name: load(name, args), records=calibration_records
    )
    return args.calibrate.run(args, tools)
