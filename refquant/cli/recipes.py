"""`refquant recipes`: list the shipped recipes, or show one resolved (a flat table, or TOML)."""

from __future__ import annotations

from ..quant.recipe import load_recipe, recipe_table, recipe_to_toml, shipped_recipes


def list_recipes(args) -> int:
    names = shipped_recipes()
    width = max(map(len, names))
    for name in names:
        description = load_recipe(name).description
        print(f"{name.ljust(width)}  {description.splitlines()[0] if description else ''}")
    return 0


def show_recipe(args) -> int:
    recipe = load_recipe(args.recipe)
    if args.toml:
        print(recipe_to_toml(recipe), end="")
        return 0
    print(f"recipe:      {recipe.name}")
    print(f"source:      {recipe.source}")
    print(f"description: {recipe.description}")
    print(f"algorithm:   {recipe.algorithm or 'none (no calibration)'}")
    print(f"rules:       {len(recipe.quant_cfg)}, applied in order; a later match wins\n")
    print(recipe_table(recipe))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("recipes", help="list the shipped recipes, or show one resolved")
    commands = parser.add_subparsers(dest="recipes_command", required=True, metavar="{list,show}")
    listing = commands.add_parser("list", help="each shipped recipe with its one-line description")
    listing.set_defaults(func=list_recipes)
    show = commands.add_parser("show", help="a recipe resolved: every rule in order, imports spliced in")
    show.add_argument("recipe", metavar="NAME_OR_PATH", help="a shipped recipe's name, or a .toml file")
    show.add_argument("--toml", action="store_true", help="write the resolved recipe back as TOML")
    show.set_defaults(func=show_recipe)
