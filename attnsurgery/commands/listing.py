"""``attnsurgery list``: surgeries, shipped recipes and model aliases."""

from __future__ import annotations

import argparse
import re

from ._common import make_console


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="surgeries, shipped recipes and model aliases, one line each")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every surgery's arguments")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..models import list_aliases
    from ..recipe import find_recipe, list_recipes
    from ..registry import get_surgery_class, list_surgeries

    console = make_console()
    table = Table(title="surgeries", show_lines=False)
    table.add_column("name", overflow="fold")
    table.add_column("stages", overflow="fold")
    table.add_column("what it does")
    for info in list_surgeries():
        table.add_row(info.name, ",".join(info.stages), info.summary)
    console.print(table)
    if args.verbose:
        for info in list_surgeries():
            cls = get_surgery_class(info.name)
            console.print(f"\n[bold]{info.name}[/bold]  ({info.paper})")
            for name, default, doc in cls.config_class.describe():
                console.print(f"  {name} = {default}: {doc}")
    recipes = Table(title="recipes", expand=True)
    # a name is what users copy: folded at any width, never cut with an ellipsis
    recipes.add_column("recipe", overflow="fold", ratio=3)
    recipes.add_column("model", overflow="fold", ratio=2)
    recipes.add_column("description (first sentence)", overflow="fold", ratio=4)
    for name in list_recipes():
        recipe = find_recipe(name)
        first = re.split(r"(?<=\.)\s", recipe.description.strip(), maxsplit=1)[0]
        recipes.add_row(name, recipe.model or "-", first)
    console.print(recipes)
    models = Table(title="model aliases")
    models.add_column("alias")
    models.add_column("source")
    for alias, text in list_aliases().items():
        models.add_row(alias, text)
    console.print(models)
    return 0
