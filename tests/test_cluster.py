"""cluster/: the manifests parse and say what the README says; a job runs on a real `ray start --head`.

The head is started with ``--block`` in its own session and stopped by killing that process
group (never ``ray stop``, which would stop every Ray on the machine), on a free port and
its own temp dir.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def test_cluster_yaml_cpu_head_gpu_workers():
    cfg = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    assert workers and all(w["resources"]["GPU"] >= 1 and w["max_workers"] >= 1 for w in workers)
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("mlflow server" in c for c in cfg["head_start_ray_commands"])
    assert any("IAA_RUNS_DIR" in c for c in cfg["setup_commands"])


def test_rayjob_runs_dvc_repro_on_gpu_workers():
    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "dvc repro" in spec["entrypoint"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["IAA_RUNS_DIR"].startswith("/mnt/shared") and env["MLFLOW_TRACKING_URI"].startswith("http")
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~60 s on 2 shared CPUs: a head, a Train controller and a worker start
def test_training_job_against_a_local_ray_head(tmp_path):
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Token auth off for this throw-away loopback head and its job only (Ray >= 2.59 enables it by
    # default and would share ~/.ray/auth_token with other sessions on this machine).
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp_dir}",
         "--include-dashboard=false", "--disable-usage-stats",
         f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
         # worker ports below the kernel's ephemeral range, where _free_port() picks the others
         f"--min-worker-port={10000 + port % 10000}", f"--max-worker-port={10000 + port % 10000 + 200}"],
        env=env, stdout=open(tmp_path / "head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        from tests.synthetic import make_features

        make_features(tmp_path / "features.parquet")
        script = textwrap.dedent(f"""
            import json, ray, torch
            from pathlib import Path
            from pipelines.config import TrainParams
            from pipelines.ranking.index import build_index
            from pipelines.io import write_parquet
            from pipelines.train.data import embedding_files, load_features
            from pipelines.ranking.pretrain import pretrain_loop
            from pipelines.train.runner import run_training
            tmp = Path({str(tmp_path)!r})
            train = load_features(tmp / "features.parquet", tmp / "embeddings").split_of("train")
            index, _ = build_index(train.cluster, train.score, low=2, high=9, n_per_bin="auto")
            write_parquet(tmp / "index.parquet", index)
            config = {{"features_path": str(tmp / "features.parquet"), "embeddings_path": str(tmp / "embeddings"),
                      "index_path": str(tmp / "index.parquet"),
                      "epochs": 2, "lr": 3e-3, "weight_decay": 0.05, "tau": 0.1, "hidden": 16, "dim": 8,
                      "dropout": 0.0, "batches_per_cluster": 3, "low": 2, "high": 9, "seed": 0}}
            state = run_training(pretrain_loop, config, TrainParams(num_workers=1), stage="pretrain",
                                 inputs=[str(tmp / "features.parquet"), str(tmp / "index.parquet")]
                                        + [str(f) for f in embedding_files(tmp / "embeddings")])
            ctx = ray.get_runtime_context()
            print("JOB", json.dumps({{"epoch": state["epoch"], "gcs": ctx.gcs_address,
                                     "cpus": ray.cluster_resources().get("CPU")}}))
        """)
        job_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "IAA_RUNS_DIR": str(tmp_path / "runs")}
        deadline = time.time() + 60
        while "Ray runtime started" not in (tmp_path / "head.log").read_text(errors="replace"):
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "ray head did not come up:\n" + (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        out = subprocess.run([sys.executable, "-c", script], env=job_env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-4000:]
        import json

        (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("JOB ")]
        job = json.loads(line[4:])
        assert job["epoch"] == 1
        assert job["gcs"].endswith(f":{port}")  # it joined our head, not a fresh local Ray
        assert job["cpus"] == 1.0
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group (`ray start --block` stops its own processes), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
