"""Ray Tune search over the head: real Ray (2 CPUs), real Ray Train workers, real MLflow (sqlite)."""

import functools
import json

import pytest
import yaml

from pipelines.config import MlflowParams
from pipelines.io import DataError
from pipelines.tracking.runs import setup
from pipelines.tune.search import apply_overrides, load_space, max_concurrent_trials, run_search, set_args, write_best
from stages.tune import head_steps
from tests.synthetic import make_features

RAW = {
    "seed": 0,
    "head": {
        "epochs": 3, "lr": 0.003, "batch_size": 32, "tm_dim": 8, "cr_dim": 8, "hidden": 16, "dropout": 0.0,
        "use_cr": False, "tfa": False, "flsa": False, "lr_decay": 0.95,
    },
}


def write_space(path, **extra):
    space = {
        "stage": "head", "metric": "val_srcc", "mode": "max", "num_samples": 1,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "trial_ray": {"num_workers": 1, "cpus_per_worker": 1},
        "fixed": {"head.epochs": 4},
        "space": {"head.lr": {"grid": [1.0e-6, 1.0e-2]}, "head.hidden": {"choice": [16]}},
        **extra,
    }
    path.write_text(yaml.safe_dump(space))
    return path


def test_space_file_errors_name_the_file_and_key(tmp_path):
    good = load_space(write_space(tmp_path / "s.yaml"))
    assert good.num_samples == 1 and good.trial_ray.num_workers == 1
    bad = write_space(tmp_path / "bad.yaml", space={"head.lr": {"logunifrm": [1e-4, 1e-2]}})
    with pytest.raises(DataError, match=r"bad\.yaml.*space\.head\.lr"):
        load_space(bad)
    local = write_space(tmp_path / "local.yaml", trial_ray={"num_workers": 0})
    with pytest.raises(DataError, match="local mode"):
        load_space(local)
    with pytest.raises(DataError, match=r"'head\.hiden'"):
        apply_overrides(RAW, {"head.hiden": 3}, "s.yaml")
    with pytest.raises(DataError, match=r"'head\.hidden'"):
        apply_overrides(RAW, {"head.hidden": "big"}, "s.yaml")
    assert apply_overrides(RAW, {"head.lr": 0.5}, "s.yaml").head.lr == 0.5


def test_cpu_budget_never_oversubscribes():
    from pipelines.config import TrainParams
    from pipelines.tune.search import SearchSpace

    s = SearchSpace("x", "head", "val_srcc", "max", 4, {"head.lr": {"choice": [1]}}, trial_ray=TrainParams(num_workers=1))
    assert max_concurrent_trials(s, 2.0) == 2
    s.trial_ray = TrainParams(num_workers=2, cpus_per_worker=1)
    assert max_concurrent_trials(s, 2.0) == 1
    s.trial_ray = TrainParams(num_workers=3)
    assert max_concurrent_trials(s, 2.0) == 1  # still one trial, never zero
    s.max_concurrent = 1
    s.trial_ray = TrainParams(num_workers=1)
    assert max_concurrent_trials(s, 8.0) == 1


def test_set_args_round_trip():
    args = set_args({"head.lr": 0.001, "head.tfa": False, "head.hidden": 256})
    assert args == ["head.hidden=256", "head.lr=0.001", "head.tfa=false"]


@pytest.fixture()
def ray_2cpu():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow  # ~90 s on 2 shared CPUs: two trials, each a Tune actor + Train controller + worker
def test_head_search_asha_mlflow_children_and_best_fragment(tmp_path, monkeypatch, ray_2cpu):
    monkeypatch.chdir(tmp_path)
    make_features(tmp_path / "data" / "features" / "features.parquet", embeddings=tmp_path / "data" / "embeddings" / "images")
    uri = setup(MlflowParams(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "art"), experiment="tune-test"))
    space = load_space(write_space(tmp_path / "space.yaml"))
    result = run_search(
        space, RAW, functools.partial(head_steps, root=str(tmp_path)), tracking_uri=uri, experiment="tune-test",
        work_dir=tmp_path / "runs", name="t1",
    )
    assert len(result.trials) == 2 and all(t["error"] is None for t in result.trials), result.trials
    # ASHA with max_t = head.epochs (the fixed value), never more
    assert all(1 <= t["epochs"] <= 4 for t in result.trials)
    best = next(t for t in result.trials if t["trial_id"] == result.best_trial)
    assert best["epochs"] == 4
    # lr = 1e-6 learns nothing: the synthetic score is linear in the embedding, so a trained head wins
    assert result.best_params["head.lr"] == 1e-2
    assert result.best_value > 0.3
    assert result.best_params["head.epochs"] == 4

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tune-test")
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert {r.data.tags["trial_id"] for r in children} == {t["trial_id"] for t in result.trials}
    for r in children:
        t = next(t for t in result.trials if t["trial_id"] == r.data.tags["trial_id"])
        assert r.info.status == ("FINISHED" if t["epochs"] == 4 else "KILLED")
        assert r.data.tags["early_stopped"] == str(t["epochs"] < 4).lower()
        hist = client.get_metric_history(r.info.run_id, "val_srcc")
        # per-epoch metrics from the Ray Train worker, by run id (a stopped trial's worker may log an
        # epoch or two more before Tune's stop reaches it)
        assert len(hist) == 4 if t["epochs"] == 4 else len(hist) >= t["epochs"]
        assert float(r.data.params["head.lr"]) == t["params"]["head.lr"]
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["best_trial"] == result.best_trial

    paths = write_best(result, tmp_path / "out", metric="val_srcc")
    frag = yaml.safe_load(paths["yaml"].read_text())
    assert frag["head"]["lr"] == result.best_params["head.lr"] and frag["head"]["epochs"] == 4
    # the fragment merges into params.yaml and validates
    merged = {**RAW, "head": {**RAW["head"], **frag["head"]}}
    assert apply_overrides(merged, {}, "best_params.yaml").head.hidden == result.best_params["head.hidden"]
    summary = json.loads(paths["json"].read_text())
    assert f"head.lr={result.best_params['head.lr']}" in summary["set_args"]
    assert summary["dvc_command"].startswith("dvc exp run -S ")


def test_pretrain_and_pseudo_trials_chain_their_steps(tmp_path):
    """The multi-step trials: pretrain feeds the head its encoder; pseudo labels feed self-training."""
    import pandas as pd
    import torch

    from pipelines.heads.build import head_from_arch
    from stages.tune import pretrain_steps, pseudo_label_step, pseudo_steps

    make_features(tmp_path / "data" / "features" / "features.parquet", embeddings=tmp_path / "data" / "embeddings" / "images")
    p = apply_overrides(RAW, {"pretrain.tau": 0.2, "selftrain.unlabeled_weight": 0.5, "head.use_cr": True}, "s.yaml")
    pre, head = pretrain_steps(p, tmp_path / "trial", root=str(tmp_path))
    assert pre.config.tau == 0.2 and pre.save_to == head.config.cr_path == str(tmp_path / "trial" / "cr_encoder.pt")
    assert head.config.features_path == tmp_path / "data" / "features" / "features.parquet"
    assert pre.config.embeddings_path == head.config.embeddings_path == tmp_path / "data" / "embeddings" / "images"

    arch = {"tm_in": 14, "n_levels": 10, "cr_spec": None, "head": {**p.__dict__["head"].__dict__, "use_cr": False}}
    arch["head"].pop("ray")
    (tmp_path / "models").mkdir()
    torch.save({"arch": arch, "model": head_from_arch(arch).state_dict()}, tmp_path / "models" / "head.pt")
    label, st = pseudo_steps(p, tmp_path / "trial", root=str(tmp_path))
    assert not label.ray_train and st.config.pseudo_path == label.config["out_path"]
    assert st.config.unlabeled_weight == 0.5 and st.config.init_path == tmp_path / "models" / "head.pt"
    (tmp_path / "trial").mkdir()
    pseudo_label_step({**label.config, "seed": 0, "betas": [0.0, 1.0], "thresholds": [0.0, 0.1], "min_selected": 0.0})
    table = pd.read_parquet(label.config["out_path"])
    assert len(table) > 0 and table["selected"].any()
    assert all(abs(sum(d) - 1) < 1e-4 for d in table["pseudo_dist"])


@pytest.mark.slow  # two trials of the tiny image-family loop, each with a Ray Train worker
def test_family_search_tunes_model_params(tmp_path, monkeypatch, ray_2cpu):
    from mlflow.tracking import MlflowClient

    from pipelines.data.demo import generate_demo
    from pipelines.data.adapters import build_manifest
    from pipelines.data.manifest import write_manifest
    from stages.tune import family_steps

    monkeypatch.chdir(tmp_path)
    generate_demo(tmp_path / "data" / "demo", n_images=40, image_size=48, progress=False)
    table, _ = build_manifest("votes_csv", tmp_path / "data" / "demo" / "labels.csv", tmp_path / "data" / "demo" / "images")
    write_manifest(tmp_path / "data" / "manifest.parquet", table)
    raw = {"seed": 0, "model": {"family": "aesaf", "image_size": 32, "batch_size": 8, "aesaf": {"widths": [8, 16], "group_maps": 4}}}
    uri = setup(MlflowParams(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "art"), experiment="tune-fam"))
    space = load_space(write_space(
        tmp_path / "space.yaml", stage="family", scheduler={"type": "fifo"}, fixed={"model.epochs": 2},
        space={"model.lr": {"grid": [1.0e-4, 3.0e-3]}}, max_concurrent=1,
    ))
    result = run_search(space, raw, functools.partial(family_steps, root=str(tmp_path)), tracking_uri=uri,
                        experiment="tune-fam", work_dir=tmp_path / "runs", name="fam")
    assert len(result.trials) == 2 and all(t["error"] is None and t["epochs"] == 2 for t in result.trials), result.trials
    assert {t["params"]["model.lr"] for t in result.trials} == {1e-4, 3e-3}
    assert result.best_params["model.epochs"] == 2 and result.best_value == max(t["val_srcc"] for t in result.trials)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tune-fam")
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 2
    # max_concurrent: 1 on 2 CPUs (room for two): the trials ran one after the other
    first, second = sorted(children, key=lambda r: r.info.start_time)
    assert max(m.timestamp for m in client.get_metric_history(first.info.run_id, "val_srcc")) <= second.info.start_time
    for r in children:  # the image loop's per-epoch metrics, precision state included
        assert len(client.get_metric_history(r.info.run_id, "val_srcc")) == 2
        assert len(client.get_metric_history(r.info.run_id, "mixed_precision")) == 2
    summary = json.loads(write_best(result, tmp_path / "out", metric="val_srcc")["json"].read_text())
    assert f"model.lr={result.best_params['model.lr']}" in summary["set_args"]


def test_trials_rank_by_the_epoch_the_stage_keeps():
    """With head.keep_best the stage keeps its best validation-SRCC epoch, so a trial that peaked
    at 0.38 beats one that ends higher than the first one's last epoch (0.339) but never peaks."""
    from pipelines.tune.search import kept_result

    peaked = [{"epoch": e, "val_srcc": v, "val_emd2": 0.1 + e} for e, v in enumerate([0.2, 0.38, 0.35, 0.339])]
    steady = [{"epoch": e, "val_srcc": v, "val_emd2": 0.2} for e, v in enumerate([0.1, 0.3, 0.35, 0.36])]
    assert kept_result(peaked, "val_srcc", keep_best=True) == (0.38, 1)
    assert kept_result(steady, "val_srcc", keep_best=True) == (0.36, 3)
    assert kept_result(peaked, "val_srcc", keep_best=False) == (0.339, 3)
    # another metric is read at the kept (best-SRCC) epoch, not at its own optimum
    assert kept_result(peaked, "val_emd2", keep_best=True) == (1.1, 1)
    assert kept_result([{"training_iteration": 1, "val_srcc": float("nan")}], "val_srcc", keep_best=True) == (None, None)
    assert kept_result([{"training_iteration": 2, "val_srcc": 0.5}], "val_srcc", keep_best=False) == (0.5, 1)
    # head.select_on: val_emd2 keeps the lowest-EMD epoch, and every metric is read there
    assert kept_result(steady + [{"epoch": 4, "val_srcc": 0.3, "val_emd2": 0.15}], "val_srcc", True, "val_emd2") == (0.3, 4)
    assert kept_result(peaked, "val_srcc", True, "val_emd2") == (0.2, 0)


def test_trial_table_lists_every_trial_best_first():
    from pipelines.tune.search import SearchResult, trial_table

    trials = [
        {"trial_id": "a1", "params": {"head.lr": 0.01, "head.tfa": True}, "epochs": 4, "val_srcc": 0.38, "selected_epoch": 1, "error": None},
        {"trial_id": "b2", "params": {"head.lr": 1e-4, "head.tfa": False}, "epochs": 2, "val_srcc": 0.2, "selected_epoch": 0, "error": None},
        {"trial_id": "c3", "params": {"head.lr": 1e-3, "head.tfa": False}, "epochs": 0, "val_srcc": None, "selected_epoch": None, "error": "boom"},
    ]
    table = trial_table(SearchResult({}, 0.38, "a1", trials, "p"), "val_srcc").splitlines()
    assert table[0].split() == ["trial", "head.lr", "head.tfa", "val_srcc", "epoch", "epochs", "run", "note"]
    assert table[2].split() == ["a1", "0.01", "True", "0.3800", "1", "4", "best"]
    assert table[3].split() == ["b2", "0.0001", "False", "0.2000", "0", "2"]
    assert table[4].split() == ["c3", "0.001", "False", "-", "-", "0", "error"]
