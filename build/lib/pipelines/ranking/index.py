"""Balanced score-bin index and sampler, TMCR sec. 3.3 ("Semantic Clustering", eq. 8, and
"Balanced Sampling").

Images are grouped by (semantic cluster, score bin); a balanced-level batch takes the same
number ``N_s`` from every populated bin of ONE cluster. Authors' setting: 7 open bins
(2,3) ... (8,9), i.e. ``bin = clamp(floor(score), 2, 8) - 2``; ``N_s = 9``; sampling with
replacement when a bin is short; 30 batches per cluster per epoch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from pipelines.io import DataError

AUTO_CLIP: tuple[int, int] = (2, 9)


def score_bins(scores: np.ndarray | Sequence[float], low: int = 2, high: int = 9) -> np.ndarray:
    """Bin id ``clamp(floor(score), low, high - 1) - low`` in ``0 .. high - low - 1``.

    Scores below ``low`` join the first bin, scores at or above ``high - 1`` the last one.
    """
    s = np.asarray(scores, dtype=np.float64)
    if not high - low >= 1:
        raise ValueError(f"need high > low, got low={low}, high={high}")
    if not np.all(np.isfinite(s)):
        raise DataError(f"scores: {int((~np.isfinite(s)).sum())} value(s) are NaN or inf; drop or fix them first")
    return (np.clip(np.floor(s), low, high - 1) - low).astype(np.int64)


def _auto_n(counts: np.ndarray, clip: tuple[int, int]) -> int:
    return int(np.clip(int(np.median(counts)), clip[0], clip[1]))


def build_index(
    clusters: np.ndarray | Sequence[int],
    scores: np.ndarray | Sequence[float],
    *,
    low: int = 2,
    high: int = 9,
    n_per_bin: int | str = "auto",
    auto_clip: tuple[int, int] = AUTO_CLIP,
) -> tuple[pd.DataFrame, dict]:
    """Group row positions by (cluster, score bin): TMCR eq. 8's ``D_c``.

    Returns ``(index, report)``. ``index`` has one row per POPULATED (cluster, bin), sorted by
    cluster then bin, with columns: ``cluster``, ``bin``, ``count``, ``members`` (int64 array
    of row positions into ``clusters`` / ``scores``, ascending), ``n_s`` (the cluster's
    per-bin quota N_s) and ``active`` (the cluster has >= 2 populated bins).

    N_s rule: an int is used for every cluster; ``"auto"`` uses, per cluster, the median
    count of its populated bins, floored to an int and clipped to ``auto_clip`` (default
    [2, 9]; 9 is the authors' value, reached by any cluster of a large data set).
    Clusters with fewer than 2 populated bins cannot form a contrast: they are marked
    ``active = False``, never sampled, and listed in ``report["inactive_clusters"]``.
    """
    c = np.asarray(clusters)
    if c.ndim != 1 or not np.issubdtype(c.dtype, np.integer):
        raise DataError(f"clusters must be a 1-D array of integer ids, got dtype {c.dtype} shape {c.shape}")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != c.shape:
        raise ValueError(f"clusters and scores differ in length: {c.shape[0]} vs {s.shape[0]}")
    if not (n_per_bin == "auto" or (isinstance(n_per_bin, (int, np.integer)) and n_per_bin >= 1)):
        raise ValueError(f"n_per_bin must be a positive int or 'auto', got {n_per_bin!r}")
    b = score_bins(s, low, high)
    order = np.lexsort((b, c))  # by cluster, then bin; stable so members stay ascending
    cs, bs = c[order], b[order]
    start = np.flatnonzero(np.r_[True, (cs[1:] != cs[:-1]) | (bs[1:] != bs[:-1])]) if c.size else np.empty(0, int)
    counts = np.diff(np.r_[start, c.size])
    index = pd.DataFrame(
        {
            "cluster": cs[start].astype(np.int64),
            "bin": bs[start].astype(np.int64),
            "count": counts.astype(np.int64),
            "members": np.split(order.astype(np.int64), start[1:]) if c.size else [],
        }
    )
    per_cluster = index.groupby("cluster")["count"]
    n_bins = per_cluster.transform("size")
    if n_per_bin == "auto":
        n_s = per_cluster.transform(lambda x: _auto_n(x.to_numpy(), auto_clip))
    else:
        n_s = pd.Series(int(n_per_bin), index=index.index)
    index["n_s"] = n_s.astype(np.int64)
    index["active"] = n_bins >= 2
    inactive = sorted(int(k) for k in index.loc[~index["active"], "cluster"].unique())
    first = index.drop_duplicates("cluster")
    report = {
        "n_images": int(c.size),
        "low": low,
        "high": high,
        "n_bins": high - low,
        "clamped_below": int((s < low).sum()),
        "clamped_above": int((s >= high).sum()),
        "n_clusters": int(first.shape[0]),
        "n_active_clusters": int(first["active"].sum()),
        "inactive_clusters": inactive,
        "inactive_reason": "fewer than 2 populated score bins: no contrast possible; excluded from sampling",
        "n_per_bin_rule": (
            f"auto: median populated-bin count per cluster, clipped to [{auto_clip[0]}, {auto_clip[1]}]"
            if n_per_bin == "auto"
            else f"fixed: {int(n_per_bin)}"
        ),
        "n_per_bin": {int(k): int(v) for k, v in zip(first["cluster"], first["n_s"])},
        "short_bins": int((index["active"] & (index["count"] < index["n_s"])).sum()),
    }
    return index, report


class BalancedBatchSampler:
    """Balanced-level batches, TMCR "Balanced Sampling".

    Each batch comes from one active cluster and holds ``N_s`` row positions from every
    populated bin of it (bin order, ascending): drawn without replacement when the bin has
    >= N_s members, with replacement otherwise. Each epoch has ``batches_per_cluster``
    independent batches per active cluster, all shuffled together. ``epoch(e)`` is a pure
    function of ``(seed, e)``: the same call gives the same batches, another epoch others.

    ``n_per_bin``: ``None`` uses the index's ``n_s`` column; an int or ``"auto"`` overrides it
    (``"auto"`` recomputes the median rule of ``build_index`` with ``auto_clip``).
    """

    def __init__(
        self,
        index: pd.DataFrame,
        n_per_bin: int | str | None = None,
        batches_per_cluster: int = 30,
        seed: int = 0,
        auto_clip: tuple[int, int] = AUTO_CLIP,
    ) -> None:
        if batches_per_cluster < 1:
            raise ValueError(f"batches_per_cluster must be >= 1, got {batches_per_cluster}")
        active = index[index["active"]] if "active" in index else index[index.groupby("cluster")["bin"].transform("size") >= 2]
        if active.empty:
            raise DataError("no cluster has 2 or more populated score bins: nothing to contrast")
        self.seed = int(seed)
        self.batches_per_cluster = int(batches_per_cluster)
        self.clusters: list[tuple[int, list[np.ndarray], int]] = []
        for cluster, rows in active.groupby("cluster", sort=True):
            members = [np.asarray(m, dtype=np.int64) for m in rows["members"]]
            if n_per_bin is None:
                n_s = int(rows["n_s"].iloc[0])
            elif n_per_bin == "auto":
                n_s = _auto_n(np.array([m.size for m in members]), auto_clip)
            elif isinstance(n_per_bin, (int, np.integer)) and n_per_bin >= 1:
                n_s = int(n_per_bin)
            else:
                raise ValueError(f"n_per_bin must be None, 'auto' or a positive int, got {n_per_bin!r}")
            self.clusters.append((int(cluster), members, n_s))

    def __len__(self) -> int:
        return len(self.clusters) * self.batches_per_cluster

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """All batches of one epoch (arrays of row positions), deterministic in (seed, epoch)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        batches: list[np.ndarray] = []
        for _, members, n_s in self.clusters:
            for _ in range(self.batches_per_cluster):
                parts = [m[rng.choice(m.size, n_s, replace=m.size < n_s)] for m in members]
                batches.append(np.concatenate(parts))
        perm = rng.permutation(len(batches))
        return [batches[k] for k in perm]
