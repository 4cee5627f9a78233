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


CR_FEATURES_KIND = "cr_features"  # the ``kind`` in the fingerprint of a CR-feature cache (``pipelines.ranking.cr_features``)
EMB_DIM_KEY = b"emb_dim"  # features-table schema metadata: the embedding width its TM features came from


def write_features_table(path, *, image_id, split, score, dist, cluster, tm, emb_dim: int) -> None:
    """Write the features table (one row per embedded image) atomically.

    The CLIP image embeddings are not stored here: they stay in the embed stage's cache
    (``data/embeddings/images``) and ``load_features`` joins them by ``image_id``. ``emb_dim``
    (their width) goes into the schema metadata, so a cache re-embedded at another width
    is caught on load.
    """
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
        }
    )
    write_parquet(path, table.replace_schema_metadata({EMB_DIM_KEY: str(int(emb_dim)).encode()}))


COLUMNS = ["image_id", "split", "score", "cluster", "dist", "tm"]


def load_features(features_path: str | Path, embeddings_path: str | Path | None) -> FeatureSet:
    """The features table with ``.emb`` joined from the image-embedding cache, in the table's row order.

    ``embeddings_path`` is the embed stage's cache directory (``data/embeddings/images``); ``None``
    skips the embeddings (``.emb`` is N x 0) for readers that need only labels, TM and clusters.

    Raises:
        DataError: either file is missing or unreadable, an image of the table has no embedding
            in the cache, or the cache's width is not the one the table was built from.
    """
    path = Path(features_path)
    if not path.exists():
        raise DataError(f"{path}: features table not found; run `dvc repro features`.")
    table = pq.read_table(path, columns=COLUMNS)
    image_id = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    if embeddings_path is None:
        emb = np.zeros((len(image_id), 0), np.float32)
    else:
        emb = _join_embeddings(path, Path(embeddings_path), image_id, (table.schema.metadata or {}).get(EMB_DIM_KEY))
    return FeatureSet(
        image_id=image_id,
        split=np.asarray(table.column("split").to_pylist(), dtype=object),
        score=table.column("score").to_numpy(zero_copy_only=False).astype(np.float32),
        dist=list_column(table, "dist"),
        cluster=table.column("cluster").to_numpy().astype(np.int64),
        tm=list_column(table, "tm"),
        emb=emb,
    )


def _join_embeddings(features: Path, cache: Path, image_id: np.ndarray, emb_dim: bytes | None) -> np.ndarray:
    import pandas as pd

    from pipelines.embed.cache import read_image_embeddings

    from pipelines.embed.cache import read_meta

    ids, emb = read_image_embeddings(cache)
    fix = "rerun `dvc repro features` (after `dvc repro embed`)"
    # a CR-feature cache (image E_CR's backbone features) has its own width; only CLIP caches must match
    clip_cache = (read_meta(cache) or {}).get("fingerprint", {}).get("kind") != CR_FEATURES_KIND
    if clip_cache and emb_dim is not None and emb.shape[1] != int(emb_dim):
        raise DataError(
            f"{features}: built from {int(emb_dim)}-d embeddings, but {cache} holds {emb.shape[1]}-d ones; {fix}."
        )
    if len(ids) == len(image_id) and all(a == b for a, b in zip(ids, image_id, strict=True)):
        return emb  # the features stage writes the cache's order: no copy
    rows = pd.Index(ids).get_indexer(pd.Index(image_id))  # cache ids are unique (checked on read)
    if (missing := np.flatnonzero(rows < 0)).size:
        raise DataError(
            f"{features}: {missing.size} image id(s) have no embedding in {cache} "
            f"(e.g. {image_id[missing[0]]}); {fix}."
        )
    return emb[rows]


def embedding_files(embeddings_path: str | Path) -> list[Path]:
    """The files of an image-embedding cache (meta.json + its parts), for a run's input fingerprint."""
    from pipelines.embed.cache import META, list_parts

    cache = Path(embeddings_path)
    if not (cache / META).is_file():
        raise DataError(f"{cache}: embedding cache not found (no {META}); run `dvc repro embed`.")
    return [cache / META, *list_parts(cache)]
