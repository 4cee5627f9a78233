"""The image-family stage end to end on a tiny generated demo, plus the loop's image handling."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipelines.io import DataError
from pipelines.models.image_loop import load_batch, load_image, stage_of

EVAL_KEYS = {"acc", "plcc", "srcc", "mse", "emd1", "emd2", "mae_L", "mae_M", "mae_H", "lt_mse_all", "lt_mse_many", "lt_mse_med", "lt_mse_few", "n"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from pipelines.data.demo import generate_demo
    from pipelines.data.adapters import build_manifest
    from pipelines.data.manifest import write_manifest

    root = tmp_path_factory.mktemp("demo")
    generate_demo(root / "data" / "demo", n_images=40, image_size=64, progress=False)
    table, _ = build_manifest("votes_csv", root / "data" / "demo" / "labels.csv", root / "data" / "demo" / "images")
    write_manifest(root / "data" / "manifest.parquet", table)
    return root


def write_params(root: Path, model: dict) -> None:
    params = {
        "seed": 0,
        "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "artifact_root": "mlruns/artifacts", "experiment": "fam-test"},
        "model": model,
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def base_model(family: str, **kw) -> dict:
    return {
        "family": family, "epochs": 3, "lr": 1e-3, "batch_size": 8, "image_size": 64,
        "amp": {"enabled": True, "dtype": "fp32", "l1": 1.0, "l2": 0.2},
        "ray": {"num_workers": 0, "use_gpu": False, "cpus_per_worker": 1}, **kw,
    }


@pytest.mark.parametrize("family,extra", [
    ("mnet", {"mnet": {"branch_blocks": 7}, "corner_grid": "with_mixed", "schedule": "three_stage",
              "stage2_size": [72, 56], "stage3_epochs": 1}),
    ("aesaf", {"aesaf": {"widths": [16, 32, 64], "group_maps": 4}, "aspect": "keep"}),
])
def test_family_stage_trains_and_writes_eval_shaped_metrics(demo, monkeypatch, family, extra):
    from stages.family import run

    monkeypatch.chdir(demo)
    monkeypatch.setenv("IAA_RUNS_DIR", str(demo / "runs"))
    write_params(demo, base_model(family, **extra))
    metrics = run()
    headline = json.loads((demo / "metrics" / "family.json").read_text())
    assert set(headline) == {family, "random_weights", "registered_model"} and headline["random_weights"] is True
    assert headline["registered_model"] == family
    assert headline[family]["srcc"] == metrics[family]["srcc"]
    on_disk = json.loads((demo / "metrics" / "details" / "family.json").read_text())
    assert on_disk["registered_model"] == family and set(on_disk[family]) >= EVAL_KEYS | {"plcc_sd", "srcc_sd"}
    assert on_disk[family]["n"] == metrics[family]["n"] > 0
    assert np.isfinite(on_disk[family]["emd2"]) and 0 <= on_disk[family]["emd2"] < 1
    assert on_disk["random_weights"] and "WARNING" in on_disk
    # no overflow in fp32 demo training: theta = -0.2 E <= 0 after epoch 0 -> mixed from epoch 1
    assert on_disk["switch_epoch"] == 1 and on_disk["epochs"] == 3
    state = torch.load(demo / "models" / "family.pt", map_location="cpu", weights_only=False)
    assert state["arch"]["family"] == family and state["amp"]["gate"]["switch_epoch"] == 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{demo / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fam-test")
    run_ = client.search_runs([exp.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    assert run_.data.tags["family"] == family and run_.data.tags["switch_epoch"] == "1"
    hist = {k: [m.value for m in sorted(client.get_metric_history(run_.info.run_id, k), key=lambda m: m.step)]
            for k in ("mixed_precision", "loss", "corner_grid", "stage", "image_h")}
    assert hist["mixed_precision"] == [0.0, 1.0, 1.0]
    assert all(np.isfinite(hist["loss"]))
    if family == "aesaf":
        assert hist["corner_grid"] == [0.0, 0.0, 0.0]  # seed 002 augments with flips only
    if family == "mnet":
        assert hist["corner_grid"] == [0.0, 1.0, 1.0]  # Corner Grid from the precision switch on
        # three-stage schedule: 64 -> 72x56 padded from the switch -> 64 for the last epoch
        assert hist["stage"] == [1.0, 2.0, 3.0] and hist["image_h"] == [64.0, 72.0, 64.0]
    assert f"{family}.srcc" in run_.data.metrics
    assert state["arch"]["aspect"] == extra.get("aspect", "square") and state["arch"]["image_size"] == 64
    check_registered_model(demo, client, run_.info.run_id, family, on_disk)


def check_registered_model(demo: Path, client, run_id: str, family: str, on_disk: dict) -> None:
    """The stage registered a FamilyModel like evaluate registers TMCR: tags, champion, and
    ``models:/tmcr-<family>@champion`` scores paths / bytes as the stage did, bad rows as errors."""
    import base64

    import mlflow
    import pandas as pd

    name = f"tmcr-{family}"  # mlflow.model_name defaults to "tmcr"
    assert on_disk["registered"] == f"models:/{name}/1" and on_disk["alias"] == "champion"
    tags = client.get_model_version(name, "1").tags
    assert tags["dataset"] == "demo" and tags["family"] == family and tags["random_weights"] == "true"
    assert float(tags["val_srcc"]) == pytest.approx(on_disk["val_srcc"][family])
    assert float(tags["metric.srcc"]) == pytest.approx(on_disk[family]["srcc"], abs=1e-5)
    assert "not a real result" in tags["WARNING"]

    mlflow.set_tracking_uri(f"sqlite:///{demo / 'mlruns' / 'mlflow.db'}")
    preds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions/test.csv"))
    assert len(preds) == on_disk[family]["n"]
    paths = [p if Path(p).is_absolute() else str(demo / p) for p in preds["path"]]
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion", model_config={"path_root": str(demo)})  # paths under demo/
    out = model.predict(pd.DataFrame({"path": paths}))
    assert list(out.columns) == ["score", "distribution", "error"] and out["error"].isna().all()
    np.testing.assert_allclose(out["score"].to_numpy(float), preds["pred_score"].to_numpy(), atol=1e-4)
    assert all(len(d) == 10 and sum(d) == pytest.approx(1, abs=1e-5) for d in out["distribution"])

    raw = Path(paths[0]).read_bytes()
    corrupt = demo / f"corrupt-{family}.jpg"
    corrupt.write_bytes(raw[: len(raw) // 3])  # a truncated JPEG
    by = model.predict(pd.DataFrame({"image": [raw, base64.b64encode(raw).decode(), b"junk"]}))
    assert by["score"][0] == pytest.approx(out["score"][0], abs=1e-5)
    assert by["score"][1] == pytest.approx(out["score"][0], abs=1e-5)
    assert by["error"][2] and by["score"][2] is None and by["distribution"][2] is None
    bad = model.predict(pd.DataFrame({"path": [str(corrupt), paths[1], str(demo / "missing.jpg")]}))
    assert list(bad["error"].notna()) == [True, False, True] and "no image file" in bad["error"][2]
    assert bad["score"][1] == pytest.approx(out["score"][1], abs=1e-5) and bad["score"][0] is None

    from stages.score import score_files  # the score CLI sends top_k only to models that take it

    table = score_files(model, [Path(p) for p in paths[:3]], batch_size=2, progress=False)
    assert table["error"].isna().all()
    np.testing.assert_allclose(table["score"].to_numpy(float), out["score"].to_numpy(float)[:3], atol=1e-5)


def _fit_mnet_gate(demo: Path, monkeypatch, **amp) -> dict:
    """M+MNet on the demo in fp32 with the fp16 overflow monitor (``amp.monitor: auto`` on CPU)."""
    from pipelines.config import AmpParams, MnetParams, ModelParams, TrainParams
    from pipelines.models.image_loop import image_family_loop
    from pipelines.train.runner import ray_config, run_training
    from stages.family import family_config

    monkeypatch.setenv("IAA_RUNS_DIR", str(demo / "runs"))
    m = ModelParams(family="mnet", epochs=5, lr=1e-3, batch_size=8, image_size=32, amp=AmpParams(dtype="fp32", **amp),
                    mnet=MnetParams(branch_blocks=4, fuse_channels=16), ray=TrainParams(num_workers=0))
    config = family_config(m, demo / "data" / "manifest.parquet", demo)
    assert config.model.amp.monitor == "auto"
    return run_training(image_family_loop, {**ray_config(config), "seed": 0}, m.ray, stage="gate", inputs=[str(config.manifest_path)])["amp"]


def test_demo_gate_opens_once_the_loss_scale_settles_and_stays_closed_while_overflows_persist(demo, monkeypatch):
    from tests.test_amp import ref_switch_epoch

    # from 2^20 the scaler backs off within epoch 0 (an fp16 overflow epoch), then meets none
    settled = _fit_mnet_gate(demo, monkeypatch, init_tau=20)
    history, switch = settled["gate"]["history"], settled["gate"]["switch_epoch"]
    assert history[0] and not any(history[1:switch])
    assert switch == ref_switch_epoch(history, 1.0, 0.2) == 5  # O = 1 keeps theta = 1 - 0.2 E > 0 until E = 5
    assert settled["tau"] < 20
    # a scale that grows after every clean step probes past fp16's range every other step
    persist = _fit_mnet_gate(demo, monkeypatch, init_tau=20, growth_interval=1)
    assert all(persist["gate"]["history"]) and persist["gate"]["switch_epoch"] is None
    assert all(t > 0 for t in persist["gate"]["thetas"])


def test_unknown_model_key_names_the_dotted_key(demo, monkeypatch, tmp_path):
    from stages.family import load_family_params

    write_params(tmp_path, base_model("mnet", mnet={"alpah": 3}))
    with pytest.raises(DataError, match="model.mnet.alpah"):
        load_family_params(tmp_path / "params.yaml")
    write_params(tmp_path, base_model("resnet"))
    with pytest.raises(DataError, match="known families"):
        load_family_params(tmp_path / "params.yaml")
    write_params(tmp_path, base_model("mnet", corner_grid="sometimes"))
    with pytest.raises(DataError, match="model.corner_grid"):
        load_family_params(tmp_path / "params.yaml")
    write_params(tmp_path, base_model("mnet", amp={"dtype": "int8"}))
    with pytest.raises(DataError, match="model.amp.dtype"):
        load_family_params(tmp_path / "params.yaml")
    write_params(tmp_path, base_model("mnet", epochs="3"))
    with pytest.raises(DataError, match="model.epochs"):
        load_family_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: 0\nmodel: {family: aesaf, mnet: {alpha: 5.0}}\n")
    assert load_family_params(tmp_path / "params.yaml")[1].mnet.alpha == 5.0  # defaults fill the rest


def test_three_stage_schedule():
    from pipelines.config import AmpParams, ModelParams

    cfg = ModelParams(image_size=224, schedule="three_stage", epochs=10, stage3_epochs=2, stage2_size=[248, 312], stage2_from=3,
                      amp=AmpParams(enabled=True))
    got = [stage_of(e, cfg, switch_epoch=4) for e in range(10)]
    assert [g[2] for g in got] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert got[5][:2] == ((248, 312), "pad") and got[9][:2] == ((224, 224), "resize")
    assert [stage_of(e, cfg, None)[2] for e in range(10)] == [1] * 8 + [3, 3]  # never switched: no stage 2
    off = dataclasses.replace(cfg, amp=AmpParams(enabled=False))
    assert [stage_of(e, off, None)[2] for e in range(10)] == [1, 1, 1, 2, 2, 2, 2, 2, 3, 3]


def test_pad_mode_keeps_the_aspect_ratio_and_bad_images_fail_clearly(tmp_path):
    Image.new("RGB", (40, 20), (255, 255, 255)).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", (30, 30), "pad")
    assert x.shape == (3, 30, 30)
    assert x[:, 15, :].min() == 1.0  # the middle row is the image, full width
    assert x[:, :7, :].max() == 0.0 and x[:, 23:, :].max() == 0.0  # constant padding above and below
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg", (8, 8))


def test_keep_aspect_resizes_the_short_side_and_pads_batches(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "wide.png")
    Image.new("RGB", (20, 30), (0, 0, 255)).save(tmp_path / "tall.png")
    assert load_image(tmp_path / "wide.png", (10, 10), "short_side").shape == (3, 10, 20)
    assert load_image(tmp_path / "tall.png", (10, 10), "short_side").shape == (3, 15, 10)
    b = load_batch([str(tmp_path / "wide.png"), str(tmp_path / "tall.png")], (10, 10), "short_side")
    assert b.shape == (2, 3, 15, 20)
    assert b[0, :, 10:, :].abs().max() == 0 and b[1, :, :, 10:].abs().max() == 0  # zero padding
    assert b[0, :, :10, :].abs().min() > 0
    from pipelines.config import ModelParams

    assert stage_of(0, ModelParams(image_size=10, aspect="keep"), None) == ((10, 10), "short_side", 1)
    with pytest.raises(DataError, match="model.aspect"):
        stage_of(0, ModelParams(image_size=10, aspect="wide"), None)
