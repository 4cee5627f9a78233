"""The image families' registry path without training: ``FamilyModel`` as a pyfunc, the stage's
registration and promotion, the split image reader, and the shared local-weights reader.

Real MLflow (sqlite store in tmp_path) and real tiny, untrained models saved as the stage saves
``models/family.pt`` (``arch`` + ``model`` + ``config``).
"""

from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from pipelines.io import DataError
from pipelines.models import build
from pipelines.models.image_loop import image_tensor, load_image, open_image, predict
from mlflow.exceptions import MlflowException

from pipelines.tracking.scoring import (
    family_signature,
    log_family_model,
    read_row_image,
    signature,
)

TINY = {
    "aesaf": {"widths": [8, 16], "group_maps": 2, "hidden": 4},
    "mnet": {"branch_blocks": 2, "fuse_channels": 8, "attn_reduction": 4},
}


def save_state(path: Path, family: str, aspect: str | None, size: int = 32) -> torch.nn.Module:
    """A family state file as the stage writes it (``aspect=None``: an older file without it)."""
    torch.manual_seed(0)
    model = build(family, 10, TINY[family]).eval()
    arch = {"family": family, "options": TINY[family], "n_levels": 10, "image_size": size}
    if aspect is not None:
        arch["aspect"] = aspect
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": arch, "model": model.state_dict(), "epoch": 0, "config": {"family": family}}, path)
    return model


def write_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(24, 40), (36, 24), (32, 32)]):
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def _store(tmp_path_factory):
    """One sqlite store for the module (creating one takes seconds); (uri, experiment id)."""
    tmp = tmp_path_factory.mktemp("family-registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("fam-reg", artifact_location=(tmp / "art").as_uri())
    return uri, exp


@pytest.fixture()
def store(_store):
    """Point MLflow at the module's store; the registry URI (and the env var MLflow exports for
    it) is restored after, as conftest restores the tracking URI."""
    before = os.environ.get("MLFLOW_REGISTRY_URI")
    uri, exp = _store
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri, exp
    mlflow.set_registry_uri(before)
    if before is None:
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


@pytest.mark.parametrize("family,aspect", [("aesaf", "keep"), ("mnet", "square"), ("aesaf", None)])
def test_family_model_scores_like_the_training_predict(tmp_path, store, family, aspect):
    _, exp = store
    model = save_state(tmp_path / "models" / "family.pt", family, aspect)
    paths = write_images(tmp_path / "imgs")
    expected = predict(model, paths, 32, aspect=aspect or "square")  # an older file: square
    with mlflow.start_run(experiment_id=exp):
        info = log_family_model(tmp_path / "models" / "family.pt", registered_name=None, pip_requirements=["mlflow"])
    assert info.signature == family_signature()
    pyfunc = mlflow.pyfunc.load_model(info.model_uri, model_config={"path_root": str(tmp_path)})
    out = pyfunc.predict(pd.DataFrame({"path": paths + [str(tmp_path / "missing.png")]}))
    assert list(out.columns) == ["score", "distribution", "error"]
    assert list(out["error"].isna()) == [True, True, True, False] and out["score"][3] is None
    np.testing.assert_allclose(np.stack(out["distribution"][:3]), expected, atol=1e-5)
    np.testing.assert_allclose(out["score"][:3].astype(float), expected @ np.arange(1, 11), atol=1e-4)
    pyfunc.unwrap_python_model().scorer.batch_size = 2  # batches of 2 with a bad row inside: same scores, in order
    mixed = pyfunc.predict(pd.DataFrame({"path": [paths[2], str(tmp_path / "missing.png"), paths[0], paths[1]]}))
    assert list(mixed["error"].notna()) == [False, True, False, False]
    np.testing.assert_allclose(mixed["score"][[0, 2, 3]].astype(float), out["score"][[2, 0, 1]].astype(float), atol=1e-5)
    raw = Path(paths[0]).read_bytes()
    by = pyfunc.predict(pd.DataFrame({"image": [b"junk", raw, base64.b64encode(raw).decode(), "not base64!"]}))
    assert by["score"][1] == pytest.approx(out["score"][0], abs=1e-5) == by["score"][2]
    assert "not a readable JPEG" in by["error"][0] and "base64" in by["error"][3]
    with pytest.raises(MlflowException, match="no 'image' or 'path' column; this model reads the columns 'image'"):
        pyfunc.predict(pd.DataFrame({"file": paths}))  # MLflow drops the unknown column


def test_stage_registration_tags_and_promotes_on_val_srcc(tmp_path, store, monkeypatch):
    from pipelines.config import MlflowParams, Params
    from stages.family import MODEL_OUT, register_family

    uri, exp = store
    monkeypatch.chdir(tmp_path)
    save_state(tmp_path / MODEL_OUT, "aesaf", "keep")
    p = dataclasses.replace(Params(), mlflow=MlflowParams(model_name="fam"))
    test_metrics = {"srcc": 0.25, "plcc": float("nan"), "acc": None, "n": 12}
    got = []
    with mlflow.start_run(experiment_id=exp):
        for val in (0.5, 0.4, 0.6, float("nan")):
            got.append(register_family(p, "aesaf", test_metrics, val, True, None))
    assert got == [
        {"registered": "models:/fam-aesaf/1", "alias": "champion"},
        {"registered": "models:/fam-aesaf/2", "alias": "challenger"},
        {"registered": "models:/fam-aesaf/3", "alias": "champion"},
        {"registered": "models:/fam-aesaf/4", "alias": None},  # no finite val_srcc: not ranked
    ]
    client = MlflowClient(uri)
    assert {a: str(v) for a, v in client.get_registered_model("fam-aesaf").aliases.items()} == {"champion": "3", "challenger": "2"}
    tags = client.get_model_version("fam-aesaf", "3").tags
    assert tags["dataset"] == tags["data"] == "demo" and tags["random_weights"] == "true" and tags["family"] == "aesaf"
    assert float(tags["val_srcc"]) == 0.6 and float(tags["metric.val_srcc"]) == 0.6 and tags["metric.srcc"] == "0.25"
    assert "metric.plcc" not in tags and "metric.acc" not in tags and tags["backbone_weights"] == "random"
    assert "val_srcc" not in client.get_model_version("fam-aesaf", "4").tags


def test_image_reader_split_and_row_reader(tmp_path):
    path = write_images(tmp_path)[0]
    for mode, size in (("resize", (16, 16)), ("short_side", (12, 12)), ("pad", (20, 30))):
        assert torch.equal(load_image(path, size, mode), image_tensor(open_image(path), size, mode))
    # bytes, base64 and path rows give the same PIL image; a grey image is converted to RGB
    raw = Path(path).read_bytes()
    ims = [read_row_image(pd.Series(r)) for r in ({"image": raw}, {"image": base64.b64encode(raw).decode()}, {"path": path})]
    assert all(np.array_equal(np.asarray(ims[0]), np.asarray(im)) for im in ims[1:])
    grey = Image.new("L", (10, 20), 128)
    assert torch.equal(image_tensor(grey, (5, 5), "short_side"), image_tensor(grey.convert("RGB"), (5, 5), "short_side"))
    with pytest.raises(DataError, match="missing.png: cannot read image"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="neither 'image' bytes nor a 'path'"):
        read_row_image(pd.Series({"path": None}))
    # the two signatures share inputs; only TMCR has top tags and a top_k param
    assert family_signature().inputs == signature().inputs and family_signature().params is None
    assert signature().outputs.input_names() == ["score", "distribution", "top_semantic", "top_attribute", "error"]


def test_local_weights_reader_for_both_families(tmp_path):
    for family, own in (("aesaf", "encoder."), ("mnet", "fore.")):
        torch.manual_seed(1)
        ref = build(family, 10, TINY[family])
        assert any(k.startswith(own) for k in ref.state_dict())
        torch.save(ref.state_dict(), tmp_path / f"{family}.pt")
        torch.manual_seed(2)
        loaded = build(family, 10, {**TINY[family], "weights": str(tmp_path / f"{family}.pt")})
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ref.state_dict().items())
        with pytest.raises(DataError, match=rf"model.{family}.weights = .*file not found \(no download"):
            build(family, 10, {**TINY[family], "weights": str(tmp_path / "none.pt")})
    torch.save({"classifier.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="neither an M\\+MNet nor a MobileNetV2"):
        build("mnet", 10, {**TINY["mnet"], "weights": str(tmp_path / "other.pt")})
    with pytest.raises(DataError, match="not an AESAF or matching VGG16"):
        build("aesaf", 10, {**TINY["aesaf"], "weights": str(tmp_path / "other.pt")})
    # torchvision backbone keys ('features.*') load into the AESAF encoder
    enc = build("aesaf", 10, TINY["aesaf"]).encoder.state_dict()
    torch.save({f"features.{k}": torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in enc.items()},
               tmp_path / "tv.pt")
    m = build("aesaf", 10, {**TINY["aesaf"], "weights": str(tmp_path / "tv.pt")})
    assert torch.equal(m.encoder[0][0].weight, torch.full_like(m.encoder[0][0].weight, 0.5))
