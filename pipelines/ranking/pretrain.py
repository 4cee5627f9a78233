"""Contrastive pretraining of E_CR on balanced-level batches (TMCR sec. 3.3), as a ``fit`` method.

``config["encoder"]``: ``embedding`` (the MLP E_CR over the cached CLIP embedding) or ``image``
(``config["image"]``: a timm / torchvision backbone under the same MLP, trained on pixels with
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

import numpy as np
import pandas as pd
import torch

from pipelines.images import batch_loader, check_images, view_batch
from pipelines.io import DataError
from pipelines.ranking.backbone import ImageCREncoder
from pipelines.ranking.cr_features import image_paths
from pipelines.ranking.encoder import CREncoder
from pipelines.ranking.index import BalancedBatchSampler, score_bins
from pipelines.ranking.loss import traversal_contrastive_loss
from pipelines.train.core import Context, FitOptions, fit
from pipelines.train.data import embedding_dim, load_features, read_embedding_rows
from pipelines.train.precision import (
    FP32, Speed, check_speed, enable_tf32, maybe_compile, optimizer, prepare_module, resolve_precision, speed_of, to_device,
)

ENCODERS = ("embedding", "image")


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


def rows_views(paths: list[str], size: int, resize: int, hflip: bool, spec) -> torch.Tensor:
    """The augmented views of a batch spec ``(rows, seed)`` (TMCR's crop and flip)."""
    rows, seed = spec
    return view_batch([paths[int(i)] for i in rows], size, resize, seed=seed, hflip=hflip)


def pretrain_images(config: dict, train) -> list[str]:
    """The image file of every train row (``config``: ``manifest_path``, ``root``), checked on disk
    for the rows the balanced sampler can pick."""
    paths = image_paths(config["manifest_path"], train.image_id, config["root"])
    index = pd.read_parquet(config["index_path"])
    picked = sorted({int(r) for m in index.loc[index["active"], "members"] for r in m})
    check_images([paths[r] for r in picked], what="rows the balanced sampler picks (pretrain.encoder: image)",
                 fix="restore the files or rebuild the manifest (`dvc repro prepare`), then rerun `dvc repro pretrain`.")
    return paths


class Pretrain:
    """The traversal contrastive method: E_CR, AdamW, the balanced sampler."""

    def __init__(self, config: dict, ctx: Context):
        encoder = config.get("encoder", "embedding")
        if encoder not in ENCODERS:
            raise ValueError(f"pretrain.encoder must be one of {ENCODERS}, got {encoder!r}")
        self.config, self.ctx, self.image = config, ctx, encoder == "image"
        device = ctx.device
        # labels only (a few small columns); the embeddings of the rows this worker trains on are read per epoch
        self.train = load_features(config["features_path"], None, splits=("train",))
        index = pd.read_parquet(config["index_path"])
        # N_s per cluster comes from the index stage (`index.n_per_bin`)
        self.sampler = BalancedBatchSampler(index, batches_per_cluster=config["batches_per_cluster"], seed=config["seed"])
        self.bins = torch.from_numpy(score_bins(self.train.score, low=config["low"], high=config["high"]).astype(np.int64))
        self.per_step = steps_of(config.get("batches_per_step", "auto"), ctx.world)
        self.local = self.per_step // ctx.world
        if self.image:
            img = config["image"]
            self.speed = speed_of(img)
            check_speed(self.speed, device, key="pretrain.image")
            paths = pretrain_images(config, self.train)
            enc = ImageCREncoder(img["backbone"], config["hidden"], config["dim"], config["dropout"], image_size=img["image_size"],
                                 resize=img["resize"], weights=img["weights"])
            enc = prepare_module(enc, device, self.speed)
            groups = [{"params": list(enc.backbone.parameters()), "lr": img["backbone_lr"]}, {"params": list(enc.proj.parameters())}]
            self.make = functools.partial(rows_views, paths, img["image_size"], img["resize"], img.get("hflip", True))
            self.precision = resolve_precision(img.get("precision", "auto"), device, key="pretrain.image.precision")
            self.workers = img.get("loader_workers", 0)
            enable_tf32(device)
        else:
            self.cache = config["embeddings_path"]
            enc = CREncoder(embedding_dim(self.cache), config["hidden"], config["dim"], config["dropout"]).to(device)
            groups = [{"params": list(enc.parameters())}]
            self.speed, self.precision, self.workers = Speed(), FP32, 0
        self.enc = enc
        self.opt = optimizer(groups, lr=config["lr"], weight_decay=config["weight_decay"], device=device, speed=self.speed)
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
        specs = [(batches[s * per_step + j], (config["seed"], epoch, s * per_step + j))
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
                rows = specs[s * local + j][0]
                x = to_device(next(views), device, self.speed)
                last = j == local - 1
                with model.no_sync() if ctx.world > 1 and not last else contextlib.nullcontext():
                    with self.precision.autocast(device):
                        z = model(x)
                    loss = traversal_contrastive_loss(z.float(), self.bins[rows].to(device), tau=config["tau"])
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
    """Ray Train loop of the ``pretrain`` stage (``config``: see ``stages.pretrain.pretrain_config``)."""
    epochs = config["epochs"]
    fit(lambda ctx: Pretrain(config, ctx), config, FitOptions(epochs=epochs, desc="pretrain"))
