"""The registered models import only what they declare.

Each model kind (TMCR, and the two image families) is logged as the stages log it, with the
requirements it declares by default; then a fresh Python process loads it and scores an image
while every top-level package outside those requirements (and their own dependencies), the
standard library and the project's ``pipelines`` is hidden: importing it raises
``ModuleNotFoundError``, as it would in a virtualenv built from the model's requirements.txt.
The same process reports its resident memory after loading and after large images.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from pipelines.tracking.scoring import SERVED_REQUIREMENTS, log_family_model, log_scoring_model
from tests.test_family_registry import save_state
from tests.test_registry import CARD, build_bundle

# A load that imports any of these is a bug, whatever the environment holds.
NEVER = {"ray", "ruamel", "dvc"}

CHILD = r"""
import importlib.abc, json, os, sys

allowed = set(json.loads(os.environ["IAA_ALLOWED_MODULES"]))
blocked = []


class Gate(importlib.abc.MetaPathFinder):
    # every finder goes through this one: a blocked package is not found (import raises
    # ModuleNotFoundError, importlib.util.find_spec gives None), as if it were not installed

    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if not (top in allowed or top in sys.stdlib_module_names or top in sys.builtin_module_names
                or top.startswith(("_cython_", "_cyutility", "_sysconfigdata_"))):  # Cython utility modules; build vars
            blocked.append(top)
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        return None

    def find_distributions(self, *args, **kwargs):  # importlib.metadata asks the finders too
        for finder in self.finders:
            if hasattr(finder, "find_distributions"):
                yield from finder.find_distributions(*args, **kwargs)

    def invalidate_caches(self):
        for finder in self.finders:
            if hasattr(finder, "invalidate_caches"):
                finder.invalidate_caches()


sys.meta_path[:] = [Gate(list(sys.meta_path))]
before = set(sys.modules)


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS"))


import mlflow.pyfunc
import pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
idle = rss_mb()
image = open(sys.argv[2], "rb").read()
out = model.predict(pd.DataFrame({"image": [image]}))
big = open(sys.argv[3], "rb").read()
for _ in range(3):
    out_big = model.predict(pd.DataFrame({"image": [big]}))
after_big = rss_mb()
print("RESULT", json.dumps({
    "score": out["score"][0], "error": out["error"][0], "big_error": out_big["error"][0],
    "modules": sorted({m.split(".")[0] for m in sys.modules}), "blocked": sorted(set(blocked)),
    "idle_rss_mb": idle, "after_big_rss_mb": after_big,
}))
"""


def _dist_closure(names: list[str]) -> set[str]:
    """The distributions ``names`` install: themselves and their dependencies (no extras), recursively."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this environment does not have
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def allowed_modules(requirements: list[str]) -> set[str]:
    """Top-level import names of the distributions the requirements install, plus ``pipelines``."""
    from packaging.utils import canonicalize_name

    dists = _dist_closure([r.split("==")[0] for r in requirements])
    allowed = {"pipelines"}
    for module, owners in metadata.packages_distributions().items():
        if any(canonicalize_name(o) in dists for o in owners):
            allowed.add(module)
    return allowed


def top_modules(dist: str) -> set[str]:
    from packaging.utils import canonicalize_name

    return {m for m, owners in metadata.packages_distributions().items() if canonicalize_name(dist) in
            {canonicalize_name(o) for o in owners} and not m.startswith("_")}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Model URIs of the three kinds, logged with their default requirements, and two images."""
    tmp = tmp_path_factory.mktemp("serve-imports")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("imports", artifact_location=(tmp / "art").as_uri())
    build_bundle(tmp / "bundle.pt")
    save_state(tmp / "aesaf" / "family.pt", "aesaf", "keep")
    save_state(tmp / "mnet" / "family.pt", "mnet", "square")
    models = {}
    with mlflow.start_run(experiment_id=exp):
        models["tmcr"] = log_scoring_model(tmp / "bundle.pt", CARD, registered_name=None).model_uri
        models["aesaf"] = log_family_model(tmp / "aesaf" / "family.pt", registered_name=None).model_uri
        models["mnet"] = log_family_model(tmp / "mnet" / "family.pt", registered_name=None).model_uri
    local = {k: mlflow.artifacts.download_artifacts(v, dst_path=str(tmp / "local" / k)) for k, v in models.items()}
    mlflow.set_tracking_uri(None)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp / "small.png")
    # a large photo-like JPEG (6000 x 4000 = 24 MP: under the 50 MP limit), as phones send them
    small = Image.fromarray(rng.integers(0, 255, (30, 45, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((6000, 4000), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    (tmp / "big.jpg").write_bytes(buf.getvalue())
    return local, tmp


@pytest.mark.parametrize("kind", ["tmcr", "aesaf", "mnet"])
def test_model_loads_and_scores_with_only_its_requirements(logged, kind):
    local, tmp = logged
    declared = (Path(local[kind]) / "requirements.txt").read_text().split()
    expected = SERVED_REQUIREMENTS[kind]
    assert [r.split("==")[0] for r in declared] == list(expected)
    assert all(r == f"{d}=={metadata.version(d)}" for r, d in zip(declared, expected))  # pinned to what is installed
    allowed = allowed_modules(declared)
    assert not NEVER & allowed
    env = {**os.environ, "IAA_ALLOWED_MODULES": json.dumps(sorted(allowed)), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, local[kind], str(tmp / "small.png"), str(tmp / "big.jpg")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert got["error"] is None and 1 <= got["score"] <= 10 and got["big_error"] is None
    assert not NEVER & set(got["modules"]), NEVER & set(got["modules"])
    # declared exactly: every declared distribution is imported by loading and scoring
    for dist in expected:
        assert top_modules(dist) & set(got["modules"]), f"{dist} is declared but not imported"
    print(f"{kind}: idle RSS {got['idle_rss_mb']} MB, after 3 x 24 MP JPEG {got['after_big_rss_mb']} MB; "
          f"blocked optional imports: {got['blocked']}")
    # large images do not leave the server at its peak: decoded pixels are freed and trimmed
    assert got["after_big_rss_mb"] - got["idle_rss_mb"] < 250


@pytest.mark.slow
def test_blocked_import_fails_loudly(logged):
    """The guard is real: with open_clip left out, the TMCR model cannot load."""
    local, tmp = logged
    declared = (Path(local["tmcr"]) / "requirements.txt").read_text().split()
    allowed = allowed_modules(declared) - {"open_clip"}
    env = {**os.environ, "IAA_ALLOWED_MODULES": json.dumps(sorted(allowed)), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, local["tmcr"], str(tmp / "small.png"), str(tmp / "big.jpg")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "ModuleNotFoundError: No module named 'open_clip'" in proc.stderr


def test_the_tag_matcher_the_served_model_uses_imports_no_kmeans():
    """Scoring computes TM with the training code's own TagMatcher; its module loads scikit-learn
    only inside the K-means functions, which serving never calls."""
    code = ("import sys\nfrom pipelines.semantics.match import TagMatcher\n"
            "print('sklearn' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]
