"""The README's commands, run as written where feasible, so that the README cannot drift: the
`iaa` lines and the Python scoring snippet (on a tiny registered `tmcr-demo` model in
`mlruns/mlflow.db`), the `dvc exp show` view (on the committed metrics files), and the test
command that `.ci/run` must run word for word."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def iaa_lines() -> list[str]:
    return [ln.strip() for block in code_blocks("bash") for ln in block.splitlines() if ln.strip().startswith("iaa ")]


def block_after(heading_text: str) -> str:
    start = README.index(heading_text)
    return re.search(r"```bash\n(.*?)```", README[start:], flags=re.S)[1].strip()


def run_iaa(line: str, *extra: str) -> tuple[int, str, str]:
    argv = shlex.split(line)[1:] + list(extra)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def test_ci_runs_the_readme_test_command():
    command = block_after("Run the test suite")
    assert command.startswith("python3 -m venv .venv") and command.endswith("-m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines()
    install = block_after("Install and run the main job")
    assert install.startswith('python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"')  # the same install as CI


def test_readme_iaa_lines_are_valid_commands():
    lines = iaa_lines()
    assert {shlex.split(ln)[1] for ln in lines} >= {"--help", "score", "serve", "models", "runs", "export"}
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv == ["--help"]:
            continue
        args = cli.parser().parse_args(argv)  # argparse exits 2 on an unknown option
        assert callable(args.func), line


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A repo root as the README assumes it: params.yaml, `tmcr-demo@champion` in mlruns/mlflow.db,
    photos/, more/**/*.png and list.csv."""
    from tests.test_serve import register_served_model

    root = tmp_path_factory.mktemp("readme")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    register_served_model(root / "mlruns", name="tmcr-demo")
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "photos" / "cat.jpg")
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "photos" / "dog.png")
    (root / "more" / "a").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(root / "more" / "a" / "x.png")
    pd.DataFrame({"path": ["photos/dog.png"]}).to_csv(root / "list.csv", index=False)
    return root


def test_readme_iaa_commands_run_as_written(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    seen = set()
    for line in iaa_lines():
        command = shlex.split(line)[1]
        seen.add(command)
        if command == "serve":  # serving runs forever: the same line, printing what it would run
            rc, out, err = run_iaa(line, "--dry-run")
            assert rc == 0, err
            assert f"MLFLOW_TRACKING_URI=sqlite:///{workspace}/mlruns/mlflow.db" in out
            assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false" in out and f"IAA_SERVE_PATH_ROOT={workspace}/photos" in out
            continue
        rc, out, err = run_iaa(line)
        if command == "export":
            try:
                import pipelines.export.onnx  # noqa: F401
            except ModuleNotFoundError:
                assert rc == 2 and "pipelines/export/onnx.py is missing" in err
                continue
        assert rc == 0, (line, err)
        if command == "--help":
            assert out.startswith("usage: iaa")
        elif command == "models":
            assert "models:/tmcr-demo/1" in out and "champion" in out
        elif command == "runs":
            assert "FINISHED" in out
    assert seen >= {"--help", "score", "serve", "models", "runs", "export"}
    one = json.loads((workspace / "cat.json").read_text())
    assert len(one) == 1 and one[0]["error"] is None and 1 <= one[0]["score"] <= 10
    many = pd.read_parquet(workspace / "scores.parquet")
    assert sorted(Path(p).name for p in many["path"]) == ["cat.jpg", "dog.png", "dog.png", "x.png"]
    assert many["error"].isna().all()
    assert not (workspace / "mlflow.db").exists()  # no stray store in the working directory


def test_readme_python_snippet_scores(workspace, monkeypatch):
    (snippet,) = [b for b in code_blocks("python") if "registry import load" in b]
    monkeypatch.chdir(workspace)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "README.md", "exec"), {})
    text = out.getvalue()
    assert "score" in text and "None" in text  # one row, its error None
    score = float(text.strip().splitlines()[-1].split()[1])
    assert 1 <= score <= 10


def test_readme_exp_show_view_puts_test_srcc_first(tmp_path):
    """The README's `dvc exp show` line on a repo with the committed metrics files and params.yaml
    (CSV output added so the columns can be read)."""
    (line,) = [ln for b in code_blocks("bash") for ln in b.splitlines() if ln.startswith("dvc exp show --only-changed")]
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    for f in (ROOT / "metrics").glob("*.json"):
        shutil.copy(f, repo / "metrics" / f.name)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    metrics = [{f"metrics/{f.name}": {"cache": False}} for f in sorted((repo / "metrics").glob("*.json"))]
    (repo / "dvc.yaml").write_text(json.dumps({"stages": {"s": {"cmd": "true", "params": ["head", "tags"], "metrics": metrics}}}))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "base"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    for f in (repo / "metrics").glob("*.json"):  # an experiment's results: every number changed
        f.write_text(re.sub(r"(?<=: )(-?\d+\.\d+)", lambda m: str(float(m[1]) + 0.01), f.read_text()))
    text = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(re.sub(r"(?m)^(  min_count: ).*$", r"\g<1>4", text, count=1))  # a changed param
    argv = [sys.executable, "-m", "dvc", *shlex.split(line)[1:], "--csv"]
    proc = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    columns = proc.stdout.splitlines()[0].split(",")
    data = [c for c in columns if c not in ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor")]
    assert data[:6] == ["head.acc", "head.plcc", "head.srcc", "selftrain.acc", "selftrain.plcc", "selftrain.srcc"], columns
    assert "tags.min_count" in data  # the changed param
    assert not [c for c in data if c.endswith(("emd2", "mae_L", "mae_M", "mae_H")) or c in ("random_weights", "val_srcc")]
    assert len(data) <= 12, data
