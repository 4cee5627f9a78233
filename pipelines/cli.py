"""``iaa``: the project's command line (installed by ``pip install -e .``).

    iaa score models:/tmcr-demo@champion photo.jpg --out scores.csv
    iaa score models:/tmcr-demo@champion photos/ "more/**/*.png" list.csv --out scores.parquet
    iaa serve models:/tmcr-demo@champion --port 5001 --path-root photos/
    iaa export models:/tmcr-demo@champion model.onnx
    iaa models                       # registered versions, aliases, metrics
    iaa runs                         # recent MLflow runs and their headline metrics

The MLflow store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``mlflow.tracking_uri``
of ``params.yaml`` in the working directory (the repo root), resolved to an absolute path, so
no stray ``mlflow.db`` is created where a command happens to run. Bad input (a missing file or
folder, an unreadable image, an unknown model, an output that exists) is one line naming the
argument and the fix, exit code 2, and nothing written.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path
from typing import Sequence

from pipelines.io import DataError

OUT_TYPES = (".csv", ".json", ".parquet")
GLOB_CHARS = set("*?[")
# The serving limits `mlflow models serve` reads (pipelines/tracking/scoring.py, README "Serving safely").
SERVE_LIMITS = {"max_rows": "IAA_SERVE_MAX_ROWS", "max_pixels": "IAA_SERVE_MAX_PIXELS",
                "max_image_bytes": "IAA_SERVE_MAX_IMAGE_BYTES", "max_concurrent": "IAA_SERVE_MAX_CONCURRENT"}


# ---------------------------------------------------------------------------- the MLflow store

def store_uri(explicit: str | None, params_file: str | Path = "params.yaml", *, must_exist: bool = True) -> str:
    """The tracking / registry URI (see the module docstring). A relative SQLite path is made
    absolute against the working directory; a SQLite store that does not exist is an error
    (MLflow would silently create an empty one)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if not Path(params_file).is_file():
            raise DataError(f"--tracking-uri: not given, MLFLOW_TRACKING_URI is unset and there is no {params_file} here; "
                            "run from the repo root or pass --tracking-uri sqlite:////abs/path/mlruns/mlflow.db.")
        from pipelines.config import load_params

        uri = load_params(params_file).mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        db = Path(uri[len(prefix):])
        db = db if uri.startswith(prefix + "/") else db.resolve()
        if must_exist and not db.is_file():
            raise DataError(f"--tracking-uri: no MLflow store at {db}; run `dvc repro` (it registers the models) "
                            "or pass --tracking-uri / MLFLOW_TRACKING_URI naming an existing store.")
        uri = prefix + str(db)
    return uri


def _use_store(uri: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


# ---------------------------------------------------------------------------- score

def expand_inputs(inputs: Sequence[str], all_files: bool = False) -> list[Path]:
    """Files named by each input: a file, a folder (recursive), a glob, or a ``.csv`` whose
    ``path`` column (else first column) lists files, relative to the CSV's folder."""
    from stages.score import IMAGE_SUFFIXES, list_images

    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p, all_files)
            if not found:
                raise DataError(f"INPUT {item}: no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                                "use --all-files to score every file.")
            files += found
        elif p.is_file() and p.suffix.lower() == ".csv":
            files += _csv_paths(p)
        elif p.is_file():
            files.append(p)
        elif GLOB_CHARS & set(item):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not all_files:
                found = [f for f in found if f.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                raise DataError(f"INPUT {item}: the pattern matches no image file; check it (quote it so that "
                                "iaa, not the shell, expands ** patterns).")
            files += found
        else:
            raise DataError(f"INPUT {item}: no such file or folder; give an image, a folder, a glob or a CSV of paths.")
    for f in files:
        if not os.access(f, os.R_OK):
            raise DataError(f"INPUT {f}: not readable (permission denied); fix its permissions or leave it out.")
    return files


def _csv_paths(csv: Path) -> list[Path]:
    import pandas as pd

    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise DataError(f"INPUT {csv}: not a readable CSV ({exc}); give one path per row under a 'path' header.") from exc
    if table.shape[1] == 0 or len(table) == 0:
        raise DataError(f"INPUT {csv}: no rows; give one image path per row under a 'path' header.")
    column = "path" if "path" in table else table.columns[0]
    paths = [Path(v) if Path(v).is_absolute() else csv.parent / v for v in table[column] if v.strip()]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"INPUT {csv}: {len(missing)} of {len(paths)} paths in column {column!r} are not files "
                        f"(first: {missing[0]}); paths are relative to the CSV's folder; fix or remove those rows.")
    return paths


def _check_out(out: Path, overwrite: bool) -> None:
    if out.suffix.lower() not in OUT_TYPES:
        raise DataError(f"--out {out}: unknown output type {out.suffix!r}; use {', '.join(OUT_TYPES)}.")
    if out.exists() and not overwrite:
        raise DataError(f"--out {out}: exists; pass --overwrite to replace it, or choose another file.")
    if out.is_dir():
        raise DataError(f"--out {out}: is a folder; give a file name ending in {', '.join(OUT_TYPES)}.")


def write_table(table, out: Path) -> None:
    """CSV / JSON as ``stages.score`` writes them; Parquet with list columns kept as lists."""
    from pipelines.io import write_parquet
    from stages.score import write_scores

    if out.suffix.lower() == ".parquet":
        table = table.copy()
        for col in ("distribution", "top_semantic", "top_attribute"):
            table[col] = [None if v is None or isinstance(v, float) else [x for x in v] for v in table[col]]
        write_parquet(out, table)
    else:
        write_scores(table, out)


def score_onnx(args: argparse.Namespace, files: list[Path]):
    """Score ``files`` with an exported ONNX file (``iaa export``) on ONNX Runtime: no torch imported."""
    import pandas as pd

    from pipelines.export.ort import OnnxScorer

    scorer = OnnxScorer(args.model, threads=args.threads or None)
    paths = [str(f) for f in files]
    rows = []
    for start in range(0, len(paths), args.batch_size):
        rows += scorer.score_paths(paths[start : start + args.batch_size], top_k=args.top_k, batch_size=args.batch_size)
    return pd.DataFrame([{"path": p, **r} for p, r in zip(paths, rows, strict=True)])


def cmd_score(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: give a whole number >= 1.")
    if args.model.endswith(".onnx"):  # an exported file: ONNX Runtime
        if not Path(args.model).is_file():
            raise DataError(f"MODEL {args.model}: no such file; export one with `iaa export models:/NAME@ALIAS {args.model}`.")
        if args.device != "cpu":
            raise DataError(f"--device {args.device}: ONNX scoring runs on the CPU here; use --device cpu.")
        _check_out(args.out, args.overwrite)
        table = score_onnx(args, expand_inputs(args.inputs, args.all_files))
        return _write_scores(table, args.out)
    import torch

    from pipelines.tracking.registry import load, parse_uri, resolve
    from stages.score import score_files

    parse_uri(args.model)  # a bad URI fails before any work
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: give a whole number >= 1.")
    if args.device != "cpu":
        raise DataError(f"--device {args.device}: the registered scoring model runs on the CPU only; use --device cpu "
                        "(--threads sets how many cores it uses).")
    _check_out(args.out, args.overwrite)
    files = expand_inputs(args.inputs, args.all_files)
    _use_store(store_uri(args.tracking_uri, args.params))
    resolve(args.model)  # unknown name / alias / version: one line naming what exists
    if args.threads:
        torch.set_num_threads(args.threads)
    root = os.path.commonpath([str(f.resolve().parent) for f in files])  # paths under the inputs only
    model = load(args.model, path_root=root)
    table = score_files(model, files, batch_size=args.batch_size, top_k=args.top_k, progress=not args.no_progress)
    return _write_scores(table, args.out)


def _write_scores(table, out: Path) -> int:
    bad = table["error"].notna()
    if bad.all():
        raise DataError(f"INPUT {table['path'].iloc[0]}: cannot be scored ({table['error'].iloc[0]}); "
                        "give JPEG, PNG, BMP, GIF, TIFF or WebP images. Nothing written.")
    write_table(table, out)
    n_bad = int(bad.sum())
    print(f"scored {len(table) - n_bad}/{len(table)} images -> {out}"
          + (f" ({n_bad} with errors: see the 'error' column)" if n_bad else ""), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- serve

def serve_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow models serve`` command line and the environment variables it gets."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "models", "serve", "-m", args.model,
           "--env-manager", "local", "-h", args.host, "-p", str(args.port), "-w", str(args.workers)]
    uri = store_uri(args.tracking_uri, args.params)
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}  # only models logged from code load
    if args.path_root is not None:
        if not args.path_root.is_dir():
            raise DataError(f"--path-root {args.path_root}: not a folder; give the folder whose images `path` inputs may name.")
        env["IAA_SERVE_PATH_ROOT"] = str(args.path_root.resolve())
    for key, var in SERVE_LIMITS.items():
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise DataError(f"--{key.replace('_', '-')} {value}: give a whole number >= 1.")
            env[var] = str(value)
    return cmd, env


def cmd_serve(args: argparse.Namespace) -> int:
    import shlex

    from pipelines.tracking.registry import parse_uri, resolve

    parse_uri(args.model)
    cmd, env = serve_command(args)
    _use_store(env["MLFLOW_TRACKING_URI"])
    mv = resolve(args.model)
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd)
    if args.dry_run:
        print(shown)
        return 0
    print(f"serving {args.model} (version {mv.version}) on http://{args.host}:{args.port}/invocations\n  {shown}", file=sys.stderr)
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, {**os.environ, **env})
    return 0  # not reached


# ---------------------------------------------------------------------------- export

def cmd_export(args: argparse.Namespace) -> int:
    try:
        from pipelines.export.onnx import export_model
    except ModuleNotFoundError as exc:
        if exc.name not in ("pipelines.export", "pipelines.export.onnx"):
            raise
        raise DataError("iaa export: this install has no ONNX export (pipelines/export/onnx.py is missing); "
                        "update the project checkout, then run `pip install -e .` again.") from None
    if args.out.exists() and not args.overwrite:
        raise DataError(f"OUT {args.out}: exists; pass --overwrite to replace it, or choose another file.")
    source = args.source
    if source.startswith("models:/"):
        from pipelines.tracking.registry import resolve

        _use_store(store_uri(args.tracking_uri, args.params))
        resolve(source)
    elif not Path(source).exists():
        raise DataError(f"SOURCE {source}: no such file; give models:/NAME@ALIAS, models:/NAME/VERSION or a model file.")
    export_model(source, args.out, overwrite=args.overwrite, quantize=args.quantize)
    print(f"exported {source} -> {args.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- models / runs

HEADLINE_TAGS = ("val_srcc", "metric.srcc", "metric.plcc", "metric.acc", "metric.mae_L", "metric.mae_H")  # test metrics, as registry tags


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_models(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    _use_store(store_uri(args.tracking_uri, args.params))
    client = MlflowClient()
    names = [args.name] if args.name else sorted(m.name for m in client.search_registered_models())
    rows = []
    for name in names:
        versions = client.search_model_versions(f"name = '{name}'")
        if args.name and not versions:
            raise DataError(f"NAME {name}: no registered model of that name; `iaa models` lists them.")
        aliases = {}
        for m in [client.get_registered_model(name)]:
            for alias, version in (getattr(m, "aliases", None) or {}).items():
                aliases.setdefault(str(version), []).append(alias)
        for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
            row = {"model": f"models:/{name}/{v.version}", "aliases": ",".join(sorted(aliases.get(str(v.version), []))) or "-",
                   "dataset": v.tags.get("dataset", "-")}
            row.update({k.removeprefix("metric."): v.tags.get(k, "-") for k in HEADLINE_TAGS})
            rows.append(row)
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no registered models in this store (`dvc repro` registers them)")
    else:
        print(_table(rows, list(rows[0])))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    import mlflow

    _use_store(store_uri(args.tracking_uri, args.params))
    runs = mlflow.search_runs(search_all_experiments=True, max_results=args.limit, order_by=["attributes.start_time DESC"],
                              output_format="list")
    rows = []
    for r in runs:
        metrics = {k: v for k, v in r.data.metrics.items() if k.rsplit(".", 1)[-1] in ("srcc", "plcc", "val_srcc")}
        rows.append({"run_id": r.info.run_id[:12], "stage": r.data.tags.get("dvc_stage", "-"),
                     "experiment": r.data.tags.get("dvc_experiment", "-"), "status": r.info.status,
                     **{k: f"{metrics[k]:.4g}" for k in sorted(metrics)[:6]}})
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no runs in this store (`dvc repro` logs them)")
    else:
        columns = list(dict.fromkeys(c for r in rows for c in r))
        print(_table(rows, columns))
    return 0


# ---------------------------------------------------------------------------- parser

def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI, else params.yaml's mlflow.tracking_uri)")
    p.add_argument("--params", default="params.yaml", help="params file that names the store (default: params.yaml here)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="iaa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("score", help="score images with a registered model",
                       description="Score images: files, folders (recursive), globs, or CSVs of paths. One row per image: "
                                   "path, score, distribution, top tags, error (a bad image gets an error row).")
    s.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or an exported .onnx file (ONNX Runtime, no torch)")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="an image, a folder, a glob (quoted), or a .csv with a 'path' column")
    s.add_argument("--out", "-o", required=True, type=Path, help="scores.csv, scores.json or scores.parquet")
    s.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    s.add_argument("--batch-size", type=int, default=64, help="images per predict call (default 64)")
    s.add_argument("--device", default="cpu", help="where the model runs: cpu (the scoring model's only device)")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--top-k", type=int, default=3, help="top semantic / attribute tags per image")
    s.add_argument("--all-files", action="store_true", help="folders and globs: every file, not only image suffixes")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    _store_args(s)
    s.set_defaults(func=cmd_score)

    v = sub.add_parser("serve", help="serve a registered model over HTTP (mlflow models serve)",
                       description="Run `mlflow models serve` on a registered model with the store's URI, pickled models "
                                   "refused (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false) and the IAA_SERVE_* limits.")
    v.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    v.add_argument("--port", "-p", type=int, default=5001)
    v.add_argument("--workers", "-w", type=int, default=1)
    v.add_argument("--path-root", type=Path, default=None, help="allow `path` inputs under this folder (default: refused)")
    for key, var in SERVE_LIMITS.items():
        v.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"sets {var}")
    v.add_argument("--dry-run", action="store_true", help="print the environment and command, do not serve")
    _store_args(v)
    v.set_defaults(func=cmd_serve)

    e = sub.add_parser("export", help="export a model to ONNX", description="Export a registered model (or model file) to ONNX.")
    e.add_argument("source", help="models:/NAME@ALIAS, models:/NAME/VERSION or a model file")
    e.add_argument("out", type=Path, help="the .onnx file to write")
    e.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    e.add_argument("--quantize", choices=["int8"], default=None, help="int8: dynamic int8 weights (faster on CPU)")
    _store_args(e)
    e.set_defaults(func=cmd_export)

    m = sub.add_parser("models", help="list registered model versions, aliases and metrics")
    m.add_argument("name", nargs="?", help="one registered model (default: all)")
    m.add_argument("--json", action="store_true")
    _store_args(m)
    m.set_defaults(func=cmd_models)

    r = sub.add_parser("runs", help="list recent MLflow runs and their test metrics")
    r.add_argument("--limit", type=int, default=20)
    r.add_argument("--json", action="store_true")
    _store_args(r)
    r.set_defaults(func=cmd_runs)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as exc:
        print(f"iaa {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
