"""The whole DAG: `dvc repro` in a fresh git + DVC repo on a tiny demo config, then DVC
experiments on it, compared the way a user compares them, and a copy of the repo."""

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
    # lr 2e-3, so that the experiment `-S head.lr=1e-3` is a change
    "head": {"epochs": 6, "lr": 2e-3, "tm_dim": 32, "cr_dim": 32, "hidden": 64, "ray": {"num_workers": 0}},
    # 15 validation images: let a weak tiny head still select a few pseudo labels
    "pseudo_search": {"thresholds": [0.1, 0.15, 0.2, 0.3], "min_selected": 0.05},
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
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    shutil.copy2(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # the offline plots page
    for cmd in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "project"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    return repo, env


def dvc(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def git(repo: Path, env: dict, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout


def reset_workspace(repo: Path, env: dict) -> None:
    """Back to the committed baseline (an experiment leaves its results in the workspace)."""
    git(repo, env, "reset", "-q", "--hard")
    dvc(repo, env, "checkout", "-f")


@pytest.fixture(scope="module")
def baseline(dag_repo, tmp_path_factory):
    """A copy of the session's tiny DAG (tests/dag_repo.py: `dvc repro` run once) with its results
    committed, as the README says: dvc.lock, metrics/ and the plot CSVs in git, the outputs in the
    DVC cache."""
    repo = tmp_path_factory.mktemp("e2e") / "repo"
    shutil.copytree(dag_repo.repo, repo, symlinks=True)
    for leftover in repo.glob("*.killed.log"):  # from a fault-injection test run before this module
        leftover.unlink()
    git(repo, dag_repo.env, "add", "-A")
    git(repo, dag_repo.env, "commit", "-q", "-m", "baseline results")
    return repo, dag_repo.env, dag_repo.output


NOISE = ("Failed to query Ray Train Controller", "PreemptionWatcher", "CloudPickle", "input_example", "token auth",
         "INFO open_clip", "core_worker")


@pytest.mark.slow
def test_dvc_repro_end_to_end(baseline):
    repo, env, shown = baseline
    reset_workspace(repo, env)
    # the terminal shows progress bars and the pipeline's messages, not third-party noise (that is in logs/)
    assert "pretrain: 100%" in shown and "head: 100%" in shown, shown[-3000:]
    for noise in NOISE:
        assert noise.lower() not in shown.lower(), (noise, shown[-3000:])
    tracked = set(git(repo, env, "ls-files").split())
    assert {"dvc.lock", "metrics/eval.json", "metrics/details/eval.json", "metrics/head.json", "plots/region_mae.csv"} <= tracked
    assert not any(f.startswith(("models/", "data/demo/", "mlruns/", "logs/")) and not f.endswith(".gitignore") for f in tracked)

    metrics = json.loads((repo / "metrics/details/eval.json").read_text())
    # the random-weights stamp: one boolean in the headline files, the full text in the details and the card
    for f in ("eval", "head", "pretrain", "selftrain", "pseudo_search", "family"):
        m = json.loads((repo / f"metrics/{f}.json").read_text())
        assert "WARNING" not in m and "clip_weights" not in m, f
        assert all(isinstance(v, (int, float, bool, type(None), dict)) or k == "registered_model" for k, v in m.items()), f
    headline = json.loads((repo / "metrics/eval.json").read_text())
    assert headline["random_weights"] is True and set(headline["head"]) == {"srcc", "plcc", "acc", "emd2", "mae_L", "mae_M", "mae_H"}
    assert headline["head"]["srcc"] == metrics["head"]["srcc"] and headline["registered_model"] == metrics["registered_model"]
    assert json.loads((repo / "metrics/family.json").read_text())["random_weights"] is True
    assert "not a real result" in metrics["WARNING"]
    card = json.loads((repo / "models/model_card.json").read_text())
    assert "not a real result" in card["WARNING"] and card["alias"] == "champion"
    assert (repo / "logs/pretrain.log").read_text().strip(), "the pretrain stage's log file is empty"
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
    model = mlflow.pyfunc.load_model("models:/tmcr-test@champion", model_config={"path_root": str(repo)})  # any cwd
    paths = [str(repo / "data/demo/images" / f"{i}.jpg") for i in ids] + [str(repo / "missing.jpg")]
    out = model.predict(pd.DataFrame({"path": paths}))
    expected = preds.set_index("image_id").loc[ids, f"pred_{metrics['registered_model']}"].to_numpy()
    # the embed stage's precision path, other batches: int8 activation scales differ (README: scoring numerics)
    np.testing.assert_allclose(out["score"].to_numpy(float)[:3], expected, atol=1e-2)
    assert out["error"].iloc[3] and out["score"].iloc[3] is None
    assert len(out["top_semantic"].iloc[0]) == 3

    # nothing changed: the second repro runs no stage and is fast; the metrics compare against HEAD
    assert "failed to load" not in dvc(repo, env, "metrics", "diff").stderr.lower()
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
    assert ran == {"validate_params", "pretrain", "cr_features", "head", "pseudo_search", "selftrain", "evaluate"}, ran
    for f in ("pretrain", "head", "selftrain", "pseudo_search", "eval"):  # the random backbone is stamped
        assert json.loads((repo / f"metrics/{f}.json").read_text())["cr_random_weights"] is True, f
    details = json.loads((repo / "metrics/details/eval.json").read_text())
    card = json.loads((repo / "models/model_card.json").read_text())
    for d in (details, card):
        assert d["cr_backbone"] == "test_efficientnet" and "not a real result" in d["CR_WARNING"]
    preds = pd.read_csv(repo / "plots/pred_vs_true.csv")
    model = mlflow.pyfunc.load_model(card["registered"], model_config={"path_root": str(repo)})  # CLIP + backbone + head
    out = model.predict(pd.DataFrame({"path": paths}))
    expected = preds.set_index("image_id").loc[ids, f"pred_{details['registered_model']}"].to_numpy()
    np.testing.assert_allclose(out["score"].to_numpy(float)[:3], expected, atol=2e-3)
    assert out["error"].iloc[3] and out["score"].iloc[3] is None


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
    meta = feats.schema.metadata
    assert feats.num_rows == len(ids) - 3 and "tm" not in feats.column_names  # TM: computed where it is used
    assert int(meta[b"n_semantic"]) + int(meta[b"n_attribute"]) == len(tags) - 1
    assert "up to date" in dvc(repo, env, "status", "--with-deps", "features").stdout.lower()
    write_tables(1)  # new embeddings: embed (and everything after it) is stale
    assert "embed" in dvc(repo, env, "status", "--with-deps", "features").stdout


def exp_rows(shown: list) -> dict[str, dict]:
    """``dvc exp show --json`` as {name or rev: data}: the baseline commit and its experiments."""
    rows: dict[str, dict] = {}

    def walk(node):
        if isinstance(node, dict):
            if "rev" in node and isinstance(node.get("data"), dict):
                rows[node.get("name") or node["rev"]] = {**node["data"], "rev": node["rev"]}
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(shown)
    return rows


def metric(row: dict, path: str, *keys: str):
    value = row["metrics"][path]["data"]
    for k in keys:
        value = value[k]
    return value


@pytest.mark.slow
def test_experiments_round_trip_and_compare(baseline):
    """`dvc exp run -S` twice from the committed baseline: params written back by DVC (YAML 1.2)
    load, every row of `dvc exp show` has test metrics, and diffs of metrics, params and plots work."""
    repo, env, _ = baseline
    reset_workspace(repo, env)
    base_rev = git(repo, env, "rev-parse", "HEAD").strip()

    # any stage validates the whole params.yaml, so the cheap experiment proves the round trip too
    st = dvc(repo, env, "exp", "run", "-n", "st6", "-S", "selftrain.epochs=6")
    assert "Running stage 'selftrain'" in st.stdout and "Running stage 'evaluate'" in st.stdout
    assert "Running stage 'head'" not in st.stdout
    assert "epochs: 6" in (repo / "params.yaml").read_text()  # rewritten by DVC (YAML 1.2), read by every stage
    reset_workspace(repo, env)
    lr = dvc(repo, env, "exp", "run", "-n", "lr1e-3", "-S", "head.lr=1e-3")
    assert "Running stage 'head'" in lr.stdout and "Running stage 'evaluate'" in lr.stdout
    assert "Running stage 'tags'" not in lr.stdout and "Running stage 'pretrain'" not in lr.stdout

    rows = exp_rows(json.loads(dvc(repo, env, "exp", "show", "--json").stdout))
    base = next(r for r in rows.values() if r["rev"] == base_rev)
    assert {"st6", "lr1e-3"} <= set(rows), sorted(rows)
    for row in (base, rows["st6"], rows["lr1e-3"]):
        for model in ("head", "selftrain"):
            assert np.isfinite(metric(row, "metrics/eval.json", model, "srcc")), row["rev"]
        assert metric(row, "metrics/eval.json", "random_weights") is True
    assert rows["lr1e-3"]["params"]["params.yaml"]["data"]["head"]["lr"] == 1e-3
    assert rows["st6"]["params"]["params.yaml"]["data"]["selftrain"]["epochs"] == 6
    # the head really retrained: another model file, other validation numbers
    assert rows["lr1e-3"]["outs"]["models/head.pt"]["hash"] != base["outs"]["models/head.pt"]["hash"]
    assert metric(rows["lr1e-3"], "metrics/head.json", "val_srcc") != metric(base, "metrics/head.json", "val_srcc")
    assert rows["lr1e-3"]["outs"]["models/cr_encoder.pt"]["hash"] == base["outs"]["models/cr_encoder.pt"]["hash"]

    mdiff = dvc(repo, env, "metrics", "diff", base_rev, "lr1e-3", "--json")
    assert "head.srcc" in json.loads(mdiff.stdout)["metrics/eval.json"]
    assert "failed to load" not in (mdiff.stdout + mdiff.stderr).lower()
    pdiff = json.loads(dvc(repo, env, "params", "diff", base_rev, "lr1e-3", "--json").stdout)["params.yaml"]
    assert (pdiff["head.lr"]["old"], pdiff["head.lr"]["new"]) == (2e-3, 1e-3) and "selftrain.epochs" not in pdiff
    pdiff = json.loads(dvc(repo, env, "params", "diff", base_rev, "st6", "--json").stdout)["params.yaml"]
    assert (pdiff["selftrain.epochs"]["old"], pdiff["selftrain.epochs"]["new"]) == (8, 6)

    # plots of two experiments side by side, in a page that needs no network
    plots = json.loads(dvc(repo, env, "plots", "diff", "st6", "lr1e-3", "--json").stdout)
    bars = next(v for k, v in plots["data"].items() if k.startswith("MAE by score region"))
    revs = {d["rev"] for d in bars[0]["content"]["data"]["values"]}
    assert revs == {"st6", "lr1e-3"}, revs
    assert {d["bar"] for d in bars[0]["content"]["data"]["values"]} == {
        f"{i} {r}: {m}" for i, r in enumerate("LMH", 1) for m in ("head", "selftrain")}
    assert not any(k.startswith("plots/pred_vs_true.csv") or k.startswith("plots/region_mae.csv") for k in plots["data"])
    dvc(repo, env, "plots", "diff", "st6", "lr1e-3", "-o", "diff_page")
    page = (repo / "diff_page/index.html").read_text()
    assert "cdn.jsdelivr" not in page and "vegaEmbed(" in page and "st6" in page and "lr1e-3" in page

    # the MLflow runs name their DVC experiment and git revision, with repo-relative paths
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlruns/mlflow.db'}")
    exp = client.get_experiment_by_name("iaa-tmcr")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.dvc_experiment = 'lr1e-3' and tags.stage = 'head'")
    assert len(runs) == 1 and runs[0].data.tags["git_revision"] == base_rev
    assert runs[0].data.params["features_path"] == "data/features/features.parquet"
    assert not any(str(v).startswith(str(repo)) for v in runs[0].data.params.values())


@pytest.mark.slow
def test_copied_repo_writes_mlflow_artifacts_into_the_copy(baseline, tmp_path):
    """A copy of a repo (with its mlruns/) logs into itself and no longer needs the original."""
    repo, env, _ = baseline
    reset_workspace(repo, env)
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, symlinks=True)
    original = repo / "mlruns" / "artifacts"
    away = repo.parent / "artifacts-away"
    original.rename(away)  # the copy must not read or write the original's artifacts
    try:
        proc = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=copy, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert not original.exists()
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = f"sqlite:///{copy / 'mlruns/mlflow.db'}"
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("iaa-tmcr")
        assert exp.artifact_location == (copy / "mlruns/artifacts").as_uri()
        run = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'evaluate'", order_by=["start_time DESC"])[0]
        assert run.info.artifact_uri.startswith((copy / "mlruns/artifacts").as_uri())
        assert {"plots/pred_vs_true.png", "plots/tsne.png"} <= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        # older runs and registered versions point into the copy too
        assert all(r.info.artifact_uri.startswith(copy.as_uri()) for r in client.search_runs([exp.experiment_id]))
        mlflow.set_tracking_uri(uri)
        model = mlflow.pyfunc.load_model("models:/tmcr-test/1", model_config={"path_root": str(copy)})
        ids = pd.read_csv(copy / "plots/pred_vs_true.csv")["image_id"].head(2).tolist()
        out = model.predict(pd.DataFrame({"path": [str(copy / "data/demo/images" / f"{i}.jpg") for i in ids]}))
        assert out["error"].isna().all() and np.isfinite(out["score"].to_numpy(float)).all()
    finally:
        away.rename(original)
