"""The one training core: ``fit`` runs any method's epochs under Ray Train.

``fit`` owns what every loop shares: seeding, resume from a checkpoint (Ray's or the stage's
resume file), the epoch loop and its progress bar, rank-0 MLflow logging, keep-best selection on
a validation metric (SRCC by default, or EMD_2), checkpoints and ``ray.train.report``. A method (``Method``) supplies what differs:
its model (wrapped in DDP by ``ray.train.torch.prepare_model`` on more than one worker: gradients
are averaged inside backward, bucketed and overlapped), one epoch of steps, and its validation.

Sharding: ``Context.shard`` is the one rank-aware split of rows for every loop: a seeded partition
of the rows into ``world`` near-equal shards, fixed for the run (a worker reads only its own rows),
shuffled per epoch; ``Context.batches`` cuts a worker's epoch into the same number of batches on
every worker (DDP's collectives need the same number of steps everywhere).

Precision and the GPU speed options come from ``pipelines.train.precision`` (one policy).
Nothing here imports a method package (ranking, heads, selftrain, models) or tracking: they import
this module.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from pipelines.config import config_from
from pipelines.train.data import shard_rows
from pipelines.train.log import EpochLogger
from pipelines.train.runner import CHECKPOINT_VERSION, load_resume_state, report_epoch, restore_rng, rng_state, worker_info

def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy's global generators; return the loop's own generator."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def cpu_copy(state_dict: dict) -> dict:
    """A detached CPU copy of a state dict (safe to keep while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in state_dict.items()}


@dataclass
class Context:
    """What a method's worker knows: who it is, where it runs, and the run's generator."""

    rank: int
    world: int
    device: torch.device
    seed: int
    generator: torch.Generator = field(repr=False)

    def shard(self, n: int) -> np.ndarray:
        """This worker's rows of ``n`` (``shard_rows``: fixed for the run)."""
        return shard_rows(n, self.rank, self.world, self.seed)

    def batches(self, n_total: int, shard_size: int, batch_size: int) -> list[torch.Tensor]:
        """This epoch's batches of this worker: positions into its shard, shuffled by the run's
        generator, ``ceil(n_total / batch_size / world)`` of them on every worker. A batch of
        fewer than 2 rows (a short shard's tail) is replaced by the shard's first rows."""
        n_batches = max(1, math.ceil(n_total / batch_size / self.world))
        order = torch.randperm(shard_size, generator=self.generator)
        out = []
        for b in range(n_batches):
            rows = order[b * batch_size : (b + 1) * batch_size]
            out.append(rows if len(rows) >= 2 else order[:batch_size])
        return out

    def ddp(self, module: torch.nn.Module, **kwargs) -> torch.nn.Module:
        """``module`` wrapped in DDP across the workers (itself on one worker). The module must
        already be on ``device``; every parameter that requires a gradient must get one each step."""
        if self.world <= 1:
            return module
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=False, **kwargs)

    def all_reduce(self):
        """``torch.distributed.all_reduce`` on more than one worker, else None."""
        if self.world <= 1:
            return None
        import torch.distributed as dist

        return dist.all_reduce


class Method(Protocol):
    """What a training method supplies to ``fit``."""

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of optimizer steps on this worker's shard; its metrics (same keys on every worker)."""

    def validate(self, epoch: int) -> dict[str, float]:
        """Rank 0 only: validation metrics of the current weights (``val_srcc`` / ``val_emd2`` drive keep-best)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (model, optimizer, scheduler, scaler, ...) and what the stage keeps."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` (a resume)."""

    def selectable(self) -> dict[str, Any]:
        """The parts of the state that keep-best keeps from the best epoch (e.g. ``{"model": ...}``),
        as detached CPU copies (``cpu_copy``): training goes on after they are taken."""


# the keys of a loop's Ray config that belong to the run, not the method: the seed, where it logs,
# where it resumes from, how often it reports (``run_training`` and ``train_stage`` add them)
RUN_KEYS = ("seed", "tracking_uri", "run_id", "resume_path", "checkpoint_every")


def method_config(cls: type, config: dict[str, Any] | Any, loop: str):
    """The method's typed, frozen config (``cls``) from a loop's Ray config (the run's keys aside).
    An unknown, missing or mistyped key fails here, at the loop's start, naming the loop and the key."""
    if not isinstance(config, dict):
        return config_from(cls, config, f"the {loop} loop's config")
    return config_from(cls, {k: v for k, v in config.items() if k not in RUN_KEYS}, f"the {loop} loop's config")


@dataclass(frozen=True)
class FitOptions:
    """The loop-independent part of a run's config."""

    epochs: int
    desc: str
    keep_best: bool = False  # keep the ``selectable()`` parts of the epoch best on ``select_on``
    select_on: str = "val_srcc"  # a key of SELECT_ON

    def __post_init__(self):
        if self.select_on not in SELECT_ON:
            raise ValueError(f"select_on = {self.select_on!r}; use one of {', '.join(SELECT_ON)}")


# validation metrics keep-best can select on, and the sign that makes larger better
SELECT_ON = {"val_srcc": 1.0, "val_emd2": -1.0}


def improves(metrics: dict[str, float], best: dict | None, select_on: str) -> bool:
    """Whether this epoch's ``metrics`` beat the kept ``best`` on ``select_on`` (the first of equal
    values stays; an epoch without the metric, e.g. too few validation rows, never wins)."""
    sign = SELECT_ON[select_on]
    value = metrics.get(select_on)
    if value is None or not np.isfinite(value):
        return False
    if best is None:
        return True
    kept = best["selected_on"] if "selected_on" in best else best["val_srcc"]  # a layout-2 state chose on val_srcc
    return sign * value > sign * kept


def fit(make_method, config: dict[str, Any], options: FitOptions) -> None:
    """Train ``make_method(ctx)`` for ``options.epochs`` epochs on this Ray Train worker."""
    rank, world, device = worker_info()
    ctx = Context(rank, world, device, int(config["seed"]), seed_everything(int(config["seed"])))
    method = make_method(ctx)
    start, best = 0, None
    if (state := load_resume_state(config)) is not None:
        method.load_state_dict(state)
        start, best = state["epoch"] + 1, state.get("best")
        restore_rng(state.get("rng"), ctx.generator)
    log = EpochLogger(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    epochs = range(start, options.epochs)
    for epoch in tqdm(epochs, desc=options.desc, disable=rank != 0, initial=start, total=options.epochs):
        t0 = time.perf_counter()
        metrics = {"epoch": epoch, **method.train_epoch(epoch)}
        metrics.setdefault("epoch_s", time.perf_counter() - t0)
        state = None
        if rank == 0:
            metrics.update(method.validate(epoch))
            log(metrics, epoch)
            if options.keep_best and improves(metrics, best, options.select_on):
                best = {**method.selectable(), "epoch": epoch, "val_srcc": metrics.get("val_srcc", np.nan),
                        "selected_on": metrics[options.select_on]}
            state = {**method.state_dict(), "epoch": epoch, "started_at_epoch": start, "best": best,
                     "rng": rng_state(ctx.generator), "metrics": metrics, "core_version": CHECKPOINT_VERSION,
                     "epochs": options.epochs}
            if epoch + 1 == options.epochs:
                state.update(selected(state))
        report_epoch(metrics, state, config, rank, options.epochs)


def selected(state: dict) -> dict:
    """The weights the stage keeps: those of the best validation epoch (``select_on``) when keep-best found
    one (the baselines select the same way), else the last epoch's."""
    best = state.get("best")
    if best is None:
        return {"selected_epoch": state["epoch"]}
    kept = {k: v for k, v in best.items() if k not in ("epoch", "val_srcc", "selected_on")}
    return {**kept, "selected_epoch": best["epoch"], "selected_val_srcc": best["val_srcc"]}
