"""Score a folder of images with a registered model (a CLI, not a DVC stage).

    python -m stages.score --model models:/tmcr-demo@champion --images photos/ --out scores.csv
    python -m stages.score --model models:/tmcr-demo/3 --images photos/ --out scores.json --top-k 5

One row per file: path, score (1..L), distribution, top semantic / attribute tags, and an
``error`` that says why a file could not be scored (it never stops the run). The tracking /
registry URI comes from ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else params.yaml.
Output: ``.csv`` (distribution as a JSON list, tags joined by ``|``) or ``.json`` (records).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipelines.io import DataError, atomic_path, write_json
from stages.common import cli

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
COLUMNS = ["path", "score", "distribution", "top_semantic", "top_attribute", "error"]


def list_images(folder: Path, all_files: bool = False) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images; pass --images DIR.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return files if all_files else [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def _takes_param(model, name: str) -> bool:
    signature = getattr(getattr(model, "metadata", None), "signature", None)
    schema = getattr(signature, "params", None)
    return schema is not None and name in {p.name for p in schema.params}


def score_files(model, files: list[Path], *, batch_size: int = 64, top_k: int = 3, progress: bool = True) -> pd.DataFrame:
    """Score ``files`` in batches; a batch that fails as a whole gives each of its rows the error.

    The model must have been loaded with a ``path_root`` above ``files`` (``registry.load``).
    """
    parts = []
    params = {"top_k": top_k} if _takes_param(model, "top_k") else None  # family models take no params
    with tqdm(total=len(files), desc="score", unit="img", disable=not progress) as bar:
        for i in range(0, len(files), batch_size):
            chunk = [str(p) for p in files[i : i + batch_size]]
            try:
                absolute = [str(p.absolute()) for p in files[i : i + batch_size]]  # relative paths: to the model's root
                out = model.predict(pd.DataFrame({"path": absolute}), params=params)
                out = out.reset_index(drop=True)
            except Exception as exc:  # the model itself failed: report, keep going
                out = pd.DataFrame({"score": pd.Series([None] * len(chunk), dtype=object),
                                    "error": [f"{type(exc).__name__}: {exc}"] * len(chunk)})
            out.insert(0, "path", chunk)
            parts.append(out)
            bar.update(len(chunk))
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    for col in COLUMNS:
        if col not in table:
            table[col] = None
    return table[COLUMNS]


def write_scores(table: pd.DataFrame, out: Path) -> None:
    suffix = out.suffix.lower()
    if suffix == ".json":
        records = []
        for row in table.to_dict(orient="records"):
            row = {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            records.append({k: (list(v) if hasattr(v, "tolist") and not isinstance(v, str) else v) for k, v in row.items()})
        write_json(out, records)
    elif suffix == ".csv":
        flat = table.copy()
        flat["distribution"] = [None if d is None or (isinstance(d, float)) else json.dumps([round(float(x), 6) for x in d]) for d in flat["distribution"]]
        for col in ("top_semantic", "top_attribute"):
            flat[col] = [None if t is None or isinstance(t, float) else "|".join(map(str, t)) for t in flat[col]]
        with atomic_path(out) as tmp:
            flat.to_csv(tmp, index=False)
    else:
        raise DataError(f"{out}: unknown output type {suffix!r}; use .csv or .json.")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stages.score", description="Score a folder of images with a registered model.")
    ap.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    ap.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    ap.add_argument("--out", required=True, type=Path, help="scores.csv or scores.json")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--batch-size", type=int, default=64, help="rows per predict call (the model batches as the embed stage did)")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--all-files", action="store_true", help="score every file, not only image suffixes (others get an error row)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def run(argv=None) -> pd.DataFrame:
    import mlflow

    from pipelines.tracking.registry import load, parse_uri

    args = parse_args(argv)
    parse_uri(args.model)  # a bad URI fails before any work
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        from pipelines.config import load_params
        from pipelines.tracking.runs import tracking_uri

        uri = tracking_uri(load_params("params.yaml").mlflow)
    if args.out.suffix.lower() not in (".csv", ".json"):
        raise DataError(f"{args.out}: unknown output type {args.out.suffix!r}; use .csv or .json.")
    files = list_images(args.images, args.all_files)
    if not files:
        raise DataError(f"{args.images}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); use --all-files to score every file.")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = load(args.model, path_root=str(args.images.resolve()))  # paths under --images only
    table = score_files(model, files, batch_size=args.batch_size, top_k=args.top_k, progress=not args.no_progress)
    write_scores(table, args.out)
    n_bad = int(table["error"].notna().sum())
    print(f"scored {len(table) - n_bad}/{len(table)} images -> {args.out}" + (f" ({n_bad} with errors: see the 'error' column)" if n_bad else ""))
    return table


@cli
def main() -> None:
    run()


if __name__ == "__main__":
    main()
