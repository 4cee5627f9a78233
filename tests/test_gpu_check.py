"""`use_gpu: true` where there is no GPU fails in seconds, naming the params key and the fix."""

import time

import pytest
import torch

from pipelines.config import TrainParams
from pipelines.io import DataError
from pipelines.train.runner import check_gpu, params_key, run_training


def _never_called(config):  # pragma: no cover - the check must stop the run before any loop
    raise AssertionError("the training loop ran although no GPU is there")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_local_mode_without_cuda_names_the_key():
    with pytest.raises(DataError, match=r"params\.yaml: head\.ray\.use_gpu is true .*no CUDA GPU.*head\.ray\.use_gpu=false"):
        check_gpu(TrainParams(num_workers=0, use_gpu=True), "head.ray")
    check_gpu(TrainParams(num_workers=0, use_gpu=False), "head.ray")  # nothing asked, nothing checked


def test_params_key_of_each_training_stage():
    assert [params_key(s) for s in ("head", "pretrain", "selftrain", "family-mnet")] == [
        "head.ray", "pretrain.ray", "selftrain.ray", "model.ray"]


@pytest.fixture()
def ray_1cpu(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False)
    yield
    ray.shutdown()


def test_worker_request_fails_fast_on_a_cluster_without_gpus(ray_1cpu, tmp_path, monkeypatch):
    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        run_training(_never_called, {"epochs": 1}, TrainParams(num_workers=1, use_gpu=True), stage="family-aesaf", inputs=[])
    msg = str(err.value)
    assert "model.ray.use_gpu is true" in msg and "has 0 GPU(s)" in msg and "-S model.ray.use_gpu=false" in msg
    assert time.perf_counter() - start < 10
