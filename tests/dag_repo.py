"""One tiny DAG in a temporary git + DVC repo, built once per test session (``dag_repo`` in
conftest.py) for the slow tests that run experiments on a copy of it (test_e2e), rerun its
stages (test_fault_tolerance, test_embed, test_reproduce) or search it (test_secrets): the files
of ``DAG_FILES`` in conftest.py, which pytest-xdist runs on one worker.

It is built the way a user with an LLM key exported would run it: ``dvc repro`` with
``OPENAI_API_KEY`` set in the environment of every stage, the tags stage in ``live`` mode
against the local chat server (tests/chat_server.py), and Ray's session files kept in a
folder of the test's own (``RAY_TMPDIR``). The pretrain stage runs one Ray worker actor,
the other training stages run Ray Train's local mode; one thread per process keeps the
numbers identical between runs of the same stage.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.chat_server import ChatServer
from tests.test_e2e import TINY, make_repo, merge
from tools.repro_check import read_metrics

CONFIG = merge(TINY, {
    "tags": {"llm": {"mode": "live", "batch_size": 16}},
    "embed": {"precision": "fp32", "batch_size": 8, "chunk_rows": 8, "num_workers": 1},
    "pretrain": {"epochs": 10, "batches_per_cluster": 4, "hidden": 32, "dim": 16, "ray": {"num_workers": 1}},
    "head": {"epochs": 10, "ray": {"num_workers": 0}},
    "selftrain": {"epochs": 8, "ray": {"num_workers": 0}},
    "model": {"epochs": 4, "ray": {"num_workers": 0}},
})


@dataclass
class DagRepo:
    repo: Path
    env: dict[str, str]
    key: str  # the API key every stage saw in its environment
    ray_dir: Path  # RAY_TMPDIR of every stage
    output: str  # what `dvc repro` printed (stdout + stderr)
    authorizations: list[str]  # the Authorization headers the chat server received
    metrics: dict[str, object]  # metrics/**/*.json right after `dvc repro`, before any test reruns a stage


def build(tmp: Path) -> DagRepo:
    key = f"sk-test-{secrets.token_hex(20)}"
    ray_dir = Path(tempfile.mkdtemp(prefix="iaa-ray-"))  # short: Ray's socket paths must fit 107 bytes
    with ChatServer() as server:
        repo, env = make_repo(tmp, merge(CONFIG, {"tags": {"llm": {"base_url": server.base_url}}}))
        env.update(OPENAI_API_KEY=key, RAY_TMPDIR=str(ray_dir), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"dvc repro failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        assert server.requests > 0, "the tags stage made no LLM request"
        return DagRepo(repo, env, key, ray_dir, proc.stdout + proc.stderr, list(server.authorizations), read_metrics(repo))


def cleanup(dag: DagRepo) -> None:
    shutil.rmtree(dag.ray_dir, ignore_errors=True)
