"""Evaluation metrics for aesthetics assessment (numpy only).

Covers the TMCR metrics (seed 000, sec. 4.2-4.4): ACC, PLCC, SRCC, MSE, EMD1/EMD2 (eq. 14)
and the long-tail MSE on a balanced 'Many' / 'Med.' / 'Few' test set; and the ELTA report
(seed 001, sec. 4.1): MAE on the bottom 20% / middle 60% / top 20% of ground-truth scores.

Conventions (documented choices where the papers are silent):

* Distributions are rows over levels 1..L. Every function that takes distributions
  normalises each row by its sum, so raw vote counts work too; a negative entry or a row that
  sums to 0 raises ``ValueError``.
* Correlations of a constant vector are undefined. ``plcc`` / ``srcc`` then return ``0.0``
  (no measurable association) instead of NaN, so a collapsed model scores 0, not a crash.
* Inputs must be finite and of equal length; anything else raises ``ValueError``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

REGIONS: tuple[str, str, str] = ("Many", "Med", "Few")


# ----------------------------------------------------------------------------- helpers
def _vec(x: np.ndarray | Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf")
    return a


def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    p, t = _vec(pred, "pred"), _vec(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in length: {p.shape[0]} vs {t.shape[0]}")
    if p.size == 0:
        raise ValueError("empty input")
    return p, t


def _dist(p: np.ndarray | Sequence[Sequence[float]], name: str) -> np.ndarray:
    """Validate a (N, L) array of distributions (or counts) and normalise its rows."""
    a = np.asarray(p, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"{name}: expected shape (N, L), got {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"{name}: entries must be finite and non-negative")
    s = a.sum(axis=1, keepdims=True)
    if np.any(s <= 0):
        raise ValueError(f"{name}: {int((s <= 0).sum())} row(s) sum to 0")
    return a / s


# ----------------------------------------------------------------------------- basic metrics
def dist_to_score(p: np.ndarray, levels: np.ndarray | None = None) -> np.ndarray:
    """Mean score of each distribution: ``s_i = sum_j j * p_ij`` (ELTA sec. 3.1).

    ``levels`` defaults to 1..L. Rows are normalised first (vote counts are accepted).
    """
    a = _dist(p, "p")
    lv = np.arange(1, a.shape[1] + 1, dtype=np.float64) if levels is None else _vec(levels, "levels")
    if lv.shape[0] != a.shape[1]:
        raise ValueError(f"levels has {lv.shape[0]} entries, distributions have {a.shape[1]}")
    return a @ lv


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    # A constant side has no defined correlation: return 0 (documented in the module).
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    xc, yc = x - x.mean(), y - y.mean()
    den = np.sqrt((xc @ xc) * (yc @ yc))
    return float(np.clip((xc @ yc) / den, -1.0, 1.0))


def plcc(pred, true) -> float:
    """Pearson linear correlation coefficient; ``0.0`` if either side is constant."""
    p, t = _pair(pred, true)
    if p.size < 2:
        raise ValueError("plcc needs at least 2 samples")
    return _pearson(p, t)


def srcc(pred, true) -> float:
    """Spearman rank correlation (Pearson on average ranks, so ties are handled);
    ``0.0`` if either side is constant."""
    p, t = _pair(pred, true)
    if p.size < 2:
        raise ValueError("srcc needs at least 2 samples")
    return _pearson(rankdata(p), rankdata(t))


def mse(pred, true) -> float:
    """Mean squared error."""
    p, t = _pair(pred, true)
    return float(np.mean((p - t) ** 2))


def mae(pred, true) -> float:
    """Mean absolute error."""
    p, t = _pair(pred, true)
    return float(np.mean(np.abs(p - t)))


def binary_accuracy(pred, true, threshold: float = 5.0) -> float:
    """Share of images where ``pred > threshold`` agrees with ``true > threshold``.

    The AVA convention: an image is 'high quality' when its mean score is strictly above 5
    on the 1-10 scale. For another scale the caller passes the threshold (e.g. the midpoint).
    """
    p, t = _pair(pred, true)
    return float(np.mean((p > threshold) == (t > threshold)))


def emd(p, q, r: float = 2.0) -> float:
    """Earth mover's distance between distributions, TMCR eq. 14, averaged over images.

    ``EMD_r = mean_i ( (1/D) sum_d |CDF_p_i(d) - CDF_q_i(d)|^r )^(1/r)``; EMD1 is ``r=1``,
    EMD2 ``r=2``. Rows are normalised first.
    """
    if r <= 0:
        raise ValueError(f"r must be > 0, got {r}")
    a, b = _dist(p, "p"), _dist(q, "q")
    if a.shape != b.shape:
        raise ValueError(f"p and q differ in shape: {a.shape} vs {b.shape}")
    diff = np.abs(np.cumsum(a, axis=1) - np.cumsum(b, axis=1))
    return float(np.mean(np.mean(diff**r, axis=1) ** (1.0 / r)))


# ----------------------------------------------------------------------------- ELTA regions
def lmh_mae(pred, true) -> dict[str, float]:
    """ELTA sec. 4.1: MAE on the low / medium / high ground-truth regions.

    Images are sorted by ground-truth score with a stable sort (ties keep input order, so
    the split is deterministic); the first ``floor(0.2 N)`` are 'L', the last
    ``floor(0.2 N)`` are 'H', the rest 'M'. Needs ``N >= 5`` so every region is non-empty.
    """
    p, t = _pair(pred, true)
    n = p.size
    if n < 5:
        raise ValueError(f"lmh_mae needs at least 5 samples, got {n}")
    k = int(np.floor(0.2 * n))
    order = np.argsort(t, kind="stable")
    err = np.abs(p - t)[order]
    return {"L": float(err[:k].mean()), "M": float(err[k : n - k].mean()), "H": float(err[n - k :].mean())}


# ----------------------------------------------------------------------------- TMCR long tail
LT_BINS = 20
LT_SHARES: tuple[float, float] = (0.5, 0.45)
"""The default long-tail rule: 20 equal-width bins of the training scores, ranked by count;
the densest holding the first half of the training images are 'Many', the next up to 95 %
'Med', the rest 'Few'. On AVA's training scores (TANet split) this reproduces the TMCR
authors' released regions, Many = [4.87, 5.88], Med = [3.85, 4.87) and (5.88, 6.90], each edge
within 0.005 (tests/test_metrics.py)."""


def longtail_regions(
    train_scores,
    n_bins: int = LT_BINS,
    *,
    shares: tuple[float, float] = LT_SHARES,
    score_range: tuple[float, float] | None = None,
) -> dict:
    """Define 'Many' / 'Med' / 'Few' score regions from the TRAINING score histogram.

    TMCR sec. 4.4 splits the score range into three regions "based on the distribution of
    image quantities in the training set" without giving the rule. Ours:

    1. Bin the training scores into ``n_bins`` equal-width bins over ``score_range``
       (default: min..max of the training scores).
    2. Rank the bins by training count, densest first (ties: lower bin first).
    3. Walk that ranking, tracking the share of training images in the bins *before* the
       current one: a bin is 'Many' while that share is < ``shares[0]``, 'Med' while it is
       < ``shares[0] + shares[1]``, and 'Few' otherwise.

    With the defaults (20 bins, shares 0.5 / 0.45), 'Many' is the smallest set of densest bins
    holding >= 50 % of training images, 'Med' the next densest up to >= 95 %, and 'Few' the
    sparsest bins (and any empty bins). For a unimodal histogram this gives a central 'Many'
    interval flanked by 'Med' and with 'Few' in both tails; on AVA it gives the authors'
    regions (see :data:`LT_SHARES`). Scores outside the range fall in the end bins.

    Returns a JSON-serialisable dict: ``edges`` (n_bins + 1 floats), ``bin_region``,
    ``bin_count``, ``shares``, ``rule``.
    """
    s = _vec(train_scores, "train_scores")
    if s.size == 0:
        raise ValueError("train_scores is empty")
    if n_bins < 3:
        raise ValueError(f"n_bins must be >= 3, got {n_bins}")
    if not (0 < shares[0] and 0 < shares[1] and shares[0] + shares[1] < 1):
        raise ValueError(f"shares must be positive with sum < 1, got {shares}")
    lo, hi = (float(s.min()), float(s.max())) if score_range is None else map(float, score_range)
    if not hi > lo:
        raise ValueError("training scores are constant (or score_range is empty): long-tail regions undefined")
    edges = np.linspace(lo, hi, n_bins + 1)
    counts = np.bincount(_bin_of(s, edges), minlength=n_bins)
    order = np.argsort(-counts, kind="stable")
    before = (np.cumsum(counts[order]) - counts[order]) / s.size
    labels = np.empty(n_bins, dtype=object)
    labels[order] = np.where(before < shares[0], "Many", np.where(before < shares[0] + shares[1], "Med", "Few"))
    return {
        "edges": edges.tolist(),
        "bin_region": [str(x) for x in labels],
        "bin_count": counts.astype(int).tolist(),
        "shares": [float(shares[0]), float(shares[1])],
        "rule": "bins ranked by training count; Many < shares[0] <= Med < shares[0]+shares[1] <= Few "
        "(cumulative share of training images before the bin)",
    }


def region_edges(cuts: Sequence[float]) -> dict:
    """Explicit regions from four cut points ``[c0, c1, c2, c3]`` (``c0 < c1 <= c2 < c3``):
    Many = [c1, c2], Med = [c0, c1) and (c2, c3], Few = below c0 or above c3 (the TMCR
    authors' AVA regions are ``[3.85, 4.87, 5.88, 6.90]``). Same use as ``longtail_regions``."""
    c = _vec(cuts, "long-tail edges")
    if c.shape != (4,) or not (c[0] < c[1] <= c[2] < c[3]):
        raise ValueError(f"long-tail edges must be 4 increasing numbers [c0 < c1 <= c2 < c3], got {c.tolist()}")
    return {"cuts": c.tolist(), "rule": "Many [c1, c2]; Med [c0, c1) and (c2, c3]; Few < c0 or > c3"}


def _bin_of(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index per score; the last bin is closed, out-of-range scores are clipped."""
    return np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 2)


def score_regions(scores, regions: Mapping) -> np.ndarray:
    """Region name ('Many' / 'Med' / 'Few') of each score under ``longtail_regions`` or
    ``region_edges`` output."""
    s = _vec(scores, "scores")
    if "cuts" in regions:
        c0, c1, c2, c3 = regions["cuts"]
        many = (s >= c1) & (s <= c2)
        med = ((s >= c0) & (s < c1)) | ((s > c2) & (s <= c3))
        return np.where(many, "Many", np.where(med, "Med", "Few")).astype(object)
    labels = np.asarray(regions["bin_region"], dtype=object)
    return labels[_bin_of(s, np.asarray(regions["edges"], dtype=np.float64))]


def balanced_test_indices(test_scores, regions: Mapping, seed: int = 0) -> dict[str, np.ndarray]:
    """TMCR sec. 4.4 balanced test set: the same number of test images from each region.

    ``m`` = size of the smallest region among the test scores; each region contributes ``m``
    images drawn without replacement by ``numpy.random.default_rng(seed)`` (returned sorted).
    Raises ``ValueError`` if a region holds no test image.
    """
    lab = score_regions(test_scores, regions)
    members = {r: np.flatnonzero(lab == r) for r in REGIONS}
    sizes = {r: int(m.size) for r, m in members.items()}
    m = min(sizes.values())
    if m == 0:
        raise ValueError(f"balanced long-tail test set impossible: test images per region {sizes}")
    rng = np.random.default_rng(seed)
    return {r: np.sort(rng.choice(members[r], size=m, replace=False)) for r in REGIONS}


BALANCED_CSV_COLUMNS = ("image_id", "Shot")
"""Columns read from a balanced long-tail set in the TMCR authors' layout
(``Label/LongTailed_Label/AVA_test_balanced.csv``: ``image_id,score2..score11,tag1,tag2,tag3,
Aesthetic,Shot``, where score2..score11 are the vote counts for 1..10, tag3 the challenge id,
Aesthetic the mean score and Shot the region, Many / Med / Few). Other columns are ignored."""


def read_balanced_set(path) -> dict[str, str]:
    """``{image_id: region}`` from a balanced long-tail set CSV (:data:`BALANCED_CSV_COLUMNS`).

    Raises ``ValueError`` naming the file (and line) for a missing column, an unknown region,
    a repeated image id or an empty file.
    """
    import csv

    out: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in BALANCED_CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; a balanced set needs {list(BALANCED_CSV_COLUMNS)} "
                "(the TMCR authors' AVA_test_balanced.csv layout)"
            )
        for line, row in enumerate(reader, 2):
            image_id, region = str(row["image_id"]).strip(), str(row["Shot"]).strip()
            if region not in REGIONS:
                raise ValueError(f"{path}:{line}: Shot {region!r} is not one of {', '.join(REGIONS)}")
            if image_id in out:
                raise ValueError(f"{path}:{line}: image_id {image_id!r} appears twice")
            out[image_id] = region
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def balanced_set_indices(test_ids, balanced: Mapping[str, str]) -> tuple[dict[str, np.ndarray], int]:
    """Positions in ``test_ids`` of each region's images of a balanced set (``read_balanced_set``),
    and how many of the set's images are not among ``test_ids``. Raises ``ValueError`` when
    none is."""
    ids = [str(i) for i in test_ids]
    out = {r: np.asarray([k for k, i in enumerate(ids) if balanced.get(i) == r], dtype=np.int64) for r in REGIONS}
    found = sum(len(v) for v in out.values())
    if found == 0:
        raise ValueError(f"none of the {len(balanced)} images of the balanced set is in the test split")
    return out, len(balanced) - found


def longtail_mse(pred, true, regions: Mapping | None, indices: Mapping[str, np.ndarray]) -> dict[str, float]:
    """MSE per region on the balanced test set, plus 'ALL' over the union (TMCR Table 3).

    ``indices`` comes from ``balanced_test_indices``; ``regions`` is checked against it (each
    index must hold a true score in its region). ``regions=None`` skips that check: a balanced
    set read from a file (``balanced_set_indices``) carries its own region labels.
    """
    p, t = _pair(pred, true)
    if set(indices) != set(REGIONS):
        raise ValueError(f"indices must have keys {REGIONS}, got {sorted(indices)}")
    lab = score_regions(t, regions) if regions is not None else None
    out: dict[str, float] = {}
    for r in REGIONS:
        idx = np.asarray(indices[r], dtype=np.int64)
        if idx.size == 0:
            raise ValueError(f"region {r} has no indices")
        if lab is not None and np.any(lab[idx] != r):
            raise ValueError(f"indices[{r!r}] holds images whose true score is outside region {r}")
        out[r] = float(np.mean((p[idx] - t[idx]) ** 2))
    union = np.concatenate([np.asarray(indices[r], dtype=np.int64) for r in REGIONS])
    out["ALL"] = float(np.mean((p[union] - t[union]) ** 2))
    return {k: out[k] for k in ("ALL", *REGIONS)}


def longtail_metrics(
    pred_scores, true_scores, train_scores, *, seed: int = 0, lt_bins: int = LT_BINS,
    lt_shares: tuple[float, float] = LT_SHARES, lt_edges: Sequence[float] | None = None,
    lt_indices: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float | None]:
    """``longtail_mse`` on the balanced set of ``evaluate``'s long-tail options; all four values
    None when a region has no test image (no balanced set can be drawn)."""
    if lt_indices is not None:
        if any(len(lt_indices.get(r, ())) == 0 for r in REGIONS):
            return dict.fromkeys(("ALL", *REGIONS))
        return longtail_mse(pred_scores, true_scores, None, lt_indices)
    regions = region_edges(lt_edges) if lt_edges is not None else longtail_regions(train_scores, lt_bins, shares=lt_shares)
    try:
        return longtail_mse(pred_scores, true_scores, regions, balanced_test_indices(true_scores, regions, seed))
    except ValueError:  # a region without test images: no balanced set can be drawn
        return dict.fromkeys(("ALL", *REGIONS))


# ----------------------------------------------------------------------------- all at once
def evaluate(
    pred_dist,
    true_dist,
    train_scores,
    *,
    threshold: float,
    seed: int = 0,
    lt_bins: int = LT_BINS,
    lt_shares: tuple[float, float] = LT_SHARES,
    lt_edges: Sequence[float] | None = None,
    lt_indices: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float | None]:
    """Every metric of both papers for one test set.

    ``pred_dist`` / ``true_dist``: (N, L) distributions over levels 1..L (counts accepted).
    ``train_scores``: training-set mean scores on the same 1..L scale; they define the
    long-tail regions (see ``longtail_regions`` for ``lt_bins`` / ``lt_shares``), unless
    ``lt_edges`` gives four explicit cut points (``region_edges``). ``lt_indices`` (from
    ``balanced_set_indices``) replaces the drawn balanced set by a given one (the regions
    are then the file's).
    ``threshold``: ACC cut (5.0 for AVA). ``seed``: the balanced long-tail test draw.
    Scores are the distribution means. Keys: acc, plcc, srcc, mse, emd1, emd2, mae_L, mae_M,
    mae_H, lt_mse_all, lt_mse_many, lt_mse_med, lt_mse_few, n. Raises ``ValueError`` when
    N < 5. When a long-tail region has no test image (small test sets) the four lt_* values
    are None rather than a number computed on a set that is not balanced. Constant
    predictions give plcc = srcc = 0.
    """
    pd_, td = _dist(pred_dist, "pred_dist"), _dist(true_dist, "true_dist")
    if pd_.shape != td.shape:
        raise ValueError(f"pred_dist and true_dist differ in shape: {pd_.shape} vs {td.shape}")
    ps, ts = dist_to_score(pd_), dist_to_score(td)
    lmh = lmh_mae(ps, ts)
    lt = longtail_metrics(ps, ts, train_scores, seed=seed, lt_bins=lt_bins, lt_shares=lt_shares,
                          lt_edges=lt_edges, lt_indices=lt_indices)
    return {
        "acc": binary_accuracy(ps, ts, threshold),
        "plcc": plcc(ps, ts),
        "srcc": srcc(ps, ts),
        "mse": mse(ps, ts),
        "emd1": emd(pd_, td, 1),
        "emd2": emd(pd_, td, 2),
        "mae_L": lmh["L"],
        "mae_M": lmh["M"],
        "mae_H": lmh["H"],
        "lt_mse_all": lt["ALL"],
        "lt_mse_many": lt["Many"],
        "lt_mse_med": lt["Med"],
        "lt_mse_few": lt["Few"],
        "n": int(ps.size),
    }
