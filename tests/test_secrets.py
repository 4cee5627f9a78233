"""The LLM API key reaches the LLM server and nothing else: no log, MLflow param or tag,
report, cache, output or Ray session file holds it, and an error that quotes it is redacted."""

from __future__ import annotations

import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipelines.io import DataError
from pipelines.tags.library import resolve_config
from pipelines.tags.llm import REDACTED, LLMConfig, LLMError, extract_llm


def files_holding(roots: list[Path], needles: list[bytes]) -> list[str]:
    """Every regular file under ``roots`` whose bytes contain one of ``needles``."""
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                hits += [f"{path} ({needle[:12].decode()}...)" for needle in needles if needle in data]
    return hits


def needles_of(key: str) -> list[bytes]:
    """The key, and its random part alone (so a key quoted with another prefix is found too)."""
    return [key.encode(), key.rsplit("-", 1)[-1].encode()]


@pytest.mark.slow
def test_api_key_appears_nowhere_after_the_live_llm_path(dag_repo, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    key, repo = dag_repo.key, dag_repo.repo
    # the live path really ran, with the key: the server got it on every request
    assert dag_repo.authorizations and set(dag_repo.authorizations) == {f"Bearer {key}"}
    recorded = (repo / "config/llm_replay.jsonl").read_text().splitlines()
    assert recorded and all(json.loads(line)["response"] for line in recorded)
    assert json.loads((repo / "data/tags/report.json").read_text())  # the tags report exists

    # the search finds the key where it is (so an empty result means something)
    canary = tmp_path / "canary" / "x.log"
    canary.parent.mkdir()
    canary.write_text(f"Authorization: Bearer {key}\n")
    assert files_holding([canary.parent], needles_of(key))

    # every file: repo (logs, reports, outputs, MLflow store and artifacts, DVC cache and
    # lock, replay cache, git) and Ray's session folder (its logs, the worker's stdout/stderr)
    assert (repo / "mlruns").is_dir() and any(dag_repo.ray_dir.rglob("*.log")), "no Ray session logs to search"
    assert files_holding([repo, dag_repo.ray_dir], needles_of(key)) == []
    assert not any(n.decode() in dag_repo.output for n in needles_of(key)), "dvc repro printed the key"

    # MLflow params, tags and metrics of every run, and the registry's model and version tags
    client = MlflowClient(f"sqlite:///{repo / 'mlruns/mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert {r.data.tags.get("stage") for r in runs} >= {"pretrain", "head", "selftrain", "evaluate", "family"}
    texts = [json.dumps({"params": r.data.params, "tags": r.data.tags}) for r in runs]
    models = client.search_registered_models()
    assert models, "nothing was registered"
    for m in models:
        texts.append(json.dumps(m.tags))
        texts += [json.dumps(v.tags) + str(v.source) for v in client.search_model_versions(f"name='{m.name}'")]
    assert not [t for t in texts for n in needles_of(key) if n.decode() in t]
    mlflow.set_tracking_uri("")


class _QuotingServer(BaseHTTPRequestHandler):
    """Answers every request with a 401 that quotes the Authorization header, as some servers do."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        auth = self.headers.get("Authorization", "")
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {auth}", "type": "invalid_request_error"}})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


def test_an_error_that_quotes_the_key_is_redacted(tmp_path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _QuotingServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    key = f"sk-test-{secrets.token_hex(20)}"
    try:
        cfg = LLMConfig(mode="live", base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key_env="TEST_KEY")
        with pytest.raises(LLMError) as err:
            extract_llm(["a sharp photo of a cat"], cfg, tmp_path / "replay.jsonl", environ={"TEST_KEY": key})
    finally:
        httpd.shutdown()
        httpd.server_close()
    message = str(err.value)
    assert "401" in message and REDACTED in message and key not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # the quoting error is dropped
    assert not (tmp_path / "replay.jsonl").exists()  # nothing recorded


def test_a_key_in_params_instead_of_its_variable_name_is_refused_without_echoing_it():
    key = f"sk-test-{secrets.token_hex(20)}"
    with pytest.raises(DataError, match="tags.llm.api_key_env: must be the NAME") as err:
        resolve_config({"llm": {"mode": "live", "api_key_env": key}})
    assert key not in str(err.value) and key[-8:] not in str(err.value)
