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
        methods.add_parser(name, help=help_text, surgery=name, common=model_options)


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
    tools = CalibrateTools(
        console=make_console(), load=lambda name: load(name, args), records=calibration_records
    )
    return args.calibrate.run(args, tools)
