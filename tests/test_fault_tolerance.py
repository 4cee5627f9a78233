"""A Ray Train worker actor killed mid-run is restarted by Ray (FailureConfig) and resumes from
its last checkpoint, through the same ``run_training`` the stages use."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from pipelines.config import TrainParams
from pipelines.io import write_parquet
from pipelines.ranking.index import build_index
from pipelines.train.data import embedding_files, load_features
from pipelines.ranking.pretrain import pretrain_loop
from pipelines.io import DataError
from pipelines.train.runner import CHECKPOINT_VERSION, run_training
from tests.synthetic import make_features

EPOCHS = 5
KILL_AFTER_EPOCH = 1


def _kill_self_once(config: dict) -> None:
    """Watch the resume file; once it holds epoch >= KILL_AFTER_EPOCH, SIGKILL this worker (once)."""
    marker = Path(config["kill_marker"])
    resume = Path(config["resume_path"])
    while not marker.exists():
        if resume.exists():
            try:
                epoch = torch.load(resume, map_location="cpu", weights_only=False)["epoch"]
            except Exception:  # mid-replace: read it again
                epoch = -1
            if epoch >= KILL_AFTER_EPOCH:
                marker.write_text(f"{os.getpid()} {epoch}")
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.005)


def crashing_pretrain_loop(config: dict) -> None:
    """The real pretrain loop, in a worker that kills itself once after an epoch's checkpoint."""
    if not Path(config["kill_marker"]).exists():
        threading.Thread(target=_kill_self_once, args=(config,), daemon=True).start()
    with open(Path(config["kill_marker"]).with_suffix(".pids"), "a") as f:
        f.write(f"{os.getpid()}\n")
    pretrain_loop({k: v for k, v in config.items() if k != "kill_marker"})


@pytest.fixture()
def ray_2cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_killed_worker_resumes_from_last_checkpoint(tmp_path, ray_2cpu):
    emb_dir = make_features(tmp_path / "features.parquet")
    train = load_features(tmp_path / "features.parquet", emb_dir).split_of("train")
    index, _ = build_index(train.cluster, train.score, low=2, high=9, n_per_bin="auto")
    write_parquet(tmp_path / "index.parquet", index)
    config = {
        "features_path": str(tmp_path / "features.parquet"), "embeddings_path": str(emb_dir),
        "index_path": str(tmp_path / "index.parquet"), "epochs": EPOCHS, "lr": 3e-3, "weight_decay": 0.05, "tau": 0.1, "hidden": 32, "dim": 16, "dropout": 0.0,
        "batches_per_cluster": 10, "low": 2, "high": 9, "seed": 0, "kill_marker": str(tmp_path / "killed"),
    }
    state = run_training(
        crashing_pretrain_loop, config, TrainParams(num_workers=1), stage="pretrain",
        inputs=[str(tmp_path / "features.parquet"), *map(str, embedding_files(emb_dir)), str(tmp_path / "index.parquet")],
        max_failures=2,
    )
    killed_pid, killed_epoch = map(int, (tmp_path / "killed").read_text().split())
    pids = [int(p) for p in (tmp_path / "killed.pids").read_text().split()]
    assert len(pids) == 2 and pids[0] == killed_pid and pids[1] != killed_pid  # a second worker process
    assert killed_epoch >= KILL_AFTER_EPOCH
    assert state["epoch"] == EPOCHS - 1
    # the restarted worker continued after a checkpoint, not from scratch. It restores the last
    # checkpoint Ray had registered, which may be an epoch or two behind the file the stage wrote
    # just before the kill (reports reach the controller asynchronously).
    assert 1 <= state["started_at_epoch"] <= killed_epoch + 1



def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    """What a resumed loop draws after restoring the checkpointed random state equals what the
    uninterrupted loop drew: torch, numpy, Python and the loop's own generator."""
    import random as pyrandom

    import numpy as np

    from pipelines.train.runner import restore_rng, rng_state

    def draws(gen):
        return (torch.rand(3).tolist(), torch.randperm(9, generator=gen).tolist(), np.random.rand(2).tolist(),
                pyrandom.random(), torch.nn.functional.dropout(torch.ones(8), 0.5).tolist())

    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1), np.random.seed(2), pyrandom.seed(4)
    draws(gen)
    torch.save({"rng": rng_state(gen)}, tmp_path / "state.pt")
    expected = draws(gen)
    torch.manual_seed(9), np.random.seed(9), pyrandom.seed(9)  # a fresh process seeds anew
    gen = torch.Generator().manual_seed(3)
    restore_rng(torch.load(tmp_path / "state.pt", weights_only=True)["rng"], gen)
    assert draws(gen) == expected


def test_fingerprint_ignores_the_mlflow_run_but_not_the_config(tmp_path):
    from pipelines.train.runner import fingerprint

    (tmp_path / "x").write_bytes(b"data")
    base = fingerprint({"lr": 1e-3, "run_id": "a", "tracking_uri": "sqlite:///a.db"}, [str(tmp_path / "x")])
    assert base == fingerprint({"lr": 1e-3, "run_id": "b", "tracking_uri": "sqlite:///b.db"}, [str(tmp_path / "x")])
    assert base != fingerprint({"lr": 2e-3, "run_id": "a"}, [str(tmp_path / "x")])


def test_run_killed_after_its_last_epoch_finishes_from_its_state(tmp_path, monkeypatch):
    """Killed after the last epoch's checkpoint but before the stage wrote its outputs: the rerun
    trains nothing, returns that state, logs its last metrics into the new MLflow run, closes the
    killed attempt's MLflow run and removes the checkpoint (the MLflow run id stays)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.train.runner import RUN_ID_FILE, STATE_FILE, close_killed_run, fingerprint

    monkeypatch.setenv("IAA_RUNS_DIR", str(tmp_path / "runs"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    killed, new = (client.create_run(exp).info.run_id for _ in range(2))
    (tmp_path / "in").write_bytes(b"inputs")
    config = {"epochs": 3, "lr": 0.1}
    run_dir = tmp_path / "runs" / f"s-{fingerprint(config, [str(tmp_path / 'in')])}"
    close_killed_run(run_dir, {**config, "run_id": killed, "tracking_uri": uri})  # the killed attempt's start
    assert (run_dir / RUN_ID_FILE).read_text() == killed
    (run_dir / "checkpoint").mkdir(parents=True)
    final = {"model": {"w": torch.ones(2)}, "epoch": 2, "metrics": {"epoch": 2, "loss": 0.25}}
    torch.save(final, run_dir / "checkpoint" / STATE_FILE)  # a checkpoint of the layout before the training core
    with pytest.raises(DataError, match=r"a resume checkpoint of layout 1; this code reads layout 2.*Delete .*s-.*rerun the stage"):
        run_training(lambda c: None, {**config, "run_id": new, "tracking_uri": uri}, TrainParams(num_workers=0),
                     stage="s", inputs=[str(tmp_path / "in")])
    torch.save({**final, "core_version": CHECKPOINT_VERSION}, run_dir / "checkpoint" / STATE_FILE)

    def must_not_train(config):
        raise AssertionError("trained again")

    state = run_training(must_not_train, {**config, "run_id": new, "tracking_uri": uri}, TrainParams(num_workers=0),
                         stage="s", inputs=[str(tmp_path / "in")])
    assert state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.ones(2))
    assert client.get_run(new).data.metrics == {"epoch": 2.0, "loss": 0.25}
    assert client.get_run(killed).info.status == "KILLED" and client.get_run(killed).data.tags["resumed_by"] == new
    assert not (run_dir / "checkpoint").exists() and (run_dir / RUN_ID_FILE).read_text() == new
    # killed after its checkpoint was removed, before the stage ended its MLflow run: the next attempt closes it
    third = client.create_run(exp).info.run_id
    close_killed_run(run_dir, {**config, "run_id": third, "tracking_uri": uri})
    assert client.get_run(new).info.status == "KILLED" and client.get_run(new).data.tags["resumed_by"] == third
    mlflow.set_tracking_uri("")


# ---- the whole stage killed from outside (SIGKILL to its process group), then rerun ----------
#
# Each long stage of the shared tiny DAG (tests/dag_repo.py, whose `dvc repro` gives the
# uninterrupted reference) is started again from scratch as a subprocess, killed at a random
# point once it has written a chunk or a checkpoint, and rerun. Nothing it left may be
# half-written; the rerun must resume, not restart, and end with the same outputs, to the
# bit, as the uninterrupted run with the same seed.

import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

from pipelines.embed.cache import chunk_error, list_parts, read_image_embeddings  # noqa: E402

REGISTRY_KEYS = ("registered", "alias")  # a rerun registers a new version


@dataclass
class StageSpec:
    outputs: tuple[str, ...]
    started: Callable[[Path], bool]  # has it written something to resume from?
    compare: Callable[[Path, Path, int], None]  # (reference copy, repo, resume epoch at the kill) after the rerun
    run: str = ""  # a training stage's run name (its resume file: runs/<run>-*/checkpoint)


def _resume_epoch(repo: Path, run: str) -> int:
    """The epoch in the stage's resume file (-1: none yet, or mid-replace)."""
    for path in repo.glob(f"runs/{run}-*/checkpoint/state.pt"):
        try:
            return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
        except Exception:  # noqa: BLE001 - replaced while we read it
            return -1
    return -1


def _same_model(ref: Path, new: Path) -> dict:
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (ref, new))
    assert a["model"].keys() == b["model"].keys()
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"{new.name}: tensors differ from the uninterrupted run: {differ[:5]}"
    assert a["epoch"] == b["epoch"] and a.get("selected_epoch") == b.get("selected_epoch")
    return b


def _same_json(ref: Path, new: Path) -> None:
    a, b = (json.loads(p.read_text()) for p in (ref, new))
    for k in REGISTRY_KEYS:
        a.pop(k, None), b.pop(k, None)
    assert a == b, f"{new.name} differs from the uninterrupted run:\n{a}\n{b}"


def _compare_training(model: str, metrics: str) -> Callable[[Path, Path, int], None]:
    def compare(ref: Path, repo: Path, killed_at: int) -> None:
        state = _same_model(ref / model, repo / model)
        # killed after its last epoch: the rerun takes that state as is; after its run folder was
        # removed (outputs being written): it starts afresh, rightly
        if 0 <= killed_at < state["epoch"]:
            assert state["started_at_epoch"] >= 1, "the rerun started from scratch instead of resuming"
        _same_json(ref / metrics, repo / metrics)

    return compare


def _compare_embed(ref: Path, repo: Path, killed_at: int) -> None:
    ref_ids, ref_emb = read_image_embeddings(ref / "data/embeddings/images")
    ids, emb = read_image_embeddings(repo / "data/embeddings/images")
    assert sorted(ids) == sorted(ref_ids)
    pos = {i: k for k, i in enumerate(ids)}
    assert np.array_equal(emb[[pos[i] for i in ref_ids]], ref_emb)
    for name in ("tags.parquet", "card.json"):
        assert (repo / "data/embeddings" / name).read_bytes() == (ref / "data/embeddings" / name).read_bytes(), name
    report = json.loads((repo / "data/embeddings/report.json").read_text())
    assert report["n_resumed"] > 0, "the rerun embedded every image again"
    assert report["n_resumed"] + report["n_embedded_now"] + report["n_skipped"] == report["n_total"]


STAGES = {
    "embed": StageSpec(
        ("data/embeddings",), lambda repo: bool(list_parts(repo / "data/embeddings/images")), _compare_embed
    ),
    "pretrain": StageSpec(
        ("models/cr_encoder.pt", "metrics/pretrain.json"), lambda repo: _resume_epoch(repo, "pretrain") >= 1,
        _compare_training("models/cr_encoder.pt", "metrics/pretrain.json"), "pretrain",
    ),
    "head": StageSpec(
        ("models/head.pt", "metrics/head.json"), lambda repo: _resume_epoch(repo, "head") >= 1,
        _compare_training("models/head.pt", "metrics/head.json"), "head",
    ),
    "selftrain": StageSpec(
        ("models/selftrain.pt", "metrics/selftrain.json"), lambda repo: _resume_epoch(repo, "selftrain") >= 1,
        _compare_training("models/selftrain.pt", "metrics/selftrain.json"), "selftrain",
    ),
    "family": StageSpec(
        ("models/family.pt", "metrics/family.json"), lambda repo: _resume_epoch(repo, "family-aesaf") >= 1,
        _compare_training("models/family.pt", "metrics/family.json"), "family-aesaf",
    ),
}


def _copy(paths: tuple[str, ...], src: Path, dst: Path) -> None:
    for rel in paths:
        target = dst / rel
        if target.is_dir():
            shutil.rmtree(target)
        target.unlink(missing_ok=True)
        if (src / rel).is_dir():
            shutil.copytree(src / rel, target)
        elif (src / rel).exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, target)


def _kill_at_random_point(repo: Path, env: dict, stage: str, spec: StageSpec, rng: random.Random) -> None:
    """Start the stage; once it has something to resume from, wait a random 0-0.3 s and SIGKILL
    its whole process group (the driver and any Ray processes it started)."""
    log = (repo / f"{stage}.killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=repo, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not spec.started(repo):
            assert proc.poll() is None, f"{stage} ended before the kill point:\n{(repo / f'{stage}.killed.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{stage}: nothing to resume from after 300 s"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.3))
        assert proc.poll() is None, f"{stage} finished before the kill: make its tiny config longer"
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while True:  # every process of the stage's group is gone
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"{stage}: processes of the killed group survive"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _nothing_half_written(repo: Path, outputs: tuple[str, ...]) -> None:
    """Every output file that exists is complete: it parses (temporary files aside)."""
    for rel in outputs:
        path = repo / rel
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] * path.exists()
        for f in files:
            if f.name.endswith(".tmp"):
                continue
            if f.suffix == ".pt":
                torch.load(f, map_location="cpu", weights_only=True)
            elif f.suffix == ".json":
                json.loads(f.read_text())
            elif f.name.startswith("part-"):
                assert chunk_error(f) is None, f
            elif f.suffix == ".parquet":
                import pyarrow.parquet as pq

                pq.read_table(f)


def _leftovers(repo: Path) -> list[str]:
    skip = (".git", ".dvc")
    tmp = [str(p.relative_to(repo)) for p in repo.rglob("*.tmp") if not p.relative_to(repo).parts[0] in skip]
    resume = [str(p.relative_to(repo)) for p in (*repo.glob("runs/*/checkpoint"), *repo.glob("runs/ray/*"))]
    return tmp + resume


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_killed_at_random_point_resumes_to_the_same_result(stage, dag_repo, tmp_path):
    repo, env = dag_repo.repo, dag_repo.env
    spec = STAGES[stage]
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    print(f"{stage}: kill seed {seed}")  # shown on failure, to replay the same kill point
    reference = tmp_path / "reference"
    _copy(spec.outputs, repo, reference)
    try:
        _copy(spec.outputs, tmp_path / "nothing", repo)  # start from scratch, as `dvc repro -f` would
        _kill_at_random_point(repo, env, stage, spec, rng)
        killed_at = _resume_epoch(repo, spec.run) if spec.run else -1
        print(f"{stage}: killed with the resume file at epoch {killed_at}")
        _nothing_half_written(repo, spec.outputs)
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"rerun of {stage} failed (kill seed {seed}):\n{proc.stderr[-4000:]}"
        spec.compare(reference, repo, killed_at)
        assert not _leftovers(repo), f"left behind after the rerun: {_leftovers(repo)}"
        if stage != "embed":  # the killed attempt's MLflow run is closed, not left RUNNING
            from mlflow.tracking import MlflowClient

            client = MlflowClient(f"sqlite:///{repo / 'mlruns/mlflow.db'}")
            ids = [e.experiment_id for e in client.search_experiments()]
            assert not client.search_runs(ids, "attributes.status = 'RUNNING'")
            assert client.search_runs(ids, "attributes.status = 'KILLED'")
    finally:
        _copy(spec.outputs, reference, repo)  # the next stage's inputs stay the reference
