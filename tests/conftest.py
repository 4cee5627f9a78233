"""Test isolation shared by every test file."""

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri():
    """`mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI into the process
    environment; without this, one test's store would leak into the next test's stages."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    import sys

    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    if "mlflow" in sys.modules:  # reset the in-process default too
        import mlflow

        mlflow.set_tracking_uri(before or "")
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
