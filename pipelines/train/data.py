"""The per-image arrays the training stages read: features table joined with embeddings."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipelines.io import DataError


def list_column(table, name: str) -> np.ndarray:
    """A (fixed-size) list<float32> Parquet column as an N x D float32 array."""
    col = table.column(name).combine_chunks()
    n = len(col)
    flat = np.asarray(col.flatten(), dtype=np.float32)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)


@dataclass
class FeatureSet:
    image_id: np.ndarray
    split: np.ndarray
    score: np.ndarray  # float32, NaN where unlabeled
    dist: np.ndarray  # N x L vote distribution, NaN rows where unlabeled
    cluster: np.ndarray
    tm: np.ndarray  # N x (M + A) tag-matching features
    emb: np.ndarray  # N x D CLIP image embeddings

    def __len__(self) -> int:
        return len(self.image_id)

    def take(self, rows: np.ndarray) -> "FeatureSet":
        return FeatureSet(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def split_of(self, *names: str) -> "FeatureSet":
        return self.take(np.flatnonzero(np.isin(self.split, names)))

    @property
    def n_levels(self) -> int:
        return self.dist.shape[1]


def write_features_table(path, *, image_id, split, score, dist, cluster, tm, emb) -> None:
    """Write the features table (one row per embedded image) atomically."""
    import pyarrow as pa

    from pipelines.io import write_parquet

    def fixed(a: np.ndarray) -> pa.Array:
        a = np.ascontiguousarray(a, dtype=np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])

    table = pa.table(
        {
            "image_id": pa.array(image_id, pa.string()),
            "split": pa.array(split, pa.string()),
            "score": pa.array(score, pa.float32()),
            "cluster": pa.array(cluster, pa.int32()),
            "dist": fixed(dist),
            "tm": fixed(tm),
            "emb": fixed(emb),
        }
    )
    write_parquet(path, table)


def load_features(path: str | Path) -> FeatureSet:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: features table not found; run `dvc repro features`.")
    table = pq.read_table(path)
    return FeatureSet(
        image_id=np.asarray(table.column("image_id").to_pylist(), dtype=object),
        split=np.asarray(table.column("split").to_pylist(), dtype=object),
        score=table.column("score").to_numpy(zero_copy_only=False).astype(np.float32),
        dist=list_column(table, "dist"),
        cluster=table.column("cluster").to_numpy().astype(np.int64),
        tm=list_column(table, "tm"),
        emb=list_column(table, "emb"),
    )
