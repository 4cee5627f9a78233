"""TM features computed where they are used: one TagMatcher for training, evaluation and serving,
no TM column in the features table, a streamed normaliser, and Ray workers that read their shard."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipelines.config import TrainParams
from pipelines.data.manifest import manifest_table, write_manifest
from pipelines.embed.cache import write_text_embeddings
from pipelines.heads.model import TMCRHead
from pipelines.io import DataError, write_parquet
from pipelines.ranking.index import build_index
from pipelines.semantics import TagMatcher
from pipelines.train.data import load_features, read_embedding_rows, shard_rows
from pipelines.semantics import load_matcher
from tests.synthetic import make_features, write_embedding_cache

KINDS = ["attribute", "semantic", "semantic", "attribute", "semantic", "attribute", "semantic", "attribute", "semantic"]


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def old_tm_features(image_emb, tag_emb, kinds, scale=1.0, chunk_rows=16_384):
    """The TM table the features stage used to store (its code as it was): ``[sim_sem | sim_attr]``,
    float32 numpy blocks, then the logit scale."""
    k = np.asarray(kinds)
    sem, attr = np.flatnonzero(k == "semantic"), np.flatnonzero(k == "attribute")
    w = np.ascontiguousarray(np.asarray(tag_emb[np.concatenate([sem, attr])], dtype=np.float32).T)
    out = np.empty((len(image_emb), w.shape[1]), dtype=np.float32)
    for start in range(0, len(image_emb), chunk_rows):
        block = np.asarray(image_emb[start : start + chunk_rows], dtype=np.float32)
        np.matmul(block, w, out=out[start : start + len(block)])
    if scale != 1.0:
        out *= np.float32(scale)
    return out, int(sem.size)


def test_tag_matcher_equals_the_old_tm_table_in_any_batch_cut():
    rng = np.random.default_rng(0)
    emb, tags = unit(rng, 50, 16), unit(rng, 9, 16)
    old, n_sem = old_tm_features(emb, tags, KINDS, scale=100.0)
    m = TagMatcher(tags, KINDS, scale=100.0)
    assert (m.n_sem, m.dim, m.emb_dim) == (n_sem, 9, 16) == (5, 9, 16)
    np.testing.assert_allclose(m.numpy(emb, chunk_rows=7), old, rtol=1e-5, atol=1e-4)  # blocks that do not divide N
    batches = torch.cat([m(torch.from_numpy(emb[s : s + 8])) for s in range(0, 50, 8)])  # per training batch
    assert batches.dtype == torch.float32
    np.testing.assert_allclose(batches.numpy(), old, rtol=1e-5, atol=1e-4)
    # a float64 reference from the definition (eq. 5-7): scaled cosines, semantic tags first
    sem = [i for i, k in enumerate(KINDS) if k == "semantic"]
    attr = [i for i, k in enumerate(KINDS) if k == "attribute"]
    ref = 100.0 * np.concatenate([emb @ tags[sem].T.astype(np.float64), emb @ tags[attr].T.astype(np.float64)], 1)
    s, a = m.split(m.numpy(emb))
    np.testing.assert_allclose(np.concatenate([s, a], 1), ref, rtol=1e-5, atol=1e-4)
    assert s.shape == (50, 5) and a.shape == (50, 4)
    with pytest.raises(DataError, match="no semantic or no attribute"):
        TagMatcher(tags[:2], ["semantic", "semantic"])


def test_streamed_normaliser_equals_the_materialised_statistics():
    rng = np.random.default_rng(1)
    tm = torch.from_numpy((30 + 4 * rng.standard_normal((1000, 7))).astype(np.float32))  # logit-scaled magnitudes
    head = TMCRHead(7, 10, None, use_cr=False)
    head.fit_normaliser(lambda: iter(tm.split(97)))
    torch.testing.assert_close(head.tm_mean, tm.mean(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(head.tm_std, tm.std(0), rtol=1e-5, atol=1e-6)
    # worker 0 streams its shard; the all-reduce adds what worker 1 contributes from the other shard
    mine, other = tm[:400].double(), tm[400:].double()
    seen = []

    def all_reduce(t: torch.Tensor) -> None:
        if not seen:  # 1st pass: the sums and the row count
            t += torch.cat([other.sum(0), torch.tensor([float(len(other))], dtype=torch.float64)])
            seen.append(t[:-1] / t[-1])
        else:  # 2nd pass: squared deviations from the global mean
            t += ((other - seen[0]) ** 2).sum(0)

    two = TMCRHead(7, 10, None, use_cr=False)
    two.fit_normaliser(lambda: iter(mine.float().split(64)), all_reduce)
    torch.testing.assert_close(two.tm_mean, head.tm_mean)
    torch.testing.assert_close(two.tm_std, head.tm_std)


def test_features_stage_writes_no_tm_column_and_readers_compute_it(tmp_path, monkeypatch):
    """The features stage on a small data layout: the table is ids, split, labels and cluster; the
    TM a reader computes equals the table the stage used to store; the cluster summary's tags are
    the ones the stored table gave."""
    from stages import features

    rng = np.random.default_rng(2)
    n, d, kinds = 120, 16, ["semantic"] * 12 + ["attribute"] * 5
    ids = [f"im{i:03d}" for i in range(n)]
    split = np.array(["train", "val", "test", "unlabeled"])[rng.choice(4, n, p=[0.6, 0.15, 0.15, 0.1])].tolist()
    votes = rng.integers(0, 20, (n, 10))
    unl = [s == "unlabeled" for s in split]
    score = [None if u else float((v * np.arange(1, 11)).sum() / max(v.sum(), 1)) for u, v in zip(unl, votes)]
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    write_manifest(data / "manifest.parquet", manifest_table(ids, [f"{i}.jpg" for i in ids], split,
                                                             [None if u else v.tolist() for u, v in zip(unl, votes)], score, 10))
    emb, tags = unit(rng, n, d), unit(rng, len(kinds), d)
    write_embedding_cache(data / "embeddings" / "images", ids, emb, chunk_rows=50)
    write_text_embeddings(data / "embeddings" / "tags.parquet", [f"tag{i}" for i in range(len(kinds))], kinds, tags)
    (data / "embeddings" / "card.json").write_text(json.dumps({"model": "m", "weights": "w", "random_weights": False,
                                                               "logit_scale": 100.0}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "features": {"n_clusters": 3, "logit_scale": True}}))
    features.main()

    path = data / "features" / "features.parquet"
    schema = pq.read_schema(path)
    assert schema.names == ["image_id", "split", "score", "cluster", "dist"]  # no TM column
    assert {k: schema.metadata[k] for k in (b"tm_scale", b"n_semantic", b"n_attribute")} == {
        b"tm_scale": b"100.0", b"n_semantic": b"12", b"n_attribute": b"5"}
    feats = load_features(path, data / "embeddings" / "images")
    assert feats.clip is feats.emb  # E_CR reads CLIP here: one array
    matcher = load_matcher(path, data / "embeddings" / "tags.parquet")
    old, n_sem = old_tm_features(emb, tags, kinds, scale=100.0)
    np.testing.assert_allclose(matcher.numpy(feats.clip), old, rtol=1e-5, atol=1e-3)
    summary = json.loads((data / "features" / "clusters.json").read_text())
    assert summary["tm_dim"] == 17
    for c, info in summary["clusters"].items():
        rows = feats.cluster == int(c)
        if rows.any():
            top = np.argsort(-old[rows, :n_sem].mean(0))[:5]
            assert info["top_semantic_tags"] == [f"tag{i}" for i in top] and info["size"] == int(rows.sum())
    # a tag table that no longer fits the features table: a clear error naming the fix
    write_text_embeddings(data / "embeddings" / "tags.parquet", ["a", "b", "c"], ["semantic", "semantic", "attribute"], tags[:3])
    with pytest.raises(DataError, match=r"features\.parquet: built for 12 semantic \+ 5 attribute tags.*rerun `dvc repro features`"):
        load_matcher(path, data / "embeddings" / "tags.parquet")


def test_subset_reads_hold_only_the_rows_asked_for(tmp_path):
    cache = make_features(tmp_path / "features.parquet", n=90)
    full = load_features(tmp_path / "features.parquet", cache)
    train = load_features(tmp_path / "features.parquet", cache, splits=("train",))
    assert np.array_equal(train.emb, full.split_of("train").emb) and set(train.split) == {"train"}
    shard = shard_rows(len(train), 1, 2, seed=0)
    part = load_features(tmp_path / "features.parquet", cache, splits=("train",), rows=shard)
    assert len(part) == len(shard) < len(train) and np.array_equal(part.emb, train.emb[shard])
    assert np.array_equal(np.sort(np.concatenate([shard_rows(len(train), r, 2, 0) for r in (0, 1)])), np.arange(len(train)))
    assert np.array_equal(shard_rows(len(train), 0, 1, 0), np.arange(len(train)))  # one worker: every row, in order
    ids = full.image_id[[70, 3, 41]]
    assert np.array_equal(read_embedding_rows(cache, ids), full.emb[[70, 3, 41]])  # across parts, in the asked order
    with pytest.raises(DataError, match=r"1 image id\(s\) have no embedding in .*embeddings \(e\.g\. nope\)"):
        read_embedding_rows(cache, np.array(["img0001", "nope"], dtype=object))


# --- two Ray workers: each reads its shard -------------------------------------------------

HEAD = {
    "protocol": "linear_probe", "lr_decay": 0.95, "weight_decay": 1e-4, "batch_size": 16, "tm_dim": 8, "cr_dim": 8, "hidden": 16,
    "dropout": 0.0, "emd_r": 2, "use_tm": True, "use_cr": False, "tfa": True, "tfa_tau1": 0.5, "tfa_tau2": 2.0, "tfa_n_mix": 1,
    "flsa": True, "flsa_weight": 0.1, "keep_best": False, "loss": "emd", "cr_features": "output",
}


def _recording(loop_name: str):
    """A training loop that records, per worker, the image ids it read from the embedding caches."""

    def loop(config: dict) -> None:
        import ray.train

        import pipelines.heads.train as head_train
        import pipelines.ranking.pretrain as pretrain
        import pipelines.train.data as data

        rank, real = ray.train.get_context().get_world_rank(), data.read_embedding_rows
        log = Path(config["read_log"]) / f"{loop_name}-rank{rank}.jsonl"

        def recorded(cache, image_id, *a, **k):
            with open(log, "a") as fh:
                fh.write(json.dumps([str(cache), [str(i) for i in image_id]]) + "\n")
            return real(cache, image_id, *a, **k)

        modules = (data, head_train, pretrain)
        for m in modules:
            m.read_embedding_rows = recorded
        try:
            method = {k: v for k, v in config.items() if k != "read_log"}
            {"pretrain_loop": pretrain.pretrain_loop, "supervised_loop": head_train.supervised_loop}[loop_name](method)
        finally:
            for m in modules:
                m.read_embedding_rows = real

    return loop


def _reads(log: Path, name: str, rank: int) -> list[list[str]]:
    return [json.loads(line)[1] for line in (log / f"{name}-rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_workers_each_read_only_their_shard(tmp_path, monkeypatch):
    import ray

    from pipelines.train.runner import run_training

    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    cache = make_features(tmp_path / "features.parquet", n=240)
    feats = load_features(tmp_path / "features.parquet", cache)
    train, val = feats.split_of("train"), feats.split_of("val")
    index, _ = build_index(train.cluster, train.score, low=2, high=9, n_per_bin="auto")
    write_parquet(tmp_path / "index.parquet", index)
    log = tmp_path / "reads"
    log.mkdir()
    base = {"features_path": str(tmp_path / "features.parquet"), "embeddings_path": str(cache), "seed": 0, "read_log": str(log)}
    head = {**base, "cr_path": None, "head": HEAD, "epochs": 2, "lr": 3e-3}
    pre = {**base, "index_path": str(tmp_path / "index.parquet"), "epochs": 2, "lr": 3e-3, "weight_decay": 0.05, "tau": 0.1,
           "hidden": 16, "dim": 8, "dropout": 0.0, "batches_per_cluster": 2, "low": 2, "high": 9}
    files = [str(tmp_path / "features.parquet"), str(tmp_path / "index.parquet")]
    one = run_training(_recording("supervised_loop"), {**head, "read_log": str(tmp_path)}, TrainParams(num_workers=0),
                       stage="head-1", inputs=files)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        two = run_training(_recording("supervised_loop"), head, TrainParams(num_workers=2), stage="head-2", inputs=files)
        run_training(_recording("pretrain_loop"), pre, TrainParams(num_workers=2), stage="pretrain-2", inputs=files)
    finally:
        ray.shutdown()

    train_ids, val_ids = set(train.image_id), set(val.image_id)
    shards = []
    for rank in (0, 1):
        reads = _reads(log, "supervised_loop", rank)
        mine = {i for ids in reads for i in ids if i in train_ids}
        assert 0 < len(mine) < len(train_ids)  # this worker's shard only
        assert {i for ids in reads for i in ids} - train_ids == (val_ids if rank == 0 else set())  # validation: rank 0
        shards.append(mine)
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == train_ids
    # the TM normaliser still covers every training row (the shards' sums are all-reduced)
    torch.testing.assert_close(two["model"]["tm_mean"], one["model"]["tm_mean"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two["model"]["tm_std"], one["model"]["tm_std"], rtol=1e-5, atol=1e-5)
    # pretraining: each epoch, a worker reads the rows of its own balanced batches, and nothing else
    for rank in (0, 1):
        reads = _reads(log, "pretrain_loop", rank)
        assert len(reads) == 2 and all(0 < len(ids) < len(train_ids) and set(ids) <= train_ids for ids in reads)
