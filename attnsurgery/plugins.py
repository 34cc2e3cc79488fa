"""The contracts a surgery folder (``patches/<name>/``) fulfils to plug into attnsurgery: public, so a surgery
written outside this repository (``register_surgery``) can follow them too.

A surgery package
    ``__init__.py`` exports ``SURGERY``, a :class:`attnsurgery.surgery.Surgery` subclass whose ``config_class`` is a
    :class:`attnsurgery.surgery.SurgeryConfig` (every field declared with ``arg``; defaults are the identity). The
    stage methods it overrides are listed in ``stages``; :meth:`~attnsurgery.surgery.Surgery.regularizer` and
    :meth:`~attnsurgery.surgery.Surgery.export` serve training.

An optional ``calibrate.py`` gives ``attnsurgery calibrate <name>``
    * a module docstring whose first line is the subcommand's help;
    * ``add_arguments(parser)``: its options (MODEL, ``--dtype`` and ``--device-map`` are added for it);
    * ``run(args, tools: CalibrateTools) -> int``: the exit code;
    * optionally ``auto_recipe(model, tokenizer, model_name, path, tools) -> Path``: the recipe that
      ``--recipe <name> MODEL`` calibrates and caches at ``path`` for a model without a shipped one.

    The file is read (not imported) to list the subcommands and imported only when its subcommand runs, so
    ``attnsurgery --help`` stays instant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class CalibrateTools:
    """What ``attnsurgery calibrate <surgery>`` hands the surgery's ``calibrate.run(args, tools)``."""

    console: Any  # a rich Console: results go here (progress goes to stderr)
    # model name -> (model, tokenizer), honouring --dtype / --device-map
    load: Callable[[str], tuple[Any, Any]]
    # (--data values, --limit, "multiple_choice" | "text") -> (records, a description of where they came from):
    # calibration splits of offline tasks or .jsonl files, never a test split
    records: Callable[[list[str] | None, int | None, str], tuple[list[dict], str]]

    def wrote_recipe(self, path: Path, model: str) -> None:
        """Say where a calibrated recipe went and how to apply it."""
        self.console.print(f"wrote {path} (use: attnsurgery apply --recipe {path} {model})")
