"""`mlflow models serve` answers real HTTP requests on loopback with the registered scoring model."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from pipelines.tracking import registry
from pipelines.tracking.scoring import log_scoring_model
from tests.test_registry import CARD, build_bundle, write_images

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _present(x) -> bool:
    return x is not None and x == x  # the server writes a missing value as null or NaN


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_models_serve_scores_paths_and_base64_bytes(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        exp = mlflow.create_experiment("serve", artifact_location=(tmp_path / "art").as_uri())
        build_bundle(tmp_path / "bundle.pt")
        with mlflow.start_run(experiment_id=exp):
            info = log_scoring_model(tmp_path / "bundle.pt", CARD, registered_name=None, pip_requirements=["mlflow"])
        registry.register(info.model_uri, "served", metrics={"val_srcc": 0.2}, dataset="demo", card=CARD, metric="val_srcc")
    finally:
        mlflow.set_tracking_uri(None)
    files = write_images(tmp_path / "imgs")

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/served@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.time() < deadline, "server did not answer /ping in 120 s:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)

        status, body = post(base + "/invocations", {
            "dataframe_split": {"columns": ["path"], "data": [[str(files["ok0"])], [str(files["text"])]]},
            "params": {"top_k": 2},
        })
        assert status == 200, body
        rows = body["predictions"]
        assert len(rows) == 2
        expected = rows[0]["score"]
        assert 1 <= expected <= 10 and not _present(rows[0]["error"])
        assert len(rows[0]["distribution"]) == 10 and len(rows[0]["top_semantic"]) == 2
        assert rows[1]["error"] and "UnidentifiedImageError" in rows[1]["error"]  # a per-row error, not a 500

        # image bytes travel base64-encoded in JSON; the binary signature decodes them
        b64 = base64.b64encode(files["ok0"].read_bytes()).decode()
        status, body = post(base + "/invocations", {"dataframe_records": [{"image": b64}]})
        assert status == 200, body
        assert body["predictions"][0]["score"] == pytest.approx(expected, abs=1e-5)

        # a request with neither column is a client error, and the server keeps serving
        status, body = post(base + "/invocations", {"dataframe_split": {"columns": ["x"], "data": [[1]]}})
        assert 400 <= status < 600
        with urllib.request.urlopen(base + "/ping", timeout=5) as r:
            assert r.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
