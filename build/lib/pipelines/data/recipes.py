"""Data-set recipes: partial params files (``config/recipes/<name>.yaml``) merged into ``params.yaml``.

A recipe sets what one data set needs (adapter, label / image / comment paths, adapter
options, score scale, index bins, clusters, CLIP model) and nothing else. Applying it is a
deep merge into ``params.yaml`` that keeps the file's comments and every other key (YAML 1.2,
round-trip, as DVC itself rewrites the file for ``dvc exp run -S``). ``data.options`` is
replaced, not merged: adapter options belong to one adapter. ``overrides`` (dotted keys, e.g.
``{"data.images": "/mnt/ava/images"}``) are applied on top. The result is validated like any
``params.yaml`` before it is written (atomically), so a bad recipe or override changes nothing.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pipelines.config import params_from_dict
from pipelines.io import DataError, write_text

RECIPES = Path("config/recipes")
REPLACED = {("data", "options")}
"""Mappings that a recipe replaces whole instead of merging into."""


def _yaml():
    from ruamel.yaml import YAML  # DVC's own YAML library (round-trip keeps comments)

    y = YAML()
    y.preserve_quotes = True
    y.default_flow_style = False
    return y


def _quote_ambiguous(node: Any) -> Any:
    """Double-quote the strings that a YAML 1.1 reader would not read back as strings ("off", "yes")."""
    import yaml
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(node, dict):
        for k in node:
            node[k] = _quote_ambiguous(node[k])
    elif isinstance(node, list):
        node[:] = [_quote_ambiguous(v) for v in node]
    elif isinstance(node, str) and not isinstance(node, DoubleQuotedScalarString):
        try:
            same = yaml.safe_load(node) == node
        except yaml.YAMLError:
            same = False
        if not same:
            return DoubleQuotedScalarString(node)
    return node


def list_recipes(folder: str | Path = RECIPES) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def load_recipe(name: str, folder: str | Path = RECIPES) -> dict:
    path = Path(folder) / f"{name}.yaml"
    if not path.is_file():
        raise DataError(f"{path}: no recipe {name!r}; known recipes: {', '.join(list_recipes(folder)) or '(none)'}.")
    from pipelines.config import read_yaml

    recipe = read_yaml(path, "")
    if not isinstance(recipe, dict):
        raise DataError(f"{path}: a recipe must be a mapping of params.yaml blocks.")
    return recipe


def _merge(target: Any, update: dict, prefix: tuple[str, ...] = ()) -> None:
    for key, value in update.items():
        here = (*prefix, key)
        if isinstance(value, dict) and isinstance(target.get(key), dict) and here not in REPLACED:
            _merge(target[key], value, here)
        else:
            target[key] = value


def _set(target: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = target
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[leaf] = value


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def apply_recipe(name: str, params_path: str | Path = "params.yaml", *, overrides: dict[str, Any] | None = None,
                 folder: str | Path = RECIPES) -> dict:
    """Merge recipe ``name`` (then ``overrides``) into ``params_path``; returns the new params as plain data."""
    params_path = Path(params_path)
    recipe = load_recipe(name, folder)
    if not params_path.is_file():
        raise DataError(f"{params_path}: file not found; run from the repository root.")
    y = _yaml()
    doc = y.load(params_path.read_text(encoding="utf-8"))
    _merge(doc, recipe)
    for key, value in (overrides or {}).items():
        _set(doc, key, value)
    plain = _plain(doc)
    params_from_dict(plain, f"{params_path} + recipe {name}")
    buf = io.StringIO()
    y.dump(_quote_ambiguous(doc), buf)
    write_text(params_path, buf.getvalue())
    return plain
