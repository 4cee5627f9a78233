"""The whole DAG: `dvc repro` in a fresh git + DVC repo on a tiny demo config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "pipelines/", "stages/", "config/", "tests/assets/", "data/byo/")

TINY = {
    "demo": {"n_images": 96, "image_size": 64},
    "tags": {"min_count": 2},
    "embed": {"model": "tests/assets/iaa-tiny-clip.json", "pretrained": "none", "batch_size": 16, "num_workers": 1},
    "features": {"n_clusters": 3},
    "pretrain": {"epochs": 3, "batches_per_cluster": 4, "hidden": 64, "dim": 32, "ray": {"num_workers": 1},
                 "image": {"backbone": "test_efficientnet", "image_size": 24, "resize": 32, "epochs": 1,
                           "batches_per_cluster": 2, "loader_workers": 1, "batch_size": 32}},
    "head": {"epochs": 6, "tm_dim": 32, "cr_dim": 32, "hidden": 64, "ray": {"num_workers": 0}},
    "selftrain": {"epochs": 3, "ray": {"num_workers": 0}},
    "evaluate": {"tsne_max_points": 60},
    "mlflow": {"model_name": "tmcr-test"},
    "model": {"family": "aesaf", "epochs": 2, "image_size": 32, "aesaf": {"widths": [8, 16, 32], "group_maps": 4},
              "mnet": {"branch_blocks": 4}},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [f for f in listed if f.startswith(PROJECT_FILES) and (ROOT / f).is_file()]


def make_repo(tmp: Path, overrides: dict) -> tuple[Path, dict]:
    repo = tmp / "repo"
    for f in project_files():
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "MLFLOW_", "RAY_ADDRESS", "IAA_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "project"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    return repo, env


def dvc(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path):
    repo, env = make_repo(tmp_path, TINY)
    dvc(repo, env, "repro")

    metrics = json.loads((repo / "metrics/eval.json").read_text())
    # random weights are stamped on every metric file and the model card
    for f in ("eval", "head", "pretrain", "selftrain", "pseudo_search", "family"):
        m = json.loads((repo / f"metrics/{f}.json").read_text())
        assert m["random_weights"] is True and "not a real result" in m["WARNING"], f
    card = json.loads((repo / "models/model_card.json").read_text())
    assert "not a real result" in card["WARNING"] and card["alias"] == "champion"
    for name in ("head", "selftrain"):
        res = metrics[name]
        for k in ("acc", "plcc", "srcc", "mse", "emd1", "emd2", "mae_L", "mae_M", "mae_H"):
            assert np.isfinite(res[k]), (name, k)
        assert 0 <= res["acc"] <= 1 and res["emd2"] >= res["emd1"] * 0 and res["mse"] > 0
    # metrics agree with the plotted predictions, and training beat a constant guess
    from pipelines.metrics import mse, srcc

    table = pd.read_csv(repo / "plots/pred_vs_true.csv")
    for name in ("head", "selftrain"):
        assert metrics[name]["srcc"] == pytest.approx(srcc(table[f"pred_{name}"], table["true_score"]))
        assert metrics[name]["mse"] == pytest.approx(mse(table[f"pred_{name}"], table["true_score"]), rel=1e-4)
        assert metrics[name]["mse"] < mse(np.full(len(table), 5.5), table["true_score"])
    for plot in ("pred_vs_true.png", "region_mae.png", "tsne.png"):
        assert (repo / "plots" / plot).stat().st_size > 5000
    pseudo = json.loads((repo / "metrics/pseudo_search.json").read_text())
    assert pseudo["val_n_selected"] >= 1 and pseudo["unlabeled_n"] > 0

    # the registry's champion loads and scores images like the pipeline did
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns/mlflow.db'}")
    preds = pd.read_csv(repo / "plots/pred_vs_true.csv")
    ids = preds["image_id"].head(3).tolist()
    model = mlflow.pyfunc.load_model("models:/tmcr-test@champion")  # self-contained: run from any cwd
    paths = [str(repo / "data/demo/images" / f"{i}.jpg") for i in ids] + [str(repo / "missing.jpg")]
    out = model.predict(pd.DataFrame({"path": paths}))
    expected = preds.set_index("image_id").loc[ids, f"pred_{metrics['registered_model']}"].to_numpy()
    np.testing.assert_allclose(out["score"].to_numpy()[:3], expected, atol=2e-3)
    assert out["error"].iloc[3] and np.isnan(out["score"].iloc[3])
    assert len(out["top_semantic"].iloc[0]) == 3

    # nothing changed: the second repro runs no stage and is fast
    start = time.perf_counter()
    second = dvc(repo, env, "repro")
    assert "Running stage" not in second.stdout
    assert time.perf_counter() - start < 15
    assert "up to date" in dvc(repo, env, "status").stdout.lower()

    # the image families are selected by params: only the family stage reruns
    exp = dvc(repo, env, "exp", "run", "-S", "model.family=mnet")
    assert "Running stage 'family'" in exp.stdout and "Running stage 'head'" not in exp.stdout
    family = json.loads((repo / "metrics/family.json").read_text())
    assert family["registered_model"] == "mnet" and np.isfinite(family["mnet"]["srcc"])

    # E_CR on pixels: one key reruns pretrain and what follows, nothing before it
    exp = dvc(repo, env, "exp", "run", "-S", "pretrain.encoder=image")
    ran = {line.split("'")[1] for line in exp.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"pretrain", "cr_features", "head", "pseudo_search", "selftrain", "evaluate"}, ran
    for f in ("pretrain", "head", "selftrain", "pseudo_search", "eval"):
        m = json.loads((repo / f"metrics/{f}.json").read_text())
        assert m["cr_encoder"] == "image" and m["cr_random_weights"] is True and "not a real result" in m["CR_WARNING"], f
    card = json.loads((repo / "models/model_card.json").read_text())
    assert card["cr_backbone"] == "test_efficientnet" and "not a real result" in card["CR_WARNING"]
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    preds = pd.read_csv(repo / "plots/pred_vs_true.csv")
    model = mlflow.pyfunc.load_model(card["registered"])  # CLIP (TM) + the backbone (CR) + the head, from pixels
    out = model.predict(pd.DataFrame({"path": paths}))
    expected = preds.set_index("image_id").loc[ids, f"pred_{metrics['registered_model']}"].to_numpy()
    np.testing.assert_allclose(out["score"].to_numpy()[:3], expected, atol=2e-3)
    assert out["error"].iloc[3] and np.isnan(out["score"].iloc[3])


def test_stage_reports_unknown_param(tmp_path):
    repo, env = make_repo(tmp_path, {"index": {"n_per_bins": 3}})
    proc = subprocess.run([sys.executable, "-m", "stages.index"], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown param 'index.n_per_bins'" in proc.stderr and "params.yaml" in proc.stderr


def test_byo_embeddings_skip_clip_and_their_folder_is_a_dependency(tmp_path):
    """`embed.source: byo` with tables in data/byo/: no CLIP runs, features are built from the
    tables, and replacing a table makes DVC rerun embed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    byo = {"source": "byo", "byo_items": "data/byo/items.parquet", "byo_texts": "data/byo/texts.parquet",
           "byo_normalise": True}
    repo, env = make_repo(tmp_path, merge(TINY, {"embed": byo}))
    dvc(repo, env, "repro", "prepare", "tags")
    ids = pd.read_parquet(repo / "data/manifest.parquet")["image_id"].astype(str).tolist()
    tags = [t for k in ("semantic", "attribute") for t in (repo / f"data/tags/{k}.txt").read_text().split("\n") if t]

    def write_tables(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for name, col, keys in (("items", "image_id", ids[:-3]), ("texts", "phrase", tags[:-1])):
            emb = rng.normal(size=(len(keys), 16)).astype(np.float32)
            pq.write_table(pa.table({col: keys, "embedding": [r.tolist() for r in emb]}), repo / f"data/byo/{name}.parquet")

    write_tables(0)
    dvc(repo, env, "repro", "features")
    report = json.loads((repo / "data/embeddings/report.json").read_text())
    assert report["items"]["manifest_without_embedding"] == 3
    card = json.loads((repo / "data/embeddings/card.json").read_text())
    assert card["model"] == "byo" and card["embed_dim"] == 16
    feats = pq.read_table(repo / "data/features/features.parquet")
    assert feats.num_rows == len(ids) - 3 and feats.schema.field("tm").type.list_size == len(tags) - 1
    assert "up to date" in dvc(repo, env, "status", "--with-deps", "features").stdout.lower()
    write_tables(1)  # new embeddings: embed (and everything after it) is stale
    assert "embed" in dvc(repo, env, "status", "--with-deps", "features").stdout
