"""Auto-encoder semantic-aesthetic fusion model (seed 002).

::

    image -> encoder -> F (c = M * P channels, the bottleneck) -> decoder -> reconstruction  (L_rec, MSE)
                         |-> group average pooling: a_m = mean of group m (P maps)   -> softmax -> L1 to p  (L_act)
                         |-> SPP (1, 4, 16 bins) per group -> split multi-way regressor -> softmax -> EMD  (L_emd)

    L = L_emd + rec_weight * L_rec + act_weight * L_act

- **Bottleneck groups** (SAF module): F's ``c`` channels are split into ``M = n_levels`` groups of
  ``P`` maps. Group average pooling (GAP) averages each group over its P maps and all positions,
  giving M activations; their softmax is tied to the ground-truth distribution by an L1
  loss (the paper's "weak constraint"), so group m is *pre-activated* for score level m.
- **Split multi-way regressor**: each group has its own small regressor (SPP of its P maps ->
  hidden -> 1 logit); the M logits form the distribution (softmax). ``split: false`` gives the
  conventional joint regressor (the paper's "w/o Split" ablation).
- **SPP**: adaptive max pooling to 1x1, 2x2 and 4x4 bins, concatenated (21 values per map), so
  any input size and aspect ratio gives the same feature length. PyTorch's adaptive bins
  (``[floor(i H / n), ceil((i + 1) H / n))``) work even when the map is smaller than ``n``.
- **Encoder**: ``backbone: small`` (a compact 4-stage conv encoder, default, CPU friendly) or
  ``vgg16`` (torchvision VGG16 conv layers as in the paper, random init unless ``weights``
  points to a local checkpoint). The decoder mirrors the downsampling with transposed convs;
  its output is resized to the input size when an odd input size does not divide evenly.

The paper's equations for the loss weights are not in the seed text; ``rec_weight`` and
``act_weight`` are params (defaults 1.0 and 0.1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.io import DataError
from pipelines.models.weights import read_weights

SPP_LEVELS = (1, 2, 4)  # 1, 4 and 16 bins


def spp(x: torch.Tensor, levels: tuple[int, ...] = SPP_LEVELS) -> torch.Tensor:
    """Spatial pyramid (max) pooling: (B, C, H, W) -> (B, C, sum n^2), bins ordered level by level, row-major."""
    if x.ndim != 4:
        raise ValueError(f"need (B, C, H, W), got {tuple(x.shape)}")
    return torch.cat([F.adaptive_max_pool2d(x, n).flatten(2) for n in levels], dim=2)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _small_encoder(widths: tuple[int, ...]) -> tuple[nn.Sequential, int, int]:
    layers, cin = [], 3
    for w in widths:
        layers += [_conv(cin, w, 2), _conv(w, w)]
        cin = w
    return nn.Sequential(*layers), cin, len(widths)


def _vgg16_encoder() -> tuple[nn.Sequential, int, int]:
    from torchvision.models import vgg16

    return vgg16(weights=None).features, 512, 5


class AESAF(nn.Module):
    def __init__(
        self,
        n_levels: int = 10,
        *,
        backbone: str = "small",
        widths: tuple[int, ...] = (32, 64, 128, 256),
        group_maps: int = 16,
        hidden: int = 32,
        split: bool = True,
    ):
        super().__init__()
        if backbone == "small":
            self.encoder, c_enc, n_down = _small_encoder(tuple(widths))
        elif backbone == "vgg16":
            self.encoder, c_enc, n_down = _vgg16_encoder()
        else:
            raise DataError(f"model.aesaf.backbone = {backbone!r}; use 'small' or 'vgg16'.")
        self.n_levels, self.group_maps, self.split = n_levels, group_maps, split
        c = n_levels * group_maps
        self.bottleneck = nn.Sequential(nn.Conv2d(c_enc, c, 1, bias=False), nn.BatchNorm2d(c))  # F, pre-activation
        dec, cin = [], c
        for i in range(n_down):
            cout = 3 if i == n_down - 1 else max(cin // 2, 16)
            dec.append(nn.ConvTranspose2d(cin, cout, 4, 2, 1))
            if i < n_down - 1:
                dec += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.decoder = nn.Sequential(*dec)
        n_spp = sum(n * n for n in SPP_LEVELS)
        if split:
            d_in = group_maps * n_spp
            self.w1 = nn.Parameter(torch.randn(n_levels, d_in, hidden) / d_in ** 0.5)
            self.b1 = nn.Parameter(torch.zeros(n_levels, hidden))
            self.w2 = nn.Parameter(torch.randn(n_levels, hidden) / hidden ** 0.5)
            self.b2 = nn.Parameter(torch.zeros(n_levels))
        else:
            self.joint = nn.Sequential(nn.Linear(c * n_spp, hidden * n_levels), nn.ReLU(inplace=True), nn.Linear(hidden * n_levels, n_levels))

    def group_average(self, f: torch.Tensor) -> torch.Tensor:
        """GAP: (B, M*P, h, w) -> (B, M), the mean of each group's P maps over all positions."""
        b = f.shape[0]
        return f.view(b, self.n_levels, self.group_maps, -1).mean(dim=(2, 3))

    def regress(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bottleneck F -> (logits (B, M), SPP features (B, M*P, 21)); split: logit m sees group m only."""
        pooled = spp(F.relu(f))
        b = f.shape[0]
        if self.split:
            g = pooled.reshape(b, self.n_levels, -1)  # (B, M, P*21): group m's maps only
            h = F.relu(torch.einsum("bmi,mih->bmh", g, self.w1) + self.b1)
            return (h * self.w2).sum(-1) + self.b2, pooled
        return self.joint(pooled.flatten(1)), pooled

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.bottleneck(self.encoder(x))
        recon = self.decoder(F.relu(f))
        if recon.shape[-2:] != x.shape[-2:]:
            recon = F.interpolate(recon, size=x.shape[-2:], mode="bilinear", align_corners=False)
        logits, pooled = self.regress(f)
        return {
            "logits": logits,
            "probs": torch.softmax(logits.float(), dim=1),
            "activation": torch.softmax(self.group_average(f).float(), dim=1),
            "recon": recon,
            "feature": pooled.flatten(1),
        }

    def load_weights(self, path: str | Path) -> None:
        """Load a local checkpoint: an AESAF state_dict, or torchvision VGG16 weights for the encoder."""
        path = Path(path)
        whole, feats = read_weights(path, option="model.aesaf.weights", own_prefix="encoder.")
        if whole:
            self.load_state_dict(feats)
            return
        try:
            self.encoder.load_state_dict(feats)
        except RuntimeError as exc:
            raise DataError(f"{path}: not an AESAF or matching VGG16 state_dict ({exc}).") from exc


def activation_loss(activation: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the softmaxed group activations and the ground-truth distribution (sum over levels, batch mean)."""
    return (activation.float() - target.float()).abs().sum(dim=1).mean()


def loss_terms(model: AESAF, out: dict, target: torch.Tensor, cfg: dict, image: torch.Tensor) -> dict[str, torch.Tensor]:
    from pipelines.models.losses import emd_loss

    l_emd = emd_loss(out["probs"], target, r=2.0)
    l_rec = F.mse_loss(out["recon"].float(), image.float())
    l_act = activation_loss(out["activation"], target)
    total = l_emd + cfg.get("rec_weight", 1.0) * l_rec + cfg.get("act_weight", 0.1) * l_act
    return {"loss": total, "emd": l_emd.detach(), "rec": l_rec.detach(), "act": l_act.detach()}


def sd_correlations(pred_dist: np.ndarray, true_dist: np.ndarray) -> dict[str, float]:
    """PLCC and SRCC of the distributions' standard deviations (seed 002's 'SD' columns)."""
    from pipelines.metrics import plcc, srcc

    def sd(p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        p = p / p.sum(axis=1, keepdims=True)
        lv = np.arange(1, p.shape[1] + 1, dtype=np.float64)
        mu = p @ lv
        return np.sqrt(np.clip(p @ lv ** 2 - mu ** 2, 0.0, None))

    ps, ts = sd(pred_dist), sd(true_dist)
    return {"plcc_sd": plcc(ps, ts), "srcc_sd": srcc(ps, ts)}
