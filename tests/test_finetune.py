"""``head.protocol: fine_tune`` with the image E_CR: backbone + TMCR head trained end to end on
pixels (Ray Train local mode), the fine-tuned backbone's CR-feature cache, and the registered
pyfunc model scoring from the head file exactly as the pipeline predicts."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.embed.cache import read_image_embeddings
from pipelines.io import DataError, load_torch
from pipelines.metrics import dist_to_score
from pipelines.ranking.backbone import ImageCREncoder
from pipelines.data.manifest import image_paths
from pipelines.ranking.cr_features import bundle_cr_encoder, write_cr_features
from pipelines.heads.finetune import finetune_loop, tuned_encoder, tuned_fingerprint
from pipelines.train.data import load_features, write_features_table
from pipelines.semantics import load_matcher
from pipelines.heads.build import load_head, predict_logits
from pipelines.train.runner import run_training
from tests.test_image_ecr import BACKBONE, HEAD, LOCAL, make_image_data
from tests.test_registry import ATTR, CARD, SEM, TINY_CLIP

IMAGE = {"hflip": True, "precision": "auto", "loader_workers": 0, "batch_size": 16}


def clip_world(tmp):
    """make_image_data's images, with TM from the tiny random CLIP's embeddings of them (as the
    features stage computes it), and a pretrained-E_CR file (random backbone, spec + weights)."""
    from pipelines.embed.clip import load_clip
    from pipelines.embed.encode import embed_images, embed_texts, write_text_embeddings

    make_image_data(tmp)
    feats = load_features(tmp / "features.parquet", None)
    paths = image_paths(tmp / "manifest.parquet", feats.image_id, tmp)
    clip = load_clip(TINY_CLIP, "none", seed=CARD["init_seed"])
    embed_images(clip, list(zip(feats.image_id, paths)), tmp / "embeddings" / "images", batch_size=64, num_workers=0, precision="fp32", progress=False)
    _, emb = read_image_embeddings(tmp / "embeddings" / "images")
    tag_emb = embed_texts(clip, SEM + ATTR)
    kinds = ["semantic"] * len(SEM) + ["attribute"] * len(ATTR)
    write_text_embeddings(tmp / "embeddings" / "tags.parquet", SEM + ATTR, kinds, tag_emb)  # beside the CLIP cache: TM reads both
    write_features_table(tmp / "features.parquet", image_id=feats.image_id, split=feats.split, score=feats.score, dist=feats.dist,
                         cluster=feats.cluster, emb_dim=clip.embed_dim, tm_scale=100.0, n_semantic=len(SEM), n_attribute=len(ATTR))
    torch.manual_seed(0)
    enc = ImageCREncoder(BACKBONE, 16, 8, 0.0, image_size=24, resize=32)
    torch.save({"spec": enc.spec(), "model": enc.state_dict()}, tmp / "cr.pt")
    return paths, tag_emb, kinds


def ft_config(tmp, **over) -> dict:
    return {"features_path": str(tmp / "features.parquet"), "embeddings_path": None, "clip_path": str(tmp / "embeddings" / "images"), "cr_path": str(tmp / "cr.pt"),
            "manifest_path": str(tmp / "manifest.parquet"), "root": str(tmp), "head": {**HEAD, "protocol": "fine_tune"},
            "epochs": 2, "lr": 3e-3, "backbone_lr": 1e-3, "seed": 0, "image": dict(IMAGE), **over}


def test_fine_tune_trains_the_backbone_and_the_pyfunc_model_scores_as_the_pipeline(tmp_path, monkeypatch):
    from pipelines.tracking.scoring import ScoringModel, make_bundle

    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    paths, tag_emb, kinds = clip_world(tmp_path)
    pre = load_torch(tmp_path / "cr.pt")
    inputs = [str(tmp_path / f) for f in ("features.parquet", "manifest.parquet", "cr.pt")]
    state = run_training(finetune_loop, ft_config(tmp_path), LOCAL, stage="head", inputs=inputs)
    assert state["epoch"] == 1 and state["precision"] == "fp32"  # CPU: fp32
    assert 0 <= state["selected_epoch"] <= 1 and np.isfinite(state["selected_val_srcc"])  # validation ran, best epoch kept
    assert state["arch"]["head"]["protocol"] == "fine_tune" and state["arch"]["cr_input"]["kind"] == "image"
    # the backbone itself was fine-tuned, and so was the projection inside the head
    tuned, pretrained = state["cr_backbone"]["backbone"], bundle_cr_encoder(pre)["backbone"]
    moved = [k for k, v in pretrained.items() if v.is_floating_point() and not torch.equal(v, tuned[k])]
    assert len(moved) > len(pretrained) // 2
    assert not torch.equal(state["model"]["cr.net.0.weight"], pre["model"]["proj.net.0.weight"])
    torch.save({k: state[k] for k in ("arch", "model", "cr_backbone")}, tmp_path / "head.pt")

    # in the pipeline: the tuned backbone's cache (head stage), then evaluate's prediction from it
    feats = load_features(tmp_path / "features.parquet", None)
    ids = [str(i) for i in feats.image_id]
    write_cr_features(tuned_encoder(load_torch(tmp_path / "head.pt")["cr_backbone"]), ids, paths, tmp_path / "tuned", batch_size=8)
    feats = load_features(tmp_path / "features.parquet", tmp_path / "tuned", clip_path=tmp_path / "embeddings" / "images")
    head = load_head(tmp_path / "head.pt")
    matcher = load_matcher(tmp_path / "features.parquet", tmp_path / "embeddings" / "tags.parquet")
    expected = dist_to_score(torch.softmax(torch.from_numpy(predict_logits(head, matcher, feats.clip, feats.emb)), 1).numpy())

    # the registered model: a bundle of the head file with its fine-tuned backbone (evaluate's make_bundle)
    saved = load_torch(tmp_path / "head.pt")
    make_bundle(tmp_path / "bundle.pt", head_state=saved, card=CARD, tags=SEM + ATTR, kinds=kinds, tag_emb=tag_emb, logit_scale=100.0,
                batch_size=64, cr_encoder=saved["cr_backbone"])
    model = ScoringModel()
    model.load_context(mlflow.pyfunc.PythonModelContext(
        artifacts={"bundle": str(tmp_path / "bundle.pt"), "clip_config": TINY_CLIP}, model_config={"path_root": str(tmp_path)}))
    got = model.predict(None, pd.DataFrame({"path": paths}))
    assert got["error"].isna().all()
    np.testing.assert_allclose(got["score"].to_numpy(float), expected, rtol=0, atol=1e-4)
    # the bundled backbone is the fine-tuned one, not the pretrained one
    bundled = model.scorer.cr_backbone.backbone.state_dict()
    assert all(torch.equal(bundled[k], v) for k, v in tuned.items()) and any(not torch.equal(bundled[k], pretrained[k]) for k in moved)


def test_stages_after_the_head_refuse_a_cache_of_other_weights(tmp_path, monkeypatch):
    """The fine-tuned cache is keyed by the tuned weights' hash: a head file whose backbone is not
    the cached one is an error that names the cache and the fix."""
    monkeypatch.chdir(tmp_path)
    from stages.cr_features import TUNED_CR_FEATURES, state_cr_input

    make_image_data(tmp_path)
    feats = load_features(tmp_path / "features.parquet", None)
    ids = [str(i) for i in feats.image_id]
    paths = image_paths(tmp_path / "manifest.parquet", ids, tmp_path)
    torch.manual_seed(0)
    enc = ImageCREncoder(BACKBONE, 16, 8, 0.0, image_size=24, resize=32)
    entry = bundle_cr_encoder({"spec": enc.spec(), "model": enc.state_dict()})
    write_cr_features(tuned_encoder(entry), ids[:4], paths[:4], TUNED_CR_FEATURES, batch_size=4)
    assert state_cr_input({"arch": {}, "cr_backbone": entry}) == TUNED_CR_FEATURES
    other = {**entry, "backbone": {k: v + 1 if v.is_floating_point() else v for k, v in entry["backbone"].items()}}
    assert tuned_fingerprint(other) != tuned_fingerprint(entry)
    with pytest.raises(DataError, match=r"cr_features_tuned: holds the features of backbone weights .*rerun `dvc repro head`"):
        state_cr_input({"arch": {}, "cr_backbone": other})


def test_images_missing_for_the_fine_tune_rows_name_the_files(tmp_path):
    from pipelines.heads.finetune import FineTuneConfig, finetune_images
    from pipelines.train.core import method_config

    make_image_data(tmp_path)
    feats = load_features(tmp_path / "features.parquet", None)
    config = method_config(FineTuneConfig, ft_config(tmp_path), "fine-tune")
    train, val = finetune_images(config, feats)
    assert len(train) == 30 and len(val) == 8
    Path(val[0]).unlink()
    with pytest.raises(DataError, match=r"1 image file\(s\) missing on disk for the train / val rows \(head\.protocol: fine_tune\).*im030\.png.*dvc repro head"):
        finetune_images(config, feats)


def test_tune_names_the_param_for_pixel_trained_steps():
    """``stages.tune`` searches E_CR's MLP and heads over cached features: the image E_CR's
    pretraining and the pixel fine-tune are refused before any trial, naming the param."""
    from pipelines.config import params_from_dict, read_yaml
    from stages.tune import check_tunable

    raw = read_yaml("params.yaml", "")

    def p(**blocks):
        return params_from_dict({**raw, **{k: {**raw[k], **v} for k, v in blocks.items()}})

    check_tunable(p(), "pretrain", "params.yaml")  # the embedding E_CR: tunable
    check_tunable(p(pretrain={"encoder": "image"}), "head", "params.yaml")  # a linear probe over the cached features
    with pytest.raises(DataError, match=r"tune --stage pretrain tunes the embedding E_CR only, but pretrain\.encoder = 'image'"):
        check_tunable(p(pretrain={"encoder": "image"}), "pretrain", "params.yaml")
    for stage in ("head", "pseudo"):
        with pytest.raises(DataError, match=r"head\.protocol = 'fine_tune' with pretrain\.encoder = 'image'.*head\.protocol: linear_probe"):
            check_tunable(p(pretrain={"encoder": "image"}, head={"protocol": "fine_tune"}), stage, "params.yaml")
