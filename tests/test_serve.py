"""`mlflow models serve` answers real HTTP requests on loopback with the registered scoring model:
strict JSON out, per-row errors, paths only under the operator's root, and short 400s."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from pipelines.tracking import registry
from pipelines.tracking.scoring import log_scoring_model
from tests.test_registry import CARD, build_bundle, write_images

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strict_json(raw: bytes):
    """Parse as a strict JSON parser does: bare NaN / Infinity are errors."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(raw, parse_constant=refuse)


def post(url: str, body, content_type: str = "application/json", timeout: float = 60) -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, strict_json(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, strict_json(raw or b"{}")
        except ValueError:
            return e.code, raw.decode(errors="replace")


def register_served_model(tmp_path: Path, name: str = "served") -> str:
    """The tiny TMCR scoring model registered as ``name`` (champion) in a sqlite store; returns its URI."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env_before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        exp = mlflow.create_experiment("serve", artifact_location=(tmp_path / "art").as_uri())
        build_bundle(tmp_path / "bundle.pt")
        with mlflow.start_run(experiment_id=exp):
            info = log_scoring_model(tmp_path / "bundle.pt", CARD, registered_name=None, pip_requirements=["mlflow"])
        registry.register(info.model_uri, name, metrics={"val_srcc": 0.2}, dataset="demo", card=CARD, metric="val_srcc")
    finally:  # reset the in-process URIs and the variables they export (a module-scoped fixture calls
        # this before the conftest's per-test reset takes its snapshot)
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return uri


@contextlib.contextmanager
def serving(tmp_path: Path, uri: str, env: dict[str, str] | None = None, name: str = "served"):
    """``mlflow models serve`` (env manager local, one worker) on 127.0.0.1 at a free port; yields
    (base URL, the server's Popen). Pickled pyfunc models are disallowed, so only a model logged
    from code can start. The server's process group is stopped at the end."""
    port = free_port()
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}",
                "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", **(env or {})}
    log_path = tmp_path / f"serve-{port}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.time() < deadline, "server did not answer /ping in 120 s:\n" + log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield base, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels but carries a few bytes of data
    (what a decompression bomb looks like from its header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    """One registered model for the module (a sqlite store takes tens of seconds to create here)."""
    tmp = tmp_path_factory.mktemp("serve")
    return register_served_model(tmp), tmp


def test_models_serve_scores_safely(store, tmp_path):
    uri, _ = store
    files = write_images(tmp_path / "imgs")
    (tmp_path / "secret.txt").write_text("outside the root")
    env = {"IAA_SERVE_PATH_ROOT": str(tmp_path / "imgs"), "IAA_SERVE_MAX_ROWS": "8"}
    with serving(tmp_path, uri, env) as (base, _):
        status, body = post(base + "/invocations", {
            "dataframe_split": {"columns": ["path"], "data": [[str(files["ok0"])], [str(files["text"])], ["ok1.png"],
                                                              [str(tmp_path / "secret.txt")], ["../secret.txt"], ["/etc/passwd"]]},
            "params": {"top_k": 2},
        })
        assert status == 200, body
        rows = body["predictions"]
        assert len(rows) == 6
        expected = rows[0]["score"]
        assert 1 <= expected <= 10 and rows[0]["error"] is None and 1 <= rows[2]["score"] <= 10
        assert len(rows[0]["distribution"]) == 10 and len(rows[0]["top_semantic"]) == 2
        assert rows[1]["score"] is None and rows[1]["distribution"] is None  # null, never NaN
        assert rows[1]["error"].startswith("not a readable JPEG, PNG") and "12 bytes" in rows[1]["error"]
        rule = "'path' must name a file under the serving path root."
        assert [r["error"] for r in rows[3:]] == [rule] * 3  # the same answer whether the file exists or not

        # image bytes travel base64-encoded in JSON; bad bytes and bombs are per-row errors
        good = b64(files["ok0"].read_bytes())
        status, body = post(base + "/invocations", {"dataframe_records": [
            {"image": good}, {"image": b64(b"\xff\xd8\xff\xe0 not really")}, {"image": "not base64!"}, {"image": 42},
            {"image": b64(png_header(50_000, 50_000))}, {"image": b64(png_header(10_000, 10_000))}, {}]})
        assert status == 200, body
        rows = body["predictions"]
        assert rows[0]["score"] == pytest.approx(expected, abs=1e-5) and rows[0]["error"] is None
        errors = [r["error"] for r in rows[1:]]
        assert "starting ff d8 ff e0" in errors[0] and "BytesIO" not in errors[0]
        assert "not base64" in errors[1] and errors[2] == "'image' must be image bytes or base64 text, not int."
        assert "too large to decode" in errors[3] and "2500000000 pixels" in errors[3]
        assert errors[4] == "the image is 10000 x 10000 = 100000000 pixels; the limit is 50000000 (IAA_SERVE_MAX_PIXELS)."
        assert errors[5] == "the row has neither 'image' bytes nor a 'path'."
        assert all(r["score"] is None for r in rows[1:])

        # request-level errors: one short 400 in MLflow's error shape, naming the columns / the limit
        status, body = post(base + "/invocations", {"dataframe_split": {"columns": ["x"], "data": [[1]]}})
        assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body
        assert "no 'image' or 'path' column; this model reads the columns 'image'" in body["message"]
        assert len(body["message"]) < 400
        status, body = post(base + "/invocations", {"dataframe_records": [{"image": good}] * 9})
        assert status == 400 and "9 rows in one request; the limit is 8" in body["message"]
        status, body = post(base + "/invocations", {"dataframe_records": [{"image": good}], "params": {"top_k": -1}})
        assert status == 400 and "top_k = -1" in body["message"]
        status, body = post(base + "/invocations", {"dataframe_records": []})
        assert status == 400 and "no 'image' or 'path' column" in body["message"]
        status, body = post(base + "/invocations", {"dataframe_split": {"columns": ["image"], "data": []}})
        assert status == 200 and body == {"predictions": []}
        with urllib.request.urlopen(base + "/ping", timeout=5) as r:
            assert r.status == 200


def test_paths_are_off_by_default_when_serving(store, tmp_path):
    """No IAA_SERVE_PATH_ROOT: every path is refused with the rule, bytes still score."""
    from pipelines.tracking.scoring import Limits

    assert Limits.load({}, environ={}).path_root is None
    uri, _ = store
    files = write_images(tmp_path / "imgs")
    raw = files["ok0"].read_bytes()
    with serving(tmp_path, uri) as (base, _):
        status, body = post(base + "/invocations", {"dataframe_records": [{"path": str(files["ok0"])}, {"image": b64(raw)}]})
    assert status == 200, body
    refused, scored = body["predictions"]
    assert refused["score"] is None and refused["error"].startswith("'path' inputs are off on this server")
    assert scored["error"] is None and 1 <= scored["score"] <= 10


def test_limits_from_config_and_environment(tmp_path):
    from mlflow.exceptions import MlflowException

    from pipelines.tracking.scoring import Limits, decode_image

    env = {"IAA_SERVE_MAX_ROWS": "5", "IAA_SERVE_MAX_PIXELS": "100", "IAA_SERVE_PATH_ROOT": str(tmp_path)}
    limits = Limits.load({"path_root": ""}, environ=env)  # an empty config value is unset: the environment counts
    assert (limits.max_rows, limits.max_pixels, limits.path_root) == (5, 100, tmp_path.resolve())
    (tmp_path / "x").mkdir()
    assert Limits.load({"path_root": str(tmp_path / "x")}, environ=env).path_root == (tmp_path / "x").resolve()  # config wins
    with pytest.raises(MlflowException, match="IAA_SERVE_MAX_ROWS / model_config max_rows = 'many': give a whole number"):
        Limits.load({}, environ={"IAA_SERVE_MAX_ROWS": "many"})
    with pytest.raises(MlflowException, match="path_root = .*: not a folder"):
        Limits.load({}, environ={"IAA_SERVE_PATH_ROOT": str(tmp_path / "nowhere")})
    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 11, 3), np.uint8)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="10 = 110 pixels; the limit is 100"):
        decode_image(buf.getvalue(), limits)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PPM")  # PIL reads PPM, the scorer does not
    with pytest.raises(ValueError, match="not a readable JPEG"):
        decode_image(buf.getvalue(), limits)
