"""MLflow runs for the pipeline stages (SQLite backend store by default).

The driver of each training/evaluation stage opens one run; Ray Train's rank-0 worker
logs per-epoch metrics into that run by id (``pipelines.train.log.EpochLogger``), so the same code logs from
a local process or a worker on a cluster (given a tracking URI both can reach).

The store belongs to the repo: ``mlflow.artifact_root`` (default ``mlruns/artifacts``) is
resolved against the repo root, and a copied or moved repo (whose SQLite store still names
the old folder, since MLflow keeps absolute locations) is relocated into itself the first
time a stage opens it (``relocate_store``). Every run is tagged with its DVC experiment
name, git revision and DVC stage, and logs repo-relative paths.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any, Iterator

from pipelines.config import MlflowParams, flatten
from pipelines.io import DataError

log = logging.getLogger(__name__)

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


# (table, column) pairs of the SQLite store that hold absolute artifact locations (MLflow 3.x)
_LOCATION_COLUMNS = (
    ("experiments", "artifact_location"), ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
)


def _sqlite_db(uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


def relocate_store(db: Path, old_root: Path, new_root: Path) -> int:
    """Rewrite the store's absolute locations under ``old_root`` to ``new_root`` (the repo
    was copied or moved with its ``mlruns/``); returns the number of rows changed."""
    changed = 0
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for old, new in ((old_root.as_uri(), new_root.as_uri()), (str(old_root), str(new_root))):
            for table, column in _LOCATION_COLUMNS:
                if table not in tables:
                    continue
                cur = con.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, old, len(old) + 1, old + "/"),
                )
                changed += cur.rowcount
    return changed


def _check_location(params: MlflowParams, uri: str, experiment: Any) -> None:
    """A store copied with its repo still names the old repo's artifact folder: move it home."""
    want = Path(params.artifact_root).resolve()
    have = experiment.artifact_location
    if have in (want.as_uri(), str(want)):
        return
    db = _sqlite_db(uri)
    repo = Path.cwd().resolve()
    relative = not Path(params.artifact_root).is_absolute()
    if db is None or not relative or not db.resolve().is_relative_to(repo) or not want.is_relative_to(repo):
        return  # a shared store (server, or a database or artifact folder outside this repo) keeps its locations
    tail = "/" + want.relative_to(repo).as_posix()
    for prefix in ("file://", ""):
        if have.startswith(prefix + "/") and have.endswith(tail):
            old_root = Path(have[len(prefix):-len(tail)] or "/")
            n = relocate_store(db, old_root, repo)
            log.info("MLflow store %s was copied from %s: %d locations now point into this repo.", db, old_root, n)
            return
    raise DataError(
        f"params.yaml mlflow.artifact_root = {params.artifact_root!r}, but MLflow experiment "
        f"{params.experiment!r} in {db} keeps its artifacts at {have}. Set mlflow.artifact_root back, "
        "or name a new mlflow.experiment."
    )


def setup(params: MlflowParams) -> str:
    """Point MLflow at the store and make sure the experiment exists, with its artifacts in
    this repo's ``mlflow.artifact_root``; return the URI."""
    import mlflow

    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.get_experiment_by_name(params.experiment)
    if experiment is None:
        root = Path(params.artifact_root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # created concurrently
            mlflow.create_experiment(params.experiment, artifact_location=root.as_uri())
    else:
        _check_location(params, uri, experiment)
    mlflow.set_experiment(params.experiment)
    return uri


def git_revision(cwd: str | Path = ".") -> str:
    """The commit the working tree is on (``DVC_EXP_BASELINE_REV`` inside ``dvc exp run``)."""
    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    if rev:
        return rev
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def provenance_tags() -> dict[str, str]:
    """Which DVC experiment, git revision and DVC stage a run belongs to."""
    return {
        "dvc_experiment": os.environ.get("DVC_EXP_NAME") or "workspace",
        "git_revision": git_revision(),
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
    }


def portable(value: Any, root: Path | None = None) -> Any:
    """An absolute path inside the repo as a repo-relative one (for params and tags)."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and os.path.isabs(value):
        root = root or Path.cwd().resolve()
        path = Path(value)
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix() or "."
    return value


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
        mlflow.set_tags({"stage": stage, **provenance_tags(), **tags})
        flat = {k: portable(v) for k, v in flatten(config).items()}
        flat = {k: (v if v is None or isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        yield run
