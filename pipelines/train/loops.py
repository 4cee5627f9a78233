"""Ray Train loops: contrastive pretraining of E_CR, and head / self-training.

Each loop is a plain function of a config dict (all paths absolute) that Ray Train runs
on every worker. Workers split each epoch's batches by rank; rank 0 logs to MLflow and
checkpoints. Pretraining averages gradients with DDP (``ray.train.torch.prepare_model``); the
head keeps ``sync_gradients`` (one all-reduce per step, as DDP does), because its step calls
``fuse`` / TFA / ``classify`` separately rather than one ``forward``, which DDP hooks.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray.train.torch
import torch
from tqdm import tqdm

from pipelines.heads.losses import flsa_loss
from pipelines.heads.build import _logits, build_head, head_loss, input_paths, predict_logits
from pipelines.heads.model import TMCRHead
from pipelines.heads.tfa import tfa_mix
from pipelines.images import batch_loader, check_images, to_device, view_batch
from pipelines.io import DataError
from pipelines.metrics import dist_to_score, emd, srcc
from pipelines.ranking.backbone import ImageCREncoder
from pipelines.ranking.cr_features import image_paths
from pipelines.ranking.encoder import CREncoder
from pipelines.ranking.index import BalancedBatchSampler, score_bins
from pipelines.ranking.loss import traversal_contrastive_loss
from pipelines.selftrain.unlabeled import load_pseudo_pool, unlabeled_loss
from pipelines.tracking.runs import EpochLogger
from pipelines.semantics import TagMatcher
from pipelines.train.data import embedding_dim, load_features, load_matcher, read_embedding_rows, shard_rows, split_rows
from pipelines.train.runner import load_resume_state, report_epoch, restore_rng, rng_state, sync_gradients, worker_info


def _seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


ENCODERS = ("embedding", "image")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: fp32). ``auto``: bf16 on a CUDA GPU
    that has it, else fp16 (with a GradScaler); fp32 on CPU (bf16 matmul is ~100x slower than fp32
    on AVX2-only CPUs; ask for ``bf16`` where a CPU has it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


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


def _rows_views(paths: list[str], size: int, resize: int, hflip: bool, spec) -> torch.Tensor:
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


def pretrain_loop(config: dict) -> None:
    """Traversal contrastive learning on balanced-level batches (TMCR sec. 3.3).

    ``config["encoder"]``: ``embedding`` (the MLP E_CR over the cached CLIP embedding) or
    ``image`` (``config["image"]``: a timm / torchvision backbone under the same MLP, trained on
    pixels with TMCR's augmentation, decoded by ``loader_workers`` processes; autocast per
    ``precision``). One optimizer step takes ``batches_per_step`` balanced batches (``auto``: one
    per worker); each worker takes its own share of them (rank-aware shards), accumulates their
    gradients, and DDP (``ray.train.torch.prepare_model``) averages them across workers: the
    step is the same as one worker taking all of them.
    """
    rank, world, device = worker_info()
    gen = _seed(config["seed"])
    encoder = config.get("encoder", "embedding")
    if encoder not in ENCODERS:
        raise ValueError(f"pretrain.encoder must be one of {ENCODERS}, got {encoder!r}")
    image = encoder == "image"
    # labels only (a few small columns); the embeddings of the rows this worker trains on are read per epoch
    train = load_features(config["features_path"], None, splits=("train",))
    index = pd.read_parquet(config["index_path"])
    # N_s per cluster comes from the index stage (`index.n_per_bin`)
    sampler = BalancedBatchSampler(index, batches_per_cluster=config["batches_per_cluster"], seed=config["seed"])
    bins = torch.from_numpy(score_bins(train.score, low=config["low"], high=config["high"]).astype(np.int64))
    per_step = steps_of(config.get("batches_per_step", "auto"), world)
    local = per_step // world
    if image:
        img = config["image"]
        paths = pretrain_images(config, train)
        enc = ImageCREncoder(img["backbone"], config["hidden"], config["dim"], config["dropout"], image_size=img["image_size"],
                             resize=img["resize"], weights=img["weights"])
        groups = [{"params": list(enc.backbone.parameters()), "lr": img["backbone_lr"]}, {"params": list(enc.proj.parameters())}]
        make = functools.partial(_rows_views, paths, img["image_size"], img["resize"], img.get("hflip", True))
        dtype, workers = amp_dtype(img.get("precision", "auto"), device), img.get("loader_workers", 0)
    else:
        cache = config["embeddings_path"]
        enc = CREncoder(embedding_dim(cache), config["hidden"], config["dim"], config["dropout"])
        groups = [{"params": list(enc.parameters())}]
        dtype, workers = None, 0
    enc.to(device)
    opt = torch.optim.AdamW(groups, lr=config["lr"], weight_decay=config["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = 0
    if (state := load_resume_state(config)) is not None:
        enc.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])  # after the move: its state lands on the parameters' device
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start = state["epoch"] + 1
        restore_rng(state.get("rng"), gen)
    model = ray.train.torch.prepare_model(enc) if world > 1 else enc  # DDP across workers
    log = EpochLogger(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    for epoch in tqdm(range(start, config["epochs"]), desc="pretrain", disable=rank != 0, initial=start, total=config["epochs"]):
        batches = sampler.epoch(epoch)
        n_steps = len(batches) // per_step
        if n_steps == 0:
            raise DataError(f"pretrain: an epoch has {len(batches)} balanced batches, fewer than batches_per_step = {per_step}; "
                            "raise pretrain.batches_per_cluster or lower pretrain.batches_per_step.")
        # this worker's share of each step: batches [rank * local, (rank + 1) * local) of the step's group
        specs = [(batches[s * per_step + j], (config["seed"], epoch, s * per_step + j))
                 for s in range(n_steps) for j in range(rank * local, (rank + 1) * local)]
        if not image:  # this epoch's shard: the embeddings of exactly the rows of this worker's batches
            make = functools.partial(_rows_tensor, *_epoch_shard(cache, train.image_id, specs))
        enc.train()
        total, n, t0 = 0.0, 0, time.perf_counter()
        views = iter(batch_loader(specs, make, workers=workers, device=device))
        for s in range(n_steps):
            opt.zero_grad(set_to_none=True)
            for j in range(local):
                rows = specs[s * local + j][0]
                x = to_device(next(views), device)
                last = j == local - 1
                with model.no_sync() if world > 1 and not last else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        z = model(x)
                    loss = traversal_contrastive_loss(z.float(), bins[rows].to(device), tau=config["tau"])
                    scaler.scale(loss / local).backward()
                total, n = total + loss.item(), n + 1
            scaler.step(opt)
            scaler.update()
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch, "loss": total / max(n, 1), "batches": n, "steps": n_steps, "epoch_s": seconds,
                   "images_per_s": sum(len(b) for b, _ in specs) * world / max(seconds, 1e-9)}
        state = None
        if rank == 0:
            log(metrics, epoch)
            state = {
                "model": enc.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                "spec": enc.spec(), "started_at_epoch": start, "precision": str(dtype or torch.float32).removeprefix("torch."),
                "rng": rng_state(gen), "metrics": metrics,
            }
        report_epoch(metrics, state, config, rank)


def _val_metrics(model: TMCRHead, matcher: TagMatcher, val) -> dict[str, float]:
    if len(val) < 3:
        return {}
    probs = torch.softmax(torch.from_numpy(predict_logits(model, matcher, val.clip, val.emb)), 1).numpy()
    pred = dist_to_score(probs)
    return {"val_emd2": float(emd(probs, val.dist, 2)), "val_srcc": float(srcc(pred, val.score))}


def _head_inputs(config: dict, rank: int, world: int) -> tuple[dict, TagMatcher]:
    """What one head worker reads: its shard of the train rows (``shard_rows``) with their
    embeddings, and the validation rows on rank 0 only (the others get none)."""
    emb, clip, tags = input_paths(config)
    path = config["features_path"]
    n_train = split_rows(path, "train")
    shard = shard_rows(n_train, rank, world, config["seed"])
    train = load_features(path, emb, clip_path=clip, splits=("train",), rows=shard)
    val = load_features(path, emb, clip_path=clip, splits=("val",), rows=None if rank == 0 else np.zeros(0, np.int64))
    return {"train": train, "val": val, "n_train": n_train, "shard": shard}, load_matcher(path, tags)


def _tm_chunks(matcher: TagMatcher, clip: np.ndarray, device, chunk_rows: int = 4096):
    with torch.no_grad():
        for s in range(0, len(clip), chunk_rows):
            yield matcher(torch.from_numpy(clip[s : s + chunk_rows]).to(device))


def _all_reduce(world: int):
    if world <= 1:
        return None
    import torch.distributed as dist

    return dist.all_reduce


def _pool_inputs(config: dict, rank: int, world: int, image_id: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """This worker's shard of the unlabelled pool ``image_id``: its positions and their (CLIP, E_CR input) rows."""
    emb, clip, _ = input_paths(config)
    mine = shard_rows(len(image_id), rank, world, config["seed"])
    e = read_embedding_rows(emb, image_id[mine])
    return mine, (e if Path(clip) == Path(emb) else read_embedding_rows(clip, image_id[mine]), e)


def supervised_loop(config: dict) -> None:
    """Head training (TMCR sec. 3.4 + ELTA TFA/FLSA), or self-training when pseudo labels are given.

    Loss per step: EMD_r(softmax(MLP(F_aes)), y) over the labelled batch plus TFA's mixed
    samples, + flsa_weight * FLSA(F_aes, s); with pseudo labels, + unlabeled_weight * L_u
    where L_u is the EMD to the sharpened pseudo-label distribution over a batch drawn from
    the whole unlabelled pool, unselected rows counting as zeros (ELTA eq. 10).
    """
    rank, world, device = worker_info()
    gen = _seed(config["seed"])
    h = config["head"]
    dist_loss = head_loss(h)
    feats, matcher = _head_inputs(config, rank, world)
    train, val = feats["train"], feats["val"]
    model, arch = build_head(config, matcher.dim, train.emb.shape[1], train.n_levels)
    model.to(device)
    matcher.to(device)
    if config.get("init_path"):  # self-training starts from the trained head (and its TM normaliser)
        model.load_state_dict(torch.load(config["init_path"], map_location=device, weights_only=True)["model"])
    else:  # TM statistics of all training rows: each worker streams its shard, the sums are all-reduced
        model.fit_normaliser(functools.partial(_tm_chunks, matcher, train.clip, device), _all_reduce(world))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config["lr"], weight_decay=h["weight_decay"])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=h["lr_decay"])
    start, best = 0, None
    if (state := load_resume_state(config)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, best = state["epoch"] + 1, state.get("best")
        restore_rng(state.get("rng"), gen)

    tensors = {k: torch.from_numpy(getattr(train, k)) for k in ("clip", "emb", "dist", "score")}
    local = np.full(feats["n_train"], -1, dtype=np.int64)  # train row -> row of this worker's shard
    local[feats["shard"]] = np.arange(len(feats["shard"]))
    local = torch.from_numpy(local)
    pseudo = None
    if config.get("pseudo_path"):
        pseudo = load_pseudo_pool(config["pseudo_path"], functools.partial(_pool_inputs, config, rank, world))
    logits = functools.partial(_logits, model, matcher)
    bs = h["batch_size"]
    n_batches = max(1, math.ceil(feats["n_train"] / bs / world))
    log = EpochLogger(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    for epoch in tqdm(range(start, config["epochs"]), desc=config.get("desc", "head"), disable=rank != 0, initial=start, total=config["epochs"]):
        model.train()
        perm = torch.randperm(feats["n_train"], generator=gen)
        mine = local[perm]
        mine = mine[mine >= 0]  # this worker's shard, in this epoch's order
        totals = {"loss": 0.0, "emd": 0.0, "flsa": 0.0, "unlabeled": 0.0}
        t0 = time.perf_counter()
        for b in range(n_batches):
            rows = mine[b * bs : (b + 1) * bs]
            if len(rows) < 2:
                rows = mine[:bs]
            clip, emb = tensors["clip"][rows].to(device), tensors["emb"][rows].to(device)
            dist, score = tensors["dist"][rows].to(device), tensors["score"][rows].to(device)
            fused = model.fuse(matcher(clip), emb)  # TM per batch, on the worker's device
            targets = dist
            if h["tfa"] and len(rows) >= 3:
                mf, mt, _ = tfa_mix(fused, dist, score, tau1=h["tfa_tau1"], tau2=h["tfa_tau2"], n_mix=h["tfa_n_mix"], generator=gen)
                fused_all, targets = torch.cat([fused, mf]), torch.cat([dist, mt])
            else:
                fused_all = fused
            l_emd = dist_loss(torch.softmax(model.classify(fused_all), 1), targets)
            loss = l_emd
            l_flsa = torch.zeros(())
            if h["flsa"]:
                l_flsa = flsa_loss(fused, score)
                loss = loss + h["flsa_weight"] * l_flsa
            l_u = torch.zeros(())
            if pseudo is not None:  # ELTA eq. 10: unselected rows of the batch count as zeros
                l_u = unlabeled_loss(pseudo, logits, dist_loss, bs, gen, device)
                loss = loss + config["unlabeled_weight"] * l_u
            opt.zero_grad()
            loss.backward()
            sync_gradients(model, world)
            opt.step()
            for k, v in (("loss", loss), ("emd", l_emd), ("flsa", l_flsa), ("unlabeled", l_u)):
                totals[k] += v.item() / n_batches
        sched.step()
        seconds = time.perf_counter() - t0  # the training steps of this epoch, validation aside
        metrics = {"epoch": epoch, **totals, "lr": sched.get_last_lr()[0], "epoch_s": seconds,
                   "rows_per_s": len(mine) * world / max(seconds, 1e-9)}
        state = None
        if rank == 0:
            metrics.update(_val_metrics(model, matcher, val))
            log(metrics, epoch)
            if h["keep_best"] and metrics.get("val_srcc", -np.inf) > (best or {}).get("val_srcc", -np.inf):
                best = {"model": _cpu_copy(model.state_dict()), "epoch": epoch, "val_srcc": metrics["val_srcc"]}
            state = {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": epoch, "arch": arch, "started_at_epoch": start, "best": best,
                "rng": rng_state(gen), "metrics": metrics,
            }
            if epoch + 1 == config["epochs"]:
                state.update(_selected(state))
        report_epoch(metrics, state, config, rank)


def _cpu_copy(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def _selected(state: dict) -> dict:
    """The weights the stage keeps: those of the best validation-SRCC epoch when
    ``head.keep_best`` found one (the baselines select the same way), else the last epoch's."""
    best = state.get("best")
    if best is None:
        return {"selected_epoch": state["epoch"]}
    return {"model": best["model"], "selected_epoch": best["epoch"], "selected_val_srcc": best["val_srcc"]}
