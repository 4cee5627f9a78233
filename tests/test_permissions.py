"""Files the pipeline writes get the permissions the umask gives (0644 under umask 022), so a
teammate or a server running as another user can read stage outputs, metrics and artifacts."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipelines.io import atomic_path, current_umask, write_json, write_parquet, write_text

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    write_json(tmp_path / "m" / "head.json", {"srcc": 0.5})
    write_text(tmp_path / "a.txt", "x\n")
    write_parquet(tmp_path / "t.parquet", pd.DataFrame({"a": [1, 2]}))
    with atomic_path(tmp_path / "model.pt") as tmp:
        import torch

        torch.save({"w": torch.zeros(2)}, tmp)
    for name in ("m/head.json", "a.txt", "t.parquet", "model.pt"):
        assert _mode(tmp_path / name) == expected, f"{name}: {oct(_mode(tmp_path / name))} under umask {oct(mask)}"
    assert not list(tmp_path.rglob("*.tmp"))


def test_overwrite_takes_the_umask_not_the_old_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "metrics.json"
    target.write_text("{}")
    target.chmod(0o600)  # a file left owner-only by an older version
    write_json(target, {"a": 1})
    assert _mode(target) == 0o644


def test_a_stage_process_writes_readable_files(tmp_path):
    """A stage run as a program (its own process, umask 022) writes 0644 metrics."""
    code = ("import os; os.umask(0o022); from stages.common import write_metrics; "
            "write_metrics('head', {'head': {'srcc': 0.1}}, ['head'], random_weights=True)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)
    assert _mode(tmp_path / "metrics" / "head.json") == 0o644
    assert _mode(tmp_path / "metrics" / "details" / "head.json") == 0o644


def test_torch_files_are_byte_for_byte_reproducible(tmp_path):
    """The same state saved twice gives the same bytes (DVC sees an unchanged model as unchanged)."""
    import torch

    from pipelines.io import save_torch

    state = {"w": torch.arange(6.0).reshape(2, 3), "epoch": 3}
    save_torch(state, tmp_path / "a.pt")
    save_torch(state, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], state["w"])


def test_model_files_record_repo_relative_paths(tmp_path, monkeypatch):
    """The config a model file keeps names paths relative to the checkout, so two clones write the same file."""
    from stages.common import portable

    monkeypatch.chdir(tmp_path)
    cfg = {"features_path": str(tmp_path / "data" / "f.parquet"), "root": str(tmp_path), "weights_path": "/elsewhere/w.pt",
           "cr_path": None, "lr": 0.1}
    assert portable(cfg) == {"features_path": "data/f.parquet", "root": ".", "weights_path": "/elsewhere/w.pt",
                             "cr_path": None, "lr": 0.1}
