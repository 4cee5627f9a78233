"""Helpers of the real-feature benchmark (``bench_real.py``): data loading, splits, baselines, metrics.

Data folder: ``items.parquet`` + ``vocab.parquet`` in the schema of
``$IAA_SHARED_DATA/bench/dpc_minilm`` (see its README). ``IAA_SHARED_DATA`` defaults to
``../shared/data`` next to the repo root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from pipelines.heads.losses import emd_loss
from pipelines.io import DataError
from pipelines.metrics import (
    binary_accuracy,
    dist_to_score,
    emd,
    evaluate,
    lmh_mae,
    longtail_metrics,
    mse,
    plcc,
    srcc,
)
from pipelines.train.data import list_column

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    return Path(os.environ.get("IAA_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()


@dataclass
class BenchData:
    image_id: np.ndarray  # str
    split: np.ndarray  # train / val / test (after any hold-out)
    emb: np.ndarray  # N x D float32, L2-normalised
    dist: np.ndarray  # N x 10 normalised vote distribution
    score: np.ndarray  # N mean score
    phrases: list[str]
    phrase_emb: np.ndarray  # V x D
    notes: list[str]


def load_bench(data_dir: Path, *, val_fraction: float = 0.2, max_items: int | None = None, seed: int = 0) -> BenchData:
    """Read a dpc_minilm-shaped folder; hold out ``val_fraction`` of train when there is no ``val``."""
    items_p, vocab_p = data_dir / "items.parquet", data_dir / "vocab.parquet"
    for p in (items_p, vocab_p):
        if not p.exists():
            raise DataError(f"{p}: not found; --data must be a folder with items.parquet and vocab.parquet "
                            "(schema: bench/dpc_minilm/README.md).")
    items = pq.read_table(items_p)
    need = {"image_id", "split", "votes", "embedding"}
    if missing := need - set(items.column_names):
        raise DataError(f"{items_p}: missing column(s) {sorted(missing)}; expected {sorted(need)}.")
    vocab = pq.read_table(vocab_p)
    if missing := {"phrase", "embedding"} - set(vocab.column_names):
        raise DataError(f"{vocab_p}: missing column(s) {sorted(missing)}; expected phrase, embedding.")
    emb = list_column(items, "embedding")
    votes = list_column(items, "votes").astype(np.float64)
    tot = votes.sum(1, keepdims=True)
    if np.any(tot <= 0):
        raise DataError(f"{items_p}: {int((tot <= 0).sum())} rows have no votes.")
    dist = (votes / tot).astype(np.float32)
    split = np.asarray(items.column("split").to_pylist(), dtype=object)
    ids = np.asarray([str(i) for i in items.column("image_id").to_pylist()], dtype=object)
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    if max_items is not None and max_items < len(ids):
        tr = np.flatnonzero(split == "train")
        drop = rng.choice(tr, size=max(0, len(tr) - max_items), replace=False)
        keep = np.setdiff1d(np.arange(len(ids)), drop)
        ids, split, emb, dist = ids[keep], split[keep], emb[keep], dist[keep]
        notes.append(f"--max-items {max_items}: train subsampled to {int((split == 'train').sum())} rows")
    if not (split == "val").any():
        tr = np.flatnonzero(split == "train")
        n_val = max(1, int(round(val_fraction * len(tr))))
        split = split.copy()
        split[rng.choice(tr, n_val, replace=False)] = "val"
        notes.append(f"no 'val' rows: held out {n_val} of {len(tr)} train rows as val (seed {seed})")
    for s in ("train", "val", "test"):
        if (split == s).sum() < 5:
            raise DataError(f"{items_p}: split {s!r} has {(split == s).sum()} rows; need >= 5.")
    return BenchData(
        image_id=ids, split=split, emb=np.ascontiguousarray(emb, np.float32), dist=dist,
        score=dist_to_score(dist).astype(np.float32),
        phrases=[str(p) for p in vocab.column("phrase").to_pylist()],
        phrase_emb=np.ascontiguousarray(list_column(vocab, "embedding"), np.float32), notes=notes,
    )


# ----------------------------------------------------------------------------- metrics
def score_metrics(pred_score: np.ndarray, true_dist: np.ndarray, train_scores: np.ndarray, seed: int = 0) -> dict:
    """``pipelines.metrics.evaluate``'s keys for a model that predicts a score only (EMD: None)."""
    ts = dist_to_score(true_dist)
    ps = np.asarray(pred_score, dtype=np.float64)
    lmh = lmh_mae(ps, ts)
    lt = longtail_metrics(ps, ts, train_scores, seed=seed)
    return {
        "acc": binary_accuracy(ps, ts, 5.0), "plcc": plcc(ps, ts), "srcc": srcc(ps, ts), "mse": mse(ps, ts),
        "emd1": None, "emd2": None, "mae_L": lmh["L"], "mae_M": lmh["M"], "mae_H": lmh["H"],
        "lt_mse_all": lt["ALL"], "lt_mse_many": lt["Many"], "lt_mse_med": lt["Med"], "lt_mse_few": lt["Few"],
        "n": int(ps.size),
    }


def dist_metrics(pred_dist: np.ndarray, true_dist: np.ndarray, train_scores: np.ndarray, seed: int = 0) -> dict:
    return evaluate(pred_dist, true_dist, train_scores, threshold=5.0, seed=seed)


# ----------------------------------------------------------------------------- baselines
def ridge_baseline(d: BenchData, alphas=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100)) -> tuple[np.ndarray, dict]:
    """scikit-learn Ridge on embedding -> mean score; alpha by val MSE."""
    from sklearn.linear_model import Ridge

    tr, va, te = (d.split == s for s in ("train", "val", "test"))
    best = None
    for a in alphas:
        m = Ridge(alpha=a).fit(d.emb[tr], d.score[tr])
        v = float(np.mean((m.predict(d.emb[va]) - d.score[va]) ** 2))
        if best is None or v < best[0]:
            best = (v, a, m)
    return best[2].predict(d.emb[te]), {"alpha": best[1], "val_mse": best[0],
                                        "val_srcc": srcc(best[2].predict(d.emb[va]), d.score[va])}


class LaionHead(nn.Module):
    """improved-aesthetic-predictor's stack (their 'linearMSE'): no activations."""

    def __init__(self, d: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(d, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x).squeeze(1)


def _fit_select(model, loss_fn, x, y, xv, yv, val_fn, *, epochs, lr, bs, seed, curve=False, val_srcc=None):
    """Adam training; keep the epoch with the lowest ``val_fn``. ``curve``: also return the
    per-epoch train loss, ``val_fn`` and (with ``val_srcc(model)``) validation SRCC."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, best_epoch = float("inf"), None, -1
    hist = {"loss": [], "val": [], "val_srcc": []}
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        total, n = 0.0, 0
        for i in range(0, len(x), bs):
            r = perm[i : i + bs]
            loss = loss_fn(model(x[r]), y[r])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        model.eval()
        with torch.no_grad():
            v = float(val_fn(model(xv), yv))
            if curve:
                hist["loss"].append(round(total / n, 5))
                hist["val"].append(round(v, 5))
                if val_srcc is not None:
                    hist["val_srcc"].append(round(float(val_srcc(model)), 5))
        if v < best:
            best, best_epoch = v, ep
            best_state = {k: t.clone() for k, t in model.state_dict().items()}
    model.load_state_dict(best_state)
    info = {"best_epoch": best_epoch, "val": best}
    if curve:
        info["curve"] = hist
    return model.eval(), info


def laion_baseline(d: BenchData, seed: int = 0, epochs: int = 60) -> tuple[np.ndarray, dict]:
    torch.manual_seed(seed)
    tr, va, te = (d.split == s for s in ("train", "val", "test"))
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
    model, info = _fit_select(
        LaionHead(d.emb.shape[1]), nn.functional.mse_loss, t(d.emb[tr]), t(d.score[tr]), t(d.emb[va]), t(d.score[va]),
        nn.functional.mse_loss, epochs=epochs, lr=1e-3, bs=256, seed=seed,
    )
    with torch.no_grad():
        info["val_srcc"] = srcc(model(t(d.emb[va])).numpy(), d.score[va])
        return model(t(d.emb[te])).numpy(), info


class _SoftmaxMLP(nn.Module):
    def __init__(self, d: int, n_levels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 256), nn.ReLU(), nn.Dropout(0.25), nn.Linear(256, n_levels))

    def features(self, x):
        """The feature ELTA's TFA and FLSA act on: the hidden layer, below the classifier."""
        return self.net[:3](x)

    def logits(self, x):
        return self.net(x)

    def forward(self, x):
        return torch.softmax(self.net(x), 1)


def mlp_emd_baseline(d: BenchData, seed: int = 0, epochs: int = 60, curve: bool = False) -> tuple[np.ndarray, dict]:
    """Linear-ReLU-Dropout-Linear-softmax under the EMD (r=2) loss; epoch by val EMD2.
    ``curve``: per-epoch train EMD, val EMD2 and val SRCC in ``info["curve"]``."""
    torch.manual_seed(seed)
    tr, va, te = (d.split == s for s in ("train", "val", "test"))
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
    model, info = _fit_select(
        _SoftmaxMLP(d.emb.shape[1], d.dist.shape[1]), lambda p, y: emd_loss(p, y, r=2), t(d.emb[tr]), t(d.dist[tr]),
        t(d.emb[va]), t(d.dist[va]), lambda p, y: emd(p.numpy(), y.numpy(), 2), epochs=epochs, lr=1e-3, bs=128, seed=seed,
        curve=curve, val_srcc=lambda m: srcc(dist_to_score(m(t(d.emb[va])).numpy()), d.score[va]),
    )
    with torch.no_grad():
        info["val_srcc"] = srcc(dist_to_score(model(t(d.emb[va])).numpy()), d.score[va])
        return model(t(d.emb[te])).numpy(), info


def mlp_elta(d: BenchData, seed: int, head, pseudo_search, selftrain, epochs: int = 60) -> dict[str, tuple[np.ndarray, dict]]:
    """ELTA plugged into the EMD-MLP baseline (ELTA sec. 4.3, Fig. 4): the same MLP, init, optimiser,
    batch and epoch rule (best val EMD2) as ``mlp_emd_baseline``, trained with TFA (``head.tfa_*``)
    and FLSA (``head.flsa_weight``) on its hidden layer; then APDS (beta, t) on the labelled val,
    pseudo labels for the 'unlabeled' rows, and one round of self-training (L_s + L_u, ELTA eq. 10;
    ``selftrain.epochs`` / ``lr`` / ``unlabeled_weight``), again keeping the best val-EMD2 epoch.

    Returns ``{"tfa_flsa": (test probs, info), "elta": (test probs, info)}``.
    """
    from pipelines.heads.losses import flsa_loss
    from pipelines.heads.tfa import tfa_mix
    from pipelines.selftrain.apds import apds_sharpen, grid_search, select_pseudo_labels
    from pipelines.heads.unlabeled import unlabeled_loss

    torch.manual_seed(seed)
    tr, va, te, un = (d.split == s for s in ("train", "val", "test", "unlabeled"))
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
    x, y, sc = t(d.emb[tr]), t(d.dist[tr]), t(d.score[tr])
    xv, yv = t(d.emb[va]), d.dist[va]
    gen = torch.Generator().manual_seed(seed)
    emd_r = lambda p, q: emd_loss(p, q, r=2)  # noqa: E731

    def fit(model, n_epochs, lr, pool=None):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.eval()
        with torch.no_grad():
            best, best_epoch = (emd(model(xv).numpy(), yv, 2), -1) if pool is not None else (float("inf"), -1)
        best_state = {k: v.clone() for k, v in model.state_dict().items()}
        for ep in range(n_epochs):
            model.train()
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 128):
                r = perm[i : i + 128]
                f = model.features(x[r])
                f_all, y_all = f, y[r]
                if head.tfa and len(r) >= 3:
                    mf, my, _ = tfa_mix(f, y[r], sc[r], tau1=head.tfa_tau1, tau2=head.tfa_tau2, n_mix=head.tfa_n_mix, generator=gen)
                    f_all, y_all = torch.cat([f, mf]), torch.cat([y[r], my])
                loss = emd_r(torch.softmax(model.net[3](f_all), 1), y_all)
                if head.flsa:
                    loss = loss + head.flsa_weight * flsa_loss(f, sc[r])
                if pool is not None:
                    loss = loss + selftrain.unlabeled_weight * unlabeled_loss(pool, model.logits, emd_r, 128, gen)
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                v = emd(model(xv).numpy(), yv, 2)
            if v < best:
                best, best_epoch = v, ep
                best_state = {k: w.clone() for k, w in model.state_dict().items()}
        model.load_state_dict(best_state)
        return model.eval(), {"best_epoch": best_epoch, "val": best}

    def result(model, info):
        with torch.no_grad():
            info["val_srcc"] = srcc(dist_to_score(model(xv).numpy()), d.score[va])
            return model(t(d.emb[te])).numpy(), info

    model, info = fit(_SoftmaxMLP(d.emb.shape[1], d.dist.shape[1]), epochs, 1e-3)
    out = {"tfa_flsa": result(model, dict(info))}
    with torch.no_grad():
        logits_val, logits_un = model.logits(xv).numpy(), model.logits(t(d.emb[un])).numpy()
    mean_score = float(d.score[tr].mean())
    search = grid_search(logits_val, d.score[va], mean_score, pseudo_search.betas, pseudo_search.thresholds,
                         min_selected=max(1, int(np.ceil(pseudo_search.min_selected * int(va.sum())))))
    probs = apds_sharpen(logits_un, mean_score, search["beta"])
    selected = select_pseudo_labels(probs, search["t"])
    pool = {"inputs": (t(d.emb[un]),), "dist": t(probs), "selected": torch.from_numpy(selected)}
    model, info = fit(model, selftrain.epochs, selftrain.lr, pool)
    info["apds"] = {"beta": search["beta"], "t": search["t"], "val_mae": search["mae"], "unlabeled_n": int(un.sum()),
                    "unlabeled_selected": int(selected.sum())}
    out["elta"] = result(model, info)
    return out
