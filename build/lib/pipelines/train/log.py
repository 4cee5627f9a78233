"""Rank-0 epoch metrics into an existing MLflow run (by id), from any Ray Train worker."""

from __future__ import annotations


class EpochLogger:
    """Logs per-epoch metrics into an existing run; picklable, for Ray Train workers."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.tracking_uri, self.run_id = tracking_uri, run_id

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if not self.run_id:
            return
        import time

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=batch)

