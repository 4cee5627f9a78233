"""A failed experiment leaves the workspace whole: params.yaml is checked by the first stage
(`validate_params`), before DVC deletes any stage's outputs to rerun it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipelines.io import DataError
from tests.test_e2e import git, make_repo

ROOT = Path(__file__).resolve().parents[1]
GUARD = "data/params_valid.json"

# A stage shaped like `head`: reads head.* params, writes a cached model and a git-tracked metrics file.
TRAIN = (
    "import json, pathlib; from pipelines.config import load_params; p = load_params('params.yaml'); "
    "pathlib.Path('models').mkdir(exist_ok=True); pathlib.Path('models/head.pt').write_text(str(p.head.lr)); "
    "pathlib.Path('metrics').mkdir(exist_ok=True); pathlib.Path('metrics/head.json').write_text(json.dumps({'lr': p.head.lr}))"
)


def project_dvc_yaml() -> dict:
    return YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())


def test_every_stage_depends_on_validate_params():
    stages = project_dvc_yaml()["stages"]
    assert stages["validate_params"]["outs"] == [GUARD]
    assert stages["validate_params"]["params"] == [{"params.yaml": None}]  # the whole file
    missing = [name for name, s in stages.items() if name != "validate_params" and GUARD not in s.get("deps", [])]
    assert missing == []


def test_validate_params_output_does_not_depend_on_valid_values(tmp_path, monkeypatch):
    from stages import validate_params

    monkeypatch.chdir(tmp_path)
    text = (ROOT / "params.yaml").read_text()
    Path("params.yaml").write_text(text)
    validate_params.main()
    first = Path(GUARD).read_bytes()
    Path("params.yaml").write_text(re.sub(r"(?m)^(  lr: ).*$", r"\g<1>0.5", text, count=1))
    validate_params.main()
    assert Path(GUARD).read_bytes() == first
    Path("params.yaml").write_text(text.replace("\nhead:\n", "\nhead:\n  lrr: 1\n", 1))
    with pytest.raises(DataError, match="head.lrr"):
        validate_params.main.__wrapped__()


def dvc_run(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)


def tracked(repo: Path) -> dict[str, bytes]:
    return {f: (repo / f).read_bytes() for f in ("metrics/head.json", "models/head.pt", "dvc.lock") if (repo / f).exists()}


def write_dag(repo: Path, guarded: bool) -> None:
    spec = {"stages": {
        "validate_params": project_dvc_yaml()["stages"]["validate_params"],
        "head": {"cmd": f'python -c "{TRAIN}"', "deps": ([GUARD] if guarded else []) + ["pipelines/config.py"],
                 "params": ["head.lr"], "outs": ["models/head.pt"], "metrics": [{"metrics/head.json": {"cache": False}}]},
    }}
    if not guarded:
        del spec["stages"]["validate_params"]
    yaml = YAML()
    with open(repo / "dvc.yaml", "w") as f:
        yaml.dump(spec, f)


@pytest.mark.slow
def test_a_bad_experiment_deletes_nothing_and_recovers(tmp_path):
    repo, env = make_repo(tmp_path, {})
    write_dag(repo, guarded=True)
    assert dvc_run(repo, env, "repro").returncode == 0
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-q", "-m", "baseline")
    baseline = tracked(repo)
    assert set(baseline) == {"metrics/head.json", "models/head.pt", "dvc.lock"}

    # a bad value: validate_params fails first, naming the key; nothing tracked is deleted
    proc = dvc_run(repo, env, "exp", "run", "-S", "head.lr=fast")
    assert proc.returncode != 0
    assert "'head.lr' must be float, got 'fast'" in proc.stderr
    assert tracked(repo) == baseline
    assert "fast" in (repo / "params.yaml").read_text()  # DVC leaves the -S value in params.yaml
    # the README's recovery: params back, outputs from the cache, and the workspace is clean
    git(repo, env, "checkout", "--", "params.yaml")
    assert dvc_run(repo, env, "checkout").returncode == 0
    status = dvc_run(repo, env, "status")
    assert "up to date" in status.stdout, status.stdout
    assert git(repo, env, "status", "--porcelain") == ""

    # a typo added with DVC's own `+key` hint is an unknown key
    proc = dvc_run(repo, env, "exp", "run", "-S", "+head.lrr=1")
    assert proc.returncode != 0 and "head.lrr" in proc.stdout + proc.stderr
    assert tracked(repo) == baseline
    git(repo, env, "checkout", "--", "params.yaml")
    dvc_run(repo, env, "checkout")

    # a valid change reruns `head`; the guard's output is the same file, so it is no reason to rerun
    proc = dvc_run(repo, env, "exp", "run", "-S", "head.lr=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((repo / "metrics/head.json").read_text()) == {"lr": 0.5}
    git(repo, env, "reset", "-q", "--hard")
    dvc_run(repo, env, "checkout", "-f")

    # without the guard, DVC deletes the stage's outputs before the stage finds the bad value
    write_dag(repo, guarded=False)
    assert dvc_run(repo, env, "repro").returncode == 0
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-q", "-m", "unguarded")
    assert dvc_run(repo, env, "exp", "run", "-S", "head.lr=fast").returncode != 0
    assert not (repo / "models/head.pt").exists() and not (repo / "metrics/head.json").exists()


def test_evaluate_registers_a_version_only_when_the_scoring_model_changed(tmp_path):
    """`evaluate` registers through `registry.register_unless_known`: a rerun with an equal scoring
    model (equal content, even from another `torch.save`) returns the registered version and logs
    nothing; a changed model is a new version."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from pipelines.io import load_torch
    from pipelines.tracking import registry
    from pipelines.tracking.scoring import log_scoring_model
    from tests.test_registry import CARD, build_bundle

    reqs = ["mlflow"]
    build_bundle(tmp_path / "a.pt")
    build_bundle(tmp_path / "b.pt")  # the same model, written again
    digest = registry.scoring_digest(tmp_path / "a.pt", CARD, reqs)
    assert registry.scoring_digest(tmp_path / "b.pt", CARD, reqs) == digest
    changed = load_torch(tmp_path / "a.pt")
    changed["model"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in changed["model"].items()}
    torch.save(changed, tmp_path / "c.pt")
    assert registry.scoring_digest(tmp_path / "c.pt", CARD, reqs) != digest
    assert registry.scoring_digest(tmp_path / "a.pt", CARD, ["mlflow", "timm"]) != digest

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        exp = mlflow.create_experiment("eval", artifact_location=(tmp_path / "art").as_uri())
        logged = []

        def register(path):
            def log():
                logged.append(path.name)
                return log_scoring_model(path, CARD, registered_name="m", pip_requirements=reqs)
            tags = {"metrics": {"val_srcc": 0.3}, "dataset": "demo", "card": CARD, "extra": {"data": "demo"}}
            with mlflow.start_run(experiment_id=exp):
                return registry.register_unless_known("m", registry.scoring_digest(path, CARD, reqs), log, **tags)

        assert register(tmp_path / "a.pt") == ("1", "champion")
        assert register(tmp_path / "b.pt") == ("1", "champion")  # a rerun: nothing logged
        assert register(tmp_path / "c.pt") == ("2", "challenger")  # a tie keeps the champion
        assert logged == ["a.pt", "c.pt"]
        versions = MlflowClient().search_model_versions("name = 'm'")
        assert sorted(str(v.version) for v in versions) == ["1", "2"]
        assert MlflowClient().get_model_version("m", "1").tags[registry.DIGEST_TAG] == digest
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def test_model_digest_covers_scalar_tensors():
    """A BatchNorm's ``num_batches_tracked`` is a 0-d tensor: it is hashed like any other, and
    a different value gives another digest (an image E_CR's bundle holds such tensors)."""
    import torch

    from pipelines.tracking import registry

    a = registry.model_digest([{"bn.num_batches_tracked": torch.tensor(3), "w": torch.ones(2, dtype=torch.bfloat16)}])
    b = registry.model_digest([{"bn.num_batches_tracked": torch.tensor(4), "w": torch.ones(2, dtype=torch.bfloat16)}])
    assert a != b and a == registry.model_digest([{"bn.num_batches_tracked": torch.tensor(3), "w": torch.ones(2, dtype=torch.bfloat16)}])
