"""The image E_CR: a timm backbone trained on pixels with the traversal loss (Ray Train, DDP),
its CR-feature cache and the linear-probe head over it, and the errors for bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.config import TrainParams
from pipelines.data.manifest import manifest_table, scores_from_votes, write_manifest
from pipelines.images import crop_view
from pipelines.io import DataError, write_parquet
from pipelines.ranking.backbone import ImageCREncoder, create_backbone, known_backbones
from pipelines.data.manifest import image_paths
from pipelines.ranking.cr_features import cr_image_features, encoder_from_state, write_cr_features
from pipelines.ranking.index import build_index
from pipelines.embed.cache import read_image_embeddings, write_text_embeddings
from pipelines.train.data import load_features, write_features_table
from pipelines.heads.train import supervised_loop
from pipelines.ranking.pretrain import pretrain_images, pretrain_loop, steps_of
from pipelines.train.runner import run_training
from tests.synthetic import write_embedding_cache

BACKBONE = "test_efficientnet"  # timm's tiny test config: 99k parameters, 256 features
LOCAL = TrainParams(num_workers=0)
IMAGE = {"backbone": BACKBONE, "weights": "none", "image_size": 24, "resize": 32, "hflip": True, "backbone_lr": 3e-3,
         "precision": "auto", "loader_workers": 0, "batch_size": 16}
HEAD = {
    "protocol": "linear_probe", "lr_decay": 0.95, "weight_decay": 1e-4, "batch_size": 16, "tm_dim": 8, "cr_dim": 8, "hidden": 16,
    "dropout": 0.0, "emd_r": 2, "use_tm": True, "use_cr": True, "tfa": True, "tfa_tau1": 0.5, "tfa_tau2": 2.0, "tfa_n_mix": 1,
    "flsa": True, "flsa_weight": 0.1, "keep_best": True, "loss": "emd", "cr_features": "hidden",
}


def make_image_data(tmp: Path, n: int = 48, one_cluster: bool = False, seed: int = 0) -> Path:
    """Images whose brightness and stripes follow the score, a manifest, a features table, an index."""
    rng = np.random.default_rng(seed)
    score_target = rng.uniform(2.2, 8.8, n)
    levels = np.arange(1, 11)
    votes = np.stack([np.round(100 * np.exp(-0.5 * ((levels - s) / 1.0) ** 2) / 2.5).astype(int) + (levels == round(s)) for s in score_target])
    score = scores_from_votes(votes)
    split = np.array((["train"] * 30 + ["val"] * 8 + ["test"] * 6 + ["unlabeled"] * 4)[:n])
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    ids, paths = [], []
    for i, s in enumerate(score):
        x = np.full((40, 40, 3), 20 + 25 * s, np.float32) + rng.normal(0, 10, (40, 40, 3))
        x[:, :: max(1, int(10 - s))] *= 0.5  # denser stripes for higher scores
        ids.append(f"im{i:03d}")
        paths.append(str(tmp / "images" / f"im{i:03d}.png"))
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(paths[-1])
    unl = split == "unlabeled"
    write_manifest(tmp / "manifest.parquet", manifest_table(
        ids, paths, split.tolist(), [None if u else v.tolist() for u, v in zip(unl, votes)],
        [None if u else float(s) for u, s in zip(unl, score)], 10))
    dist = (votes / votes.sum(1, keepdims=True)).astype(np.float32)
    sc = score.astype(np.float32).copy()
    sc[unl], dist[unl] = np.nan, np.nan
    cluster = np.zeros(n, np.int64) if one_cluster else rng.integers(0, 2, n)
    clip = rng.normal(size=(n, 16)).astype(np.float32)  # the CLIP cache TM reads, and its tag table (3 + 3 tags)
    write_embedding_cache(tmp / "embeddings" / "images", ids, clip / np.linalg.norm(clip, axis=1, keepdims=True))
    write_text_embeddings(tmp / "embeddings" / "tags.parquet", [f"t{i}" for i in range(6)], ["semantic"] * 3 + ["attribute"] * 3,
                          rng.normal(size=(6, 16)).astype(np.float32))
    write_features_table(tmp / "features.parquet", image_id=ids, split=split, score=sc, dist=dist, cluster=cluster, emb_dim=16)
    train = load_features(tmp / "features.parquet", None).split_of("train")
    index, _ = build_index(train.cluster, train.score, low=2, high=9, n_per_bin=2)
    write_parquet(tmp / "index.parquet", index)
    return tmp


def image_config(tmp: Path, **over) -> dict:
    return {
        "encoder": "image", "features_path": str(tmp / "features.parquet"), "embeddings_path": None,
        "index_path": str(tmp / "index.parquet"), "manifest_path": str(tmp / "manifest.parquet"), "root": str(tmp),
        "epochs": 2, "lr": 3e-3, "weight_decay": 0.0, "tau": 0.1, "hidden": 16, "dim": 8, "dropout": 0.0,
        "batches_per_cluster": 3, "batches_per_step": "auto", "low": 2, "high": 9, "seed": 0, "image": dict(IMAGE), **over,
    }


def inputs(tmp: Path) -> list[str]:
    return [str(tmp / f) for f in ("features.parquet", "index.parquet", "manifest.parquet")]


@pytest.fixture()
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    return make_image_data(tmp_path)


def test_unknown_backbone_names_the_param_and_close_known_ones():
    with pytest.raises(DataError, match=r"pretrain\.image\.backbone = 'resnet_18' is not a known backbone\. Closest: .*resnet18"):
        create_backbone("resnet_18")
    with pytest.raises(DataError, match=r"torchvision:resnet_18.*not a known backbone"):
        create_backbone("torchvision:resnet_18")
    names = known_backbones()
    assert "swin_base_patch4_window7_224" in names and "torchvision:resnet18" in names
    model, dim, weights = create_backbone("torchvision:resnet18")
    assert dim == 512 and weights == "random" and model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    model, dim, _ = create_backbone("mobilenetv3_small_050")  # pooled width after its pre-logits conv head
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, dim) == (1, 1024)


def test_local_checkpoint_loads_and_unfit_ones_fail(tmp_path):
    import timm

    full = timm.create_model(BACKBONE, num_classes=10)  # as saved by a classifier training: head keys included
    torch.save({"state_dict": full.state_dict()}, tmp_path / "ok.pt")
    model, dim, weights = create_backbone(BACKBONE, str(tmp_path / "ok.pt"))
    assert weights == f"checkpoint:{tmp_path / 'ok.pt'}" and dim == 256
    for k, v in model.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k
    other = timm.create_model("test_resnet", num_classes=0).state_dict()
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(DataError, match=r"other\.pt: does not fit pretrain\.image\.backbone = 'test_efficientnet': \d+ missing keys"):
        create_backbone(BACKBONE, str(tmp_path / "other.pt"))
    bad = {k: v for k, v in full.state_dict().items()}
    key = next(k for k, v in bad.items() if v.ndim == 4)
    bad[key] = torch.zeros(1, 1, 1, 1)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(DataError, match=rf"1 shape mismatches \(file vs backbone\) \(e\.g\. {key}: \(1, 1, 1, 1\)"):
        create_backbone(BACKBONE, str(tmp_path / "shape.pt"))
    with pytest.raises(DataError, match=r"missing\.pt': file not found"):
        create_backbone(BACKBONE, str(tmp_path / "missing.pt"))


def test_crop_view_is_the_papers_augmentation():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    a = crop_view(im, 24, 32, np.random.default_rng([0, 1, 2]))
    assert a.shape == (3, 24, 24) and torch.equal(a, crop_view(im, 24, 32, np.random.default_rng([0, 1, 2])))
    views = {crop_view(im, 24, 32, np.random.default_rng([0, 1, k])).sum().item() for k in range(8)}
    assert len(views) > 4  # random crops and flips
    centre = crop_view(im, 24, 32)
    from pipelines.images import image_tensor, normalise

    full = normalise(image_tensor(im, (32, 32)))
    assert torch.allclose(centre, full[:, 4:28, 4:28])
    assert torch.equal(crop_view(im, 32, 32, np.random.default_rng(0), hflip=False), full)


def test_image_pretrain_cache_and_linear_probe(data):
    state = run_training(pretrain_loop, image_config(data), LOCAL, stage="pretrain", inputs=inputs(data))
    assert state["epoch"] == 1 and state["spec"]["kind"] == "image" and state["spec"]["weights"] == "random"
    assert state["precision"] == "fp32"  # CPU: fp32
    fresh = ImageCREncoder(BACKBONE, 16, 8, 0.0, image_size=24, resize=32)
    moved = [k for k, v in fresh.state_dict().items() if k.startswith("backbone.") and v.is_floating_point()
             and not torch.equal(v, state["model"][k])]
    assert moved  # the backbone itself was trained
    torch.save(state, data / "cr.pt")
    encoder = encoder_from_state(torch.load(data / "cr.pt", weights_only=True))
    feats = load_features(data / "features.parquet", None)
    ids = [str(i) for i in feats.image_id]
    paths = image_paths(data / "manifest.parquet", ids, data)
    out = data / "cr_features"
    assert write_cr_features(encoder, ids, paths, out, batch_size=8, chunk_rows=16) == {"n_total": 48, "n_encoded": 48}
    assert write_cr_features(encoder, ids, paths, out, batch_size=8, chunk_rows=16)["n_encoded"] == 0  # resumable
    cached_ids, cached = read_image_embeddings(out)
    assert cached_ids == ids and cached.shape == (48, 256)
    # what the scoring model computes from a PIL image is what the cache holds
    live = cr_image_features(encoder, [Image.open(p).convert("RGB") for p in paths[:3]]).numpy()
    np.testing.assert_allclose(live, cached[:3], rtol=1e-4, atol=1e-5)
    config = {"features_path": str(data / "features.parquet"), "embeddings_path": str(out), "cr_path": str(data / "cr.pt"),
              "clip_path": str(data / "embeddings" / "images"), "head": HEAD, "epochs": 3, "lr": 3e-3, "seed": 0}
    head = run_training(supervised_loop, config, LOCAL, stage="head", inputs=inputs(data))
    assert head["arch"]["cr_input"]["kind"] == "image" and head["arch"]["cr_spec"]["in_dim"] == 256
    for k, v in state["model"].items():  # linear probe: the projection is the pretrained one
        if k.startswith("proj."):
            assert torch.equal(head["model"]["cr." + k[len("proj."):]], v)


def test_images_missing_on_disk_for_sampled_rows(data):
    train = load_features(data / "features.parquet", None).split_of("train")
    from pipelines.ranking.pretrain import PretrainConfig
    from pipelines.train.core import method_config

    config = method_config(PretrainConfig, image_config(data), "pretrain")
    assert len(pretrain_images(config, train)) == len(train)
    (data / "images" / f"{train.image_id[0]}.png").unlink()
    with pytest.raises(DataError, match=r"1 image file\(s\) missing on disk for rows the balanced sampler picks .*im000\.png.*dvc repro prepare"):
        pretrain_images(config, train)


def test_batches_per_step_must_split_across_workers():
    assert steps_of("auto", 2) == 2 and steps_of(4, 2) == 4
    with pytest.raises(ValueError, match="multiple of the 2 worker"):
        steps_of(3, 2)


def test_killed_image_pretraining_resumes_from_its_checkpoint(data):
    script = textwrap.dedent(f"""
        import torch
        from pathlib import Path
        from pipelines.config import TrainParams
        from pipelines.ranking.pretrain import pretrain_loop
        from pipelines.train.runner import run_training
        from tests.test_image_ecr import image_config, inputs
        tmp = Path({str(data)!r})
        state = run_training(pretrain_loop, image_config(tmp, epochs=12, batches_per_cluster=2), TrainParams(num_workers=0),
                             stage="pretrain", inputs=inputs(tmp))
        torch.save(state, tmp / "final.pt")
    """)
    env = {**os.environ, "IAA_RUNS_DIR": str(data / "runs")}
    root = Path(__file__).parents[1]
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # start-up (torch, timm, Ray) on a busy machine
    while not list((data / "runs").glob("*/checkpoint/state.pt")):
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.01)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (resume,) = (data / "runs").glob("*/checkpoint/state.pt")
    killed = torch.load(resume, weights_only=True)
    assert killed["epoch"] < 11 and killed["spec"]["kind"] == "image"
    subprocess.run([sys.executable, "-c", script], env=env, cwd=root, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    final = torch.load(data / "final.pt", weights_only=True)
    assert final["epoch"] == 11 and final["started_at_epoch"] >= killed["epoch"] + 1
