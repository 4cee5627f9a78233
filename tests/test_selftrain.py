"""APDS pseudo labels (pipelines/selftrain/pseudo.py), shared by the pseudo_search stage and Tune trials.

The features here carry their own logits (``emb`` is read as the head's output), so the chosen
(beta, t) and the selection are known in advance:

- 'far' rows peak at level 9, far from the train mean 5.0: max prob ~0.45 unsharpened (below
  both thresholds), ~1.0 with beta = 1; their true score is 9, so they are right;
- 'near' rows peak at level 5, near the mean: ~0.45 unsharpened, ~0.62 with beta = 1 (only
  t = 0.5 keeps them); their true score is 7.5, so they are wrong.

With betas [0, 1] and thresholds [0.5, 0.8], beta = 0 selects nothing; (1, 0.8) keeps only the
4 far validation rows (MAE ~0) and wins when 4 rows suffice; (1, 0.5) keeps all 8 (MAE ~1.2)
and is the only pair left when 6 are required.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.io import DataError
from pipelines.selftrain import pseudo
from pipelines.selftrain.pseudo import label_pool, pseudo_labels
from pipelines.train.data import FeatureSet, load_features, write_features_table
from pipelines.embed.cache import write_text_embeddings
from tests.synthetic import write_embedding_cache

LEVELS = 10
SEARCH = {"seed": 0, "val_fraction": 1.0, "betas": [0.0, 1.0], "thresholds": [0.5, 0.8]}
COLUMNS = ["image_id", "pseudo_dist", "pred_score", "max_prob", "selected"]
METRIC_KEYS = {"beta", "t", "val_mae", "val_n", "val_n_selected", "unlabeled_n", "unlabeled_selected", "mean_score"}


def _peak(level: int) -> np.ndarray:
    z = np.zeros(LEVELS, np.float32)
    z[level - 1] = 2.0
    return z


FLAT = np.zeros(LEVELS, np.float32)  # uniform: never selected
UNLABELED = [_peak(9), _peak(5)] * 3 + [_peak(5), FLAT] * 2
FAR = np.array([z[8] > 0 for z in UNLABELED])  # the unlabeled rows (1, 0.8) keeps
PEAKED = np.array([z.max() > 0 for z in UNLABELED])  # the unlabeled rows (1, 0.5) keeps
# (split, logits, score)
ROWS = (
    [("train", _peak(5), 4.0), ("train", _peak(5), 6.0)]
    + [("val", _peak(9), 9.0), ("val", _peak(5), 7.5)] * 4
    # test rows are never read: as validation they would make every selection infeasible at t = 0.8
    + [("test", _peak(9), 1.0)] * 6
    + [("unlabeled", z, np.nan) for z in UNLABELED]
)


def columns() -> dict:
    n = len(ROWS)
    score = np.array([r[2] for r in ROWS], np.float32)
    dist = np.full((n, LEVELS), 0.1, np.float32)
    dist[np.isnan(score)] = np.nan
    return {
        "image_id": np.array([f"img{i:02d}" for i in range(n)], object), "split": np.array([r[0] for r in ROWS], object), "score": score,
        "dist": dist, "cluster": np.zeros(n, np.int64),
        "emb": np.stack([r[1] for r in ROWS]), "clip": np.zeros((n, 3), np.float32),
    }


def logits_of(fs: FeatureSet) -> np.ndarray:
    return fs.emb.astype(np.float64)


@pytest.mark.parametrize(
    ("min_selected", "t", "val_selected", "unl_selected"),
    [(0.5, 0.8, 4, FAR), (0.75, 0.5, 8, PEAKED)],
)
def test_label_pool_known_answer(min_selected, t, val_selected, unl_selected):
    labels = label_pool(FeatureSet(**columns()), logits_of, min_selected=min_selected, **SEARCH)
    m = labels.metrics()
    assert set(m) == METRIC_KEYS
    assert (m["beta"], m["t"], m["val_n"], m["val_n_selected"]) == (1.0, t, 8, val_selected)
    assert m["mean_score"] == 5.0 and m["unlabeled_n"] == 10
    assert labels.selected.tolist() == unl_selected.tolist()
    assert m["unlabeled_selected"] == int(unl_selected.sum())
    assert m["val_mae"] < 0.01 if t == 0.8 else 1.0 < m["val_mae"] < 1.5
    assert [(r["beta"], r["t"], r["n_selected"]) for r in labels.search["grid"]] == [(0, 0.5, 0), (0, 0.8, 0), (1, 0.5, 8), (1, 0.8, 4)]

    table = labels.table().to_pandas()
    assert list(table.columns) == COLUMNS
    unl_ids = [f"img{i:02d}" for i, r in enumerate(ROWS) if r[0] == "unlabeled"]
    assert table["image_id"].tolist() == unl_ids
    dist = np.stack(table["pseudo_dist"].to_numpy())
    np.testing.assert_allclose(dist.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(table["max_prob"], dist.max(1), rtol=1e-6)
    np.testing.assert_allclose(table["pred_score"], dist @ np.arange(1, LEVELS + 1), rtol=1e-5)
    assert (table["pred_score"][FAR] > 8.9).all()  # the far rows are sharpened to level 9


def test_label_pool_val_fraction_is_seeded():
    feats = FeatureSet(**columns())
    a = label_pool(feats, logits_of, min_selected=0.25, **{**SEARCH, "val_fraction": 0.5})
    b = label_pool(feats, logits_of, min_selected=0.25, **{**SEARCH, "val_fraction": 0.5})
    assert a.val_n == 4 and a.metrics() == b.metrics()


def test_label_pool_errors_name_the_file_and_the_fix():
    c = columns()
    c["split"] = np.where(c["split"] == "val", "test", c["split"])
    with pytest.raises(DataError, match=r"^f\.parquet: no 'val' rows"):
        label_pool(FeatureSet(**c), logits_of, min_selected=0.5, features_name="f.parquet", **SEARCH)
    with pytest.raises(DataError, match=r"^params\.yaml pseudo_search: no \(beta, t\) selects >= 1 of 8.*pseudo_search\.thresholds"):
        label_pool(FeatureSet(**columns()), logits_of, min_selected=0.1, **{**SEARCH, "thresholds": [0.999999]})


def _features_file(tmp_path):
    """The features table and its embedding cache, where the stages read them (data/...)."""
    path = tmp_path / "data" / "features" / "features.parquet"
    c = columns()
    emb = c.pop("emb")
    c.pop("clip")
    write_embedding_cache(tmp_path / "data" / "embeddings" / "images", c["image_id"], emb)
    tags = np.eye(emb.shape[1], dtype=np.float32)[:4]  # the tag table TM reads (the stub head ignores TM)
    write_text_embeddings(tmp_path / "data" / "embeddings" / "tags.parquet", list("abcd"), ["semantic"] * 2 + ["attribute"] * 2, tags)
    write_features_table(path, **c, emb_dim=emb.shape[1], n_semantic=2, n_attribute=2)
    return path, tmp_path / "data" / "embeddings" / "images"


def test_pseudo_labels_reads_the_files(tmp_path, monkeypatch):
    path, emb_dir = _features_file(tmp_path)
    with pytest.raises(DataError, match=r"head\.pt: trained head not found; run `dvc repro head`"):
        pseudo_labels(path, emb_dir, tmp_path / "head.pt", min_selected=0.5, **SEARCH)
    (tmp_path / "head.pt").write_bytes(b"")
    monkeypatch.setattr(pseudo, "load_head", lambda p: None)
    monkeypatch.setattr(pseudo, "predict_logits", lambda model, matcher, clip, emb: emb.astype(np.float64))
    got = pseudo_labels(path, emb_dir, tmp_path / "head.pt", min_selected=0.5, **SEARCH)
    want = label_pool(load_features(path, emb_dir), logits_of, min_selected=0.5, **SEARCH)
    assert got.metrics() == want.metrics() and got.selected.tolist() == FAR.tolist()


def test_stage_and_tune_step_write_the_same_labels(tmp_path, monkeypatch):
    """Both callers of the shared function: the DVC stage (files + metrics) and the Tune trial step."""
    import torch

    from stages import pseudo_search
    from stages.tune import pseudo_label_step

    monkeypatch.chdir(tmp_path)
    _features_file(tmp_path)
    (tmp_path / "models").mkdir()
    torch.save({"arch": {"cr_input": None}}, tmp_path / "models" / "head.pt")  # a head on the CLIP cache
    (tmp_path / "data" / "embeddings" / "card.json").write_text(json.dumps({"model": "m", "weights": "w", "random_weights": False}))
    ps = {k: v for k, v in SEARCH.items() if k != "seed"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "seed": 0, "pseudo_search": {**ps, "min_selected": 0.5},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_root": str(tmp_path / "art"), "experiment": "t"},
    }))
    monkeypatch.setattr(pseudo, "load_head", lambda p: None)
    monkeypatch.setattr(pseudo, "predict_logits", lambda model, matcher, clip, emb: emb.astype(np.float64))

    pseudo_search.main()
    metrics = json.loads((tmp_path / "metrics" / "pseudo_search.json").read_text())
    # numbers, and the one E_CR random-weights boolean; the CLIP stamp is in eval.json and MLflow
    assert set(metrics) == METRIC_KEYS | {"cr_random_weights"} and metrics["cr_random_weights"] is False
    assert (metrics["beta"], metrics["t"], metrics["val_n_selected"], metrics["unlabeled_selected"]) == (1.0, 0.8, 4, 3)
    assert len(json.loads((tmp_path / "data" / "pseudo" / "grid.json").read_text())) == 4
    stage = pd.read_parquet(tmp_path / "data" / "pseudo" / "pseudo_labels.parquet")
    assert list(stage.columns) == COLUMNS and stage["selected"].tolist() == FAR.tolist()

    pseudo_label_step({
        "features_path": "data/features/features.parquet", "embeddings_path": "data/embeddings/images",
        "head_path": "models/head.pt", "out_path": "trial.parquet",
        **SEARCH, "min_selected": 0.5,
    })
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "trial.parquet"), stage)


# ----------------------------------------------------------------------------- ELTA eq. 10
def _pool(n=40, levels=LEVELS, selected_every=5, seed=0):
    import torch

    g = np.random.default_rng(seed)
    x = torch.from_numpy(g.normal(size=(n, 6)).astype(np.float32))
    dist = torch.softmax(torch.from_numpy(g.normal(size=(n, levels)).astype(np.float32)), 1)
    selected = torch.zeros(n, dtype=torch.bool)
    selected[::selected_every] = True
    return {"inputs": (x,), "dist": dist, "selected": selected}


def test_unlabeled_loss_is_eq10_mean_over_the_whole_batch():
    """L_u = (1/B_u) sum_i 1[selected_i] H(y^_i, f(x_i)) over a batch drawn from the WHOLE pool:
    unselected rows count as zeros, so L_u is coverage x the selected rows' mean, not that mean."""
    import torch

    from pipelines.heads.losses import emd_loss
    from pipelines.heads.unlabeled import unlabeled_loss

    torch.manual_seed(0)
    pool = _pool()
    model = torch.nn.Linear(6, LEVELS)
    loss = lambda p, q: emd_loss(p, q, r=2)  # noqa: E731
    got = unlabeled_loss(pool, model, loss, 16, torch.Generator().manual_seed(3))
    rows = torch.randint(40, (16,), generator=torch.Generator().manual_seed(3))  # the same draw
    with torch.no_grad():
        pred = torch.softmax(model(pool["inputs"][0][rows]), 1)
    per = [emd_loss(pred[k : k + 1], pool["dist"][rows][k : k + 1]).item() for k in range(16)]
    sel = pool["selected"][rows].numpy()
    assert 0 < sel.sum() < 16
    ref = sum(v for v, s in zip(per, sel) if s) / 16
    assert got.item() == pytest.approx(ref, rel=1e-5)
    mean_selected = sum(v for v, s in zip(per, sel) if s) / sel.sum()
    assert got.item() == pytest.approx(mean_selected * sel.sum() / 16, rel=1e-5)
    assert got.item() < 0.5 * mean_selected  # the old rule (selected rows only) was 1/coverage larger
    got.backward()
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


def test_unlabeled_loss_with_nothing_selected_in_the_batch_is_zero():
    import torch

    from pipelines.heads.losses import emd_loss
    from pipelines.heads.unlabeled import unlabeled_loss

    pool = _pool()
    pool["selected"][:] = False
    assert unlabeled_loss(pool, torch.nn.Linear(6, LEVELS), emd_loss, 8, torch.Generator().manual_seed(0)).item() == 0.0


def test_load_pseudo_pool_keeps_every_row_and_the_mask(tmp_path):
    from pipelines.io import write_parquet
    from pipelines.heads.unlabeled import load_pseudo_pool

    ids = np.array(["a", "b", "c", "d"], dtype=object)
    clip, emb = np.arange(8, dtype=np.float32).reshape(4, 2), np.arange(12, dtype=np.float32).reshape(4, 3)
    row = {k: i for i, k in enumerate(ids)}
    asked = []

    def read(pool_ids, keep=slice(None)):  # the rows of these ids, as the loop reads them from the caches
        asked.append(pool_ids.tolist())
        mine = np.arange(len(pool_ids))[keep]
        take = [row[i] for i in pool_ids[mine]]
        return mine, (clip[take], emb[take])

    table = pd.DataFrame({"image_id": ["d", "b", "c"], "pseudo_dist": [np.full(LEVELS, 0.1 * (k + 1), np.float32) for k in range(3)],
                          "selected": [True, False, True]})
    write_parquet(tmp_path / "p.parquet", table)
    pool = load_pseudo_pool(tmp_path / "p.parquet", read)
    assert asked == [["d", "b", "c"]]
    assert pool["selected"].tolist() == [True, False, True]
    assert pool["inputs"][0].numpy().tolist() == clip[[3, 1, 2]].tolist()
    assert pool["inputs"][1].numpy().tolist() == emb[[3, 1, 2]].tolist()
    # a worker's shard of the pool (rows 0 and 2 of the table): labels and mask stay row-aligned
    shard = load_pseudo_pool(tmp_path / "p.parquet", lambda i: read(i, [0, 2]))
    assert shard["selected"].tolist() == [True, True] and shard["inputs"][1].numpy().tolist() == emb[[3, 2]].tolist()
    np.testing.assert_allclose(shard["dist"][:, 0].numpy(), [0.1, 0.3], rtol=1e-6)
    table["selected"] = False
    write_parquet(tmp_path / "none.parquet", table)
    assert load_pseudo_pool(tmp_path / "none.parquet", read) is None


def test_selftrain_loop_averages_l_u_over_the_whole_pool(tmp_path, monkeypatch):
    """The self-training loop (one epoch, same seed): with a quarter of the pool selected, the
    logged L_u is about a quarter of the L_u with every row selected (same pseudo labels)."""
    import torch

    from pipelines.config import TrainParams
    from pipelines.io import write_parquet
    from pipelines.heads.train import supervised_loop
    from pipelines.train.runner import run_training
    from tests.synthetic import make_features

    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    make_features(tmp_path / "features.parquet")
    feats = load_features(tmp_path / "features.parquet", tmp_path / "embeddings")
    unl = feats.split_of("unlabeled")
    head = {"protocol": "linear_probe", "lr_decay": 1.0, "weight_decay": 0.0, "batch_size": 16, "tm_dim": 8,
            "cr_dim": 8, "hidden": 16, "dropout": 0.0, "emd_r": 2, "use_tm": True, "use_cr": False, "tfa": False,
            "tfa_tau1": 0.2, "tfa_tau2": 4.0, "tfa_n_mix": 4, "flsa": False, "flsa_weight": 0.1, "keep_best": False,
            "loss": "emd", "cr_features": "output"}
    base = {"features_path": str(tmp_path / "features.parquet"), "embeddings_path": str(tmp_path / "embeddings"),
            "cr_path": None, "head": head, "epochs": 1, "lr": 0.0, "seed": 0, "unlabeled_weight": 1.0}
    onehot = np.zeros((len(unl), LEVELS), np.float32)
    onehot[:, 0] = 1.0  # far from any prediction: every selected row has a large loss
    import pipelines.heads.train as loops

    real, seen = loops.unlabeled_loss, []
    monkeypatch.setattr(loops, "unlabeled_loss", lambda *a, **k: seen.append(real(*a, **k).item()) or torch.tensor(seen[-1]))
    logged = {}
    for name, selected in (("all", np.ones(len(unl), bool)), ("quarter", np.arange(len(unl)) % 4 == 0)):
        write_parquet(tmp_path / f"{name}.parquet", pd.DataFrame(
            {"image_id": unl.image_id, "pseudo_dist": list(onehot), "selected": selected}))
        seen.clear()
        run_training(supervised_loop, {**base, "pseudo_path": str(tmp_path / f"{name}.parquet")},
                     TrainParams(num_workers=0), stage=f"st-{name}",
                     inputs=[str(tmp_path / "features.parquet"), str(tmp_path / f"{name}.parquet")])
        assert seen, "the loop did not compute L_u"
        logged[name] = float(np.mean(seen))
    ratio = logged["quarter"] / logged["all"]
    assert 0.1 < ratio < 0.45, logged  # about the coverage, 0.25; the selected-only rule gave ~1
