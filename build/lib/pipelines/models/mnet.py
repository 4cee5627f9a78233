"""M+MNet (seed 003): ForeNet + BackNet on MobileNetV2 layers, ForePool / BackPool, 1x1 fusion.

::

    image -> ForeNet (MobileNetV2 features) -> self-attention -> ForePool -> \
                                                                            concat -> 1x1 conv -> BN-ReLU
    image -> BackNet (MobileNetV2 features) -----------------> BackPool -> /      -> dropout -> linear -> softmax

Choices the paper leaves open (documented, all params):

- ``branch_blocks``: how many of torchvision's 19 ``mobilenet_v2().features`` blocks each branch
  keeps (the paper: "partial layer structures"). Default 19 (all, 1280 channels, stride 32).
- Self-attention: SAGAN form (query/key 1x1 convs to ``C / attn_reduction`` channels, value
  is the feature map itself, learnable residual gain ``gamma`` initialised to 0), so the block
  adds only ``2 C^2 / attn_reduction`` parameters.
- ``pool_size``: the pooled map size (default 1: each window is the whole feature map, as the
  global pooling of MobileNetV2 it replaces). BackPool needs windows of >= 2 cells, so the
  input must give a feature map of >= 2 cells per window (>= 33 px on one side at stride 32,
  for ``pool_size`` 1); smaller inputs raise a ``ValueError`` naming the size.
- ``fuse_channels``: output channels of the 1x1 fusion conv (default 128).
- ``weights``: a local checkpoint (a torchvision MobileNetV2 ``state_dict`` or a saved M+MNet
  ``state_dict``); no download is attempted. Without it both branches are randomly initialised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipelines.io import DataError
from pipelines.models.pooling import BackPool, ForePool
from pipelines.models.weights import read_weights


class SelfAttention2d(nn.Module):
    """SAGAN-style spatial self-attention: ``x + gamma * V softmax(Q^T K)`` with V = x."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        d = max(channels // reduction, 1)
        self.q = nn.Conv2d(channels, d, 1, bias=False)
        self.k = nn.Conv2d(channels, d, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))
        self.scale = d ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(x).flatten(2).transpose(1, 2)  # (B, N, d)
        k = self.k(x).flatten(2)  # (B, d, N)
        attn = torch.softmax((q @ k) * self.scale, dim=-1)  # (B, N, N)
        v = x.flatten(2)  # (B, C, N)
        out = (v @ attn.transpose(1, 2)).view(b, c, h, w)
        return x + self.gamma * out


def _mobilenet_features(blocks: int) -> nn.Sequential:
    from torchvision.models import mobilenet_v2

    feats = mobilenet_v2(weights=None).features
    if not 1 <= blocks <= len(feats):
        raise DataError(f"model.mnet.branch_blocks = {blocks}; MobileNetV2 has 1..{len(feats)} feature blocks.")
    return feats[:blocks]


def _out_channels(seq: nn.Sequential) -> int:
    for m in reversed(list(seq.modules())):
        if isinstance(m, nn.Conv2d):
            return m.out_channels
    raise ValueError("no conv layer")


class MNet(nn.Module):
    def __init__(
        self,
        n_levels: int = 10,
        *,
        branch_blocks: int = 19,
        attn_reduction: int = 8,
        pool_size: int = 1,
        fuse_channels: int = 128,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.fore = _mobilenet_features(branch_blocks)
        self.back = _mobilenet_features(branch_blocks)
        c = _out_channels(self.fore)
        self.attn = SelfAttention2d(c, attn_reduction)
        self.fore_pool = ForePool(pool_size)
        self.back_pool = BackPool(pool_size)
        self.fuse = nn.Sequential(nn.Conv2d(2 * c, fuse_channels, 1, bias=False), nn.BatchNorm2d(fuse_channels), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(fuse_channels * pool_size * pool_size, n_levels))
        self.n_levels = n_levels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.fore_pool(self.attn(self.fore(x)))
        b = self.back_pool(self.back(x))
        z = self.fuse(torch.cat([f, b], dim=1))
        logits = self.head(z.flatten(1))
        return {"logits": logits, "probs": torch.softmax(logits.float(), dim=1), "feature": z.flatten(1)}

    def load_weights(self, path: str | Path) -> None:
        """Load a local checkpoint: an M+MNet state_dict, or torchvision MobileNetV2 weights for both branches."""
        path = Path(path)
        whole, feats = read_weights(path, option="model.mnet.weights", own_prefix="fore.")
        if whole:
            self.load_state_dict(feats)
            return
        if not feats:
            raise DataError(f"{path}: neither an M+MNet nor a MobileNetV2 state_dict (no 'features.*' keys).")
        for branch in (self.fore, self.back):
            own = branch.state_dict()
            missing = [k for k in own if k not in feats]
            if missing:
                raise DataError(f"{path}: MobileNetV2 weights lack {missing[:3]} for the branches.")
            branch.load_state_dict({k: feats[k] for k in own})


def loss_terms(model: MNet, out: dict, target: torch.Tensor, cfg: dict) -> dict[str, torch.Tensor]:
    """Re-EMD (or plain EMD with ``loss: emd``)."""
    from pipelines.models.losses import emd_loss, re_emd_loss

    if cfg.get("loss", "re_emd") == "re_emd":
        main = re_emd_loss(out["probs"], target, alpha=cfg.get("alpha", 10.0), beta=cfg.get("beta", 0.1))
    else:
        main = emd_loss(out["probs"], target, r=2.0)
    return {"loss": main, "emd": main.detach()}


