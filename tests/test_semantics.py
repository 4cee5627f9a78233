"""K-means in bounded memory, checked against direct numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from pipelines.io import DataError
from pipelines.semantics import (
    assign_clusters,
    cluster_means,
    fit_kmeans,
    inertia,
    kmeans_space,
    semantic_clusters,
)
from pipelines.semantics.match import resolve_n_init


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def blobs(rng, n_per, centres, spread=0.05):
    x = np.concatenate([c + spread * rng.standard_normal((n_per, len(c))) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(len(centres)), n_per)


def test_assign_inertia_and_means_match_brute_force():
    rng = np.random.default_rng(1)
    x, centres = rng.standard_normal((101, 6)).astype(np.float32), rng.standard_normal((4, 6)).astype(np.float32)
    d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    labels = assign_clusters(x, centres, chunk_rows=10)
    np.testing.assert_array_equal(labels, d2.argmin(1))
    assert inertia(x, labels, centres, chunk_rows=13) == pytest.approx(float(d2.min(1).sum()), rel=1e-5)
    labels[labels == 3] = 0  # cluster 3 empty
    means = cluster_means(x, labels, 4, chunk_rows=9)
    for c in range(3):
        np.testing.assert_allclose(means[c], x[labels == c].mean(0), rtol=1e-5, atol=1e-6)
    assert np.isnan(means[3]).all()


def test_n_init_auto_follows_the_fitted_size():
    assert resolve_n_init("auto", 10_000) == 10
    assert resolve_n_init("auto", 10_001) == 3
    assert resolve_n_init(5, 10**6) == 5
    with pytest.raises(DataError, match="kmeans_n_init"):
        resolve_n_init(0, 10)


@pytest.mark.parametrize("method", ["sample", "minibatch", "full"])
def test_every_method_recovers_separated_clusters(method):
    rng = np.random.default_rng(2)
    x, truth = blobs(rng, 300, 3 * np.eye(5, 8))
    km = fit_kmeans(x, 5, 0, method=method, fit_rows=200)
    if method == "sample":
        assert km.labels_.shape == (200,)  # fitted on the sample only
    assert adjusted_rand_score(truth, assign_clusters(x, km.cluster_centers_)) == 1.0


def test_fit_kmeans_is_deterministic_and_rejects_unknown_method():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 4)).astype(np.float32)
    a = fit_kmeans(x, 3, 7, fit_rows=100).cluster_centers_
    np.testing.assert_array_equal(a, fit_kmeans(x, 3, 7, fit_rows=100).cluster_centers_)
    with pytest.raises(DataError, match="features.kmeans"):
        fit_kmeans(x, 3, 0, method="spectral")


def test_semantic_clusters_fit_on_train_rows_only():
    rng = np.random.default_rng(4)
    train, _ = blobs(rng, 100, 3 * np.eye(2, 4))
    test = (np.array([0, 0, 30, 0]) + 0.05 * rng.standard_normal((50, 4))).astype(np.float32)  # a far-off third group
    x = np.concatenate([train, test])
    mask = np.r_[np.ones(len(train), bool), np.zeros(len(test), bool)]
    labels = semantic_clusters(x, 2, 0, fit_mask=mask, fit_rows=150)
    # with the test rows in the fit, one centre would move to them; fitted on train, the two train groups stay apart
    assert len(set(labels[:100])) == 1 and len(set(labels[100:200])) == 1 and labels[0] != labels[100]
    with pytest.raises(DataError, match="n_clusters = 5 but only 3 training"):
        semantic_clusters(x, 5, 0, fit_mask=np.r_[np.ones(3, bool), np.zeros(len(x) - 3, bool)])


@pytest.mark.parametrize("n_tags", [40, 5])  # wider than the embedding (SVD basis) and narrower (the sims)
def test_kmeans_space_keeps_the_semantic_geometry(n_tags):
    rng = np.random.default_rng(5)
    emb, tags = unit(rng, 200, 12), unit(rng, n_tags, 12)
    sims = 100.0 * emb @ tags.T
    y = kmeans_space(emb, tags, scale=100.0, chunk_rows=64)
    assert y.shape == (200, min(12, n_tags))
    d_sim = ((sims[:, None] - sims[None]) ** 2).sum(-1)
    d_y = ((y[:, None].astype(np.float64) - y[None]) ** 2).sum(-1)
    np.testing.assert_allclose(d_y, d_sim, rtol=1e-4, atol=1e-2)
    centres = sims[:3]  # the same centres in both spaces (the map is linear)
    np.testing.assert_array_equal(assign_clusters(y, y[:3]), assign_clusters(sims, centres))
