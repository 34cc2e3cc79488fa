"""``attnsurgery list``: surgeries, shipped recipes and model aliases."""

from __future__ import annotations

import argparse

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
    for col in ("name", "stages", "what it does"):
        table.add_column(col)
    for info in list_surgeries():
        table.add_row(info.name, ",".join(info.stages), info.summary)
    console.print(table)
    if args.verbose:
        for info in list_surgeries():
            cls = get_surgery_class(info.name)
            console.print(f"\n[bold]{info.name}[/bold]  ({info.paper})")
            for name, default, doc in cls.config_class.describe():
                console.print(f"  {name} = {default}: {doc}")
    recipes = Table(title="recipes")
    for col in ("recipe", "model", "description"):
        recipes.add_column(col)
    for name in list_recipes():
        recipe = find_recipe(name)
        recipes.add_row(name, recipe.model or "-", recipe.description)
    console.print(recipes)
    models = Table(title="model aliases")
    models.add_column("alias")
    models.add_column("source")
    for alias, text in list_aliases().items():
        models.add_row(alias, text)
    console.print(models)
    return 0
