"""Fine-tuning the image E_CR with the TMCR head, end to end on pixels (``head.protocol: fine_tune``).

The head's fine-tune protocol (TMCR sec. 3.4) with the image E_CR: the backbone
(initialised from ``models/cr_encoder.pt``), its projection MLP and the head train together
on the head's plain shuffled batches, decoded and augmented by ``pipelines.images`` (TMCR's
crop and flip), while TM still comes from the CLIP cache. ``FineTuneModel`` is one module
whose ``forward`` runs every parameterised step (backbone, fuse, TFA's mix, classify), so
Ray Train wraps it in DDP (``ray.train.torch.prepare_model``) as pretraining does.

The head file it writes has the linear-probe head's layout (``arch``, ``model``: the
``TMCRHead``), plus ``cr_backbone`` (the fine-tuned backbone's spec and weights, the format
of ``pipelines.ranking.cr_features.bundle_cr_encoder``): scoring bundles those, and
``write_tuned_features`` caches their features for the stages after the head.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.config import ImageEncoderParams
from pipelines.data.manifest import image_paths
from pipelines.heads.build import build_head, head_loss
from pipelines.heads.losses import flsa_loss
from pipelines.heads.model import TMCRHead
from pipelines.heads.tfa import tfa_mix
from pipelines.heads.train import HeadConfig, freeze_unused, val_metrics
from pipelines.images import TrainViews, batch_loader, check_decode, check_images, view_batch
from pipelines.io import load_torch
from pipelines.ranking.backbone import encoder_from_spec, state_fingerprint
from pipelines.ranking.cr_features import backbone_state
from pipelines.train.core import Context, cpu_copy, fit, method_config
from pipelines.train.data import FeatureSet, load_features
from pipelines.semantics import load_matcher
from pipelines.train.precision import (
    check_speed, enable_tf32, maybe_compile, optimizer, prepare_module, resolve_precision, speed_of, to_device,
)


@dataclass(frozen=True, kw_only=True)
class FineTuneConfig(HeadConfig):
    """The fine-tune loop's config: the head's, plus the images and the backbone's learning rate
    (``stages.head.finetune_config`` builds it from params)."""

    manifest_path: str | Path
    root: str  # relative image paths resolve against it
    backbone_lr: float  # head.backbone_lr
    image: ImageEncoderParams  # pretrain.image: hflip, precision, loader_workers, batch_size, speed options
    embeddings_path: str | Path | None = None  # not read: E_CR's input is the images
    desc: str = "head (fine-tune)"


def tm_of(feats: FeatureSet, matcher) -> np.ndarray:
    """The TM features of these rows (from their CLIP embeddings, the matcher every reader uses):
    the one place the fine-tune loop computes TM."""
    return matcher.numpy(feats.clip)


class FineTuneModel(nn.Module):
    """Backbone + TMCR head. ``forward(tm, x, dist, score, generator)`` returns (F_aes of the
    batch, the logits of the batch and of TFA's mixed rows, their targets)."""

    def __init__(self, backbone: nn.Module, head: TMCRHead, h):
        super().__init__()
        self.backbone, self.head, self.h = backbone, head, h

    def forward(self, tm, x, dist, score, generator):
        fused = self.head.fuse(tm, self.backbone(x))
        fused_all, targets = fused, dist
        h = self.h
        if h.tfa and len(x) >= 3:
            mf, mt, _ = tfa_mix(fused.float(), dist, score, tau1=h.tfa_tau1, tau2=h.tfa_tau2, n_mix=h.tfa_n_mix,
                                generator=generator)
            fused_all, targets = torch.cat([fused.float(), mf]), torch.cat([dist, mt])
        return fused, self.head.classify(fused_all), targets

    @torch.no_grad()
    def features(self, paths: list[str], size: int, resize: int, batch: int, device) -> np.ndarray:
        """The backbone's features of the files' evaluation views (centre crop), (N, D) float32."""
        self.backbone.eval()
        out = [self.backbone(view_batch(paths[i : i + batch], size, resize).to(device, non_blocking=True)).float().cpu().numpy()
               for i in range(0, len(paths), batch)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def finetune_images(config: FineTuneConfig, feats: FeatureSet) -> tuple[list[str], list[str]]:
    """The image files of the train and val rows (``config``: ``manifest_path``, ``root``), checked on disk."""
    paths = image_paths(config.manifest_path, feats.image_id, config.root)
    rows = {s: np.flatnonzero(feats.split == s) for s in ("train", "val")}
    check_images([paths[i] for r in rows.values() for i in r], what="the train / val rows (head.protocol: fine_tune)",
                 fix="restore the files or rebuild the manifest (`dvc repro prepare`), then rerun `dvc repro head`.")
    return [paths[i] for i in rows["train"]], [paths[i] for i in rows["val"]]


class FineTune:
    """Backbone + head on pixels: this worker's shard of the train rows, validation on rank 0."""

    def __init__(self, config: FineTuneConfig, ctx: Context):
        self.config, self.ctx = config, ctx
        device = ctx.device
        h, img = self.h, self.img = config.head, config.image
        _, clip, tags = config.inputs()
        feats = load_features(config.features_path, None, clip_path=clip)
        self.matcher = load_matcher(config.features_path, tags)
        train, self.val = feats.split_of("train"), feats.split_of("val")
        train_tm = tm_of(train, self.matcher)
        cr_state = load_torch(config.cr_path)
        self.spec = spec = cr_state["spec"]
        self.size, self.resize = spec["image_size"], spec["resize"]
        enc = encoder_from_spec(spec)
        enc.backbone.load_state_dict(backbone_state(cr_state))
        head, self.arch = build_head(config.arch_head(), config.cr_path, self.matcher.dim, int(spec["in_dim"]), train.n_levels)
        head.fit_normaliser(lambda: iter(torch.from_numpy(train_tm).split(4096)))
        freeze_unused(head)
        self.speed = speed_of(img)
        check_speed(self.speed, device, key="pretrain.image")
        check_decode(img.decode, device, key="pretrain.image.decode")
        self.ft = prepare_module(FineTuneModel(enc.backbone, head, h), device, self.speed)
        train_paths, self.val_paths = finetune_images(config, feats)
        groups = [{"params": list(self.ft.backbone.parameters()), "lr": config.backbone_lr},
                  {"params": [p for p in self.ft.head.parameters() if p.requires_grad]}]
        self.opt = optimizer(groups, lr=config.lr, weight_decay=h.weight_decay, device=device, speed=self.speed)
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=h.lr_decay)
        self.precision = resolve_precision(img.precision, device, key="pretrain.image.precision")
        self.scaler = self.precision.scaler(device)
        enable_tf32(device)
        self.model, _ = maybe_compile(ctx.ddp(self.ft), self.speed)
        self.dist_loss = head_loss(self.arch["head"])
        self.n_train = len(train)
        self.shard = ctx.shard(self.n_train)
        self.tensors = {k: torch.from_numpy(getattr(train, k)[self.shard]) for k in ("dist", "score")}
        self.tensors["tm"] = torch.from_numpy(train_tm[self.shard])
        self.views = TrainViews([train_paths[i] for i in self.shard], self.size, self.resize, img.hflip, img.decode)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        ctx, device, h = self.ctx, self.ctx.device, self.h
        self.ft.train()
        batches = ctx.batches(self.n_train, len(self.shard), h.batch_size)
        specs = [(rows.numpy(), (ctx.seed, epoch, b, ctx.rank)) for b, rows in enumerate(batches)]
        views = iter(batch_loader(specs, self.views.load, workers=self.img.loader_workers, device=device))
        totals, t0 = {"loss": 0.0, "emd": 0.0, "flsa": 0.0}, time.perf_counter()
        for rows, spec in zip(batches, specs, strict=True):
            x = to_device(self.views.finish(next(views), spec, device), device, self.speed)
            tm, dist, score = (self.tensors[k][rows].to(device) for k in ("tm", "dist", "score"))
            with self.precision.autocast(device):
                fused, logits, targets = self.model(tm, x, dist, score, ctx.generator)
            l_emd = self.dist_loss(torch.softmax(logits.float(), 1), targets)
            l_flsa = flsa_loss(fused.float(), score) if h.flsa else torch.zeros((), device=device)
            loss = l_emd + (h.flsa_weight * l_flsa if h.flsa else 0.0)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            for k, v in (("loss", loss), ("emd", l_emd), ("flsa", l_flsa)):
                totals[k] += v.item() / len(batches)
        self.sched.step()
        seconds = time.perf_counter() - t0
        return {**totals, "lr": self.sched.get_last_lr()[-1], "backbone_lr": self.sched.get_last_lr()[0], "epoch_s": seconds,
                "images_per_s": sum(len(r) for r in batches) * ctx.world / max(seconds, 1e-9)}

    def validate(self, epoch: int) -> dict[str, float]:
        if len(self.val) < 3:
            return {}
        emb = self.ft.features(self.val_paths, self.size, self.resize, self.img.batch_size, self.ctx.device)
        return val_metrics(copy.deepcopy(self.ft.head).cpu(), self.matcher, dataclasses.replace(self.val, emb=emb))

    def _tuned(self) -> dict:
        return {"spec": self.spec, "backbone": cpu_copy(self.ft.backbone.state_dict())}

    def selectable(self) -> dict:
        return {"model": cpu_copy(self.ft.head.state_dict()), "cr_backbone": self._tuned()}

    def state_dict(self) -> dict:
        return {"model": cpu_copy(self.ft.head.state_dict()), "cr_backbone": self._tuned(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "arch": self.arch,
                "precision": self.precision.name}

    def load_state_dict(self, state: dict) -> None:
        self.ft.head.load_state_dict(state["model"])
        self.ft.backbone.load_state_dict(state["cr_backbone"]["backbone"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def finetune_loop(config: dict) -> None:
    """Fine-tune (``config``: a ``FineTuneConfig`` and the run's keys).

    Per step: EMD_r over the batch and TFA's mixed rows + flsa_weight * FLSA, as the linear-probe
    head; the backbone at ``backbone_lr``, the rest at ``lr``, both decayed by ``lr_decay``. Rank 0
    scores validation each epoch (evaluation views through the current backbone) and keeps the
    best validation epoch's (``head.select_on``) backbone and head when ``keep_best``.
    """
    cfg = method_config(FineTuneConfig, config, "fine-tune")
    fit(lambda ctx: FineTune(cfg, ctx), config, cfg.fit_options())


def tuned_encoder(cr_backbone: dict):
    """The image E_CR whose ``embed`` is the fine-tuned backbone of a head file's ``cr_backbone``."""
    from pipelines.ranking.cr_features import cr_backbone_from_bundle

    return cr_backbone_from_bundle(cr_backbone)


def tuned_fingerprint(cr_backbone: dict) -> str:
    """The weights hash that keys the fine-tuned backbone's CR-feature cache."""
    return state_fingerprint(cr_backbone["backbone"])
