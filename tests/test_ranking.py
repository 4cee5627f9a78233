"""Traversal contrastive loss (TMCR eq. 9-10) and the balanced score-bin index / sampler."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.io import DataError
from pipelines.ranking.index import BalancedBatchSampler, build_index, score_bins
from pipelines.ranking.loss import traversal_contrastive_loss

AVA_VOTES = Path("/work/shared/data/labels/ava/AVA_votes.csv")


# ----------------------------------------------------------------------------- reference loss
def ref_traversal_loss(z: list[list[float]], bins: list[int], tau: float) -> float:
    """Explicit loops over anchor / round / positive / negative, straight from the definition."""
    n = len(z)
    norm = [math.sqrt(sum(x * x for x in v)) for v in z]

    def sim(a, b):
        return sum(x * y for x, y in zip(z[a], z[b])) / (norm[a] * norm[b]) / tau

    terms = []

    def add_terms(a, positives, negatives):
        if not negatives:
            return
        for p in positives:
            num = math.exp(sim(a, p))
            den = num + sum(math.exp(sim(a, m)) for m in negatives)
            terms.append(-math.log(num / den))

    span = max(bins) - min(bins)
    for a in range(n):
        ba = bins[a]
        # round 0: same bin positive, all other bins negative
        add_terms(a, [x for x in range(n) if x != a and bins[x] == ba], [m for m in range(n) if bins[m] != ba])
        # rounds k >= 1, both directions: positive bin ba + d k, negatives strictly beyond it
        for d in (1, -1):
            for k in range(1, span + 1):
                pos = [x for x in range(n) if bins[x] == ba + d * k]
                neg = [m for m in range(n) if d * (bins[m] - ba) > k]
                add_terms(a, pos, neg)
    return sum(terms) / len(terms) if terms else 0.0


def _loss(z, b, tau=0.07):
    return traversal_contrastive_loss(torch.tensor(z, dtype=torch.float64), torch.tensor(b), tau).item()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_traversal_loss_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 25))
    bins = rng.choice([0, 1, 2, 4, 5, 6], size=n).tolist()  # gaps, uneven and singleton bins
    z = rng.normal(size=(n, 5)) * rng.uniform(0.5, 3, size=(n, 1))  # unnormalised on purpose
    tau = [0.07, 0.5, 1.0, 0.2][seed]
    assert _loss(z, bins, tau) == pytest.approx(ref_traversal_loss(z.tolist(), bins, tau), rel=1e-9)


def test_traversal_loss_small_cases_match_reference():
    rng = np.random.default_rng(9)
    for bins in ([0, 1, 2], [3, 3, 1], [0, 0, 5, 5, 5], [2, 1, 0, 1, 2, 3, 3]):
        z = rng.normal(size=(len(bins), 3))
        assert _loss(z, bins, 0.3) == pytest.approx(ref_traversal_loss(z.tolist(), bins, 0.3), rel=1e-9)


def test_traversal_loss_no_terms_is_zero_with_gradient():
    for bins in ([4, 4, 4], [0, 1]):  # one bin: no negatives; two singletons: nothing beyond
        z = torch.randn(len(bins), 8, requires_grad=True)
        loss = traversal_contrastive_loss(z, torch.tensor(bins))
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert z.grad is not None and torch.all(z.grad == 0)


def test_traversal_loss_gradient_flows_and_is_finite():
    z = torch.randn(63, 32, requires_grad=True)
    bins = torch.arange(7).repeat_interleave(9)
    loss = traversal_contrastive_loss(z, bins)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_traversal_loss_invariances():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 6, generator=g, dtype=torch.float64)
    bins = torch.randint(0, 5, (20,), generator=g)
    base = traversal_contrastive_loss(z, bins).item()
    scale = torch.rand(20, 1, generator=g, dtype=torch.float64) + 0.1
    assert traversal_contrastive_loss(z * scale, bins).item() == pytest.approx(base, rel=1e-10)
    perm = torch.randperm(20, generator=g)
    assert traversal_contrastive_loss(z[perm], bins[perm]).item() == pytest.approx(base, rel=1e-10)
    assert traversal_contrastive_loss(z, bins + 10).item() == pytest.approx(base, rel=1e-10)


def test_ordered_embeddings_beat_shuffled():
    g = torch.Generator().manual_seed(1)
    bins = torch.arange(7).repeat_interleave(6)
    angle = bins.double() * (math.pi / 12) + 0.02 * torch.randn(42, generator=g, dtype=torch.float64)
    z = torch.stack([torch.cos(angle), torch.sin(angle)], 1)  # on an arc, in bin order
    ordered = traversal_contrastive_loss(z, bins).item()
    shuffled = [traversal_contrastive_loss(z, bins[torch.randperm(42, generator=g)]).item() for _ in range(5)]
    assert ordered < min(shuffled)


def test_traversal_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="integer"):
        traversal_contrastive_loss(torch.randn(3, 2), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError):
        traversal_contrastive_loss(torch.randn(3, 2), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- index
def test_score_bins_hand_values():
    s = [0.5, 1.99, 2.0, 2.99, 3.0, 5.5, 7.99, 8.0, 8.99, 9.0, 10.0]
    assert score_bins(s).tolist() == [0, 0, 0, 0, 1, 3, 5, 6, 6, 6, 6]
    assert score_bins([1.2, 3.7, 5.0], low=1, high=6).tolist() == [0, 2, 4]
    with pytest.raises(DataError, match="NaN"):
        score_bins([5.0, float("nan")])


def _toy(seed=0):
    rng = np.random.default_rng(seed)
    clusters = np.r_[rng.integers(0, 3, 300), [7, 7, 7]]  # cluster 7: one bin only
    scores = np.r_[np.clip(rng.normal(5.3, 1.2, 300), 1, 10), [5.1, 5.5, 5.9]]
    return clusters, scores


def test_build_index_matches_reference_grouping():
    clusters, scores = _toy()
    index, report = build_index(clusters, scores, low=2, high=9)
    ref = defaultdict(list)
    for pos, (c, s) in enumerate(zip(clusters, scores)):
        ref[(int(c), min(max(int(math.floor(s)), 2), 8) - 2)].append(pos)
    assert sorted(ref) == list(zip(index["cluster"], index["bin"]))
    for row in index.itertuples():
        assert row.members.tolist() == ref[(row.cluster, row.bin)]
        assert row.count == len(ref[(row.cluster, row.bin)])
    for c, rows in index.groupby("cluster"):
        median = int(np.median([len(ref[(c, b)]) for b in rows["bin"]]))
        assert (rows["n_s"] == min(max(median, 2), 9)).all()
    assert report["inactive_clusters"] == [7]
    assert not index.loc[index["cluster"] == 7, "active"].any()
    assert report["n_active_clusters"] == 3 and report["n_images"] == 303
    assert report["clamped_below"] == int((scores < 2).sum()) and report["clamped_above"] == int((scores >= 9).sum())
    fixed, rep = build_index(clusters, scores, n_per_bin=4)
    assert (fixed["n_s"] == 4).all() and rep["n_per_bin_rule"] == "fixed: 4"


def test_build_index_validation():
    with pytest.raises(DataError, match="integer"):
        build_index(np.array([0.5, 1.0]), [5.0, 6.0])
    with pytest.raises(ValueError, match="length"):
        build_index(np.array([0, 1]), [5.0])
    with pytest.raises(ValueError, match="n_per_bin"):
        build_index(np.array([0, 1]), [5.0, 6.0], n_per_bin=0)


def _check_epoch(index, sampler, batches):
    where = {}  # row position -> (cluster, bin)
    for row in index.itertuples():
        for m in row.members:
            where[int(m)] = (row.cluster, row.bin)
    n_s = dict(zip(index["cluster"], index["n_s"]))
    count = dict(zip(zip(index["cluster"], index["bin"]), index["count"]))
    populated = index[index["active"]].groupby("cluster")["bin"].apply(set).to_dict()
    seen_clusters = []
    for batch in batches:
        cells = [where[int(p)] for p in batch]
        cl = {c for c, _ in cells}
        assert len(cl) == 1  # one cluster per batch
        c = cl.pop()
        seen_clusters.append(c)
        per_bin = defaultdict(list)
        for (_, b), p in zip(cells, batch):
            per_bin[b].append(int(p))
        assert set(per_bin) == populated[c]  # every populated bin, nothing else
        for b, ps in per_bin.items():
            assert len(ps) == n_s[c]  # N_s from each bin
            if count[(c, b)] >= n_s[c]:
                assert len(set(ps)) == len(ps)  # without replacement when the bin is big enough
    return seen_clusters


def test_sampler_balance_determinism_and_shuffle():
    clusters, scores = _toy()
    index, _ = build_index(clusters, scores)
    sampler = BalancedBatchSampler(index, batches_per_cluster=5, seed=3)
    assert len(sampler) == 15
    e0 = sampler.epoch(0)
    assert len(e0) == 15
    seen = _check_epoch(index, sampler, e0)
    assert sorted(seen) == sorted([0, 1, 2] * 5) and 7 not in seen  # inactive cluster never sampled
    assert seen != sorted(seen)  # clusters interleaved
    again = BalancedBatchSampler(index, batches_per_cluster=5, seed=3).epoch(0)
    assert all(np.array_equal(a, b) for a, b in zip(e0, again))
    e1 = sampler.epoch(1)
    assert not all(np.array_equal(a, b) for a, b in zip(e0, e1))
    other_seed = BalancedBatchSampler(index, batches_per_cluster=5, seed=4).epoch(0)
    assert not all(np.array_equal(a, b) for a, b in zip(e0, other_seed))


def test_sampler_short_bins_use_replacement_and_override():
    clusters = np.zeros(12, dtype=np.int64)
    scores = np.array([2.5] * 10 + [8.5] * 2)  # bin 0: 10 images, bin 6: 2 images
    index, report = build_index(clusters, scores, n_per_bin=5)
    assert report["short_bins"] == 1
    batch = BalancedBatchSampler(index, batches_per_cluster=1, seed=0).epoch(0)[0]
    low, high = batch[scores[batch] < 5], batch[scores[batch] > 5]
    assert len(low) == len(high) == 5
    assert len(set(low.tolist())) == 5 and set(high.tolist()) <= {10, 11}
    assert len(BalancedBatchSampler(index, n_per_bin=3).epoch(0)[0]) == 6
    auto = BalancedBatchSampler(index, n_per_bin="auto").epoch(0)[0]  # median(10, 2) = 6
    assert len(auto) == 12
    only_inactive, _ = build_index(np.zeros(3, dtype=np.int64), [5.0, 5.2, 5.4])
    with pytest.raises(DataError, match="contrast"):
        BalancedBatchSampler(only_inactive)


@pytest.mark.skipif(not AVA_VOTES.exists(), reason=f"{AVA_VOTES} not present (shared AVA labels)")
def test_ava_scale_index_and_epoch_under_two_seconds():
    scores = pd.read_csv(AVA_VOTES, usecols=["score"])["score"].to_numpy()
    assert scores.size > 250_000
    clusters = np.random.default_rng(0).integers(0, 15, scores.size)
    t0 = time.perf_counter()
    index, report = build_index(clusters, scores, low=2, high=9)
    sampler = BalancedBatchSampler(index, batches_per_cluster=30, seed=0)
    batches = sampler.epoch(0)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"index + one epoch took {elapsed:.2f} s"
    assert len(batches) == len(sampler) == 15 * 30
    assert int(index["count"].sum()) == scores.size
    bins = score_bins(scores)
    populated = index.groupby("cluster")["bin"].apply(set).to_dict()
    for batch in batches[:60]:
        cl = np.unique(clusters[batch])
        assert len(cl) == 1
        per_bin = np.bincount(bins[batch], minlength=7)
        # N_s = 9 (the auto rule reaches the authors' value) from every populated bin, 0 elsewhere
        assert {b for b in range(7) if per_bin[b]} == populated[int(cl[0])]
        assert set(per_bin[per_bin > 0].tolist()) == {9}
        assert len(populated[int(cl[0])]) >= 6  # AVA: bin (8, 9) is rare, the rest always present
    assert set(report["n_per_bin"].values()) == {9}
