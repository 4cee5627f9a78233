"""Test isolation shared by every test file, and how pytest-xdist shares the files out."""

import os

import pytest

# Two pytest-xdist workers share the machine (pyproject.toml: -n 2): one compute thread per
# process (torch and BLAS here, and the stages and Ray workers the tests start, which inherit
# it), so that their thread pools do not spin against each other on a 2-core machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")


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


# The test files that read the session's tiny DAG (``dag_repo``). Under pytest-xdist they are one
# unit of work, run by one worker, so the DAG is built once; a test of another file that reads it fails.
DAG_FILES = frozenset({"test_e2e.py", "test_embed.py", "test_fault_tolerance.py", "test_reproduce.py", "test_secrets.py"})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``-n 2 --dist loadfile`` (pyproject.toml): one test file is one unit, so that a module's
    fixtures (a Ray cluster, a trained model) are built by one worker only; the DAG files are one
    unit together."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class DagFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "dag" if file.rsplit("/", 1)[-1] in DAG_FILES else file

    return DagFilesTogether(config, log)


def pytest_collection_modifyitems(config, items):
    """The DAG files run first (the longest unit of work), then the files with slow tests; the
    rest fill the gaps. The order within a file is kept."""
    slow = {it.path for it in items if it.get_closest_marker("slow")}
    items.sort(key=lambda it: (it.path.name not in DAG_FILES, it.path not in slow))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if "dag_repo" in item.fixturenames and item.path.name not in DAG_FILES:
        pytest.fail(f"{item.path.name} reads dag_repo: add it to DAG_FILES in tests/conftest.py", pytrace=False)
