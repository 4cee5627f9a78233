"""ONNX export of the scoring models and the ONNX Runtime scorer.

Real models (the tiny random open_clip + an untrained TMCR head; a tiny AE-fusion model),
real exporter, real ONNX Runtime; the torch reference is the served pyfunc scorer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipelines.export.onnx import export_model
from pipelines.export.ort import OnnxScorer, clip_pixels, family_pixels, score_folder
from pipelines.io import DataError
from pipelines.tracking.scoring import ScoringModel, log_scoring_model
from tests.test_family_registry import save_state
from tests.test_registry import CARD, TINY_CLIP, build_bundle

SIZES = [(40, 56), (64, 64), (90, 30), (30, 20), (200, 150), (63, 64), (17, 300)]  # (h, w): smaller than the crop too


def images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        small = rng.integers(0, 255, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        paths.append(str(folder / f"im{i}.{'jpg' if i % 2 else 'png'}"))
        im.save(paths[-1])
    return paths


def torch_scores(artifacts: dict[str, str], paths: list[str]) -> pd.DataFrame:
    model = ScoringModel()
    model.load_context(mlflow.pyfunc.PythonModelContext(artifacts=artifacts, model_config={"path_root": "/"}))
    return model.predict(None, pd.DataFrame({"path": paths}), params=None)


@pytest.fixture(scope="module")
def tmcr(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    build_bundle(tmp / "bundle.pt")
    export_model(tmp / "bundle.pt", tmp / "tmcr.onnx")
    return tmp


def test_tmcr_onnx_scores_like_torch(tmcr):
    paths = images(tmcr / "imgs")
    (tmcr / "imgs" / "notes.txt").write_text("not an image")
    (tmcr / "imgs" / "broken.png").write_text("not an image")
    ref = torch_scores({"bundle": str(tmcr / "bundle.pt"), "clip_config": TINY_CLIP}, paths)
    rows = score_folder(tmcr / "tmcr.onnx", tmcr / "imgs", top_k=2)
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == len(paths) + 1  # notes.txt is not an image suffix; broken.png is a row with an error
    assert by_path[str(tmcr / "imgs" / "broken.png")]["score"] is None
    assert "not a readable" in by_path[str(tmcr / "imgs" / "broken.png")]["error"]
    got = np.array([by_path[p]["score"] for p in paths])
    diff = np.abs(got - ref["score"].to_numpy(float)).max()
    print(f"max |ORT - torch| score: {diff:.2g}")
    assert diff <= 1e-3
    np.testing.assert_allclose(np.stack([by_path[p]["distribution"] for p in paths]), np.stack(ref["distribution"]), atol=1e-4)
    ref2 = ScoringModel()
    ref2.load_context(mlflow.pyfunc.PythonModelContext(artifacts={"bundle": str(tmcr / "bundle.pt"), "clip_config": TINY_CLIP},
                                                       model_config={"path_root": "/"}))
    top = ref2.predict(None, pd.DataFrame({"path": paths}), params={"top_k": 2})
    assert [by_path[p]["top_semantic"] for p in paths] == list(top["top_semantic"])
    assert [by_path[p]["top_attribute"] for p in paths] == list(top["top_attribute"])
    # batches of 3 (with the broken image inside one) give the same numbers
    again = OnnxScorer(tmcr / "tmcr.onnx").score_paths(paths[:2] + [str(tmcr / "imgs" / "broken.png")] + paths[2:], batch_size=3)
    assert again[2]["error"] and np.allclose([r["score"] for r in again[:2] + again[3:]], got, atol=1e-6)


def test_preprocessing_replays_the_torch_path_exactly(tmcr):
    from pipelines.embed.clip import load_clip
    from pipelines.embed.encode import ImageDecoder
    from pipelines.images import image_tensor

    spec = OnnxScorer(tmcr / "tmcr.onnx").pre
    decoder = ImageDecoder(load_clip(TINY_CLIP, "none").preprocess)
    for path in images(tmcr / "pre"):
        im = Image.open(path).convert("RGB")
        assert np.array_equal(clip_pixels(im, spec), decoder.transform(im)), path
        for mode, resize in (("resize", "resize"), ("short_side", "short_side")):
            want = (image_tensor(im, (24, 24), mode) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.array_equal(family_pixels(im, {"resize": resize, "size": 24}), want)


def test_family_onnx_scores_like_torch(tmp_path):
    save_state(tmp_path / "family.pt", "aesaf", "square")
    paths = images(tmp_path / "imgs")
    export_model(tmp_path / "family.pt", tmp_path / "aesaf.onnx")
    ref = torch_scores({"family": str(tmp_path / "family.pt")}, paths)
    rows = OnnxScorer(tmp_path / "aesaf.onnx").score_paths(paths)
    assert "top_semantic" not in rows[0] and rows[0]["error"] is None
    assert np.abs(np.array([r["score"] for r in rows]) - ref["score"].to_numpy(float)).max() <= 1e-3


def test_ort_scorer_does_not_import_torch(tmcr):
    code = ("import sys, json\nfrom pipelines.export.ort import score_folder\n"
            f"rows = score_folder({str(tmcr / 'tmcr.onnx')!r}, {str(tmcr / 'imgs')!r})\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'n': len(rows), 'ok': sum(r['error'] is None for r in rows)}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["ok"] >= 1


def test_export_from_a_logged_model_and_int8(tmcr, tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        exp = mlflow.create_experiment("onnx", artifact_location=(tmp_path / "art").as_uri())
        with mlflow.start_run(experiment_id=exp):
            uri = log_scoring_model(tmcr / "bundle.pt", CARD, registered_name=None).model_uri
        local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model"))
        export_model(uri, tmp_path / "from_uri.onnx")  # runs:/ URI
    finally:
        mlflow.set_tracking_uri(None)
    export_model(local, tmp_path / "from_dir.onnx", quantize="int8")  # a downloaded model folder
    paths = images(tmp_path / "imgs")
    fp32 = [r["score"] for r in OnnxScorer(tmp_path / "from_uri.onnx").score_paths(paths)]
    int8 = [r["score"] for r in OnnxScorer(tmp_path / "from_dir.onnx").score_paths(paths)]
    ref = [r["score"] for r in OnnxScorer(tmcr / "tmcr.onnx").score_paths(paths)]
    assert np.allclose(fp32, ref, atol=1e-6) and np.abs(np.array(int8) - ref).max() < 0.05
    assert OnnxScorer(tmp_path / "from_dir.onnx").meta["quantize"] == "int8"


def test_bad_export_inputs_are_clear_errors_and_write_nothing(tmcr, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="export source .*missing.pt.*no such file"):
        export_model(tmp_path / "missing.pt", out / "a.onnx")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="neither a TMCR scoring bundle .* nor a family model state"):
        export_model(tmp_path / "other.pt", out / "a.onnx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="has no MLmodel file"):
        export_model(tmp_path / "folder", out / "a.onnx")
    save_state(tmp_path / "mnet.pt", "mnet", "square")
    with pytest.raises(DataError, match="family mnet .*cannot be written to ONNX.*serve it with the MLflow model"):
        export_model(tmp_path / "mnet.pt", out / "a.onnx")
    with pytest.raises(DataError, match="quantize = 'int4'"):
        export_model(tmcr / "bundle.pt", out / "a.onnx", quantize="int4")
    assert list(out.iterdir()) == []  # nothing half-written, no temporary files left
    (out / "a.onnx").write_bytes(b"keep me")
    with pytest.raises(DataError, match="already exists; .* overwrite=True"):
        export_model(tmcr / "bundle.pt", out / "a.onnx")
    assert (out / "a.onnx").read_bytes() == b"keep me"
    export_model(tmcr / "bundle.pt", out / "a.onnx", overwrite=True)
    assert OnnxScorer(out / "a.onnx").kind == "tmcr" and sorted(p.name for p in out.iterdir()) == ["a.onnx"]
    with pytest.raises(DataError, match="ONNX file .*nope.onnx.* not found; write it with `iaa export`"):
        OnnxScorer(out / "nope.onnx")


def test_iaa_scores_a_folder_with_an_onnx_file(tmcr, tmp_path):
    from pipelines.cli import main

    paths = images(tmp_path / "imgs")
    out = tmp_path / "scores.csv"
    assert main(["score", str(tmcr / "tmcr.onnx"), str(tmp_path / "imgs"), "--out", str(out), "--no-progress"]) == 0
    got = pd.read_csv(out).set_index("path")["score"]
    ref = {p: r["score"] for p, r in zip(paths, OnnxScorer(tmcr / "tmcr.onnx").score_paths(paths))}
    assert len(got) == len(paths) and all(abs(got[str(p)] - s) < 1e-6 for p, s in ref.items())
    before = out.read_bytes()  # an existing output is refused, nothing written over it
    assert main(["score", str(tmcr / "tmcr.onnx"), str(tmp_path / "imgs"), "--out", str(out)]) == 2
    assert out.read_bytes() == before
