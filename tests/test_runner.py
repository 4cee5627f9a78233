"""The Ray Train runner's settings reach the loop: the checkpoint cadence (``ray.checkpoint_every``)."""

import pytest

from pipelines.config import TrainParams
from pipelines.io import DataError
from pipelines.train.runner import report_epoch, run_training, worker_info


def cadence_loop(config: dict) -> None:
    rank, _, _ = worker_info()
    for epoch in range(config["epochs"]):
        state = {"epoch": epoch, "checkpoint_every": config["checkpoint_every"]}
        report_epoch({"epoch": epoch}, state, config, rank, config["epochs"])


def test_checkpoint_cadence_comes_from_params_and_a_callers_value_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    every2 = TrainParams(num_workers=0, checkpoint_every=2)
    state = run_training(cadence_loop, {"epochs": 5}, every2, stage="cadence", inputs=[])
    assert state == {"epoch": 4, "checkpoint_every": 2}  # the last epoch always reaches Ray
    tuned = run_training(cadence_loop, {"epochs": 3, "checkpoint_every": 1}, every2, stage="cadence", inputs=[])
    assert tuned["checkpoint_every"] == 1
    with pytest.raises(DataError, match="checkpoint_every"):
        run_training(cadence_loop, {"epochs": 1}, TrainParams(num_workers=0, checkpoint_every=0), stage="cadence", inputs=[])
