"""A Ray Train worker actor killed mid-run is restarted by Ray (FailureConfig) and resumes from
its last checkpoint, through the same ``run_training`` the stages use."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from pipelines.config import TrainParams
from pipelines.io import write_parquet
from pipelines.ranking.index import build_index
from pipelines.train.data import embedding_files, load_features
from pipelines.train.loops import pretrain_loop
from pipelines.train.runner import run_training
from tests.synthetic import make_features

EPOCHS = 5
KILL_AFTER_EPOCH = 1


def _kill_self_once(config: dict) -> None:
    """Watch the resume file; once it holds epoch >= KILL_AFTER_EPOCH, SIGKILL this worker (once)."""
    marker = Path(config["kill_marker"])
    resume = Path(config["resume_path"])
    while not marker.exists():
        if resume.exists():
            try:
                epoch = torch.load(resume, map_location="cpu", weights_only=False)["epoch"]
            except Exception:  # mid-replace: read it again
                epoch = -1
            if epoch >= KILL_AFTER_EPOCH:
                marker.write_text(f"{os.getpid()} {epoch}")
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.005)


def crashing_pretrain_loop(config: dict) -> None:
    """The real pretrain loop, in a worker that kills itself once after an epoch's checkpoint."""
    if not Path(config["kill_marker"]).exists():
        threading.Thread(target=_kill_self_once, args=(config,), daemon=True).start()
    with open(Path(config["kill_marker"]).with_suffix(".pids"), "a") as f:
        f.write(f"{os.getpid()}\n")
    pretrain_loop(config)


@pytest.fixture()
def ray_2cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_killed_worker_resumes_from_last_checkpoint(tmp_path, ray_2cpu):
    emb_dir = make_features(tmp_path / "features.parquet")
    train = load_features(tmp_path / "features.parquet", emb_dir).split_of("train")
    index, _ = build_index(train.cluster, train.score, low=2, high=9, n_per_bin="auto")
    write_parquet(tmp_path / "index.parquet", index)
    config = {
        "features_path": str(tmp_path / "features.parquet"), "embeddings_path": str(emb_dir),
        "index_path": str(tmp_path / "index.parquet"), "epochs": EPOCHS, "lr": 3e-3, "weight_decay": 0.05, "tau": 0.1, "hidden": 32, "dim": 16, "dropout": 0.0,
        "batches_per_cluster": 10, "low": 2, "high": 9, "seed": 0, "kill_marker": str(tmp_path / "killed"),
    }
    state = run_training(
        crashing_pretrain_loop, config, TrainParams(num_workers=1), stage="pretrain",
        inputs=[str(tmp_path / "features.parquet"), *map(str, embedding_files(emb_dir)), str(tmp_path / "index.parquet")],
        max_failures=2,
    )
    killed_pid, killed_epoch = map(int, (tmp_path / "killed").read_text().split())
    pids = [int(p) for p in (tmp_path / "killed.pids").read_text().split()]
    assert len(pids) == 2 and pids[0] == killed_pid and pids[1] != killed_pid  # a second worker process
    assert killed_epoch >= KILL_AFTER_EPOCH
    assert state["epoch"] == EPOCHS - 1
    # the restarted worker continued after a checkpoint, not from scratch. It restores the last
    # checkpoint Ray had registered, which may be an epoch or two behind the file the stage wrote
    # just before the kill (reports reach the controller asynchronously).
    assert 1 <= state["started_at_epoch"] <= killed_epoch + 1
