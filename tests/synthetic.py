"""A small synthetic features table with real signal, for training-loop tests."""

from __future__ import annotations

import numpy as np

from pipelines.train.data import write_features_table

SPLITS = ("train", "val", "test", "unlabeled")


def make_features(path, n: int = 240, d: int = 16, n_tags: tuple[int, int] = (8, 6), seed: int = 0) -> None:
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
    write_features_table(
        path, image_id=[f"img{i:04d}" for i in range(n)], split=split, score=score, dist=dist,
        cluster=rng.integers(0, 3, n), tm=emb @ tags.T, emb=emb,
    )
