"""benchmarks/bench_gpu.py: its import closure holds no Ray, MLflow or DVC (they are blocked while it
runs), and its help is one self-contained page. (The benchmark itself: `--quick` on CPU, full size on CUDA.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def test_help_is_one_self_contained_page():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("--quick", "--no-compile", "--parts", "gpu.json", "channels_last", "GradScaler", "max_memory_allocated"):
        assert word in r.stdout, word


def test_import_closure_has_no_ray_mlflow_or_dvc_and_they_are_blocked():
    code = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench_gpu", {str(SCRIPT)!r})
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
m.main(["--imports-only"])
refused = {{}}
for name in ("ray", "ray.train.torch", "mlflow", "dvc.api"):
    try:
        __import__(name)
        refused[name] = False
    except ImportError as e:
        refused[name] = "must not import" in str(e)
print(json.dumps(refused))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    closure, refused = (json.loads(line) for line in r.stdout.strip().splitlines()[-2:])
    assert closure["blocked_loaded"] == []
    for mod in ("pipelines.models.amp", "pipelines.ranking.backbone", "pipelines.train.precision", "pipelines.images"):
        assert mod in closure["pipelines"], mod
    assert refused == {"ray": True, "ray.train.torch": True, "mlflow": True, "dvc.api": True}
