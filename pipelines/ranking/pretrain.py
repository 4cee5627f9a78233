"""Contrastive pretraining of E_CR on balanced-level batches (TMCR sec. 3.3), as a ``fit`` method.

``PretrainConfig.encoder``: ``embedding`` (the MLP E_CR over the cached CLIP embedding) or ``image``
(``PretrainConfig.image``: a timm / torchvision backbone under the same MLP, trained on pixels with
TMCR's augmentation, decoded by ``loader_workers`` processes, in the precision and with the speed
options of ``pipelines.train.precision``). One optimizer step takes ``batches_per_step`` balanced
batches (``auto``: one per worker); each worker takes its own share of them, accumulates their
gradients, and DDP averages them across workers: the step is the same as one worker taking all
of them.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipelines.config import ImageEncoderParams
from pipelines.data.manifest import image_paths
from pipelines.images import TrainViews, batch_loader, check_decode, check_images
from pipelines.io import DataError
from pipelines.ranking.backbone import ImageCREncoder
from pipelines.ranking.encoder import CREncoder
from pipelines.ranking.index import BalancedBatchSampler, score_bins
from pipelines.ranking.loss import traversal_contrastive_loss
from pipelines.train.core import Context, FitOptions, fit, method_config
from pipelines.train.data import embedding_dim, load_features, read_embedding_rows
from pipelines.train.precision import (
    FP32, Speed, check_speed, enable_tf32, maybe_compile, optimizer, prepare_module, resolve_precision, speed_of, to_device,
)

ENCODERS = ("embedding", "image")


@dataclass(frozen=True)
class PretrainConfig:
    """The pretrain loop's config: ``stages.pretrain.pretrain_config`` builds it from params, for
    the stage and for Tune (``pretrain.*`` keys; ``low`` / ``high`` are ``index.*``)."""

    features_path: str | Path
    index_path: str | Path
    epochs: int
    lr: float
    weight_decay: float
    tau: float
    hidden: int
    dim: int
    dropout: float
    batches_per_cluster: int
    low: int
    high: int
    encoder: str = "embedding"
    batches_per_step: int | str = "auto"
    embeddings_path: str | Path | None = None  # encoder: embedding
    manifest_path: str | Path | None = None  # encoder: image
    root: str | None = None  # encoder: image (relative image paths resolve against it)
    image: ImageEncoderParams | None = None  # encoder: image

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"pretrain.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder == "image" and (self.image is None or self.manifest_path is None or self.root is None):
            raise ValueError("pretrain.encoder: image needs image, manifest_path and root")
        if self.encoder == "embedding" and self.embeddings_path is None:
            raise ValueError("pretrain.encoder: embedding needs embeddings_path")


def steps_of(batches_per_step: int | str, world: int) -> int:
    """Balanced batches per optimizer step (all workers together): ``auto`` = one per worker."""
    n = world if batches_per_step == "auto" else int(batches_per_step)
    if n < 1 or n % world:
        raise ValueError(f"pretrain.batches_per_step = {batches_per_step!r}: need a multiple of the {world} worker(s), or auto")
    return n


def _rows_tensor(emb: torch.Tensor, local: np.ndarray, spec) -> torch.Tensor:
    """A batch's embeddings from a shard: ``local`` maps a train row to its row of ``emb``."""
    return emb[torch.from_numpy(local[np.asarray(spec[0], dtype=np.int64)])]


def _epoch_shard(cache, image_id: np.ndarray, specs) -> tuple[torch.Tensor, np.ndarray]:
    """The embeddings of the train rows in ``specs`` (read from the cache, nothing else) and the
    map from a train row to its row of that array."""
    rows = np.unique(np.concatenate([np.asarray(b, dtype=np.int64) for b, _ in specs])) if specs else np.zeros(0, np.int64)
    local = np.full(len(image_id), -1, dtype=np.int64)
    local[rows] = np.arange(len(rows))
    return torch.from_numpy(read_embedding_rows(cache, image_id[rows])), local


def pretrain_images(config: PretrainConfig, train) -> list[str]:
    """The image file of every train row (``config``: ``manifest_path``, ``root``), checked on disk
    for the rows the balanced sampler can pick."""
    paths = image_paths(config.manifest_path, train.image_id, config.root)
    index = pd.read_parquet(config.index_path)
    picked = sorted({int(r) for m in index.loc[index["active"], "members"] for r in m})
    check_images([paths[r] for r in picked], what="rows the balanced sampler picks (pretrain.encoder: image)",
                 fix="restore the files or rebuild the manifest (`dvc repro prepare`), then rerun `dvc repro pretrain`.")
    return paths


class Pretrain:
    """The traversal contrastive method: E_CR, AdamW, the balanced sampler."""

    def __init__(self, config: PretrainConfig, ctx: Context):
        self.config, self.ctx, self.image = config, ctx, config.encoder == "image"
        device = ctx.device
        # labels only (a few small columns); the embeddings of the rows this worker trains on are read per epoch
        self.train = load_features(config.features_path, None, splits=("train",))
        index = pd.read_parquet(config.index_path)
        # N_s per cluster comes from the index stage (`index.n_per_bin`)
        self.sampler = BalancedBatchSampler(index, batches_per_cluster=config.batches_per_cluster, seed=ctx.seed)
        self.bins = torch.from_numpy(score_bins(self.train.score, low=config.low, high=config.high).astype(np.int64))
        self.per_step = steps_of(config.batches_per_step, ctx.world)
        self.local = self.per_step // ctx.world
        if self.image:
            img = config.image
            self.speed = speed_of(img)
            check_speed(self.speed, device, key="pretrain.image")
            check_decode(img.decode, device, key="pretrain.image.decode")
            paths = pretrain_images(config, self.train)
            enc = ImageCREncoder(img.backbone, config.hidden, config.dim, config.dropout, image_size=img.image_size,
                                 resize=img.resize, weights=img.weights)
            enc = prepare_module(enc, device, self.speed)
            groups = [{"params": list(enc.backbone.parameters()), "lr": img.backbone_lr}, {"params": list(enc.proj.parameters())}]
            self.views = TrainViews(paths, img.image_size, img.resize, img.hflip, img.decode)
            self.make = self.views.load
            self.precision = resolve_precision(img.precision, device, key="pretrain.image.precision")
            self.workers = img.loader_workers
            enable_tf32(device)
        else:
            self.cache = config.embeddings_path
            enc = CREncoder(embedding_dim(self.cache), config.hidden, config.dim, config.dropout).to(device)
            groups = [{"params": list(enc.parameters())}]
            self.speed, self.precision, self.workers = Speed(), FP32, 0
        self.enc = enc
        self.opt = optimizer(groups, lr=config.lr, weight_decay=config.weight_decay, device=device, speed=self.speed)
        self.scaler = self.precision.scaler(device)
        self.model, _ = maybe_compile(ctx.ddp(enc), self.speed)
        self.compiled = False  # set once the first step (which compiles) has run

    def train_epoch(self, epoch: int) -> dict[str, float]:
        ctx, config, per_step, local = self.ctx, self.config, self.per_step, self.local
        batches = self.sampler.epoch(epoch)
        n_steps = len(batches) // per_step
        if n_steps == 0:
            raise DataError(f"pretrain: an epoch has {len(batches)} balanced batches, fewer than batches_per_step = {per_step}; "
                            "raise pretrain.batches_per_cluster or lower pretrain.batches_per_step.")
        # this worker's share of each step: batches [rank * local, (rank + 1) * local) of the step's group
        specs = [(batches[s * per_step + j], (ctx.seed, epoch, s * per_step + j))
                 for s in range(n_steps) for j in range(ctx.rank * local, (ctx.rank + 1) * local)]
        make = self.make if self.image else functools.partial(_rows_tensor, *_epoch_shard(self.cache, self.train.image_id, specs))
        self.enc.train()
        device, model = ctx.device, self.model
        total, n, t0 = 0.0, 0, time.perf_counter()
        views = iter(batch_loader(specs, make, workers=self.workers, device=device))
        first = None
        for s in range(n_steps):
            if s == 1 and first is None:
                first = time.perf_counter() - t0
            self.opt.zero_grad(set_to_none=True)
            for j in range(local):
                spec = specs[s * local + j]
                rows, batch = spec[0], next(views)
                x = to_device(self.views.finish(batch, spec, device) if self.image else batch, device, self.speed)
                last = j == local - 1
                with model.no_sync() if ctx.world > 1 and not last else contextlib.nullcontext():
                    with self.precision.autocast(device):
                        z = model(x)
                    loss = traversal_contrastive_loss(z.float(), self.bins[rows].to(device), tau=config.tau)
                    self.scaler.scale(loss / local).backward()
                total, n = total + loss.item(), n + 1
            self.scaler.step(self.opt)
            self.scaler.update()
        seconds = time.perf_counter() - t0
        out = {"loss": total / max(n, 1), "batches": n, "steps": n_steps, "epoch_s": seconds,
               "images_per_s": sum(len(b) for b, _ in specs) * ctx.world / max(seconds, 1e-9)}
        if self.speed.compile and not self.compiled and first is not None:  # the first step compiles: its time
            out["compile_s"], self.compiled = first, True
        return out

    def validate(self, epoch: int) -> dict[str, float]:
        return {}

    def selectable(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"model": self.enc.state_dict(), "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "spec": self.enc.spec(), "precision": self.precision.name}

    def load_state_dict(self, state: dict) -> None:
        self.enc.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])  # after the move: its state lands on the parameters' device
        self.scaler.load_state_dict(state["scaler"])


def pretrain_loop(config: dict) -> None:
    """Ray Train loop of the ``pretrain`` stage (``config``: a ``PretrainConfig`` and the run's keys)."""
    cfg = method_config(PretrainConfig, config, "pretrain")
    fit(lambda ctx: Pretrain(cfg, ctx), config, FitOptions(epochs=cfg.epochs, desc="pretrain"))
