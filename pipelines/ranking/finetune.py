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
import functools
import math
import time

import numpy as np
import ray.train.torch
import torch
from torch import nn
from tqdm import tqdm

from pipelines.heads.losses import flsa_loss
from pipelines.heads.model import TMCRHead
from pipelines.heads.tfa import tfa_mix
from pipelines.images import batch_loader, check_images, to_device, view_batch
from pipelines.ranking.backbone import encoder_from_spec, state_fingerprint
from pipelines.ranking.cr_features import backbone_state, image_paths
from pipelines.train.data import FeatureSet, load_features, load_matcher
from pipelines.train.loops import _cpu_copy, _rows_views, _seed, _val_metrics, amp_dtype, build_head, head_loss, input_paths
from pipelines.train.runner import load_resume_state, report_epoch, restore_rng, rng_state, worker_info
from pipelines.tracking.runs import EpochLogger
from pipelines.io import load_torch


def tm_of(feats: FeatureSet, matcher) -> np.ndarray:
    """The TM features of these rows (from their CLIP embeddings, the matcher every reader uses):
    the one place the fine-tune loop computes TM."""
    return matcher.numpy(feats.clip)


class FineTuneModel(nn.Module):
    """Backbone + TMCR head. ``forward(tm, x, dist, score, generator)`` returns (F_aes of the
    batch, the logits of the batch and of TFA's mixed rows, their targets)."""

    def __init__(self, backbone: nn.Module, head: TMCRHead, h: dict):
        super().__init__()
        self.backbone, self.head, self.h = backbone, head, h

    def forward(self, tm, x, dist, score, generator):
        fused = self.head.fuse(tm, self.backbone(x))
        fused_all, targets = fused, dist
        h = self.h
        if h["tfa"] and len(x) >= 3:
            mf, mt, _ = tfa_mix(fused.float(), dist, score, tau1=h["tfa_tau1"], tau2=h["tfa_tau2"], n_mix=h["tfa_n_mix"],
                                generator=generator)
            fused_all, targets = torch.cat([fused.float(), mf]), torch.cat([dist, mt])
        return fused, self.head.classify(fused_all), targets

    @torch.no_grad()
    def features(self, paths: list[str], size: int, resize: int, batch: int, device) -> np.ndarray:
        """The backbone's features of the files' evaluation views (centre crop), (N, D) float32."""
        self.backbone.eval()
        out = [self.backbone(to_device(view_batch(paths[i : i + batch], size, resize), device)).float().cpu().numpy()
               for i in range(0, len(paths), batch)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def finetune_images(config: dict, feats: FeatureSet) -> tuple[list[str], list[str]]:
    """The image files of the train and val rows (``config``: ``manifest_path``, ``root``), checked on disk."""
    paths = image_paths(config["manifest_path"], feats.image_id, config["root"])
    rows = {s: np.flatnonzero(feats.split == s) for s in ("train", "val")}
    check_images([paths[i] for r in rows.values() for i in r], what="the train / val rows (head.protocol: fine_tune)",
                 fix="restore the files or rebuild the manifest (`dvc repro prepare`), then rerun `dvc repro head`.")
    return [paths[i] for i in rows["train"]], [paths[i] for i in rows["val"]]


def finetune_loop(config: dict) -> None:
    """Fine-tune (``config``: the head loop's, plus ``manifest_path``, ``root``, ``backbone_lr`` and
    ``image``: ``hflip``, ``precision``, ``loader_workers``, ``batch_size``).

    Per step: EMD_r over the batch and TFA's mixed rows + flsa_weight * FLSA, as the linear-probe
    head; the backbone at ``backbone_lr``, the rest at ``lr``, both decayed by ``lr_decay``. Rank 0
    scores validation each epoch (evaluation views through the current backbone) and keeps the
    best validation-SRCC epoch's backbone and head when ``keep_best``.
    """
    rank, world, device = worker_info()
    gen = _seed(config["seed"])
    h, img = config["head"], config["image"]
    _, clip, tags = input_paths(config)
    feats = load_features(config["features_path"], None, clip_path=clip)
    matcher = load_matcher(config["features_path"], tags)
    train, val = feats.split_of("train"), feats.split_of("val")
    train_tm = tm_of(train, matcher)
    cr_state = load_torch(config["cr_path"])
    spec = cr_state["spec"]
    size, resize = spec["image_size"], spec["resize"]
    enc = encoder_from_spec(spec)
    enc.backbone.load_state_dict(backbone_state(cr_state))
    head, arch = build_head(config, matcher.dim, int(spec["in_dim"]), train.n_levels)
    head.fit_normaliser(lambda: iter(torch.from_numpy(train_tm).split(4096)))
    if h.get("cr_features") == "hidden":  # z's layer feeds nothing: frozen, so DDP waits for no gradient of it
        head.cr.net[3:].requires_grad_(False)
    ft = FineTuneModel(enc.backbone, head, h).to(device)
    train_paths, val_paths = finetune_images(config, feats)
    groups = [{"params": list(ft.backbone.parameters()), "lr": config["backbone_lr"]},
              {"params": [p for p in ft.head.parameters() if p.requires_grad]}]
    opt = torch.optim.AdamW(groups, lr=config["lr"], weight_decay=h["weight_decay"])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=h["lr_decay"])
    dtype = amp_dtype(img.get("precision", "auto"), device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start, best = 0, None
    if (state := load_resume_state(config)) is not None:
        ft.head.load_state_dict(state["model"])
        ft.backbone.load_state_dict(state["cr_backbone"]["backbone"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, best = state["epoch"] + 1, state.get("best")
        restore_rng(state.get("rng"), gen)
    model = ray.train.torch.prepare_model(ft) if world > 1 else ft  # DDP across workers
    dist_loss = head_loss(h)
    tensors = {k: torch.from_numpy(getattr(train, k)) for k in ("dist", "score")}
    tensors["tm"] = torch.from_numpy(train_tm)
    make = functools.partial(_rows_views, train_paths, size, resize, img.get("hflip", True))
    bs = h["batch_size"]
    n_batches = max(1, math.ceil(len(train) / bs / world))
    log = EpochLogger(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    for epoch in tqdm(range(start, config["epochs"]), desc="head (fine-tune)", disable=rank != 0, initial=start, total=config["epochs"]):
        ft.train()
        mine = torch.randperm(len(train), generator=gen)[rank::world]
        batches = [mine[b * bs : (b + 1) * bs] if len(mine[b * bs : (b + 1) * bs]) >= 2 else mine[:bs] for b in range(n_batches)]
        specs = [(rows.numpy(), (config["seed"], epoch, b, rank)) for b, rows in enumerate(batches)]
        views = iter(batch_loader(specs, make, workers=img.get("loader_workers", 0), device=device))
        totals, t0 = {"loss": 0.0, "emd": 0.0, "flsa": 0.0}, time.perf_counter()
        for rows in batches:
            x = to_device(next(views), device)
            tm, dist, score = (tensors[k][rows].to(device) for k in ("tm", "dist", "score"))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                fused, logits, targets = model(tm, x, dist, score, gen)
            l_emd = dist_loss(torch.softmax(logits.float(), 1), targets)
            l_flsa = flsa_loss(fused.float(), score) if h["flsa"] else torch.zeros((), device=device)
            loss = l_emd + (h["flsa_weight"] * l_flsa if h["flsa"] else 0.0)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            for k, v in (("loss", loss), ("emd", l_emd), ("flsa", l_flsa)):
                totals[k] += v.item() / n_batches
        sched.step()
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch, **totals, "lr": sched.get_last_lr()[-1], "backbone_lr": sched.get_last_lr()[0],
                   "images_per_s": sum(len(r) for r in batches) * world / max(seconds, 1e-9)}
        state = None
        if rank == 0:
            if len(val) >= 3:
                emb = ft.features(val_paths, size, resize, img.get("batch_size", 64), device)
                metrics.update(_val_metrics(copy.deepcopy(ft.head).cpu(), matcher, dataclasses.replace(val, emb=emb)))
            log(metrics, epoch)
            tuned = {"spec": spec, "backbone": _cpu_copy(ft.backbone.state_dict())}
            if h["keep_best"] and metrics.get("val_srcc", -np.inf) > (best or {}).get("val_srcc", -np.inf):
                best = {"model": _cpu_copy(ft.head.state_dict()), "cr_backbone": tuned, "epoch": epoch, "val_srcc": metrics["val_srcc"]}
            state = {
                "model": _cpu_copy(ft.head.state_dict()), "cr_backbone": tuned, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "arch": arch,
                "started_at_epoch": start, "best": best, "rng": rng_state(gen), "metrics": metrics,
                "precision": str(dtype or torch.float32).removeprefix("torch."),
            }
            if epoch + 1 == config["epochs"] and best is not None:
                state.update(model=best["model"], cr_backbone=best["cr_backbone"], selected_epoch=best["epoch"],
                             selected_val_srcc=best["val_srcc"])
            elif epoch + 1 == config["epochs"]:
                state["selected_epoch"] = epoch
        report_epoch(metrics, state, config, rank)


def tuned_encoder(cr_backbone: dict):
    """The image E_CR whose ``embed`` is the fine-tuned backbone of a head file's ``cr_backbone``."""
    from pipelines.ranking.cr_features import cr_backbone_from_bundle

    return cr_backbone_from_bundle(cr_backbone)


def tuned_fingerprint(cr_backbone: dict) -> str:
    """The weights hash that keys the fine-tuned backbone's CR-feature cache."""
    return state_fingerprint(cr_backbone["backbone"])
