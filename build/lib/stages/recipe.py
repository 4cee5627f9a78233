"""Apply a data-set recipe to params.yaml: ``python -m stages.recipe NAME [--set KEY=VALUE ...]``.

``config/recipes/NAME.yaml`` is merged into ``params.yaml`` (comments kept); each ``--set``
(a dotted params key and a YAML value, as ``dvc exp run -S``) is applied on top. Then
``dvc repro`` runs the pipeline on that data set. ``--list`` names the recipes.
"""

import argparse

from pipelines.data.recipes import apply_recipe, list_recipes
from pipelines.io import DataError
from stages.common import cli


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help="recipe name (config/recipes/NAME.yaml)")
    ap.add_argument("--set", "-S", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--list", action="store_true", help="list the recipes and exit")
    args = ap.parse_args()
    if args.list or not args.name:
        print("\n".join(list_recipes()))
        return
    from ruamel.yaml import YAML  # YAML 1.2 values, as `dvc exp run -S` reads them

    overrides, parse = {}, YAML(typ="safe")
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"--set {item!r}: expected KEY=VALUE with a dotted params key, e.g. data.images=/mnt/ava.")
        overrides[key] = parse.load(value) if value else ""
    p = apply_recipe(args.name, args.params, overrides=overrides)
    d = p["data"]
    print(f"{args.params}: recipe {args.name} applied (adapter {d['adapter']}, labels {d['labels']}, images {d['images']}, "
          f"comments {d['comments']}); run `dvc repro`.")


if __name__ == "__main__":
    main()
