"""APDS (ELTA eq. 7-9) and its grid search against loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.selftrain.apds import apds_sharpen, apds_temperatures, grid_search, select_pseudo_labels


# ----------------------------------------------------------------------------- references
def ref_sharpen(logits, mean, beta):
    out = []
    for z in logits:
        e = [math.exp(v) for v in z]
        p0 = [v / sum(e) for v in e]
        s_hat = sum((c + 1) * p for c, p in enumerate(p0))
        tau = math.exp(-beta * abs(s_hat - mean))  # eq. 8
        e2 = [math.exp(v / tau) for v in z]  # eq. 7-8, softmax over the levels of one sample
        out.append([v / sum(e2) for v in e2])
    return out


def ref_grid(logits, true, mean, betas, ts, floor_n):
    rows = []
    for beta in betas:
        probs = ref_sharpen(logits, mean, beta)
        for t in ts:
            errs = [
                abs(sum((c + 1) * p for c, p in enumerate(pr)) - y) for pr, y in zip(probs, true) if max(pr) >= t
            ]
            rows.append((beta, t, sum(errs) / len(errs) if errs else None, len(errs)))
    feasible = [r for r in rows if r[3] >= floor_n]
    best = min(feasible, key=lambda r: (r[2], -r[3], rows.index(r)))
    return rows, best


def entropy(p):
    p = np.asarray(p)
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=-1)


# ----------------------------------------------------------------------------- temperatures / sharpening
def test_temperatures_hand_computed():
    tau = apds_temperatures([5.0, 6.0, 3.0, 7.5], mean_score=5.0, beta=0.5)
    np.testing.assert_allclose(tau, [1.0, math.exp(-0.5), math.exp(-1.0), math.exp(-1.25)], rtol=1e-15)
    np.testing.assert_allclose(apds_temperatures([1.0, 9.0], 5.0, 0.0), [1.0, 1.0])
    with pytest.raises(ValueError, match="beta"):
        apds_temperatures([5.0], 5.0, -1.0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_sharpen_matches_reference(beta):
    z = np.random.default_rng(int(beta * 10)).normal(0, 2, size=(30, 10))
    got = apds_sharpen(z, mean_score=5.4, beta=beta)
    np.testing.assert_allclose(got, ref_sharpen(z.tolist(), 5.4, beta), rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(got.sum(1), 1.0)


def test_sharpen_beta_zero_is_plain_softmax_and_custom_levels():
    z = np.random.default_rng(0).normal(size=(5, 4))
    soft = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(apds_sharpen(z, 2.5, 0.0), soft)
    # levels shift the predicted score, hence the temperature: levels 0..3 with mean 1.5 == levels 1..4 with 2.5
    np.testing.assert_allclose(apds_sharpen(z, 1.5, 0.7, levels=[0, 1, 2, 3]), apds_sharpen(z, 2.5, 0.7))


def test_sharpening_is_stronger_far_from_the_mean():
    v = np.array([0.0, 0.5, 1.5, 2.0, 2.2, 2.0, 1.5, 0.5, 0.0, -0.5])
    near = v  # mass around level 5
    far = np.sort(v)[::-1]  # same logits, mass at the low levels: same entropy before sharpening
    mid = np.roll(near, -2)
    z = np.stack([near, mid, far])
    before = entropy(apds_sharpen(z, 5.0, 0.0))
    scores = (apds_sharpen(z, 5.0, 0.0) * np.arange(1, 11)).sum(1)
    assert abs(scores[0] - 5) < abs(scores[1] - 5) < abs(scores[2] - 5)
    after = entropy(apds_sharpen(z, 5.0, 0.8))
    drop = before - after
    assert before[0] == pytest.approx(before[2])
    assert 0 <= drop[0] < drop[1] < drop[2]


def test_sharpen_huge_beta_gives_one_hot_without_nan():
    z = np.array([[0.0, 1.0, 3.0, 3.0], [5.0, 0.0, 0.0, 0.0]])
    p = apds_sharpen(z, 1.0, 1e6)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[0], [0, 0, 0.5, 0.5])  # tied maxima share the mass
    with pytest.raises(ValueError, match="NaN"):
        apds_sharpen(np.array([[0.0, np.nan]]), 1.0, 1.0)


def test_select_pseudo_labels_threshold_inclusive():
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.79, 0.21]])
    assert select_pseudo_labels(p, 0.8).tolist() == [False, True, True, False]
    assert select_pseudo_labels(p, 0.5).all()


# ----------------------------------------------------------------------------- grid search
def test_grid_search_matches_reference():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1.5, size=(60, 10))
    true = rng.uniform(2, 9, 60)
    betas, ts = [0.0, 0.2, 0.5, 1.0], [0.2, 0.3, 0.5, 0.7]
    out = grid_search(z, true, 5.4, betas, ts, min_selected=5)
    rows, best = ref_grid(z.tolist(), true.tolist(), 5.4, betas, ts, 5)
    assert len(out["grid"]) == len(rows)
    for got, (b, t, m, n) in zip(out["grid"], rows):
        assert (got["beta"], got["t"], got["n_selected"]) == (b, t, n)
        assert (got["mae"] is None) == (m is None) and (m is None or got["mae"] == pytest.approx(m, rel=1e-10))
        assert got["feasible"] == (n >= 5)
    assert (out["beta"], out["t"], out["n_selected"]) == (best[0], best[1], best[3])
    assert out["mae"] == pytest.approx(best[2], rel=1e-10)


def _constructed():
    """10 confident, accurate predictions and 10 flat, wrong ones."""
    good = np.full((10, 10), 0.0)
    good[np.arange(10), np.arange(10) % 5 + 3] = 6.0  # peak at levels 4..8, max prob ~0.98
    good_true = (np.arange(10) % 5 + 4).astype(float)
    bad = np.random.default_rng(0).normal(0, 0.1, size=(10, 10))  # near uniform, max prob ~0.11
    bad_true = np.full(10, 9.5)
    return np.vstack([good, bad]), np.r_[good_true, bad_true]


def test_grid_search_finds_known_optimum():
    z, true = _constructed()
    out = grid_search(z, true, 5.5, betas=[0.0], thresholds=[0.05, 0.5, 0.99], min_selected=5)
    assert out["t"] == 0.5 and out["n_selected"] == 10  # keeps exactly the confident ones
    assert out["mae"] < 0.2
    assert out["coverage"] == 0.5 and out["min_selected"] == 5
    row99 = next(r for r in out["grid"] if r["t"] == 0.99)
    assert row99["n_selected"] == 0 and row99["mae"] is None and not row99["feasible"]


def test_grid_search_respects_min_selected():
    z, true = _constructed()
    out = grid_search(z, true, 5.5, betas=[0.0], thresholds=[0.05, 0.5], min_selected=15)
    assert out["t"] == 0.05 and out["n_selected"] >= 15  # the better t=0.5 selects only 10
    frac = grid_search(z, true, 5.5, betas=[0.0], thresholds=[0.05, 0.5], min_selected=0.6)
    assert frac["min_selected"] == 12 and frac["t"] == 0.05
    with pytest.raises(ValueError, match="no \\(beta, t\\)"):
        grid_search(z, true, 5.5, betas=[0.0], thresholds=[0.5, 0.99], min_selected=11)


def test_grid_search_sharpening_can_help():
    """A far-from-mean prediction that is right but not confident is admitted once beta > 0."""
    z = np.zeros((2, 10))
    z[0, 8] = 2.0  # far from the mean (level 9); max prob ~0.45 unsharpened
    z[1, 4] = 2.0  # near the mean (level 5)
    true = np.array([9.0, 7.5])  # the near one is wrong
    out = grid_search(z, true, 5.0, betas=[0.0, 1.0], thresholds=[0.8], min_selected=1)
    assert out["beta"] == 1.0 and out["n_selected"] == 1
    assert next(r for r in out["grid"] if r["beta"] == 0.0)["n_selected"] == 0


def test_grid_search_ties_prefer_larger_selection():
    z = np.zeros((6, 5))
    z[np.arange(6), [0, 1, 2, 3, 4, 2]] = [4.0, 4.0, 4.0, 1.0, 1.0, 1.0]  # 3 confident, 3 not
    true = apds_sharpen(z, 3.0, 0.0) @ np.arange(1, 6)  # every selection has MAE exactly 0
    out = grid_search(z, true, 3.0, betas=[0.0], thresholds=[0.9, 0.5, 0.3], min_selected=1)
    assert [r["mae"] for r in out["grid"]] == [0.0, 0.0, 0.0]
    assert out["t"] == 0.3 and out["n_selected"] == 6
