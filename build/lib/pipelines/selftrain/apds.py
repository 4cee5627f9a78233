"""Adaptive Probability Distribution Sharpening (APDS), ELTA sec. 3.4, eq. 7-9 (numpy).

Pseudo-labels for self-training: each prediction is sharpened with a per-sample temperature
that falls with its distance from the mean score (so minority predictions sharpen most),
and kept when its largest sharpened probability reaches a threshold ``t``. ``(beta, t)`` are
chosen by a grid search on a LABELLED VALIDATION subset.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _levels(n_levels: int, levels: np.ndarray | Sequence[float] | None) -> np.ndarray:
    lv = np.arange(1, n_levels + 1, dtype=np.float64) if levels is None else np.asarray(levels, dtype=np.float64)
    if lv.shape != (n_levels,):
        raise ValueError(f"levels must have {n_levels} entries, got shape {lv.shape}")
    return lv


def _logits(logits: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be (N, C) with C >= 2, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or inf")
    return z


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def apds_temperatures(pred_scores, mean_score: float, beta: float) -> np.ndarray:
    """ELTA eq. 8: ``tau_i(beta) = exp(-beta * |s_hat_i - mean_score|)``.

    ``mean_score`` is the mean ground-truth score of the TRAINING set (ELTA sec. 3.1's
    ``s_bar``), on the same scale as the predicted scores. ``beta >= 0`` (0: no sharpening).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    s = np.asarray(pred_scores, dtype=np.float64)
    return np.exp(-beta * np.abs(s - float(mean_score)))


def apds_sharpen(logits, mean_score: float, beta: float, levels=None) -> np.ndarray:
    """ELTA eq. 7-8: per-sample sharpened distribution ``softmax(z_i / tau_i(beta))``.

    ``s_hat_i`` is the score of the UNSHARPENED prediction ``softmax(z_i)`` over ``levels``
    (default 1..C). The softmax runs over the C levels of each sample: eq. 7-8 write the
    denominator as a sum over ``j = 1..B`` (the batch), which is a typo for the class sum
    (otherwise the output would not be a distribution over levels). Computed as
    ``softmax((z_i - max z_i) / tau_i)`` with ``tau_i >= 1e-300``, so huge ``beta`` gives a
    one-hot (uniform over tied maxima) instead of overflow.
    """
    z = _logits(logits)
    lv = _levels(z.shape[1], levels)
    tau = apds_temperatures(_softmax(z) @ lv, mean_score, beta)
    shifted = z - z.max(axis=1, keepdims=True)
    return _softmax(shifted / np.maximum(tau, 1e-300)[:, None])


def select_pseudo_labels(probs_sharp, t: float) -> np.ndarray:
    """Pseudo-label mask: ``max_c probs_sharp[i, c] >= t`` (ELTA eq. 10's indicator)."""
    p = np.asarray(probs_sharp, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs_sharp must be (N, C), got shape {p.shape}")
    return p.max(axis=1) >= t


def grid_search(
    logits,
    true_scores,
    mean_score: float,
    betas: Sequence[float],
    thresholds: Sequence[float],
    *,
    min_selected: int | float = 0.05,
    levels=None,
) -> dict:
    """Choose ``(beta*, t*)`` for APDS, ELTA eq. 9, on a LABELLED VALIDATION subset.

    Never pass test labels: the caller must hold out a labelled validation subset (the
    authors' code scored the grid on the evaluated set's ground truth, a leak).

    For each (beta, t): sharpen (``apds_sharpen``), select ``max prob >= t``, and score the
    selection by the MEAN absolute error between the sharpened distribution's score and the
    true score. Eq. 9 minimises the SUM of errors, which an empty or near-empty selection
    always wins (and which penalises coverage), so we use the mean subject to a coverage
    floor: at least ``min_selected`` samples (an int count, or a float in (0, 1] read as a
    fraction of the subset, rounded up; at least 1). Ties in MAE go to the larger
    selection, then to the earlier grid cell (betas outer, thresholds inner, as given).

    ``true_scores`` are on the scale of ``levels`` (default 1..C). Returns ``beta``, ``t``,
    ``mae``, ``n_selected``, ``coverage``, ``min_selected`` (resolved count), ``n`` and
    ``grid``: one dict per cell (beta, t, mae or None when nothing is selected, n_selected,
    feasible). Raises ``ValueError`` if no cell reaches the floor.
    """
    z = _logits(logits)
    y = np.asarray(true_scores, dtype=np.float64)
    if y.shape != (z.shape[0],) or not np.all(np.isfinite(y)):
        raise ValueError(f"true_scores must be {z.shape[0]} finite values, got shape {y.shape}")
    lv = _levels(z.shape[1], levels)
    n = z.shape[0]
    if isinstance(min_selected, float):
        if not 0 < min_selected <= 1:
            raise ValueError(f"a fractional min_selected must be in (0, 1], got {min_selected}")
        floor_n = max(1, math.ceil(min_selected * n))
    else:
        floor_n = max(1, int(min_selected))
    ts = np.asarray(thresholds, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0 or len(betas) == 0:
        raise ValueError("betas and thresholds must be non-empty 1-D sequences")

    rows: list[dict] = []
    for beta in betas:
        probs = apds_sharpen(z, mean_score, float(beta), lv)
        err = np.abs(probs @ lv - y)
        sel = probs.max(axis=1)[None, :] >= ts[:, None]  # (T, N)
        n_sel = sel.sum(axis=1)
        sum_err = sel.astype(np.float64) @ err
        for t, k, se in zip(ts, n_sel, sum_err):
            rows.append(
                {
                    "beta": float(beta),
                    "t": float(t),
                    "mae": float(se / k) if k > 0 else None,
                    "n_selected": int(k),
                    "feasible": bool(k >= floor_n),
                }
            )
    feasible = [(r["mae"], -r["n_selected"], pos) for pos, r in enumerate(rows) if r["feasible"]]
    if not feasible:
        best_n = max(r["n_selected"] for r in rows)
        raise ValueError(
            f"no (beta, t) selects >= {floor_n} of {n} samples (best: {best_n}); lower the thresholds or min_selected"
        )
    best = rows[min(feasible)[2]]
    return {
        "beta": best["beta"],
        "t": best["t"],
        "mae": best["mae"],
        "n_selected": best["n_selected"],
        "coverage": best["n_selected"] / n,
        "min_selected": floor_n,
        "n": n,
        "grid": rows,
    }
