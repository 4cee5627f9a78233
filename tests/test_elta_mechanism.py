"""ELTA's modules do what the paper says they do, on a small synthetic long-tailed regression.

The data: a strong, known signal (score = 5.4 + 0.75 z, z ~ N(0, 1), features a noisy
embedding of z) with AVA-like vote distributions (a discretised Gaussian over levels
1..10). Most scores sit near the mean, so a small head trained for a few epochs regresses
its tail predictions towards the mean: the failure ELTA targets. Each test trains the
same head with a module on and off (same seeds, same data, same steps) and checks the
paper's claim on held-out rows:

- TFA (tail feature mixup, ELTA eq. 1-4) lowers the MAE of the bottom / top 20 % of scores;
- FLSA (feature-label similarity alignment, eq. 5-6) lowers it too;
- APDS (adaptive sharpening, eq. 7-9): for a head whose distributions are too flat (the
  case APDS is for: its logits halved, as an early-stopped or over-regularised head gives),
  with beta chosen on a labelled validation subset, the sharpened pseudo-labels of an
  unlabelled pool are closer to the truth than the unsharpened ones, most of all in the
  tails. (For a head whose spread is already right, sharpening only rounds scores to
  levels and does not help: ``pseudo_search.betas`` keeps 0, so the search can say so.)

The module code under test is the project's own (``pipelines.heads.tfa`` / ``losses`` and
``pipelines.selftrain.apds``); breaking any of them (e.g. TFA's first-sample weights
favouring the mean, FLSA's label similarity inverted, APDS's temperature above 1) fails
its test. CPU, a few seconds in all.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.heads.losses import emd_loss, flsa_loss
from pipelines.heads.tfa import tfa_mix
from pipelines.metrics import lmh_mae
from pipelines.selftrain.apds import apds_sharpen, grid_search

LEVELS = np.arange(1, 11, dtype=np.float64)
SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: tiny matmuls, and a busy machine makes thread hand-offs dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def long_tailed(n: int, seed: int, d: int = 16, noise: float = 0.5):
    """Features (n, d), vote distributions (n, 10) and their mean scores (n,)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n)
    s = np.clip(5.4 + 0.75 * z, 1.5, 9.5)
    u = np.random.default_rng(123).standard_normal((2, d))  # the same signal directions for every split
    x = np.outer(z, u[0]) + 0.5 * np.outer(np.tanh(z), u[1]) + noise * rng.standard_normal((n, d))
    dist = np.exp(-0.5 * (LEVELS[None] - s[:, None]) ** 2)
    dist /= dist.sum(1, keepdims=True)
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return t(x), t(dist), t(dist @ LEVELS)


class Head(nn.Module):
    """Features (the layer TFA / FLSA act on, as F_aes in the TMCR head) -> logits over 10 levels."""

    def __init__(self, d: int, hidden: int = 32):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(d, hidden), nn.ReLU())
        self.classify = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.classify(self.features(x))


def train_head(seed: int, *, tfa: bool = False, flsa_weight: float = 0.0, epochs: int = 3, n: int = 800) -> Head:
    """Adam, batch 64, EMD r=2 (+ TFA's mixed rows appended, + flsa_weight * FLSA), as the head loop."""
    x, y, s = long_tailed(n, seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Head(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 64):
            r = perm[i : i + 64]
            f = model.features(x[r])
            f_all, y_all = f, y[r]
            if tfa:
                mf, my, _ = tfa_mix(f, y[r], s[r], n_mix=8, generator=gen)
                f_all, y_all = torch.cat([f, mf]), torch.cat([y[r], my])
            loss = emd_loss(torch.softmax(model.classify(f_all), 1), y_all, r=2)
            if flsa_weight:
                loss = loss + flsa_weight * flsa_loss(f, s[r])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def tail_mae(model: Head, seed: int) -> dict[str, float]:
    """MAE on the bottom 20 % / middle / top 20 % of a held-out set's scores (ELTA sec. 4.1)."""
    x, _, s = long_tailed(1000, 1000 + seed)
    with torch.no_grad():
        pred = torch.softmax(model(x), 1).double().numpy() @ LEVELS
    return lmh_mae(pred, s.numpy())


def mean_over_seeds(**kw) -> dict[str, float]:
    runs = [tail_mae(train_head(seed, **kw), seed) for seed in SEEDS]
    return {k: float(np.mean([r[k] for r in runs])) for k in ("L", "M", "H")}


@pytest.fixture(scope="module")
def baseline() -> dict[str, float]:
    return mean_over_seeds()


def test_synthetic_task_shows_regression_to_the_mean(baseline):
    # the premise of the other tests: the tails are where the plain head fails
    assert baseline["L"] > 1.3 * baseline["M"] and baseline["H"] > 1.3 * baseline["M"], baseline


def test_tfa_lowers_tail_mae(baseline):
    on = mean_over_seeds(tfa=True)
    tails_off, tails_on = baseline["L"] + baseline["H"], on["L"] + on["H"]
    assert tails_on < 0.9 * tails_off, (baseline, on)
    assert on["L"] < baseline["L"] and on["H"] < baseline["H"], (baseline, on)


def test_flsa_lowers_tail_mae(baseline):
    on = mean_over_seeds(flsa_weight=0.3)
    tails_off, tails_on = baseline["L"] + baseline["H"], on["L"] + on["H"]
    assert tails_on < 0.95 * tails_off, (baseline, on)
    assert on["L"] < baseline["L"] and on["H"] < baseline["H"], (baseline, on)


def test_apds_sharpened_pseudo_labels_beat_unsharpened():
    """beta chosen on a labelled validation subset (eq. 9, all rows kept: t = 0); the unlabelled
    pool's pseudo-label scores with that beta vs beta = 0 (plain softmax), against the hidden
    truth. The head is over-smoothed on purpose (logits / 2): APDS's premise."""
    mae_sharp, mae_plain, tails_sharp, tails_plain, betas = [], [], [], [], []
    for seed in SEEDS:
        model = train_head(seed)
        xv, _, sv = long_tailed(400, 2000 + seed)  # labelled validation subset
        xu, _, su = long_tailed(1000, 3000 + seed)  # unlabelled pool (truth only to score the test)
        with torch.no_grad():
            zv, zu = model(xv).double().numpy() / 2, model(xu).double().numpy() / 2  # too flat
        mean_score = float(long_tailed(800, seed)[2].mean())  # s-bar: the training mean
        search = grid_search(zv, sv.numpy(), mean_score, [0.0, 0.25, 0.5, 1.0, 2.0, 4.0], [0.0], min_selected=1.0)
        betas.append(search["beta"])
        sharp = apds_sharpen(zu, mean_score, search["beta"]) @ LEVELS
        plain = apds_sharpen(zu, mean_score, 0.0) @ LEVELS
        mae_sharp.append(np.abs(sharp - su.numpy()).mean())
        mae_plain.append(np.abs(plain - su.numpy()).mean())
        ls, lp = lmh_mae(sharp, su.numpy()), lmh_mae(plain, su.numpy())
        tails_sharp.append(ls["L"] + ls["H"])
        tails_plain.append(lp["L"] + lp["H"])
    assert min(betas) > 0, betas  # validation prefers sharpening
    assert np.mean(mae_sharp) < 0.97 * np.mean(mae_plain), (mae_sharp, mae_plain)
    assert np.mean(tails_sharp) < 0.95 * np.mean(tails_plain), (tails_sharp, tails_plain)
