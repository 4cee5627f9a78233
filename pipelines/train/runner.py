"""Run a training loop through Ray Train, with stage-level resume.

``num_workers = 0`` is Ray Train's local mode (the loop runs in this process, no actors:
fast tests); ``>= 1`` starts that many Ray worker actors, on this machine or on the
cluster named by ``RAY_ADDRESS``. The loop code is the same either way.

Two kinds of resume:
- a worker that dies mid-run is restarted by Ray (``FailureConfig``) from the last
  checkpoint it reported (``ray.train.get_checkpoint()``);
- a stage killed from outside (Ctrl-C, OOM, a preempted node) leaves
  ``<runs>/<stage>-<fingerprint>/checkpoint/state.pt``; rerunning the stage with the same config
  and inputs continues from it. The fingerprint hashes the config and input files, so
  changed inputs never resume stale state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from pipelines.config import TrainParams
from pipelines.io import DataError, load_torch, save_torch, write_text

STATE_FILE = "state.pt"
# The checkpoint layout of ``pipelines.train.core.fit``; bumped when it changes. A resume file of
# another layout is refused with a message that says how to restart (never misread, never a
# silent retrain).
CHECKPOINT_VERSION = 2
CHECKPOINT_EVERY = 5


RUN_KEYS = ("run_id", "tracking_uri")  # where a run logs, not what it trains


def ray_config(config: Any) -> dict[str, Any]:
    """A loop's config as the plain dict Ray hands to the loop: a method's typed config
    (a dataclass: ``PretrainConfig``, ``HeadConfig``, ...) flattened, nested blocks included."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def fingerprint(config: dict[str, Any], inputs: list[str]) -> str:
    """What a resumable run is: its config (less ``RUN_KEYS``, new for every MLflow run) and inputs."""
    config = {k: v for k, v in config.items() if k not in RUN_KEYS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path in inputs:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def runs_dir() -> Path:
    return Path(os.environ.get("IAA_RUNS_DIR", "runs")).resolve()


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS``, else start a local Ray with ``num_cpus``
    (default: this machine's); its logs go where ``pipelines.logs`` sends them."""
    import ray

    from pipelines.logs import quiet_ray_loggers, quiet_ray_worker_output

    quiet_ray_loggers()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False)
    quiet_ray_worker_output()


def wait_for_resources(need: dict[str, float]) -> dict[str, float]:
    """The Ray cluster's resources once they cover ``need`` (e.g. ``{"GPU": 2}``), else as they
    are when the wait ends. A cluster named by ``RAY_ADDRESS`` may be autoscaling, so there the
    wait lasts up to ``IAA_GPU_WAIT_S`` seconds (default 600); a local one is checked once."""
    import time

    import ray

    wait = float(os.environ.get("IAA_GPU_WAIT_S", "600")) if os.environ.get("RAY_ADDRESS") else 0.0
    deadline = time.monotonic() + wait
    while True:
        have = ray.cluster_resources()
        if all(have.get(k, 0.0) >= v for k, v in need.items()) or time.monotonic() >= deadline:
            return have
        time.sleep(5)


def check_gpu(params: TrainParams, key: str, source: str = "params.yaml") -> None:
    """Fail in seconds, not hang, when ``<key>.use_gpu`` asks for GPUs that are not there.

    Local mode needs CUDA in this process; worker actors need ``num_workers`` GPUs in the Ray
    cluster. A cluster named by ``RAY_ADDRESS`` may be autoscaling GPU nodes, so there the check
    waits up to ``IAA_GPU_WAIT_S`` seconds (default 600) for them to join.
    """
    if not params.use_gpu:
        return
    how = f" (e.g. `dvc exp run -S {key}.use_gpu=false`)" if source == "params.yaml" else f" in {source}"
    fix = (f"Set {key}.use_gpu: false{how}, or run where GPUs are: a CUDA machine, "
           "or a Ray cluster with GPU nodes named by RAY_ADDRESS.")
    if params.num_workers == 0:
        if not torch.cuda.is_available():
            raise DataError(f"{source}: {key}.use_gpu is true with {key}.num_workers: 0 (local mode), "
                            f"but this machine has no CUDA GPU. {fix}")
        return
    need = params.num_workers
    res = wait_for_resources({"GPU": need})
    have, cpus = res.get("GPU", 0.0), res.get("CPU", 0.0)
    if have >= need:
        return
    raise DataError(f"{source}: {key}.use_gpu is true and {key}.num_workers = {need} asks for {need} GPU(s), "
                    f"but the Ray cluster has {have:g} GPU(s) (and {cpus:g} CPUs). {fix}")


def params_key(stage: str) -> str:
    """The params.yaml block of a training stage's ``ray`` settings (``family-mnet`` -> ``model.ray``)."""
    block = stage.split("-", 1)[0]
    return f"{'model' if block == 'family' else block}.ray"


def run_training(
    loop: Callable[[dict], None],
    config: Any,
    ray_params: TrainParams,
    *,
    stage: str,
    inputs: list[str],
    max_failures: int = 2,
) -> dict[str, Any]:
    """Fit ``loop`` with Ray Train; return the final state dict the loop checkpointed. ``config``: the
    loop's typed config or its dict, with the run's keys (``pipelines.train.core.RUN_KEYS``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if ray_params.checkpoint_every < 1:
        raise DataError(f"params.yaml: {stage}: ray.checkpoint_every = {ray_params.checkpoint_every}; use an integer >= 1.")
    config = ray_config(config)
    fp = fingerprint(config, inputs)
    run_name = f"{stage}-{fp}"
    resume = runs_dir() / run_name / "checkpoint" / STATE_FILE
    close_killed_run(resume.parent.parent, config)
    if (finished := finished_run(resume, config)) is not None:
        return finished
    # not part of the fingerprint: the cadence does not change what is trained; a caller's own
    # value (Tune trials report every epoch) wins
    config = {"checkpoint_every": ray_params.checkpoint_every, **config, "resume_path": str(resume)}
    from pipelines.logs import quiet_ray_loggers

    quiet_ray_loggers()  # local mode too: Ray Train logs from this process
    if ray_params.num_workers > 0:
        ensure_ray(max(ray_params.num_workers * ray_params.cpus_per_worker, os.cpu_count() or 1))
    check_gpu(ray_params, params_key(stage))
    resources = {"CPU": ray_params.cpus_per_worker}
    if ray_params.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=ray_params.num_workers, use_gpu=ray_params.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(runs_dir() / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{stage}: Ray Train finished without a checkpoint ({result.error})")
    with result.checkpoint.as_directory() as d:
        state = load_torch(Path(d) / STATE_FILE)
    remove_run(run_name)
    return state


# ---- helpers used inside the loops (on every worker) -------------------------------------


def worker_info() -> tuple[int, int, torch.device]:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def load_resume_state(config: dict) -> dict | None:
    """The state to continue from: the later of Ray's restored checkpoint and the stage's
    resume file (Ray may restore an older checkpoint than the last epoch rank 0 wrote)."""
    import ray.train

    states = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            states.append(load_torch(Path(d) / STATE_FILE))
    path = Path(config["resume_path"])
    if path.exists():
        states.append(load_torch(path))
    for state in states:
        check_version(state, path)
    return max(states, key=lambda s: s["epoch"], default=None)


def check_version(state: dict, path: Path) -> None:
    """Refuse a resume state written in another checkpoint layout, saying how to restart."""
    version = state.get("core_version", 1)
    if version != CHECKPOINT_VERSION:
        raise DataError(
            f"{path}: a resume checkpoint of layout {version}; this code reads layout {CHECKPOINT_VERSION} and cannot "
            f"continue from it. Delete {path.parent.parent} (or all of {runs_dir()}) and rerun the stage to train from the start.")


def report_epoch(metrics: dict[str, float], state: dict | None, config: dict, rank: int, epochs: int) -> None:
    """Checkpoint one epoch: rank 0 writes the resume point; Ray gets a report every
    ``config['checkpoint_every']`` epochs (``ray.checkpoint_every``, default 5) and at the last of ``epochs``.

    The resume file (replaced atomically) is written every epoch: it is cheap. A
    ``ray.train.report`` costs about a second with worker actors, and per-epoch metrics
    already reach MLflow from rank 0, so Ray only hears of the checkpoint epochs (rank 0
    attaches the checkpoint; Ray copies it to ``storage_path``). The decision depends on
    the epoch alone, so every worker reports the same number of times (it is a barrier).
    """
    import ray.train
    from ray.train import Checkpoint

    path = Path(config["resume_path"])
    if rank == 0 and state is not None:
        save_torch(state, path)
    epoch, every = int(metrics["epoch"]), config.get("checkpoint_every", CHECKPOINT_EVERY)
    if (epoch + 1) % every and epoch + 1 < epochs:
        return
    if rank == 0 and state is not None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path.parent)))
    else:
        ray.train.report(metrics)


RUN_ID_FILE = "mlflow_run_id"


def close_killed_run(run_dir: Path, config: dict[str, Any]) -> None:
    """Mark the MLflow run of a killed earlier attempt of this run KILLED (it would stay
    RUNNING forever), and remember this attempt's run (``config["run_id"]``)."""
    run_id = config.get("run_id")
    if not run_id:
        return
    marker = run_dir / RUN_ID_FILE
    if marker.exists() and (old := marker.read_text().strip()) and old != run_id:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config.get("tracking_uri"))
        try:
            if client.get_run(old).info.status == "RUNNING":
                client.set_tag(old, "resumed_by", run_id)
                client.set_terminated(old, "KILLED")
        except MlflowException:  # the old run lives in another store
            pass
    write_text(marker, run_id)


def finished_run(resume: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The final state of a run killed after its last epoch was saved but before the stage
    wrote its outputs, or None. Its last epoch's metrics (``state["metrics"]``) are logged
    again into the caller's MLflow run (``config["run_id"]``), which has seen no epoch."""
    if not resume.exists():
        return None
    state = load_torch(resume)
    check_version(state, resume)
    if "metrics" not in state or state["epoch"] + 1 < state.get("epochs", config.get("epochs", float("inf"))):
        return None
    from pipelines.train.log import EpochLogger

    EpochLogger(config.get("tracking_uri"), config.get("run_id"))(state["metrics"], state["epoch"])
    remove_run(resume.parent.parent.name)
    return state


def remove_run(run_name: str) -> None:
    """Delete a finished run's checkpoint and Ray's storage of it. Ray Train restores a run
    from its storage by name, so a kept one would make the next run of the same config and
    inputs (``dvc repro -f``) start from the final checkpoint and train nothing. The run's
    MLflow run id (``RUN_ID_FILE``) stays: a stage killed after this point, before it ends its
    MLflow run, leaves that run RUNNING, and the next attempt closes it (``close_killed_run``)."""
    shutil.rmtree(runs_dir() / "ray" / run_name, ignore_errors=True)
    shutil.rmtree(runs_dir() / run_name / "checkpoint", ignore_errors=True)


# ---- bit-exact resume: the random state travels with the checkpoint ----------------------


def rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """Every random state a loop draws from: torch's (CPU, CUDA), numpy's and Python's global
    generators, and the loop's own ``generators``. Stored in the resume state (tensors, ints
    and tuples only, so it loads with ``weights_only=True``), it makes a resumed run draw the
    same dropout masks, permutations and mixes as an uninterrupted one."""
    import random

    import numpy as np

    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
        "generators": [g.get_state() for g in generators],
    }


def restore_rng(state: dict[str, Any] | None, *generators: torch.Generator) -> None:
    """Put back what :func:`rng_state` captured (no-op for a state saved without it)."""
    if not state:
        return
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    random.setstate(state["python"])
    if len(state["generators"]) != len(generators):
        raise ValueError(f"resume state has {len(state['generators'])} generator(s), the loop {len(generators)}")
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s)
