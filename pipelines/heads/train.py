"""Head training (TMCR sec. 3.4 + ELTA TFA / FLSA), and self-training with pseudo labels, as ``fit`` methods.

Loss per step: EMD_r(softmax(MLP(F_aes)), y) over the labelled batch plus TFA's mixed samples,
+ flsa_weight * FLSA(F_aes, s); with pseudo labels, + unlabeled_weight * L_u where L_u is the EMD
to the sharpened pseudo-label distribution over a batch drawn from the whole unlabelled pool,
unselected rows counting as zeros (ELTA eq. 10).

``HeadStep`` is one module whose ``forward`` runs every parameterised part of a step (TM, fuse,
TFA's mix, classify, the unlabelled batch), so DDP wraps it like any model: its gradients are
averaged inside backward on more than one worker.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.config import HeadParams
from pipelines.heads.build import build_head, head_loss, input_paths, predict_logits
from pipelines.heads.losses import flsa_loss
from pipelines.heads.model import TMCRHead
from pipelines.heads.tfa import tfa_mix
from pipelines.heads.unlabeled import load_pseudo_pool, unlabeled_loss
from pipelines.metrics import dist_to_score, emd, srcc
from pipelines.train.core import Context, FitOptions, cpu_copy, fit, method_config
from pipelines.train.data import load_features, read_embedding_rows, split_rows
from pipelines.semantics import load_matcher


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """The head loop's config (``head`` and ``selftrain`` stages): ``stages.head.head_config`` builds
    it from params, for the stages and for Tune."""

    features_path: str | Path
    embeddings_path: str | Path  # E_CR's input cache (CLIP embeddings or CR features)
    head: HeadParams
    epochs: int
    lr: float
    clip_path: str | Path | None = None  # the CLIP cache TM reads (default: embeddings_path)
    tags_path: str | Path | None = None  # the tag table (default: tags.parquet beside clip_path)
    cr_path: str | Path | None = None  # the pretrained E_CR (head.use_cr)
    desc: str = "head"
    # self-training (ELTA eq. 10): the trained head it starts from, the pseudo labels, L_u's weight
    init_path: str | Path | None = None
    pseudo_path: str | Path | None = None
    unlabeled_weight: float = 0.0

    def inputs(self) -> tuple[str, str, str]:
        """(E_CR input cache, CLIP cache for TM, tag table)."""
        return input_paths(self.embeddings_path, self.clip_path, self.tags_path)

    def arch_head(self) -> dict:
        """The ``head`` block as model files keep it (``arch["head"]``: a plain dict, no Ray settings)."""
        return {k: v for k, v in dataclasses.asdict(self.head).items() if k != "ray"}

    def fit_options(self) -> FitOptions:
        return FitOptions(epochs=self.epochs, desc=self.desc, keep_best=self.head.keep_best, select_on=self.head.select_on)


def val_metrics(model: TMCRHead, matcher, val) -> dict[str, float]:
    """Validation EMD_2 and SRCC of ``model`` on the rows ``val`` (none for fewer than 3 rows)."""
    if len(val) < 3:
        return {}
    probs = torch.softmax(torch.from_numpy(predict_logits(model, matcher, val.clip, val.emb)), 1).numpy()
    pred = dist_to_score(probs)
    return {"val_emd2": float(emd(probs, val.dist, 2)), "val_srcc": float(srcc(pred, val.score))}


def freeze_unused(head: TMCRHead) -> None:
    """Under fine-tune with ``cr_features: hidden`` the CR encoder's output layer feeds nothing:
    frozen, so DDP waits for no gradient of it (AdamW skips a parameter without a gradient, so
    one worker's result is the same)."""
    if head.use_cr and head.fine_tune and head.cr_features == "hidden":
        head.cr.net[3:].requires_grad_(False)


class HeadStep(nn.Module):
    """The loss of one head step; ``forward(clip, emb, dist, score)`` -> (loss, its parts)."""

    def __init__(self, head: TMCRHead, matcher, h: HeadParams, generator: torch.Generator, *, pool=None,
                 unlabeled_weight: float = 0.0):
        super().__init__()
        self.head, self.matcher, self.h, self.generator = head, matcher, h, generator
        self.dist_loss = head_loss(dataclasses.asdict(h))
        self.pool, self.unlabeled_weight = pool, unlabeled_weight

    def logits(self, clip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.head(self.matcher(clip), emb)

    def forward(self, clip, emb, dist, score):
        h, head = self.h, self.head
        fused = head.fuse(self.matcher(clip), emb)  # TM per batch, on the worker's device
        fused_all, targets = fused, dist
        if h.tfa and len(clip) >= 3:
            mf, mt, _ = tfa_mix(fused, dist, score, tau1=h.tfa_tau1, tau2=h.tfa_tau2, n_mix=h.tfa_n_mix,
                                generator=self.generator)
            fused_all, targets = torch.cat([fused, mf]), torch.cat([dist, mt])
        l_emd = self.dist_loss(torch.softmax(head.classify(fused_all), 1), targets)
        loss, zero = l_emd, torch.zeros((), device=clip.device)
        l_flsa = l_u = zero
        if h.flsa:
            l_flsa = flsa_loss(fused, score)
            loss = loss + h.flsa_weight * l_flsa
        if self.pool is not None:  # ELTA eq. 10: unselected rows of the batch count as zeros
            l_u = unlabeled_loss(self.pool, self.logits, self.dist_loss, h.batch_size, self.generator, clip.device)
            loss = loss + self.unlabeled_weight * l_u
        return loss, {"emd": l_emd, "flsa": l_flsa, "unlabeled": l_u}


def _tm_chunks(matcher, clip: np.ndarray, device, chunk_rows: int = 4096):
    with torch.no_grad():
        for s in range(0, len(clip), chunk_rows):
            yield matcher(torch.from_numpy(clip[s : s + chunk_rows]).to(device))


def _pool_inputs(config: HeadConfig, ctx: Context, image_id: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """This worker's shard of the unlabelled pool ``image_id``: its positions and their (CLIP, E_CR input) rows."""
    emb, clip, _ = config.inputs()
    mine = ctx.shard(len(image_id))
    e = read_embedding_rows(emb, image_id[mine])
    return mine, (e if Path(clip) == Path(emb) else read_embedding_rows(clip, image_id[mine]), e)


class HeadTraining:
    """The head (or, with ``pseudo_path``, self-training) on this worker's shard of the train rows."""

    def __init__(self, config: HeadConfig, ctx: Context):
        self.config, self.ctx = config, ctx
        device = ctx.device
        h = self.h = config.head
        emb, clip, tags = config.inputs()
        path = config.features_path
        self.n_train = split_rows(path, "train")
        shard = ctx.shard(self.n_train)
        train = load_features(path, emb, clip_path=clip, splits=("train",), rows=shard)
        # validation rows on rank 0 only (the others get none)
        self.val = load_features(path, emb, clip_path=clip, splits=("val",), rows=None if ctx.rank == 0 else np.zeros(0, np.int64))
        self.matcher = load_matcher(path, tags)
        model, self.arch = build_head(config.arch_head(), config.cr_path, self.matcher.dim, train.emb.shape[1], train.n_levels)
        model.to(device)
        self.matcher.to(device)
        if config.init_path:  # self-training starts from the trained head (and its TM normaliser)
            model.load_state_dict(torch.load(config.init_path, map_location=device, weights_only=True)["model"])
        else:  # TM statistics of all training rows: each worker streams its shard, the sums are all-reduced
            model.fit_normaliser(functools.partial(_tm_chunks, self.matcher, train.clip, device), ctx.all_reduce())
        freeze_unused(model)
        self.model = model
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=h.weight_decay)
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=h.lr_decay)
        self.tensors = {k: torch.from_numpy(getattr(train, k)) for k in ("clip", "emb", "dist", "score")}
        self.shard_size = len(shard)
        pool = None
        if config.pseudo_path:
            pool = load_pseudo_pool(config.pseudo_path, functools.partial(_pool_inputs, config, ctx))
        step = HeadStep(model, self.matcher, h, ctx.generator, pool=pool, unlabeled_weight=config.unlabeled_weight)
        self.step = ctx.ddp(step)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        ctx, device = self.ctx, self.ctx.device
        self.model.train()
        batches = ctx.batches(self.n_train, self.shard_size, self.h.batch_size)
        totals = {"loss": 0.0, "emd": 0.0, "flsa": 0.0, "unlabeled": 0.0}
        t0 = time.perf_counter()
        for rows in batches:
            clip, emb, dist, score = (self.tensors[k][rows].to(device) for k in ("clip", "emb", "dist", "score"))
            loss, parts = self.step(clip, emb, dist, score)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            for k, v in (("loss", loss), *parts.items()):
                totals[k] += v.item() / len(batches)
        self.sched.step()
        seconds = time.perf_counter() - t0  # the training steps of this epoch, validation aside
        return {**totals, "lr": self.sched.get_last_lr()[0], "epoch_s": seconds,
                "rows_per_s": sum(len(r) for r in batches) * ctx.world / max(seconds, 1e-9)}

    def validate(self, epoch: int) -> dict[str, float]:
        return val_metrics(self.model, self.matcher, self.val)

    def selectable(self) -> dict:
        return {"model": cpu_copy(self.model.state_dict())}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "arch": self.arch}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


def supervised_loop(config: dict) -> None:
    """Ray Train loop of the ``head`` and ``selftrain`` stages (``config``: a ``HeadConfig`` and the run's keys)."""
    cfg = method_config(HeadConfig, config, "head")
    fit(lambda ctx: HeadTraining(cfg, ctx), config, cfg.fit_options())
