"""Tag matching (TMCR eq. 3-7) and semantic clustering (TMCR sec. 3.3)."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from pipelines.io import DataError


def tag_matching(
    image_emb: np.ndarray, tag_emb: np.ndarray, kinds: list[str], scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of every image to every semantic and every attribute tag.

    Both inputs are L2-normalised, so the dot product is the cosine (eq. 5-6). Returns
    ``(sim_sem (N x M), sim_attr (N x A))``; their concatenation is the TM feature (eq. 7).
    ``scale`` is CLIP's logit scale when the authors' logit-scaled similarities are wanted.
    """
    kinds_arr = np.asarray(kinds)
    sem, attr = kinds_arr == "semantic", kinds_arr == "attribute"
    if not sem.any() or not attr.any():
        raise DataError(
            "tag embeddings hold no semantic or no attribute tags; rebuild the tag library (stage `tags`)."
        )
    sims = (image_emb.astype(np.float32) @ tag_emb.astype(np.float32).T) * np.float32(scale)
    return sims[:, sem], sims[:, attr]


def semantic_clusters(sim_sem: np.ndarray, n_clusters: int, seed: int, fit_mask: np.ndarray) -> np.ndarray:
    """K-means on the semantic-similarity vectors (authors: 15 clusters).

    The centroids are fitted on ``fit_mask`` rows only (the training split, so that test
    images never shape the clusters) and every row is then assigned to its nearest centroid.
    """
    n_fit = int(fit_mask.sum())
    if n_fit < n_clusters:
        raise DataError(
            f"features.n_clusters = {n_clusters} but only {n_fit} training images; lower n_clusters in params.yaml."
        )
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    km.fit(sim_sem[fit_mask])
    return km.predict(sim_sem).astype(np.int32)
