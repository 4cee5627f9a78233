"""A small synthetic features table with real signal, for training-loop tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.embed.cache import list_parts, write_chunk, write_meta, write_text_embeddings
from pipelines.train.data import write_features_table

SPLITS = ("train", "val", "test", "unlabeled")


def write_embedding_cache(out_dir, ids, emb: np.ndarray, chunk_rows: int | None = None) -> Path:
    """An image-embedding cache in the embed stage's format (parts + meta.json), as
    ``load_features`` joins it."""
    out_dir = Path(out_dir)
    emb = np.asarray(emb, np.float32)
    for old in list_parts(out_dir):  # a rewrite replaces the whole cache
        old.unlink()
    step = chunk_rows or max(len(ids), 1)
    for k, start in enumerate(range(0, len(ids), step)):
        write_chunk(out_dir, k, list(ids[start : start + step]), emb[start : start + step])
    write_meta(out_dir, {"fingerprint": {"embed_dim": int(emb.shape[1])}})
    return out_dir


def make_features(path, n: int = 240, d: int = 16, n_tags: tuple[int, int] = (8, 6), seed: int = 0,
                  embeddings=None) -> Path:
    """Write the features table at ``path``, its embedding cache at ``embeddings`` (default: an
    ``embeddings`` folder beside the table) and the tag table ``tags.parquet`` beside the cache
    (the embed stage's layout; TM = emb @ tags.T, scale 1); returns the cache's path."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    w = rng.normal(size=d)
    latent = emb @ w
    score = np.clip(5.5 + 1.6 * (latent - latent.mean()) / latent.std(), 1.2, 9.8)
    levels = np.arange(1, 11)
    dist = np.exp(-0.5 * ((levels[None] - score[:, None]) / 1.2) ** 2)
    dist = (dist / dist.sum(1, keepdims=True)).astype(np.float32)
    split = np.asarray(SPLITS)[rng.choice(4, n, p=[0.55, 0.15, 0.15, 0.15])]
    tags = rng.normal(size=(sum(n_tags), d)).astype(np.float32)
    tags /= np.linalg.norm(tags, axis=1, keepdims=True)
    score = score.astype(np.float32)
    score[split == "unlabeled"] = np.nan
    dist[split == "unlabeled"] = np.nan
    ids = [f"img{i:04d}" for i in range(n)]
    embeddings = Path(path).parent / "embeddings" if embeddings is None else Path(embeddings)
    write_embedding_cache(embeddings, ids, emb, chunk_rows=100)  # several parts, as the embed stage writes
    write_text_embeddings(embeddings.parent / "tags.parquet", [f"tag{i}" for i in range(len(tags))],
                          ["semantic"] * n_tags[0] + ["attribute"] * n_tags[1], tags)
    write_features_table(
        path, image_id=ids, split=split, score=score, dist=dist,
        cluster=rng.integers(0, 3, n), emb_dim=d, n_semantic=n_tags[0], n_attribute=n_tags[1],
    )
    return embeddings
