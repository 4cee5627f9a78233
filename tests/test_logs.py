"""A stage's terminal shows our messages and progress; third-party lines go to its log file."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = """
import logging, os, sys, warnings
from tqdm import tqdm
from stages.common import cli

@cli
def main():
    logging.getLogger("pipelines.demo").info("our message")
    logging.getLogger("mlflow.models").warning("third-party warning")
    logging.getLogger("ray.train").info("third-party info")
    warnings.warn("a python warning")
    os.write(2, b"E core_worker.cc: C-level noise\\n")
    for _ in tqdm(range(3), desc="progress"):
        pass

if __name__ == "__main__":
    main()
"""


def _run(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    pkg = tmp_path / "stages_x"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mystage.py").write_text(STAGE)
    clean = {k: v for k, v in os.environ.items() if k != "IAA_VERBOSE"}
    return subprocess.run([sys.executable, "-m", "stages_x.mystage"], cwd=tmp_path, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", **env})


def test_quiet_by_default_with_a_kept_log(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout + proc.stderr
    assert "our message" in shown and "progress: 100%" in shown
    for noise in ("third-party warning", "third-party info", "a python warning", "C-level noise"):
        assert noise not in shown, noise
    log = (tmp_path / "logs" / "mystage.log").read_text()
    for line in ("our message", "third-party warning", "third-party info", "a python warning", "C-level noise"):
        assert line in log, line


def test_verbose_shows_everything(tmp_path):
    proc = _run(tmp_path, IAA_VERBOSE="1")
    assert proc.returncode == 0, proc.stderr
    for line in ("our message", "third-party warning", "a python warning", "C-level noise", "progress: 100%"):
        assert line in proc.stderr, line
    assert "third-party warning" in (tmp_path / "logs" / "mystage.log").read_text()
