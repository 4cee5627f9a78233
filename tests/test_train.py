"""Ray Train loops on synthetic features: they learn and checkpoint (a killed stage's resume is
tested on the whole DAG in test_fault_tolerance)."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.config import TrainParams
from pipelines.embed.cache import read_image_embeddings
from pipelines.io import DataError, write_parquet
from pipelines.metrics import dist_to_score, srcc
from pipelines.ranking.index import build_index
from pipelines.train.data import embedding_files, load_features
from pipelines.semantics import load_matcher
from pipelines.heads.build import head_from_arch, predict_logits
from pipelines.heads.train import supervised_loop
from pipelines.ranking.pretrain import pretrain_loop
from pipelines.train.runner import fingerprint, run_training
from tests.synthetic import make_features, write_embedding_cache

LOCAL = TrainParams(num_workers=0)
HEAD = {
    "protocol": "linear_probe", "lr_decay": 0.95, "weight_decay": 1e-4, "batch_size": 32, "tm_dim": 16,
    "cr_dim": 16, "hidden": 32, "dropout": 0.0, "emd_r": 2, "use_tm": True, "use_cr": True, "tfa": True,
    "tfa_tau1": 0.5, "tfa_tau2": 2.0, "tfa_n_mix": 1, "flsa": True, "flsa_weight": 0.1, "keep_best": True, "loss": "emd", "cr_features": "output",
}


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    make_features(tmp_path / "features.parquet")
    train = load_features(tmp_path / "features.parquet", tmp_path / "embeddings").split_of("train")
    index, _ = build_index(train.cluster, train.score, low=2, high=9, n_per_bin="auto")
    write_parquet(tmp_path / "index.parquet", index)
    return tmp_path


def pretrain_config(tmp: Path, epochs: int = 4, batches: int = 5) -> dict:
    return {
        "features_path": str(tmp / "features.parquet"), "embeddings_path": str(tmp / "embeddings"),
        "index_path": str(tmp / "index.parquet"), "epochs": epochs,
        "lr": 3e-3, "weight_decay": 0.05, "tau": 0.1, "hidden": 32, "dim": 16, "dropout": 0.0,
        "batches_per_cluster": batches, "low": 2, "high": 9, "seed": 0,
    }


def inputs(tmp: Path) -> list[str]:
    return [str(tmp / "features.parquet"), *map(str, embedding_files(tmp / "embeddings")), str(tmp / "index.parquet")]


def test_pretrain_then_head_learn(workdir):
    state = run_training(pretrain_loop, pretrain_config(workdir), LOCAL, stage="pretrain", inputs=inputs(workdir))
    assert state["epoch"] == 3 and state["started_at_epoch"] == 0
    torch.save(state, workdir / "cr.pt")
    config = {
        "features_path": str(workdir / "features.parquet"), "embeddings_path": str(workdir / "embeddings"),
        "cr_path": str(workdir / "cr.pt"), "head": HEAD,
        "epochs": 25, "lr": 3e-3, "seed": 0,
    }
    head = run_training(supervised_loop, config, LOCAL, stage="head", inputs=inputs(workdir))
    model = head_from_arch(head["arch"])
    model.load_state_dict(head["model"])
    test = load_features(workdir / "features.parquet", workdir / "embeddings").split_of("test")
    pred = dist_to_score(torch.softmax(torch.from_numpy(predict_logits(model, load_matcher(workdir / "features.parquet", workdir / "tags.parquet"), test.clip, test.emb)), 1).numpy())
    assert srcc(pred, test.score) > 0.6  # the score is a linear function of the embedding
    # linear probe: the CR encoder weights are the pretrained ones, untouched
    for k, v in state["model"].items():
        assert torch.equal(head["model"][f"cr.{k}"], v)
    # no resume file is left behind after a successful fit
    assert not list((workdir / "runs").glob("*/checkpoint/state.pt"))


def test_fingerprint_changes_with_config_and_inputs(workdir):
    a = fingerprint(pretrain_config(workdir), inputs(workdir))
    assert a == fingerprint(pretrain_config(workdir), inputs(workdir))
    assert a != fingerprint(pretrain_config(workdir, epochs=5), inputs(workdir))
    make_features(workdir / "features.parquet", seed=1)
    b = fingerprint(pretrain_config(workdir), inputs(workdir))
    assert a != b
    # the embeddings live in their own cache (not in the features table): changing only them changes it too
    ids, emb = read_image_embeddings(workdir / "embeddings")
    write_embedding_cache(workdir / "embeddings", ids, emb[::-1], chunk_rows=100)
    assert b != fingerprint(pretrain_config(workdir), inputs(workdir))


def test_load_features_joins_the_embedding_cache_by_image_id(tmp_path):
    cache = make_features(tmp_path / "features.parquet", n=50)
    ids, emb = read_image_embeddings(cache)
    feats = load_features(tmp_path / "features.parquet", cache)
    assert feats.image_id.tolist() == ids and np.array_equal(feats.emb, emb)
    assert pq.read_schema(tmp_path / "features.parquet").names == ["image_id", "split", "score", "cluster", "dist"]  # no TM column
    # another order, and extra images the table does not list: still joined by id, in the table's order
    order = np.random.default_rng(0).permutation(len(ids))
    extra = np.ones((3, emb.shape[1]), np.float32)
    write_embedding_cache(tmp_path / "shuffled", [ids[i] for i in order] + ["x1", "x2", "x3"],
                          np.concatenate([emb[order], extra]), chunk_rows=16)
    again = load_features(tmp_path / "features.parquet", tmp_path / "shuffled")
    assert again.image_id.tolist() == ids and np.array_equal(again.emb, emb)
    assert np.array_equal(again.take(np.arange(5, 9)).emb, emb[5:9])
    # no embeddings wanted (the index stage): N x 0
    assert load_features(tmp_path / "features.parquet", None).emb.shape == (50, 0)


def test_load_features_errors_name_both_files(tmp_path):
    cache = make_features(tmp_path / "features.parquet", n=20)
    ids, emb = read_image_embeddings(cache)
    write_embedding_cache(tmp_path / "partial", ids[:-2], emb[:-2])
    with pytest.raises(DataError, match=r"features\.parquet: 2 image id\(s\) have no embedding in .*partial \(e\.g\. img0018\)"):
        load_features(tmp_path / "features.parquet", tmp_path / "partial")
    write_embedding_cache(tmp_path / "wide", ids, np.zeros((len(ids), 32), np.float32))
    with pytest.raises(DataError, match=r"features\.parquet: built from 16-d embeddings, but .*wide holds 32-d ones"):
        load_features(tmp_path / "features.parquet", tmp_path / "wide")
    with pytest.raises(DataError, match=r"missing: embedding cache not found"):
        load_features(tmp_path / "features.parquet", tmp_path / "missing")
    with pytest.raises(DataError, match=r"missing: embedding cache not found"):
        embedding_files(tmp_path / "missing")


def _val_srcc(state: dict, features: Path) -> float:
    model = head_from_arch(state["arch"])
    model.load_state_dict(state["model"])
    val = load_features(features, features.parent / "embeddings").split_of("val")
    return srcc(dist_to_score(torch.softmax(torch.from_numpy(predict_logits(model, load_matcher(features, features.parent / "tags.parquet"), val.clip, val.emb)), 1).numpy()), val.score)


def test_head_keeps_its_best_validation_epoch(workdir):
    """Same seed, same trajectory: keep_best returns the best-val epoch's weights, not the last."""
    base = {"features_path": str(workdir / "features.parquet"), "embeddings_path": str(workdir / "embeddings"), "cr_path": None, "epochs": 12, "lr": 3e-2, "seed": 0}
    head = {**HEAD, "use_cr": False, "dropout": 0.0}
    last = run_training(supervised_loop, {**base, "head": {**head, "keep_best": False}}, LOCAL, stage="head", inputs=inputs(workdir))
    best = run_training(supervised_loop, {**base, "head": head}, LOCAL, stage="head", inputs=inputs(workdir))
    assert last["selected_epoch"] == 11 and "selected_val_srcc" not in last
    assert 0 <= best["selected_epoch"] <= 11
    got = _val_srcc(best, workdir / "features.parquet")
    assert abs(got - best["selected_val_srcc"]) < 1e-6  # the saved weights are the selected epoch's
    assert got >= _val_srcc(last, workdir / "features.parquet") - 1e-9


def test_head_on_hidden_cr_features_with_re_emd(workdir):
    state = run_training(pretrain_loop, pretrain_config(workdir), LOCAL, stage="pretrain", inputs=inputs(workdir))
    torch.save(state, workdir / "cr.pt")
    config = {
        "features_path": str(workdir / "features.parquet"), "embeddings_path": str(workdir / "embeddings"),
        "cr_path": str(workdir / "cr.pt"), "head": {**HEAD, "cr_features": "hidden", "loss": "re_emd"}, "epochs": 15, "lr": 3e-3, "seed": 0,
    }
    head = run_training(supervised_loop, config, LOCAL, stage="head", inputs=inputs(workdir))
    assert head["model"]["cr_proj.weight"].shape[1] == 32  # the CR encoder's hidden width, not its 16-d output
    model = head_from_arch(head["arch"])
    model.load_state_dict(head["model"])
    test = load_features(workdir / "features.parquet", workdir / "embeddings").split_of("test")
    pred = dist_to_score(torch.softmax(torch.from_numpy(predict_logits(model, load_matcher(workdir / "features.parquet", workdir / "tags.parquet"), test.clip, test.emb)), 1).numpy())
    assert srcc(pred, test.score) > 0.6


def test_head_reads_the_embedding_and_whitens_tm_through_params(workdir):
    """head.cr_features: input and head.tm_whiten reach the model from the head's params, and a
    saved head rebuilds (``head_from_arch``) to the same predictions: what the stage and scoring do."""
    state = run_training(pretrain_loop, pretrain_config(workdir), LOCAL, stage="pretrain", inputs=inputs(workdir))
    torch.save(state, workdir / "cr.pt")
    config = {
        "features_path": str(workdir / "features.parquet"), "embeddings_path": str(workdir / "embeddings"), "cr_path": str(workdir / "cr.pt"),
        "head": {**HEAD, "cr_features": "input", "tm_whiten": True}, "epochs": 3, "lr": 3e-3, "seed": 0,
    }
    head = run_training(supervised_loop, config, LOCAL, stage="head", inputs=inputs(workdir))
    emb_dim = load_features(workdir / "features.parquet", workdir / "embeddings").emb.shape[1]
    assert head["model"]["cr_proj.weight"].shape[1] == emb_dim  # the embedding itself, not an E_CR layer
    white = head["model"]["tm_white"]
    assert not torch.allclose(white, torch.eye(len(white)))  # fitted on the training rows
    model = head_from_arch(head["arch"])
    model.load_state_dict(head["model"])  # strict: the rebuilt head has the whitening buffer too
    val = load_features(workdir / "features.parquet", workdir / "embeddings").split_of("val")
    matcher = load_matcher(workdir / "features.parquet", workdir / "tags.parquet")
    a = predict_logits(model, matcher, val.clip, val.emb)
    model.tm_white.copy_(torch.eye(len(white)))
    assert not np.allclose(a, predict_logits(model, matcher, val.clip, val.emb))  # the whitening is applied


def test_head_loss_choice():
    from pipelines.heads.losses import emd_loss
    from pipelines.models.losses import re_emd_loss
    from pipelines.heads.build import head_loss

    g = torch.Generator().manual_seed(0)
    p, t = torch.rand(4, 10, generator=g).softmax(1), torch.rand(4, 10, generator=g).softmax(1)
    assert torch.allclose(head_loss({"loss": "emd", "emd_r": 2})(p, t), emd_loss(p, t, r=2))
    assert torch.allclose(head_loss({"loss": "re_emd", "emd_r": 2})(p, t), re_emd_loss(p, t, alpha=10, beta=0.1, gamma=2))
    assert not torch.allclose(emd_loss(p, t), re_emd_loss(p, t))


def test_keep_best_selects_on_the_named_metric():
    """val_srcc: the highest wins; val_emd2: the lowest; the first of equal values stays; an epoch
    without the metric (too few validation rows) never wins; an unknown metric is refused."""
    from pipelines.train.core import FitOptions, improves

    best = {"selected_on": 0.5, "val_srcc": 0.5}
    assert improves({"val_srcc": 0.6}, best, "val_srcc") and not improves({"val_srcc": 0.5}, best, "val_srcc")
    assert improves({"val_emd2": 0.4}, {"selected_on": 0.5}, "val_emd2") and not improves({"val_emd2": 0.6}, {"selected_on": 0.5}, "val_emd2")
    assert improves({"val_emd2": 0.9}, None, "val_emd2") and not improves({}, None, "val_emd2")
    assert not improves({"val_srcc": float("nan")}, None, "val_srcc")
    assert improves({"val_srcc": 0.6}, {"val_srcc": 0.5}, "val_srcc")  # a layout-2 state (selected on val_srcc)
    with pytest.raises(ValueError, match="val_emd2"):
        FitOptions(epochs=1, desc="x", select_on="val_mse")
