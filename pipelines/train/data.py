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
    flat = np.array(col.flatten(), dtype=np.float32)  # a writable copy (torch.from_numpy wants one)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)


@dataclass
class FeatureSet:
    image_id: np.ndarray
    split: np.ndarray
    score: np.ndarray  # float32, NaN where unlabeled
    dist: np.ndarray  # N x L vote distribution, NaN rows where unlabeled
    cluster: np.ndarray
    emb: np.ndarray  # N x D E_CR input: the CLIP image embeddings, or the image E_CR's backbone features
    clip: np.ndarray  # N x D CLIP image embeddings, TM's input (the same array as ``emb`` when E_CR reads CLIP)

    def __len__(self) -> int:
        return len(self.image_id)

    def take(self, rows: np.ndarray) -> "FeatureSet":
        cols = {f.name: getattr(self, f.name)[rows] for f in fields(self) if f.name != "clip"}
        return FeatureSet(**cols, clip=cols["emb"] if self.clip is self.emb else self.clip[rows])

    def split_of(self, *names: str) -> "FeatureSet":
        return self.take(np.flatnonzero(np.isin(self.split, names)))

    @property
    def n_levels(self) -> int:
        return self.dist.shape[1]


CR_FEATURES_KIND = "cr_features"  # the ``kind`` in the fingerprint of a CR-feature cache (``pipelines.ranking.cr_features``)
# features-table schema metadata: the width of the embeddings the table was built from, and
# what the TM features of its rows are (logit scale, tag counts), which readers check their tag table against
EMB_DIM_KEY = b"emb_dim"
TM_SCALE_KEY, N_SEMANTIC_KEY, N_ATTRIBUTE_KEY = b"tm_scale", b"n_semantic", b"n_attribute"


def write_features_table(path, *, image_id, split, score, dist, cluster, emb_dim: int, tm_scale: float = 1.0,
                         n_semantic: int | None = None, n_attribute: int | None = None) -> None:
    """Write the features table (one row per embedded image: ids, split, labels, cluster) atomically.

    It holds no TM features: :class:`pipelines.semantics.TagMatcher` computes them where they
    are used, from the CLIP embeddings (``data/embeddings/images``, which ``load_features``
    joins by ``image_id``) and the tag table (``data/embeddings/tags.parquet``). The schema
    metadata records ``emb_dim`` (so a cache re-embedded at another width is caught on load),
    ``tm_scale`` (the logit scale of the TM features) and the tag counts they were built with.
    """
    import pyarrow as pa

    from pipelines.io import write_parquet

    dist = np.ascontiguousarray(dist, dtype=np.float32)
    table = pa.table(
        {
            "image_id": pa.array(image_id, pa.string()),
            "split": pa.array(split, pa.string()),
            "score": pa.array(score, pa.float32()),
            "cluster": pa.array(cluster, pa.int32()),
            "dist": pa.FixedSizeListArray.from_arrays(pa.array(dist.reshape(-1)), dist.shape[1]),
        }
    )
    meta = {EMB_DIM_KEY: int(emb_dim), TM_SCALE_KEY: repr(float(tm_scale)),
            N_SEMANTIC_KEY: n_semantic, N_ATTRIBUTE_KEY: n_attribute}
    write_parquet(path, table.replace_schema_metadata({k: str(v).encode() for k, v in meta.items() if v is not None}))


COLUMNS = ["image_id", "split", "score", "cluster", "dist"]


def _read(path: Path, read):
    """``read()`` of the features table at ``path``, with errors that name it and the fix."""
    if not path.exists():
        raise DataError(f"{path}: features table not found; run `dvc repro features`.")
    try:
        return read()
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: not a readable features table ({exc}); rerun `dvc repro features`.") from exc


def _table(path: Path, columns: list[str], splits):
    filters = None if splits is None else [("split", "in", list(splits))]
    return _read(path, lambda: pq.read_table(path, columns=columns, filters=filters))


def features_meta(path: Path) -> dict:
    """The features table's schema metadata (bytes keys and values: ``TM_SCALE_KEY``, ...)."""
    return _read(path, lambda: pq.read_schema(path).metadata or {})


def load_features(features_path: str | Path, embeddings_path: str | Path | None, *, clip_path: str | Path | None = None,
                  splits=None, rows: np.ndarray | None = None) -> FeatureSet:
    """The features table's rows with their embeddings joined by ``image_id``, in the table's order.

    ``embeddings_path``: the E_CR input cache (the embed stage's ``data/embeddings/images``, or the
    CR-feature cache); ``None`` skips it (``.emb`` is N x 0) for readers of labels and clusters
    only. ``clip_path``: the CLIP image cache that TM reads (``.clip``); ``None`` means
    ``embeddings_path`` itself, when that is a CLIP cache, else N x 0.

    Only what is asked for is read: the rows of ``splits`` (all when None), then of those the
    positions ``rows`` (a worker's shard), and of the caches only those rows
    (:func:`read_embedding_rows`).

    Raises:
        DataError: a file is missing or unreadable, an image of the table has no embedding
            in a cache, or a CLIP cache's width is not the one the table was built from.
    """
    path = Path(features_path)
    table = _table(path, COLUMNS, splits)
    if rows is not None:
        table = table.take(np.asarray(rows, dtype=np.int64))
    image_id = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    emb_dim = features_meta(path).get(EMB_DIM_KEY)
    emb = _embeddings(path, embeddings_path, image_id, emb_dim)
    if clip_path is None or (embeddings_path is not None and Path(clip_path) == Path(embeddings_path)):
        clip = emb if embeddings_path is not None and not _is_cr_cache(Path(embeddings_path)) else np.zeros((len(image_id), 0), np.float32)
    else:
        clip = _embeddings(path, clip_path, image_id, emb_dim)
    return FeatureSet(
        image_id=image_id,
        split=np.asarray(table.column("split").to_pylist(), dtype=object),
        score=table.column("score").to_numpy(zero_copy_only=False).astype(np.float32),
        dist=list_column(table, "dist"),
        cluster=table.column("cluster").to_numpy().astype(np.int64),
        emb=emb,
        clip=clip,
    )


def split_rows(features_path: str | Path, *names: str) -> int:
    """How many rows of the features table are in the splits ``names`` (reads the split column only)."""
    return _table(Path(features_path), ["split"], names).num_rows


def shard_rows(n: int, rank: int, world: int, seed: int) -> np.ndarray:
    """Worker ``rank``'s share of ``n`` rows (sorted positions): all rows for one worker, else a
    seeded random partition into ``world`` near-equal shards, fixed for the whole run."""
    if world <= 1:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, world]).permutation(n)[rank::world])


def _is_cr_cache(cache: Path) -> bool:
    from pipelines.embed.cache import read_meta

    return (read_meta(cache) or {}).get("fingerprint", {}).get("kind") == CR_FEATURES_KIND


def _embeddings(features: Path, cache: str | Path | None, image_id: np.ndarray, emb_dim: bytes | None) -> np.ndarray:
    if cache is None:
        return np.zeros((len(image_id), 0), np.float32)
    cache = Path(cache)
    emb = read_embedding_rows(cache, image_id, what=str(features))
    # a CR-feature cache (image E_CR's backbone features) has its own width; only CLIP caches must match
    if emb_dim is not None and emb.shape[1] != int(emb_dim) and not _is_cr_cache(cache):
        raise DataError(f"{features}: built from {int(emb_dim)}-d embeddings, but {cache} holds {emb.shape[1]}-d ones; {FIX}.")
    return emb


FIX = "rerun `dvc repro features` (after `dvc repro embed`)"


def read_embedding_rows(cache: str | Path, image_id, what: str = "the features table") -> np.ndarray:
    """The embeddings of ``image_id`` (len x D float32, in that order) from an embedding cache.

    One pass over the cache's parts, one part in memory at a time: each part is checked
    against its checksum (as ``read_image_embeddings`` does), and only the wanted rows are
    kept. So a reader of a subset (a worker's shard, the test split) holds that subset, not
    the cache.

    Raises:
        DataError: the cache is missing or corrupt, has an id twice, or lacks a wanted id.
    """
    import hashlib

    import pandas as pd
    import pyarrow as pa

    from pipelines.embed.cache import DIGEST_CHARS, FIX as CACHE_FIX, META, PART_RE, list_parts, read_meta

    cache = Path(cache)
    if not cache.is_dir() or read_meta(cache) is None:
        raise DataError(f"{cache}: embedding cache not found (no readable {META}); run `dvc repro embed`.")
    wanted = pd.Index(np.asarray(image_id, dtype=object))
    if not wanted.is_unique:
        raise DataError(f"{what}: duplicate image ids; {FIX}.")
    dim = read_meta(cache).get("fingerprint", {}).get("embed_dim")
    out: np.ndarray | None = None
    seen = np.zeros(len(wanted), dtype=bool)
    for part in list_parts(cache):
        data = part.read_bytes()
        digest, actual = PART_RE.match(part.name).group(2), hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]
        if digest != actual:
            why = "has no checksum in its name" if digest is None else f"does not match its checksum ({actual} != {digest})"
            raise DataError(f"{part}: embedding chunk {why}: truncated, corrupted or from an older version; {CACHE_FIX}.")
        try:
            table = pq.read_table(pa.BufferReader(data), columns=["image_id", "embedding"])
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{part}: not a valid Parquet chunk ({exc}); {CACHE_FIX}.") from exc
        del data
        col = table.column("embedding").type
        if not pa.types.is_fixed_size_list(col):
            raise DataError(f"{part}: column `embedding` is {col}, not fixed_size_list; {CACHE_FIX}.")
        if dim is not None and col.list_size != int(dim):
            raise DataError(f"{part}: embeddings have {col.list_size} dims, the cache says {dim}; {CACHE_FIX}.")
        if out is None:
            out = np.empty((len(wanted), col.list_size), dtype=np.float32)
        pos = wanted.get_indexer(pd.Index(table.column("image_id").to_pylist()))
        hit = np.flatnonzero(pos >= 0)
        if not hit.size:
            continue
        dst = pos[hit]
        if seen[dst].any() or len(np.unique(dst)) < len(dst):
            raise DataError(f"{cache}: duplicate image ids in the cache (e.g. {wanted[dst[seen[dst]][0]] if seen[dst].any() else wanted[dst[0]]}); {CACHE_FIX}.")
        emb = table.column("embedding").take(pa.array(hit, pa.int64())).combine_chunks()
        if emb.null_count:
            raise DataError(f"{part}: {emb.null_count} null embedding(s); {CACHE_FIX}.")
        out[dst] = np.asarray(emb.flatten(), dtype=np.float32).reshape(len(hit), -1)
        seen[dst] = True
    if out is None:
        out = np.zeros((len(wanted), int(dim or 0)), dtype=np.float32)
    if (missing := np.flatnonzero(~seen)).size:
        raise DataError(f"{what}: {missing.size} image id(s) have no embedding in {cache} (e.g. {wanted[missing[0]]}); {FIX}.")
    return out


def embedding_dim(cache: str | Path) -> int:
    """The width of an embedding cache's rows (its meta, else its first part's schema)."""
    from pipelines.embed.cache import META, list_parts, read_meta

    meta = read_meta(cache)
    if meta is None:
        raise DataError(f"{cache}: embedding cache not found (no readable {META}); run `dvc repro embed`.")
    if (dim := meta.get("fingerprint", {}).get("embed_dim")) is not None:
        return int(dim)
    parts = list_parts(cache)
    if not parts:
        raise DataError(f"{cache}: the embedding cache has no parts; run `dvc repro embed`.")
    return pq.read_schema(parts[0]).field("embedding").type.list_size


def embedding_files(embeddings_path: str | Path) -> list[Path]:
    """The files of an image-embedding cache (meta.json + its parts), for a run's input fingerprint."""
    from pipelines.embed.cache import META, list_parts

    cache = Path(embeddings_path)
    if not (cache / META).is_file():
        raise DataError(f"{cache}: embedding cache not found (no {META}); run `dvc repro embed`.")
    return [cache / META, *list_parts(cache)]
