"""Ray Train loop that trains an image model family (``pipelines.models``) on manifest images.

Config (a plain dict, all paths absolute; see ``stages/family.py``):

- ``manifest_path``, ``root`` (relative image paths resolve against it), ``family``, ``options``
  (the family's params), ``seed``, ``epochs``, ``lr``, ``weight_decay``, ``batch_size``,
  ``image_size``;
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
-1 until the switch) through ``report_epoch``, like ``pipelines.train.loops``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipelines.data.manifest import read_manifest, vote_distribution
from pipelines.io import DataError
from pipelines.metrics import dist_to_score, emd, srcc
from pipelines.models import build, loss_terms, make_optimizer, resolve
from pipelines.models.amp import MixedPrecisionTrainer, PrecisionGate, low_dtype, monitor_dtype
from pipelines.models.augment import augment, crop_source, crops_in, pad_box
from pipelines.tracking.runs import EpochLogger
from pipelines.train.runner import (
    load_resume_state,
    report_epoch,
    restore_rng,
    rng_state,
    sync_gradients,
    worker_info,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
CORNER_GRID_MODES = ("off", "always", "with_mixed")
SCHEDULES = ("single", "three_stage")
ASPECTS = ("square", "keep")


def open_image(path: str | Path) -> Image.Image:
    """The file as a loaded RGB PIL image; an unreadable file is a ``DataError`` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}); fix or remove it from the label file.") from exc


def image_tensor(im: Image.Image, size: tuple[int, int], mode: str = "resize") -> torch.Tensor:
    """An RGB PIL image as a float tensor (3, h, w) in [0, 1]. ``resize``: to exactly h x w; ``pad``:
    fit inside, keep the aspect ratio, centre on a constant (black) canvas; ``short_side``: keep
    the aspect ratio, short side = ``size[0]`` (the seed-002 preprocessing; the long side follows)."""
    im = im.convert("RGB")  # a no-op copy for RGB input
    h, w = size
    if mode == "resize":
        im = im.resize((w, h), Image.BILINEAR)
    elif mode == "short_side":
        k = h / min(im.width, im.height)
        im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.BILINEAR)
    elif mode == "pad":
        x0, y0, x1, y1 = pad_box(im.width, im.height, size)
        canvas = Image.new("RGB", (w, h), (0, 0, 0))
        canvas.paste(im.resize((x1 - x0, y1 - y0), Image.BILINEAR), (x0, y0))
        im = canvas
    else:
        raise ValueError(f"mode must be 'resize', 'short_side' or 'pad', got {mode!r}")
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def load_image(path: str | Path, size: tuple[int, int], mode: str = "resize") -> torch.Tensor:
    """``image_tensor(open_image(path), size, mode)``: the file as a float tensor (3, h, w) in [0, 1]."""
    return image_tensor(open_image(path), size, mode)


def predict_mode(aspect: str) -> str:
    """The resize mode of an ``aspect`` at prediction time: ``square`` -> ``resize``, ``keep`` -> ``short_side``."""
    if aspect not in ASPECTS:
        raise DataError(f"model.aspect = {aspect!r}; use one of {ASPECTS}.")
    return "resize" if aspect == "square" else "short_side"


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def stage_of(epoch: int, config: dict, switch_epoch: int | None) -> tuple[tuple[int, int], str, int]:
    """(size (h, w), resize mode, stage number) of an epoch under the resolution schedule."""
    s = config["image_size"]
    base = predict_mode(config.get("aspect", "square"))
    if config.get("schedule", "single") == "single":
        return (s, s), base, 1
    if config["schedule"] not in SCHEDULES:
        raise DataError(f"model.schedule = {config['schedule']!r}; use one of {SCHEDULES}.")
    start2 = switch_epoch if config["amp"]["enabled"] else config["stage2_from"]
    if epoch >= config["epochs"] - config["stage3_epochs"]:
        return (s, s), base, 3
    if start2 is not None and epoch >= start2:
        h, w = config["stage2_size"]
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


def image_family_loop(config: dict) -> None:
    rank, world, device = worker_info()
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"] % 2**32)
    gen = torch.Generator().manual_seed(config["seed"])
    df = read_manifest(config["manifest_path"])
    train, val = labelled(df, "train"), labelled(df, "val")
    if len(train) < 2:
        raise DataError(f"{config['manifest_path']}: {len(train)} labelled train images; need >= 2.")
    train_paths, val_paths = _paths(train, config["root"]), _paths(val, config["root"])
    dist = torch.from_numpy(vote_distribution(train, missing="raise"))
    val_dist = vote_distribution(val, missing="raise") if len(val) else None
    n_levels = dist.shape[1]
    options = dict(config["options"])
    model = build(config["family"], n_levels, options).to(device)
    opt = make_optimizer(model.parameters(), resolve(config["family"], "optimizer", config.get("optimizer", "auto")),
                         config["lr"], config["weight_decay"], config.get("momentum", 0.9))
    a = config["amp"]
    gate = PrecisionGate(l1=a["l1"], l2=a["l2"], window=a["window"], enabled=a["enabled"])
    low = low_dtype(a["dtype"], device)
    trainer = MixedPrecisionTrainer(
        model, opt, dtype=low, gate=gate, init_tau=a["init_tau"], monitor=monitor_dtype(a.get("monitor", "auto"), low),
        growth_interval=a["growth_interval"], grad_hook=lambda m: sync_gradients(m, world),
    )
    start = 0
    if (state := load_resume_state(config)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        trainer.load_state_dict(state["amp"])
        start = state["epoch"] + 1
        restore_rng(state.get("rng"), gen)
    bs = config["batch_size"]
    n_batches = max(1, math.ceil(len(train) / bs / world))
    arch = {"family": config["family"], "options": options, "n_levels": n_levels, "image_size": config["image_size"],
            "aspect": config.get("aspect", "square")}
    log = EpochLogger(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    grid_mode = resolve(config["family"], "corner_grid", config.get("corner_grid", "auto"))
    crop_mode = resolve(config["family"], "crop", config.get("crop", "auto"))
    if grid_mode not in CORNER_GRID_MODES:
        raise DataError(f"model.corner_grid = {grid_mode!r}; use one of {CORNER_GRID_MODES}.")
    for epoch in tqdm(range(start, config["epochs"]), desc=config["family"], disable=rank != 0, initial=start, total=config["epochs"]):
        model.train()
        size, mode, stage = stage_of(epoch, config, gate.switch_epoch)
        use_grid = grid_mode == "always" or (grid_mode == "with_mixed" and gate.mixed)
        use_crop = crops_in(stage, mode, crop_mode)
        perm = torch.randperm(len(train), generator=gen)
        mine = perm[rank::world]
        totals: dict[str, float] = {}
        for b in range(n_batches):
            rows = mine[b * bs : (b + 1) * bs]
            if len(rows) < 2:
                rows = mine[:bs]
            flip = torch.rand(len(rows), generator=gen) < 0.5 if config.get("hflip", True) else None
            crop = torch.rand(len(rows), 2, generator=gen) if use_crop else None
            x = load_batch([train_paths[int(i)] for i in rows], size, mode, flip=flip, crop=crop,
                           grid_r=config.get("corner_grid_r", 0.1) if use_grid else None).to(device)
            y = dist[rows].to(device)
            parts: dict = {}

            def loss_fn(m: torch.nn.Module, dtype: torch.dtype, x=x, y=y, parts=parts) -> torch.Tensor:
                out = m(x.to(dtype))
                parts.update(loss_terms(config["family"], m, out, y, options, x))
                return parts["loss"].float()

            trainer.step(loss_fn)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / n_batches
        prec = trainer.end_epoch(epoch)
        metrics = {
            "epoch": epoch, **totals, **prec, "stage": float(stage), "image_h": float(size[0]),
            "switch_epoch": float(-1 if gate.switch_epoch is None else gate.switch_epoch),
            "corner_grid": float(use_grid), "random_crop": float(use_crop),
        }
        state = None
        if rank == 0:
            if val_dist is not None and len(val) >= 3:
                probs = predict(model, val_paths, config["image_size"], device=device, aspect=config.get("aspect", "square"))
                metrics.update({"val_emd2": float(emd(probs, val_dist, 2)), "val_srcc": float(srcc(dist_to_score(probs), dist_to_score(val_dist)))})
            log(metrics, epoch)
            state = {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "amp": trainer.state_dict(),
                "epoch": epoch, "arch": arch, "started_at_epoch": start, "switch_epoch": gate.switch_epoch,
                "rng": rng_state(gen), "metrics": metrics,
            }
        report_epoch(metrics, state, config, rank)


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
