"""Test isolation shared by every test file."""

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri():
    """`mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI into the process
    environment (and the stages export MLFLOW_REGISTRY_URI); without this, one test's store
    would leak into the next test's stages."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    registry_before = os.environ.get("MLFLOW_REGISTRY_URI")
    yield
    import sys

    if registry_before is None:
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
    else:
        os.environ["MLFLOW_REGISTRY_URI"] = registry_before

    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    if "mlflow" in sys.modules:  # reset the in-process default too
        import mlflow

        mlflow.set_tracking_uri(before or "")
        mlflow.set_registry_uri(registry_before)  # the CLI sets both (a later test's registry lookups follow it)
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        if registry_before is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


@pytest.fixture(scope="session")
def dag_repo(tmp_path_factory):
    """The tiny DAG of tests/dag_repo.py, run once by `dvc repro` and shared by the slow tests."""
    from tests.dag_repo import build, cleanup

    dag = build(tmp_path_factory.mktemp("dag"))
    yield dag
    cleanup(dag)
