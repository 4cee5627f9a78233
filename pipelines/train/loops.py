"""Ray Train loops: contrastive pretraining of E_CR, and head / self-training.

Each loop is a plain function of a config dict (all paths absolute) that Ray Train runs
on every worker. Workers split each epoch's batches by rank and average gradients
(``sync_gradients``); rank 0 logs to MLflow and checkpoints.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipelines.heads.losses import emd_loss, flsa_loss
from pipelines.heads.model import TMCRHead
from pipelines.heads.tfa import tfa_mix
from pipelines.metrics import dist_to_score, emd, srcc
from pipelines.ranking.encoder import CREncoder
from pipelines.ranking.index import BalancedBatchSampler, score_bins
from pipelines.ranking.loss import traversal_contrastive_loss
from pipelines.selftrain.unlabeled import load_pseudo_pool, unlabeled_loss
from pipelines.tracking.runs import EpochLogger
from pipelines.train.data import load_features
from pipelines.train.runner import load_resume_state, report_epoch, restore_rng, rng_state, sync_gradients, worker_info


def _seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def pretrain_loop(config: dict) -> None:
    """Traversal contrastive learning on balanced-level batches (TMCR sec. 3.3)."""
    rank, world, device = worker_info()
    gen = _seed(config["seed"])
    train = load_features(config["features_path"], config["embeddings_path"]).split_of("train")
    index = pd.read_parquet(config["index_path"])
    # N_s per cluster comes from the index stage (`index.n_per_bin`)
    sampler = BalancedBatchSampler(index, batches_per_cluster=config["batches_per_cluster"], seed=config["seed"])
    emb = torch.from_numpy(train.emb)
    bins = torch.from_numpy(score_bins(train.score, low=config["low"], high=config["high"]).astype(np.int64))
    enc = CREncoder(emb.shape[1], config["hidden"], config["dim"], config["dropout"]).to(device)
    opt = torch.optim.AdamW(enc.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    start = 0
    if (state := load_resume_state(config)) is not None:
        enc.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
        restore_rng(state.get("rng"), gen)
    log = EpochLogger(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    for epoch in tqdm(range(start, config["epochs"]), desc="pretrain", disable=rank != 0, initial=start, total=config["epochs"]):
        batches = sampler.epoch(epoch)
        batches = batches[: len(batches) // world * world][rank::world]
        enc.train()
        total, n = 0.0, 0
        for rows in batches:
            rows_t = torch.from_numpy(np.asarray(rows, dtype=np.int64))
            z = enc(emb[rows_t].to(device))
            loss = traversal_contrastive_loss(z, bins[rows_t].to(device), tau=config["tau"])
            opt.zero_grad()
            loss.backward()
            sync_gradients(enc, world)
            opt.step()
            total, n = total + loss.item(), n + 1
        metrics = {"epoch": epoch, "loss": total / max(n, 1), "batches": n}
        state = None
        if rank == 0:
            log(metrics, epoch)
            state = {
                "model": enc.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "spec": enc.spec(),
                "started_at_epoch": start, "rng": rng_state(gen), "metrics": metrics,
            }
        report_epoch(metrics, state, config, rank)


def build_head(config: dict, tm_in: int, emb_dim: int, n_levels: int) -> tuple[TMCRHead, dict]:
    """The head described by ``config['head']``, with the pretrained E_CR when used.

    Returns the model and its architecture dict (``head_from_arch`` rebuilds it).
    """
    cr_spec, cr_weights = None, None
    if config["head"]["use_cr"]:
        cr_state = torch.load(config["cr_path"], map_location="cpu", weights_only=False)
        cr_spec, cr_weights = cr_state["spec"], cr_state["model"]
        if cr_spec["in_dim"] != emb_dim:
            raise ValueError(f"CR encoder expects {cr_spec['in_dim']}-d embeddings, features have {emb_dim}")
    arch = {"tm_in": tm_in, "n_levels": n_levels, "cr_spec": cr_spec, "head": config["head"]}
    model = head_from_arch(arch)
    if cr_weights is not None:
        model.cr.load_state_dict(cr_weights)
    return model, arch


def head_from_arch(arch: dict) -> TMCRHead:
    """An untrained head of the given architecture (load a state dict into it)."""
    h = arch["head"]
    cr = CREncoder(**arch["cr_spec"]) if arch["cr_spec"] else None
    return TMCRHead(
        arch["tm_in"], arch["n_levels"], cr, tm_dim=h["tm_dim"], cr_dim=h["cr_dim"], hidden=h["hidden"],
        dropout=h["dropout"], use_tm=h["use_tm"], use_cr=h["use_cr"], fine_tune=h["protocol"] == "fine_tune",
        cr_features=h.get("cr_features", "output"),  # models saved before the option: output
    )


def load_head(path) -> TMCRHead:
    """A trained head from a model file written by the head / selftrain stage."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = head_from_arch(state["arch"])
    model.load_state_dict(state["model"])
    return model.eval()


@torch.no_grad()
def predict_logits(model: TMCRHead, tm: np.ndarray, emb: np.ndarray, batch: int = 1024) -> np.ndarray:
    model.eval()
    out = [
        model(torch.from_numpy(tm[i : i + batch]), torch.from_numpy(emb[i : i + batch])).numpy()
        for i in range(0, len(tm), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.mlp[-1].out_features), np.float32)


def _val_metrics(model: TMCRHead, val) -> dict[str, float]:
    if len(val) < 3:
        return {}
    probs = torch.softmax(torch.from_numpy(predict_logits(model, val.tm, val.emb)), 1).numpy()
    pred = dist_to_score(probs)
    return {"val_emd2": float(emd(probs, val.dist, 2)), "val_srcc": float(srcc(pred, val.score))}


HEAD_LOSSES = ("emd", "re_emd")


def head_loss(h: dict):
    """The distribution loss of ``head.loss``: TMCR's EMD_r (eq. 14), or M+MNet's Re-EMD
    (eq. 4, alpha 10, beta 0.1, gamma = emd_r), which weights each level's CDF gap by the
    target's mass there."""
    from pipelines.models.losses import re_emd_loss

    r = h["emd_r"]
    if h.get("loss", "emd") == "re_emd":
        return lambda pred, target: re_emd_loss(pred, target, gamma=r)
    return lambda pred, target: emd_loss(pred, target, r=r)


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
    feats = load_features(config["features_path"], config["embeddings_path"])
    train, val = feats.split_of("train"), feats.split_of("val")
    model, arch = build_head(config, train.tm.shape[1], train.emb.shape[1], train.n_levels)
    model.fit_normaliser(torch.from_numpy(train.tm))
    if config.get("init_path"):  # self-training starts from the trained head
        model.load_state_dict(torch.load(config["init_path"], map_location="cpu", weights_only=False)["model"])
    model.to(device)
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

    tensors = {k: torch.from_numpy(getattr(train, k)) for k in ("tm", "emb", "dist", "score")}
    pseudo = load_pseudo_pool(config["pseudo_path"], feats.image_id, feats.tm, feats.emb) if config.get("pseudo_path") else None
    bs = h["batch_size"]
    n_batches = max(1, math.ceil(len(train) / bs / world))
    log = EpochLogger(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    for epoch in tqdm(range(start, config["epochs"]), desc=config.get("desc", "head"), disable=rank != 0, initial=start, total=config["epochs"]):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        mine = perm[rank::world]
        totals = {"loss": 0.0, "emd": 0.0, "flsa": 0.0, "unlabeled": 0.0}
        for b in range(n_batches):
            rows = mine[b * bs : (b + 1) * bs]
            if len(rows) < 2:
                rows = mine[:bs]
            tm, emb = tensors["tm"][rows].to(device), tensors["emb"][rows].to(device)
            dist, score = tensors["dist"][rows].to(device), tensors["score"][rows].to(device)
            fused = model.fuse(tm, emb)
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
                l_u = unlabeled_loss(pseudo, model, dist_loss, bs, gen, device)
                loss = loss + config["unlabeled_weight"] * l_u
            opt.zero_grad()
            loss.backward()
            sync_gradients(model, world)
            opt.step()
            for k, v in (("loss", loss), ("emd", l_emd), ("flsa", l_flsa), ("unlabeled", l_u)):
                totals[k] += v.item() / n_batches
        sched.step()
        metrics = {"epoch": epoch, **totals, "lr": sched.get_last_lr()[0]}
        state = None
        if rank == 0:
            metrics.update(_val_metrics(model, val))
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
