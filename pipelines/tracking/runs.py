"""MLflow runs for the pipeline stages (SQLite backend store by default).

The driver of each training/evaluation stage opens one run; Ray Train's rank-0 worker
logs per-epoch metrics into that run by id (``EpochLogger``), so the same code logs from
a local process or a worker on a cluster (given a tracking URI both can reach).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from pipelines.config import MlflowParams, flatten

RANDOM_WEIGHTS_WARNING = "RANDOM CLIP WEIGHTS: not a real result (demo fallback; no pretrained weights were available)"


def tracking_uri(params: MlflowParams) -> str:
    """Resolve a relative SQLite path against the working directory (the repo root)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        db = Path(uri[len(prefix):]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = prefix + str(db)
    return uri


def setup(params: MlflowParams) -> str:
    """Point MLflow at the store and make sure the experiment exists; return the URI."""
    import mlflow

    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(params.experiment) is None:
        root = Path(params.artifact_root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # created concurrently
            mlflow.create_experiment(params.experiment, artifact_location=root.as_uri())
    mlflow.set_experiment(params.experiment)
    return uri


def weights_tags(card: dict) -> dict[str, str]:
    """Tags that say which CLIP weights the features came from (stamped on every run)."""
    tags = {"clip_model": str(card.get("model")), "clip_weights": str(card.get("weights"))}
    if card.get("random_weights"):
        tags["random_weights"] = "true"
        tags["WARNING"] = RANDOM_WEIGHTS_WARNING
    else:
        tags["random_weights"] = "false"
    return tags


@contextlib.contextmanager
def stage_run(params: MlflowParams, stage: str, *, config: dict[str, Any], tags: dict[str, str]) -> Iterator[Any]:
    """An MLflow run for one stage with its params and tags logged."""
    import mlflow

    setup(params)
    with mlflow.start_run(run_name=stage) as run:
        mlflow.set_tags({"stage": stage, **tags})
        flat = {k: (v if v is None or isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flatten(config).items()}
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        yield run


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
