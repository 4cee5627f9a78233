"""pipelines.metrics against slow loop references written from the papers' definitions."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from pipelines import metrics as M


# ----------------------------------------------------------------------------- references
def ref_score(p: list[list[float]]) -> list[float]:
    out = []
    for row in p:
        tot = sum(row)
        out.append(sum((j + 1) * v / tot for j, v in enumerate(row)))
    return out


def ref_pearson(x, y) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((x[i] - mx) * (y[i] - my) for i in range(n))
    vx = sum((x[i] - mx) ** 2 for i in range(n))
    vy = sum((y[i] - my) ** 2 for i in range(n))
    return cov / math.sqrt(vx * vy)


def ref_ranks(x) -> list[float]:
    # average rank: 1 + (#strictly smaller) + (#equal - 1) / 2
    return [1 + sum(v < xi for v in x) + (sum(v == xi for v in x) - 1) / 2 for xi in x]


def ref_emd(p, q, r) -> float:
    tot = 0.0
    for a, b in zip(p, q):
        sa, sb = sum(a), sum(b)
        ca = cb = 0.0
        acc = 0.0
        for d in range(len(a)):
            ca += a[d] / sa
            cb += b[d] / sb
            acc += abs(ca - cb) ** r
        tot += (acc / len(a)) ** (1 / r)
    return tot / len(p)


def ref_lmh(pred, true) -> dict[str, float]:
    n = len(true)
    order = sorted(range(n), key=lambda i: (true[i], i))
    k = int(0.2 * n)
    groups = {"L": order[:k], "M": order[k : n - k], "H": order[n - k :]}
    return {g: sum(abs(pred[i] - true[i]) for i in idx) / len(idx) for g, idx in groups.items()}


def ref_regions(train, n_bins, shares):
    lo, hi = min(train), max(train)
    w = (hi - lo) / n_bins
    counts = [0] * n_bins
    for s in train:
        counts[min(int((s - lo) / w), n_bins - 1)] += 1
    ranked = sorted(range(n_bins), key=lambda b: (-counts[b], b))
    labels = [None] * n_bins
    seen = 0
    for b in ranked:
        share = seen / len(train)
        labels[b] = "Many" if share < shares[0] else ("Med" if share < shares[0] + shares[1] else "Few")
        seen += counts[b]
    return counts, labels


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------- basic metrics
def test_dist_to_score_matches_reference_and_accepts_counts(rng):
    counts = rng.integers(0, 50, size=(40, 10)).astype(float)
    counts[:, 3] += 1  # no all-zero row
    np.testing.assert_allclose(M.dist_to_score(counts), ref_score(counts.tolist()), rtol=1e-12)
    np.testing.assert_allclose(M.dist_to_score(counts), M.dist_to_score(counts * 7.0), rtol=1e-12)
    np.testing.assert_allclose(M.dist_to_score(np.eye(5)), [1, 2, 3, 4, 5])


def test_dist_rejects_bad_rows():
    with pytest.raises(ValueError, match="sum to 0"):
        M.dist_to_score(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="non-negative"):
        M.dist_to_score(np.array([[0.5, -0.1, 0.6]]))


def test_correlations_match_reference(rng):
    x = rng.normal(size=200)
    y = 0.6 * x + rng.normal(size=200)
    y_tied = np.round(y, 0)  # plenty of ties
    assert M.plcc(x, y) == pytest.approx(ref_pearson(x.tolist(), y.tolist()), abs=1e-12)
    assert M.srcc(x, y) == pytest.approx(ref_pearson(ref_ranks(x.tolist()), ref_ranks(y.tolist())), abs=1e-12)
    assert M.srcc(x, y_tied) == pytest.approx(
        ref_pearson(ref_ranks(x.tolist()), ref_ranks(y_tied.tolist())), abs=1e-12
    )


def test_correlation_known_values():
    x = np.arange(10.0)
    assert M.plcc(x, 3 * x + 1) == pytest.approx(1.0)
    assert M.plcc(x, -x) == pytest.approx(-1.0)
    assert M.srcc(x, np.exp(x)) == pytest.approx(1.0)  # monotone, not linear
    assert M.plcc(x, np.exp(x)) < 0.9


def test_constant_predictions_give_zero_correlation_not_nan():
    true = np.array([1.0, 2.0, 3.0, 5.0])
    assert M.plcc(np.full(4, 5.0), true) == 0.0
    assert M.srcc(np.full(4, 5.0), true) == 0.0
    assert M.plcc(true, np.full(4, 2.0)) == 0.0


def test_input_validation():
    with pytest.raises(ValueError, match="length"):
        M.mse([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        M.plcc([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        M.plcc([1.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        M.mae([], [])


def test_mse_mae_acc_match_reference(rng):
    p, t = rng.uniform(1, 10, 300), rng.uniform(1, 10, 300)
    p[:5] = 5.0  # exactly on the threshold: not > 5
    t[3:8] = 5.0
    assert M.mse(p, t) == pytest.approx(sum((a - b) ** 2 for a, b in zip(p, t)) / 300)
    assert M.mae(p, t) == pytest.approx(sum(abs(a - b) for a, b in zip(p, t)) / 300)
    ref_acc = sum((a > 5.0) == (b > 5.0) for a, b in zip(p, t)) / 300
    assert M.binary_accuracy(p, t) == pytest.approx(ref_acc)
    ref_acc3 = sum((a > 3.0) == (b > 3.0) for a, b in zip(p, t)) / 300
    assert M.binary_accuracy(p, t, threshold=3.0) == pytest.approx(ref_acc3)
    assert M.binary_accuracy([5.0, 5.1], [5.1, 5.0]) == 0.0  # the cut is strict on both sides


@pytest.mark.parametrize("r", [1, 2, 3])
def test_emd_matches_reference(rng, r):
    p, q = rng.dirichlet(np.ones(10), 50), rng.dirichlet(np.ones(10) * 2, 50) * 13  # q as counts
    assert M.emd(p, q, r) == pytest.approx(ref_emd(p.tolist(), q.tolist(), r), rel=1e-12)


def test_emd_known_values():
    L = 10
    p, q = np.eye(L)[[0]], np.eye(L)[[L - 1]]
    assert M.emd(p, q, 1) == pytest.approx((L - 1) / L)
    assert M.emd(p, q, 2) == pytest.approx(math.sqrt((L - 1) / L))
    assert M.emd(p, p, 2) == 0.0
    with pytest.raises(ValueError, match="shape"):
        M.emd(np.ones((2, 5)), np.ones((2, 6)))


# ----------------------------------------------------------------------------- ELTA regions
def test_lmh_mae_matches_reference_with_ties(rng):
    true = np.round(rng.uniform(1, 10, 103), 0)  # many ties at the 20% boundaries
    pred = true + rng.normal(size=103)
    assert M.lmh_mae(pred, true) == pytest.approx(ref_lmh(pred.tolist(), true.tolist()))


def test_lmh_mae_regions_by_construction():
    true = np.arange(10.0)
    pred = true.copy()
    pred[[0, 1]] += 1.0  # bottom 20%
    pred[[8, 9]] -= 3.0  # top 20%
    assert M.lmh_mae(pred, true) == {"L": 1.0, "M": 0.0, "H": 3.0}
    with pytest.raises(ValueError, match="at least 5"):
        M.lmh_mae([1.0, 2.0], [1.0, 2.0])


# ----------------------------------------------------------------------------- TMCR long tail
def test_longtail_regions_match_reference(rng):
    train = np.clip(rng.normal(5.4, 0.8, 5000), 1, 10)
    reg = M.longtail_regions(train, 20, shares=(0.6, 0.3))
    counts, labels = ref_regions(train.tolist(), 20, (0.6, 0.3))
    assert reg["bin_count"] == counts
    assert reg["bin_region"] == labels
    assert len(reg["edges"]) == 21
    # unimodal data: the densest bin is Many, both extreme bins are Few
    assert reg["bin_region"][int(np.argmax(counts))] == "Many"
    assert reg["bin_region"][0] == reg["bin_region"][-1] == "Few"
    share = {r: sum(c for c, l in zip(counts, labels) if l == r) / 5000 for r in M.REGIONS}
    assert share["Many"] >= 0.6 and share["Many"] + share["Med"] >= 0.9 and share["Few"] > 0


def test_longtail_regions_exact_share_boundaries():
    # bins of width 1 over [1, 4]: counts 3, 6, 1 -> densest bin Many; the next starts at
    # exactly 60% so it is Med (strict <); the last starts at 90%: Few.
    train = np.array([1.0, 1.5, 1.5] + [2.5] * 6 + [4.0])
    reg = M.longtail_regions(train, 3, shares=(0.6, 0.3))
    assert reg["bin_count"] == [3, 6, 1]
    assert reg["bin_region"] == ["Med", "Many", "Few"]
    assert M.score_regions([0.0, 2.0, 2.99, 3.0, 9.0], reg).tolist() == ["Med", "Many", "Many", "Few", "Few"]


def test_longtail_regions_constant_scores_raise():
    with pytest.raises(ValueError, match="constant"):
        M.longtail_regions(np.full(10, 5.0))


def test_balanced_test_indices(rng):
    train = np.clip(rng.normal(5.4, 0.8, 5000), 1, 10)
    test = np.clip(rng.normal(5.4, 0.8, 2000), 1, 10)
    reg = M.longtail_regions(train)
    idx = M.balanced_test_indices(test, reg, seed=7)
    lab = M.score_regions(test, reg)
    m = min(int((lab == r).sum()) for r in M.REGIONS)
    assert set(idx) == set(M.REGIONS)
    for r in M.REGIONS:
        assert len(idx[r]) == m and len(set(idx[r].tolist())) == m
        assert all(lab[i] == r for i in idx[r])
    again = M.balanced_test_indices(test, reg, seed=7)
    assert all(np.array_equal(idx[r], again[r]) for r in M.REGIONS)
    other = M.balanced_test_indices(test, reg, seed=8)
    assert not all(np.array_equal(idx[r], other[r]) for r in M.REGIONS)
    with pytest.raises(ValueError, match="impossible"):
        M.balanced_test_indices(np.full(10, 5.4), reg, seed=0)


def test_longtail_mse_matches_reference(rng):
    train = np.clip(rng.normal(5.4, 0.8, 5000), 1, 10)
    true = np.clip(rng.normal(5.4, 0.8, 1000), 1, 10)
    pred = true + rng.normal(0, 0.5, 1000)
    reg = M.longtail_regions(train)
    idx = M.balanced_test_indices(true, reg, seed=0)
    out = M.longtail_mse(pred, true, reg, idx)
    for r in M.REGIONS:
        assert out[r] == pytest.approx(sum((pred[i] - true[i]) ** 2 for i in idx[r]) / len(idx[r]))
    allidx = [i for r in M.REGIONS for i in idx[r]]
    assert out["ALL"] == pytest.approx(sum((pred[i] - true[i]) ** 2 for i in allidx) / len(allidx))
    bad = dict(idx, Few=idx["Many"])
    with pytest.raises(ValueError, match="outside region"):
        M.longtail_mse(pred, true, reg, bad)


# ----------------------------------------------------------------------------- evaluate
EVAL_KEYS = {
    "acc", "plcc", "srcc", "mse", "emd1", "emd2", "mae_L", "mae_M", "mae_H",
    "lt_mse_all", "lt_mse_many", "lt_mse_med", "lt_mse_few", "n",
}  # fmt: skip


def _votes(rng, n, L=10):
    centre = rng.normal(5.4, 1.0, n)
    lv = np.arange(1, L + 1)
    return np.exp(-0.5 * ((lv[None, :] - centre[:, None]) / 1.3) ** 2)


def test_evaluate_consistent_with_parts(rng):
    true = _votes(rng, 600)
    pred = _votes(rng, 600)
    train = M.dist_to_score(_votes(rng, 4000))
    out = M.evaluate(pred, true, train, threshold=5.0, seed=3)
    assert set(out) == EVAL_KEYS
    ps, ts = M.dist_to_score(pred), M.dist_to_score(true)
    assert out["plcc"] == pytest.approx(M.plcc(ps, ts))
    assert out["srcc"] == pytest.approx(M.srcc(ps, ts))
    assert out["emd2"] == pytest.approx(ref_emd(pred.tolist(), true.tolist(), 2))
    assert out["mae_H"] == pytest.approx(ref_lmh(ps.tolist(), ts.tolist())["H"])
    assert out["n"] == 600
    assert all(np.isfinite(v) for v in out.values())


def test_evaluate_perfect_and_constant_predictions(rng):
    true = _votes(rng, 300)
    train = M.dist_to_score(_votes(rng, 3000))
    perfect = M.evaluate(true, true, train, threshold=5.0)
    assert perfect["plcc"] == pytest.approx(1.0) and perfect["srcc"] == pytest.approx(1.0)
    assert perfect["acc"] == 1.0
    assert perfect["mse"] == perfect["emd1"] == perfect["lt_mse_all"] == perfect["mae_M"] == 0.0
    const = M.evaluate(np.tile(true[:1], (300, 1)), true, train, threshold=5.0)
    assert const["plcc"] == 0.0 and const["srcc"] == 0.0
    assert all(np.isfinite(v) for v in const.values())


def test_evaluate_small_test_set_without_a_region_leaves_longtail_empty(rng):
    train = M.dist_to_score(_votes(rng, 3000))
    regions = M.longtail_regions(train)
    true = _votes(rng, 400)
    ts = M.dist_to_score(true)
    # keep only test images of the densest ('Many') region: no balanced set exists
    keep = np.flatnonzero(M.score_regions(ts, regions) == "Many")[:20]
    assert keep.size >= 5
    out = M.evaluate(true[keep], true[keep], train, threshold=5.0)
    assert out["lt_mse_all"] is None and out["lt_mse_few"] is None
    assert out["mse"] == 0.0 and out["n"] == keep.size


# ----------------------------------------------------------------------------- authors' long-tail regions
SHARED = Path(os.environ.get("IAA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
AVA_MERGED = SHARED / "labels" / "ava" / "ava_merged_labels.csv"
AUTHORS_CUTS = (3.85, 4.87, 5.88, 6.90)  # TMCR authors' AVA_test_balanced.csv, by the vote mean


def _cuts_of(regions, train):
    """The region boundaries of a bin rule: Many's bin span, and the Med span around it."""
    edges, lab = np.asarray(regions["edges"]), np.asarray(regions["bin_region"])
    many, med = np.flatnonzero(lab == "Many"), np.flatnonzero(lab != "Few")
    assert np.all(np.diff(many) == 1) and np.all(np.diff(med) == 1), "regions must be contiguous here"
    return edges[med[0]], edges[many[0]], edges[many[-1] + 1], edges[med[-1] + 1]


def test_default_rule_reproduces_the_authors_ava_regions():
    """On AVA's training scores (TANet split) the default rule gives the TMCR authors' released
    regions: Many [4.87, 5.88], Med [3.85, 4.87) and (5.88, 6.90], each edge within 0.05."""
    if not AVA_MERGED.exists():
        pytest.skip(f"real data not available: {AVA_MERGED} (set IAA_SHARED_DATA to the shared data folder)")
    import pandas as pd

    d = pd.read_csv(AVA_MERGED, usecols=["mean", "split_tanet"])
    train = d.loc[d["split_tanet"] == "train_inferred", "mean"].to_numpy()
    assert len(train) > 200_000
    got = _cuts_of(M.longtail_regions(train), train)
    assert np.max(np.abs(np.array(got) - AUTHORS_CUTS)) < 0.05, got
    # the former 60/30 rule was off by 0.34 (Many up to 6.22)
    old = _cuts_of(M.longtail_regions(train, shares=(0.6, 0.3)), train)
    assert np.max(np.abs(np.array(old) - AUTHORS_CUTS)) > 0.3


def test_region_edges_explicit_cuts_and_closed_sides():
    reg = M.region_edges(AUTHORS_CUTS)
    scores = [3.0, 3.85, 4.86, 4.87, 5.88, 5.89, 6.90, 6.91]
    assert M.score_regions(scores, reg).tolist() == ["Few", "Med", "Med", "Many", "Many", "Med", "Med", "Few"]
    with pytest.raises(ValueError, match="4 increasing"):
        M.region_edges([5.0, 4.0, 6.0, 7.0])
    with pytest.raises(ValueError, match="4 increasing"):
        M.region_edges([1.0, 2.0, 3.0])


def test_evaluate_with_explicit_edges_and_a_balanced_file(rng, tmp_path):
    true = _votes(rng, 500)
    pred = _votes(rng, 500)
    train = M.dist_to_score(_votes(rng, 3000))
    ts, ps = M.dist_to_score(true), M.dist_to_score(pred)
    out = M.evaluate(pred, true, train, threshold=5.0, seed=0, lt_edges=AUTHORS_CUTS)
    reg = M.region_edges(AUTHORS_CUTS)
    ref = M.longtail_mse(ps, ts, reg, M.balanced_test_indices(ts, reg, 0))
    assert out["lt_mse_few"] == pytest.approx(ref["Few"]) and out["lt_mse_all"] == pytest.approx(ref["ALL"])
    # a balanced set in the authors' CSV layout: the file's regions, only the images in the test split
    bal = M.read_balanced_set(Path(__file__).parent / "assets" / "lt_balanced_sample.csv")
    assert bal == {"t0": "Few", "t1": "Many", "t2": "Many", "t3": "Med", "t4": "Few", "t5": "Med", "x9": "Med"}
    ids = [f"t{i}" for i in range(500)]
    idx, missing = M.balanced_set_indices(ids, bal)
    assert missing == 1 and {r: v.tolist() for r, v in idx.items()} == {"Many": [1, 2], "Med": [3, 5], "Few": [0, 4]}
    out = M.evaluate(pred, true, train, threshold=5.0, lt_indices=idx)
    assert out["lt_mse_many"] == pytest.approx(((ps[[1, 2]] - ts[[1, 2]]) ** 2).mean())
    assert out["lt_mse_all"] == pytest.approx(((ps[:6] - ts[:6]) ** 2).mean())
    with pytest.raises(ValueError, match="none of the 7"):
        M.balanced_set_indices(["zz"], bal)
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,Aesthetic,Shot\n1,5.0,Many\n2,3.0,Tail\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: Shot 'Tail'"):
        M.read_balanced_set(bad)
    bad.write_text("image_id,Aesthetic\n1,5.0\n")
    with pytest.raises(ValueError, match="missing column"):
        M.read_balanced_set(bad)


def test_evaluate_stage_long_tail_options():
    from pipelines.config import EvaluateParams
    from pipelines.io import DataError
    from stages.evaluate import longtail_options

    assert longtail_options(EvaluateParams(), ["a"]) == {}
    assert longtail_options(EvaluateParams(lt_edges=list(AUTHORS_CUTS)), ["a"]) == {"lt_edges": list(AUTHORS_CUTS)}
    with pytest.raises(DataError, match="evaluate.lt_edges"):
        longtail_options(EvaluateParams(lt_edges=[1.0, 2.0]), ["a"])
    sample = str(Path(__file__).parent / "assets" / "lt_balanced_sample.csv")
    got = longtail_options(EvaluateParams(lt_balanced_set=sample), ["t3", "t0", "zz"])
    assert {r: v.tolist() for r, v in got["lt_indices"].items()} == {"Many": [], "Med": [0], "Few": [1]}
    with pytest.raises(DataError, match="evaluate.lt_balanced_set"):
        longtail_options(EvaluateParams(lt_balanced_set=sample), ["zz"])
    with pytest.raises(DataError, match="evaluate.lt_balanced_set"):
        longtail_options(EvaluateParams(lt_balanced_set="no/such.csv"), ["zz"])
