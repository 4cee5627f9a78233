"""Tag matching (TMCR eq. 3-7) and semantic clustering (TMCR sec. 3.3), in bounded memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.io import DataError

CHUNK_ROWS = 16_384
"""Rows per block of the chunked matmul / assignment (bounds the temporaries)."""

KMEANS_METHODS = ("sample", "minibatch", "full")
SMALL_FIT = 10_000
"""Up to this many fitted rows, ``n_init="auto"`` means 10 restarts (sklearn's classic default), else 3."""


def resolve_n_init(n_init: int | str, n_rows: int) -> int:
    if n_init == "auto":
        return 10 if n_rows <= SMALL_FIT else 3
    if not isinstance(n_init, int) or isinstance(n_init, bool) or n_init < 1:
        raise DataError(f"features.kmeans_n_init = {n_init!r}; use an integer >= 1 or auto.")
    return n_init


def _split_kinds(kinds: list[str]) -> tuple[np.ndarray, np.ndarray]:
    kinds_arr = np.asarray(kinds)
    sem, attr = np.flatnonzero(kinds_arr == "semantic"), np.flatnonzero(kinds_arr == "attribute")
    if not sem.size or not attr.size:
        raise DataError(
            "tag embeddings hold no semantic or no attribute tags; rebuild the tag library (stage `tags`)."
        )
    return sem, attr


class TagMatcher:
    """TM features (eq. 5-7), computed where they are used: ``scale * E @ [T_sem | T_attr].T``.

    One matmul of L2-normalised CLIP image embeddings ``E`` with the tag-embedding matrix, in
    float32 on ``E``'s device. Training (head, self-training), pseudo-labelling, evaluation
    and the served model all call this one function, so their TM numerics agree; no
    N x (M + A) table is stored. Columns are the semantic tags, then the attribute tags
    (``n_sem`` of the first kind).
    """

    def __init__(self, tag_emb: np.ndarray, kinds: list[str], scale: float = 1.0):
        sem, attr = _split_kinds(kinds)
        rows = np.asarray(tag_emb, dtype=np.float32)[np.concatenate([sem, attr])]
        self.weight = torch.from_numpy(np.ascontiguousarray(rows.T))  # D x (M + A)
        self.n_sem, self.scale = int(sem.size), float(scale)

    @property
    def dim(self) -> int:
        """M + A: the width of the TM feature."""
        return int(self.weight.shape[1])

    @property
    def emb_dim(self) -> int:
        return int(self.weight.shape[0])

    def to(self, device: torch.device | str) -> "TagMatcher":
        """This matcher with its tag matrix on ``device`` (the worker's GPU, say)."""
        self.weight = self.weight.to(device)
        return self

    def __call__(self, emb: torch.Tensor) -> torch.Tensor:
        """TM features of a batch of image embeddings (B x D -> B x (M + A), float32)."""
        w = self.weight if self.weight.device == emb.device else self.weight.to(emb.device)
        out = emb.to(torch.float32) @ w
        return out * self.scale if self.scale != 1.0 else out

    def numpy(self, emb: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
        """TM features of an N x D array, ``chunk_rows`` rows at a time (N x (M + A) float32).

        For small N (a request, a plot sample): readers of many rows call the matcher per batch.
        """
        with torch.no_grad():
            blocks = [self(torch.from_numpy(np.ascontiguousarray(emb[s : s + chunk_rows], dtype=np.float32))).cpu().numpy()
                      for s in range(0, len(emb), chunk_rows)]
        return np.concatenate(blocks) if blocks else np.zeros((0, self.dim), np.float32)

    def split(self, tm):
        """``(sim_sem, sim_attr)`` of TM features."""
        return tm[:, : self.n_sem], tm[:, self.n_sem :]


def kmeans_space(image_emb: np.ndarray, sem_tag_emb: np.ndarray, scale: float = 1.0,
                 chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Rows whose Euclidean geometry is exactly that of the semantic TM features, in <= D dims.

    ``sim_sem = scale * E @ T.T`` (N x M) is a linear map of the D-d embeddings, so
    ``||sim_1 - sim_2||^2 = (e_1 - e_2) G (e_1 - e_2)^T`` with ``G = T.T @ T`` (D x D). With
    ``G = V diag(w) V.T``, ``Y = scale * E @ V @ diag(sqrt(w))`` (N x rank(T)) has the same
    distances, inertia and assignments as ``sim_sem``, at D / M of the cost when the library
    is wider than the embedding (2,145 tags vs 768 dims for ViT-L/14). When it is not,
    ``sim_sem`` itself is returned.
    """
    t = np.asarray(sem_tag_emb, dtype=np.float64)
    if t.shape[0] <= t.shape[1]:
        return _sims(image_emb, t, scale, chunk_rows)
    w, v = np.linalg.eigh(t.T @ t)
    keep = w > w.max() * 1e-10
    return _sims(image_emb, (v[:, keep] * np.sqrt(w[keep])).T, scale, chunk_rows)


def _sims(image_emb: np.ndarray, rows: np.ndarray, scale: float, chunk_rows: int) -> np.ndarray:
    """``scale * image_emb @ rows.T`` in float32, block by block."""
    w = np.ascontiguousarray(np.asarray(rows, dtype=np.float32).T)
    out = np.empty((len(image_emb), w.shape[1]), dtype=np.float32)
    for start in range(0, len(image_emb), chunk_rows):
        block = np.asarray(image_emb[start : start + chunk_rows], dtype=np.float32)
        np.matmul(block, w, out=out[start : start + len(block)])
    if scale != 1.0:
        out *= np.float32(scale)
    return out


def fit_kmeans(x: np.ndarray, n_clusters: int, seed: int, *, rows: np.ndarray | None = None,
               method: str = "sample", fit_rows: int = 50_000, n_init: int | str = "auto",
               batch_size: int = 4096):
    """A K-means fitted on ``x[rows]`` (all rows when ``rows`` is None): an sklearn estimator.

    ``method``:

    - ``sample``: Lloyd's K-means (``n_init`` restarts) on at most ``fit_rows`` of those rows,
      drawn uniformly with ``seed``, so the cost stops growing with N;
    - ``minibatch``: ``MiniBatchKMeans`` (``batch_size``, ``n_init`` restarts) on every row;
    - ``full``: Lloyd's K-means with ``n_init`` restarts on every row (the reference).

    ``n_init="auto"``: 10 restarts up to :data:`SMALL_FIT` fitted rows, else 3.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans  # here: the served model imports TagMatcher, not K-means

    if method not in KMEANS_METHODS:
        raise DataError(f"features.kmeans = {method!r}; use one of {', '.join(KMEANS_METHODS)}.")
    rows = np.arange(len(x)) if rows is None else np.asarray(rows)
    if method == "sample" and len(rows) > fit_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, fit_rows, replace=False))
    n_init = resolve_n_init(n_init, len(rows))
    if method == "minibatch":
        km = MiniBatchKMeans(n_clusters=n_clusters, n_init=n_init, batch_size=batch_size, random_state=seed)
    else:
        km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    return km.fit(np.ascontiguousarray(x[rows], dtype=np.float32))


def assign_clusters(x: np.ndarray, centers: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Nearest centre of every row (squared Euclidean), block by block."""
    centers = np.asarray(centers, dtype=np.float32)
    c_sq = (centers * centers).sum(1)
    out = np.empty(len(x), dtype=np.int32)
    for start in range(0, len(x), chunk_rows):
        block = np.asarray(x[start : start + chunk_rows], dtype=np.float32)
        out[start : start + len(block)] = np.argmin(c_sq - 2 * block @ centers.T, axis=1)
    return out


def inertia(x: np.ndarray, labels: np.ndarray, centers: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> float:
    """Sum of squared distances of the rows to their assigned centres (float64 accumulation)."""
    centers = np.asarray(centers, dtype=np.float32)
    total = 0.0
    for start in range(0, len(x), chunk_rows):
        block = np.asarray(x[start : start + chunk_rows], dtype=np.float32)
        diff = block - centers[labels[start : start + len(block)]]
        total += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
    return total


def cluster_means(x: np.ndarray, labels: np.ndarray, n_clusters: int, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Mean row of every cluster (k x D; NaN rows for empty clusters), block by block."""
    sums = np.zeros((n_clusters, x.shape[1]), dtype=np.float64)
    for start in range(0, len(x), chunk_rows):
        lab = labels[start : start + chunk_rows]
        onehot = np.zeros((n_clusters, len(lab)), dtype=np.float32)
        onehot[lab, np.arange(len(lab))] = 1
        sums += onehot @ np.asarray(x[start : start + len(lab)], dtype=np.float32)
    counts = np.bincount(labels, minlength=n_clusters).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def semantic_clusters(sim_sem: np.ndarray, n_clusters: int, seed: int, fit_mask: np.ndarray, *,
                      method: str = "sample", fit_rows: int = 50_000, n_init: int | str = "auto") -> np.ndarray:
    """K-means on the semantic-similarity vectors (authors: 15 clusters).

    The centroids are fitted on ``fit_mask`` rows only (the training split, so that test
    images never shape the clusters; see :func:`fit_kmeans` for ``method``) and every row is
    then assigned to its nearest centroid.
    """
    n_fit = int(fit_mask.sum())
    if n_fit < n_clusters:
        raise DataError(
            f"features.n_clusters = {n_clusters} but only {n_fit} training images; lower n_clusters in params.yaml."
        )
    km = fit_kmeans(sim_sem, n_clusters, seed, rows=np.flatnonzero(fit_mask), method=method, fit_rows=fit_rows,
                    n_init=n_init)
    return assign_clusters(sim_sem, km.cluster_centers_)


def load_matcher(features_path: str | Path, tags_path: str | Path):
    """The :class:`TagMatcher` of a features table: the tag table's
    embeddings at the logit scale the table records (``features.logit_scale``)."""
    from pipelines.embed.cache import read_text_embeddings
    from pipelines.train.data import FIX, N_ATTRIBUTE_KEY, N_SEMANTIC_KEY, TM_SCALE_KEY, features_meta

    meta = features_meta(Path(features_path))
    _, kinds, tag_emb = read_text_embeddings(tags_path)
    matcher = TagMatcher(tag_emb, kinds, float(meta.get(TM_SCALE_KEY, b"1.0")))
    built = tuple(int(meta[k]) for k in (N_SEMANTIC_KEY, N_ATTRIBUTE_KEY) if k in meta)
    if built and built != (matcher.n_sem, matcher.dim - matcher.n_sem):
        raise DataError(f"{features_path}: built for {built[0]} semantic + {built[1]} attribute tags, but {tags_path} has "
                        f"{matcher.n_sem} + {matcher.dim - matcher.n_sem}; {FIX}.")
    return matcher
