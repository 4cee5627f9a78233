"""The MLflow store belongs to its repo: a copy relocates it into itself; runs carry provenance."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = """
import json, sys
import mlflow
from pipelines.config import MlflowParams
from pipelines.tracking.runs import stage_run
from pathlib import Path
Path("note.txt").write_text("x")
with stage_run(MlflowParams(experiment="t", artifact_root=sys.argv[1]), "s",
               config={"data_path": str(Path("data/x.parquet").resolve()), "n": 1}, tags={}) as run:
    mlflow.log_artifact("note.txt")
print(json.dumps({"run_id": run.info.run_id, "artifact_uri": run.info.artifact_uri}))
"""


def _stage(cwd: Path, artifact_root: str = "mlruns/artifacts", **env) -> dict:
    import json

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, artifact_root], cwd=cwd, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _client(repo: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlruns/mlflow.db'}")


def test_copied_store_moves_into_the_copy_and_runs_carry_provenance(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    first = _stage(a, DVC_EXP_NAME="exp-1", DVC_EXP_BASELINE_REV="abc123", DVC_STAGE="head")
    assert first["artifact_uri"].startswith((a / "mlruns/artifacts").as_uri())
    shutil.copytree(a, b)
    shutil.rmtree(a / "mlruns" / "artifacts")  # the copy must not need the original
    second = _stage(b)
    assert second["artifact_uri"].startswith((b / "mlruns/artifacts").as_uri())
    assert (b / "mlruns/artifacts").exists() and not (a / "mlruns/artifacts").exists()
    client = _client(b)
    old = client.get_run(first["run_id"])
    assert old.info.artifact_uri.startswith(b.as_uri())  # the earlier run, relocated with the store
    assert [f.path for f in client.list_artifacts(first["run_id"])] == ["note.txt"]
    assert old.data.tags["dvc_experiment"] == "exp-1" and old.data.tags["git_revision"] == "abc123"
    assert old.data.tags["dvc_stage"] == "head"
    assert old.data.params["data_path"] == "data/x.parquet"  # repo-relative
    assert client.get_run(second["run_id"]).data.tags["dvc_experiment"] == "workspace"


def test_changed_artifact_root_is_an_error_naming_the_key(tmp_path):
    _stage(tmp_path)
    with pytest.raises(RuntimeError, match=r"mlflow\.artifact_root = 'elsewhere/artifacts'.*keeps its artifacts"):
        _stage(tmp_path, "elsewhere/artifacts")


def test_absolute_artifact_root_is_kept(tmp_path):
    shared = tmp_path / "shared-artifacts"
    repo = tmp_path / "r"
    repo.mkdir()
    run = _stage(repo, str(shared))
    assert run["artifact_uri"].startswith(shared.as_uri())
    assert _stage(repo, str(shared))["artifact_uri"].startswith(shared.as_uri())


def test_portable_paths():
    from pipelines.tracking.runs import portable

    root = Path("/repo")
    assert portable("/repo/data/x.parquet", root) == "data/x.parquet"
    assert portable("/repo", root) == "."
    assert portable("/elsewhere/x", root) == "/elsewhere/x"
    assert portable(3, root) == 3 and portable("rel/x", root) == "rel/x"
