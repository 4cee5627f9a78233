"""The manifest: one row per image, the contract every later stage reads.

Columns (Parquet):

============  ==================  ==========================================================
image_id      string              unique, non-empty
path          string              image file (as resolved by the adapter; relative paths are
                                  relative to the working directory the stage ran in)
split         string              one of ``SPLITS``
votes         list<int32> | null  one count per level (``n_levels`` long); null when unknown
score         float32 | null      mean score on 1..L when votes are known; the data set's own
                                  scale for score-only sets; null for ``unlabeled`` rows
n_levels      int16               number of rating levels L (the same on every row)
============  ==================  ==========================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.io import DataError, write_parquet

SPLITS: tuple[str, ...] = ("train", "val", "test", "unlabeled")
"""Allowed values of the ``split`` column; ``unlabeled`` rows carry no score."""

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("split", pa.string()),
        pa.field("votes", pa.list_(pa.int32())),
        pa.field("score", pa.float32()),
        pa.field("n_levels", pa.int16()),
    ]
)

_SCORE_TOL = 1e-3
_FIX = "rebuild it with the data stage (`dvc repro prepare`)"


def scores_from_votes(votes: np.ndarray) -> np.ndarray:
    """Mean score on 1..L of an ``N x L`` array of vote counts (rows must not sum to 0)."""
    votes = np.asarray(votes, dtype=np.float64)
    levels = np.arange(1, votes.shape[1] + 1, dtype=np.float64)
    return (votes @ levels / votes.sum(axis=1)).astype(np.float32)


def manifest_table(
    image_id: list[str],
    path: list[str],
    split: list[str],
    votes: list[list[int] | None],
    score: list[float | None],
    n_levels: int,
) -> pa.Table:
    """Assemble columns into a table with the manifest schema (no value checks)."""
    return pa.table(
        {
            "image_id": pa.array(image_id, pa.string()),
            "path": pa.array(path, pa.string()),
            "split": pa.array(split, pa.string()),
            "votes": pa.array(votes, pa.list_(pa.int32())),
            "score": pa.array(score, pa.float32()),
            "n_levels": pa.array([n_levels] * len(image_id), pa.int16()),
        },
        schema=SCHEMA,
    )


def write_manifest(path: str | os.PathLike, table: pa.Table | pd.DataFrame) -> None:
    """Validate ``table`` against the contract and write it atomically as Parquet."""
    if isinstance(table, pd.DataFrame):
        table = _from_pandas(table)
    table = _conform(table, source="manifest to write")
    validate_manifest(table, source=str(path))
    write_parquet(path, table)


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a manifest; ``votes`` holds int32 arrays (None when unknown)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; {_FIX}.")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc}); {_FIX}.") from exc
    table = _conform(table, source=str(path))
    validate_manifest(table, source=str(path))
    df = table.to_pandas()
    df["votes"] = [None if v is None else np.asarray(v, dtype=np.int32) for v in df["votes"]]
    return df


def vote_distribution(df: pd.DataFrame, *, missing: str = "nan") -> np.ndarray:
    """``N x L`` float32 vote distributions of a manifest frame; rows with votes sum to 1.

    Rows without votes (unlabeled, or score-only data sets) are all-NaN rows when
    ``missing="nan"``; with ``missing="raise"`` they raise :class:`DataError`.
    """
    if missing not in ("nan", "raise"):
        raise ValueError(f"missing must be 'nan' or 'raise', got {missing!r}")
    has = np.array([v is not None for v in df["votes"]], dtype=bool)
    if missing == "raise" and not has.all():
        ids = df["image_id"].to_numpy()[~has][:3].tolist()
        raise DataError(
            f"vote_distribution: {int((~has).sum())} rows have no votes (e.g. {ids}); "
            "select the rows with votes first (`df[df.votes.notna()]`)."
        )
    if len(df) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    n_levels = int(df["n_levels"].iloc[0])
    out = np.full((len(df), n_levels), np.nan, dtype=np.float32)
    if has.any():
        counts = np.stack([np.asarray(v, dtype=np.float64) for v, h in zip(df["votes"], has) if h])
        out[has] = counts / counts.sum(axis=1, keepdims=True)
    return out


def validate_manifest(table: pa.Table, source: str) -> None:
    """Raise :class:`DataError` (naming ``source``) unless ``table`` meets the contract."""

    def fail(what: str) -> DataError:
        return DataError(f"{source}: invalid manifest: {what}; {_FIX}.")

    n = table.num_rows
    for name in ("image_id", "path", "split", "n_levels"):
        if table[name].null_count:
            raise fail(f"column {name!r} has {table[name].null_count} null values")
    if n == 0:
        raise fail("no rows")
    ids = table["image_id"].to_numpy(zero_copy_only=False)
    if (pc.utf8_length(table["image_id"]).to_numpy() == 0).any():
        raise fail("empty image_id")
    if pc.count_distinct(table["image_id"]).as_py() != n:
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise fail(f"duplicate image_id {dup!r}")
    if (pc.utf8_length(table["path"]).to_numpy() == 0).any():
        raise fail("empty path")
    split = table["split"].to_numpy(zero_copy_only=False)
    bad = sorted(set(split) - set(SPLITS))
    if bad:
        raise fail(f"unknown split values {bad} (allowed: {', '.join(SPLITS)})")
    levels = np.unique(table["n_levels"].to_numpy())
    if len(levels) != 1 or levels[0] < 2:
        raise fail(f"n_levels must be one value >= 2, got {levels.tolist()}")
    n_levels = int(levels[0])

    score = table["score"].to_numpy(zero_copy_only=False).astype(np.float64)  # null -> nan
    unlabeled = split == "unlabeled"
    if np.isnan(score[~unlabeled]).any():
        raise fail("labelled rows (train/val/test) without a score")
    if (~np.isnan(score[unlabeled])).any():
        raise fail("unlabeled rows with a score (score must be null there)")
    if not np.isfinite(score[~unlabeled]).all():
        raise fail("non-finite score")

    votes = table["votes"].combine_chunks()
    has = votes.is_valid().to_numpy(zero_copy_only=False)
    if has.any():
        lengths = pc.list_value_length(votes).to_numpy(zero_copy_only=False)[has]
        if (lengths != n_levels).any():
            raise fail(f"votes lists must have n_levels={n_levels} entries")
        counts = pc.list_flatten(votes.filter(pa.array(has))).to_numpy().reshape(-1, n_levels)
        if (counts < 0).any():
            raise fail("negative vote counts")
        if (counts.sum(axis=1) == 0).any():
            raise fail("all-zero vote counts")
        lab = ~unlabeled[has]
        mean = scores_from_votes(counts[lab]).astype(np.float64)
        if (np.abs(mean - score[has][lab]) > _SCORE_TOL).any():
            raise fail("score differs from the mean of the votes")


def _conform(table: pa.Table, source: str) -> pa.Table:
    """Select and cast the manifest columns, or raise naming what is missing or mistyped."""
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise DataError(f"{source}: not a manifest: missing columns {missing}; {_FIX}.")
    checks = {
        "image_id": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        "path": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        "split": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        "votes": lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t))
        and pa.types.is_integer(t.value_type)
        or pa.types.is_null(t),
        "score": lambda t: pa.types.is_floating(t) or pa.types.is_null(t),
        "n_levels": pa.types.is_integer,
    }
    columns = []
    for field in SCHEMA:
        col = table[field.name]
        if not checks[field.name](col.type):
            raise DataError(
                f"{source}: not a manifest: column {field.name!r} has type {col.type}, "
                f"expected {field.type}; {_FIX}."
            )
        columns.append(col.cast(field.type))
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _from_pandas(df: pd.DataFrame) -> pa.Table:
    votes = [
        None if v is None or (np.isscalar(v) and pd.isna(v)) else [int(x) for x in v]
        for v in df["votes"]
    ]
    n_levels = df["n_levels"].astype("int64").tolist()
    table = manifest_table(
        image_id=df["image_id"].astype(str).tolist(),
        path=df["path"].astype(str).tolist(),
        split=df["split"].astype(str).tolist(),
        votes=votes,
        score=[None if pd.isna(s) else float(s) for s in df["score"]],
        n_levels=0,
    )
    return table.set_column(5, "n_levels", pa.array(n_levels, pa.int16()))


def image_paths(manifest_path: str | Path, image_ids: Sequence[str], root: str | Path) -> list[str]:
    """The image file of each id (manifest ``path``; relative paths resolve against ``root``)."""
    df = read_manifest(manifest_path)
    by_id = pd.Series(df["path"].to_numpy(), index=df["image_id"].astype(str))
    ids = pd.Index([str(i) for i in image_ids])
    rows = by_id.index.get_indexer(ids)
    if (missing := np.flatnonzero(rows < 0)).size:
        raise DataError(f"{manifest_path}: {missing.size} image id(s) of the features table are not in the manifest "
                        f"(e.g. {ids[missing[0]]}); rerun `dvc repro features`.")
    return [p if Path(p).is_absolute() else str(Path(root) / p) for p in by_id.to_numpy()[rows]]
