"""Ray Train loop that trains an image model family (``pipelines.models``) on manifest images.

Config: ``FamilyConfig`` (``stages.family.family_config`` builds it from params): ``manifest_path``,
``root`` (relative image paths resolve against it) and ``model``, the ``model`` params block
(``pipelines.config.ModelParams``) with its ``auto`` choices resolved to the family's; ``options``
is the family's own block (``model.mnet`` / ``model.aesaf``). Of ``model``:

- ``family``, ``epochs``, ``lr``, ``weight_decay``, ``batch_size``, ``image_size``, ``loader_workers``;
- ``corner_grid`` (``off`` / ``always`` / ``with_mixed``: from the precision switch on, as
  M+MNet's stage 2; ``auto``: the family's), ``corner_grid_r`` (0.1), ``hflip`` (random
  horizontal flips), ``crop`` (``off`` / ``random``: stage 1's 256 -> 224 random crop; ``auto``:
  the family's), ``optimizer`` (``adam`` / ``sgd`` with ``momentum``; ``auto``: the family's) --
  see ``pipelines.models.augment`` and ``pipelines.models.resolve``;
- ``amp``: ``{enabled, l1, l2, window, dtype, init_tau, growth_interval, monitor}`` (``pipelines.models.amp``);
- ``aspect``: ``square`` (resize to ``image_size`` squared) or ``keep`` (short side
  ``image_size``, aspect ratio kept; training batches are zero-padded bottom/right to the
  batch's largest image, prediction runs one image at a time, unpadded -- seed 002's SPP makes
  any size work);
- ``schedule``: ``single`` (every epoch at ``image_size`` squared) or ``three_stage``
  (M+MNet: ``image_size`` until the precision switch -- or ``stage2_from`` when AMP is off --,
  then ``stage2_size`` [h, w] with the aspect ratio kept and constant padding, then the last
  ``stage3_epochs`` epochs at ``image_size`` again).

Each epoch reports loss parts, ``val_emd2`` / ``val_srcc`` (rank 0), and the precision state
(``mixed_precision``, ``theta``, ``overflow_epoch``, ``loss_scale_log2``, ``switch_epoch``,
-1 until the switch). The epochs run in the one training core (``pipelines.train.core.fit``): the
model is wrapped in DDP on more than one worker, each worker trains on its shard of the rows.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipelines.config import ModelParams
from pipelines.data.manifest import read_manifest, vote_distribution
from pipelines.images import MEAN, STD, batch_loader, image_tensor, load_image, normalise, open_image, to_device  # noqa: F401 (re-exported)
from pipelines.io import DataError
from pipelines.metrics import dist_to_score, emd, srcc
from pipelines.models import build, loss_terms, make_optimizer, resolve
from pipelines.models.amp import MixedPrecisionTrainer, PrecisionGate, low_dtype, monitor_dtype
from pipelines.models.augment import augment, crop_source, crops_in, pad_box
from pipelines.train.core import Context, FitOptions, fit, method_config
from pipelines.train.precision import check_speed, enable_tf32, prepare_module, speed_of, use_fused

CORNER_GRID_MODES = ("off", "always", "with_mixed")
SCHEDULES = ("single", "three_stage")
ASPECTS = ("square", "keep")


@dataclass(frozen=True, kw_only=True)
class FamilyConfig:
    """The family loop's config."""

    model: ModelParams  # ``auto`` choices (optimizer, crop, corner_grid) resolved to the family's
    manifest_path: str | Path
    root: str

    @property
    def options(self) -> dict:
        """The family's own params block (``model.mnet`` / ``model.aesaf``); no ``weights`` key when none is given."""
        options = dataclasses.asdict(self.model.mnet if self.model.family == "mnet" else self.model.aesaf)
        if not options.get("weights"):
            options.pop("weights", None)
        return options


def predict_mode(aspect: str) -> str:
    """The resize mode of an ``aspect`` at prediction time: ``square`` -> ``resize``, ``keep`` -> ``short_side``."""
    if aspect not in ASPECTS:
        raise DataError(f"model.aspect = {aspect!r}; use one of {ASPECTS}.")
    return "resize" if aspect == "square" else "short_side"


def stage_of(epoch: int, m: ModelParams, switch_epoch: int | None) -> tuple[tuple[int, int], str, int]:
    """(size (h, w), resize mode, stage number) of an epoch under the resolution schedule of ``m`` (``model.*``)."""
    s = m.image_size
    base = predict_mode(m.aspect)
    if m.schedule == "single":
        return (s, s), base, 1
    if m.schedule not in SCHEDULES:
        raise DataError(f"model.schedule = {m.schedule!r}; use one of {SCHEDULES}.")
    start2 = switch_epoch if m.amp.enabled else m.stage2_from
    if epoch >= m.epochs - m.stage3_epochs:
        return (s, s), base, 3
    if start2 is not None and epoch >= start2:
        h, w = m.stage2_size
        return (int(h), int(w)), "pad", 2
    return (s, s), base, 1


def _paths(df: pd.DataFrame, root: str) -> list[str]:
    return [p if Path(p).is_absolute() else str(Path(root) / p) for p in df["path"]]


def load_batch(paths: list[str], size, mode, *, flip: torch.Tensor | None = None, grid_r: float | None = None,
               crop: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised images; training augmentation (``crop`` (N, 2) offsets in [0, 1), ``flip``, Corner
    Grid ``grid_r`` on the image content) by ``pipelines.models.augment.augment``."""
    imgs = []
    for i, p in enumerate(paths):
        im = open_image(p)
        x = image_tensor(im, size if crop is None else crop_source(size), mode)
        box = pad_box(im.width, im.height, size) if mode == "pad" else None
        x = augment(x, size, crop=None if crop is None else crop[i], flip=flip is not None and bool(flip[i]), grid_r=grid_r, box=box)
        imgs.append(normalise(x))
    h = max(x.shape[1] for x in imgs)
    w = max(x.shape[2] for x in imgs)
    # keep-aspect batches: pad bottom / right with 0 (the mean colour after normalisation)
    return torch.stack([torch.nn.functional.pad(x, (0, w - x.shape[2], 0, h - x.shape[1])) for x in imgs])


def _train_batch(paths: list[str], size, mode, grid_r: float | None, spec) -> torch.Tensor:
    rows, flip, crop = spec
    return load_batch([paths[int(i)] for i in rows], size, mode, flip=flip, crop=crop, grid_r=grid_r)


@torch.no_grad()
def predict(
    model: torch.nn.Module, paths: list[str], size: int, batch: int = 32, device: str | torch.device = "cpu", aspect: str = "square"
) -> np.ndarray:
    """(N, L) predicted distributions: images resized to ``size`` squared, or (``aspect="keep"``)
    short side ``size`` with the aspect ratio kept, one image per forward pass (no padding)."""
    model.eval()
    mode = predict_mode(aspect)
    batch = batch if aspect == "square" else 1
    out = []
    for i in range(0, len(paths), batch):
        x = load_batch(paths[i : i + batch], (size, size), mode).to(device)
        out.append(model(x)["probs"].float().cpu().numpy())
    n_levels = getattr(model, "n_levels", 10)
    return np.concatenate(out) if out else np.zeros((0, n_levels), np.float32)


def labelled(df: pd.DataFrame, split: str) -> pd.DataFrame:
    return df[(df["split"] == split) & df["votes"].notna()].reset_index(drop=True)


class FamilyTraining:
    """An image model family (M+MNet, AE fusion) on this worker's shard of the labelled train images."""

    def __init__(self, config: FamilyConfig, ctx: Context):
        self.config, self.ctx = config, ctx
        m = self.m = config.model
        device = ctx.device
        df = read_manifest(config.manifest_path)
        train, self.val = labelled(df, "train"), labelled(df, "val")
        if len(train) < 2:
            raise DataError(f"{config.manifest_path}: {len(train)} labelled train images; need >= 2.")
        self.n_train = len(train)
        self.shard = ctx.shard(self.n_train)
        paths = _paths(train, config.root)
        self.train_paths = [paths[i] for i in self.shard]
        self.val_paths = _paths(self.val, config.root)
        dist = vote_distribution(train, missing="raise")
        self.dist = torch.from_numpy(dist[self.shard])
        self.val_dist = vote_distribution(self.val, missing="raise") if len(self.val) else None
        n_levels = dist.shape[1]
        self.options = config.options
        self.speed = speed_of(m)
        check_speed(self.speed, device, key="model")
        enable_tf32(device)
        self.model = prepare_module(build(m.family, n_levels, self.options), device, self.speed)
        self.opt = make_optimizer(self.model.parameters(), resolve(m.family, "optimizer", m.optimizer), m.lr, m.weight_decay, m.momentum,
                                  fused=use_fused(self.speed, device))
        a = m.amp
        self.gate = PrecisionGate(l1=a.l1, l2=a.l2, window=a.window, enabled=a.enabled)
        low = low_dtype(a.dtype, device)
        self.trainer = MixedPrecisionTrainer(
            ctx.ddp(self.model), self.opt, dtype=low, gate=self.gate, init_tau=a.init_tau,
            monitor=monitor_dtype(a.monitor, low), growth_interval=a.growth_interval,
        )
        self.arch = {"family": m.family, "options": self.options, "n_levels": n_levels, "image_size": m.image_size, "aspect": m.aspect}
        self.grid_mode = resolve(m.family, "corner_grid", m.corner_grid)
        self.crop_mode = resolve(m.family, "crop", m.crop)
        if self.grid_mode not in CORNER_GRID_MODES:
            raise DataError(f"model.corner_grid = {self.grid_mode!r}; use one of {CORNER_GRID_MODES}.")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        m, ctx, device, gen = self.m, self.ctx, self.ctx.device, self.ctx.generator
        self.model.train()
        size, mode, stage = stage_of(epoch, m, self.gate.switch_epoch)
        use_grid = self.grid_mode == "always" or (self.grid_mode == "with_mixed" and self.gate.mixed)
        use_crop = crops_in(stage, mode, self.crop_mode)
        batches = ctx.batches(self.n_train, len(self.shard), m.batch_size)
        specs = []  # (rows, flips, crops) per batch, drawn in batch order; decoded by the shared loader
        for rows in batches:
            flip = torch.rand(len(rows), generator=gen) < 0.5 if m.hflip else None
            crop = torch.rand(len(rows), 2, generator=gen) if use_crop else None
            specs.append((rows, flip, crop))
        make = functools.partial(_train_batch, self.train_paths, size, mode, m.corner_grid_r if use_grid else None)
        totals: dict[str, float] = {}
        loader = batch_loader(specs, make, workers=m.loader_workers, device=device)
        for (rows, _, _), x in zip(specs, loader, strict=True):
            x = to_device(x, device)
            y = self.dist[rows].to(device)
            parts: dict = {}

            def loss_fn(net: torch.nn.Module, x=x, y=y, parts=parts) -> torch.Tensor:
                out = net(x)  # the trainer's autocast (mixed phase) sets the compute dtype
                parts.update(loss_terms(m.family, self.model, out, y, self.options, x))
                return parts["loss"].float()

            self.trainer.step(loss_fn)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / len(batches)
        prec = self.trainer.end_epoch(epoch)
        return {
            **totals, **prec, "stage": float(stage), "image_h": float(size[0]),
            "switch_epoch": float(-1 if self.gate.switch_epoch is None else self.gate.switch_epoch),
            "corner_grid": float(use_grid), "random_crop": float(use_crop),
        }

    def validate(self, epoch: int) -> dict[str, float]:
        if self.val_dist is None or len(self.val) < 3:
            return {}
        probs = predict(self.model, self.val_paths, self.m.image_size, device=self.ctx.device, aspect=self.m.aspect)
        return {"val_emd2": float(emd(probs, self.val_dist, 2)),
                "val_srcc": float(srcc(dist_to_score(probs), dist_to_score(self.val_dist)))}

    def selectable(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "amp": self.trainer.state_dict(),
                "arch": self.arch, "switch_epoch": self.gate.switch_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.trainer.load_state_dict(state["amp"])


def image_family_loop(config: dict) -> None:
    """Ray Train loop of the ``family`` stage (``config``: a ``FamilyConfig`` and the run's keys)."""
    cfg = method_config(FamilyConfig, config, "family")
    fit(lambda ctx: FamilyTraining(cfg, ctx), config, FitOptions(epochs=cfg.model.epochs, desc=cfg.model.family))


def arch_aspect(arch: dict) -> str:
    """The ``aspect`` a model was trained with (``square`` for files saved before it was recorded)."""
    return arch.get("aspect", "square")


def model_from_state(state: dict) -> torch.nn.Module:
    """Rebuild a trained family model from the loop's final state (``arch`` + ``model``); the
    ``arch`` also records ``image_size`` and ``aspect`` (``arch_aspect``) for prediction."""
    arch = state["arch"]
    opts = {k: v for k, v in arch["options"].items() if k != "weights"}
    model = build(arch["family"], arch["n_levels"], opts)
    model.load_state_dict(state["model"])
    return model.eval()
