"""Every example a user copies resolves: recipe names in --help texts and the README exist, README command lines
parse with the real argument parser, and --help keeps its examples on their own lines. A stale name fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from attnsurgery.cli import build_parser
from attnsurgery.recipe import find_recipe
from attnsurgery.registry import get_surgery_class

ROOT = Path(__file__).parent.parent


def _help_texts() -> dict[str, str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    texts = {"attnsurgery": parser.format_help()}
    for name, p in sub.choices.items():
        if name != "lm-eval":
            texts[name] = p.format_help()
    return texts


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]  # joined
    lines = [re.split(r"\s#\s", line)[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("attnsurgery ") and "lm-eval" not in line]


def _recipe_names(text: str) -> set[str]:
    names = set(re.findall(r"--recipe[ =]([A-Za-z0-9_./-]+)", text))
    names |= set(re.findall(r'patch\(model, "([a-z_]+/[A-Za-z0-9_.-]+)"\)', text))
    return {
        n
        for n in names
        if not n.isupper() and not n.startswith(("runs", "out", "evals/")) and not n.endswith((".yaml", "/"))
    }


@pytest.mark.parametrize("where", ["help", "readme", "docstrings"])
def test_recipe_names_in_examples_exist(where):
    if where == "help":
        text = "\n".join(_help_texts().values())
    elif where == "readme":
        text = (ROOT / "README.md").read_text()
    else:
        text = "\n".join(p.read_text() for p in (ROOT / "attnsurgery").rglob("*.py"))
    names = _recipe_names(text)
    assert names, "the scan found no recipe names: it is looking in the wrong place"
    for name in sorted(names):
        find_recipe(name, model="smollm2-135m")  # raises RecipeError naming a recipe that does not exist


def test_readme_command_lines_parse():
    commands = _readme_commands()
    assert len(commands) >= 10
    parser = build_parser()
    for line in commands:
        # "[-v]" marks an optional flag in the README; "…" an elided prompt
        argv = [a.strip("[]").replace("…", "x") for a in shlex.split(line)[1:]]
        try:
            parser.parse_args(argv)
        except SystemExit as err:  # argparse refused it: a stale flag or command
            pytest.fail(f"README command does not parse: {line} (exit {err.code})")


def test_help_shows_defaults():
    train = _help_texts()["train"]
    assert "default: 200" in " ".join(train.split())  # --steps
    assert "default: 32" in " ".join(train.split())  # --val-windows


def test_readme_says_which_defaults_edit_the_model():
    """The README's 'the defaults' column says 'edits' exactly for the surgeries whose default arguments are not
    their identity settings (act, var, vhr, moh, hedgehog today); a new default that changes the model must say so."""
    from attnsurgery import list_surgeries
    from attnsurgery.registry import get_surgery_class

    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [
            c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))
        ]  # "\|" is a pipe in a cell
        if len(cells) == 5 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[4]
    for info in list_surgeries():
        cls = get_surgery_class(info.name)
        if not cls.__module__.startswith("attnsurgery.patches."):
            continue
        defaults = {name: default for name, default, _ in cls.config_class.describe()}
        edits = any(defaults.get(k) != repr(v) for k, v in cls.identity_args.items())
        assert info.name in rows, f"README's surgery table lacks {info.name}"
        assert rows[info.name].startswith("edits") == edits, (info.name, rows[info.name])


def _help_commands() -> list[str]:
    """Example command lines in every --help text: whole lines starting 'attnsurgery ' (a trailing '(...)' note
    dropped) and inline '(e.g. attnsurgery ...)' examples; usage templates in capitals are skipped."""
    commands = []
    for text in _help_texts().values():
        for line in text.splitlines():
            line = line.strip()
            commands += re.findall(r"\(e\.g\. (attnsurgery [^)]*)\)", line)
            if line.startswith("attnsurgery ") and not re.search(r"\b[A-Z]{4,}\b", line.split("(")[0]):
                commands.append(re.split(r"\s{2,}\(", line)[0])
    return commands


def test_help_example_commands_parse():
    commands = _help_commands()
    assert len(commands) >= 7, commands  # apply x2, inspect x2, eval, calibrate, train, linearize
    parser = build_parser()
    for line in commands:
        argv = [a.replace("...", "x") for a in shlex.split(line)[1:]]
        try:
            args = parser.parse_args(argv)
        except SystemExit as err:
            pytest.fail(f"--help example does not parse: {line} (exit {err.code})")
        # and what it names resolves: the surgery (apply's first target, train's surgery) is registered
        named = getattr(args, "surgery", None) or (
            args.targets[0] if len(getattr(args, "targets", [])) > 1 else None
        )
        if named is not None:
            get_surgery_class(named)  # raises UnknownSurgeryError with a did-you-mean
