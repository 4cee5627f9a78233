"""ForePool / BackPool (M+MNet, seed 003, eq. 1-2) with the paper's adaptive stride and kernel.

For each pooling window Omega the output is ``sum_{i in Omega} t_i * x_i`` with

- ForePool (eq. 1): ``t_i = e^{x_i} / sum_{j in Omega} e^{x_j}`` (a softmax over the window:
  high activations, i.e. salient content, dominate);
- BackPool (eq. 2): ``t_i = 1 - e^{x_i} / sum_{j in Omega} e^{x_j}`` (low activations,
  i.e. background, keep the larger weights).

Eq. 2 is implemented as written: its weights sum to ``|Omega| - 1``, not 1, so BackPool's
output is a constant multiple of a weighted mean (the following 1x1 fusion conv absorbs the
scale). A 1x1 window gives BackPool an output of exactly 0 (its only weight is 1 - 1);
``adaptive_geometry`` therefore refuses windows of one element for BackPool.

Adaptive geometry (sec. 3.1.1), padding 0, for an ``h_in x w_in`` input and a desired
``h_out x w_out`` output::

    (s_h, s_w) = (floor(h_in / h_out), floor(w_in / w_out))
    (k_h, k_w) = (h_in - (h_out - 1) s_h, w_in - (w_out - 1) s_w)

so the windows tile the input exactly and the output is ``h_out x w_out`` for any input of
at least that size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def adaptive_geometry(h_in: int, w_in: int, h_out: int, w_out: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((k_h, k_w), (s_h, s_w))`` of the paper's adaptive pooling (padding 0)."""
    if h_out < 1 or w_out < 1:
        raise ValueError(f"output size must be >= 1, got {h_out}x{w_out}")
    if h_in < h_out or w_in < w_out:
        raise ValueError(
            f"input {h_in}x{w_in} is smaller than the pooled output {h_out}x{w_out}; "
            "use a larger image or a smaller pool size"
        )
    s_h, s_w = h_in // h_out, w_in // w_out
    return (h_in - (h_out - 1) * s_h, w_in - (w_out - 1) * s_w), (s_h, s_w)


def weighted_pool(x: torch.Tensor, output_size: int | tuple[int, int], mode: str) -> torch.Tensor:
    """Pool ``x`` (B, C, H, W) to (B, C, h_out, w_out) with eq. 1 (``fore``) or eq. 2 (``back``) weights."""
    if x.ndim != 4:
        raise ValueError(f"need (B, C, H, W), got {tuple(x.shape)}")
    if mode not in ("fore", "back"):
        raise ValueError(f"mode must be 'fore' or 'back', got {mode!r}")
    b, c, h, w = x.shape
    h_out, w_out = _pair(output_size)
    (kh, kw), (sh, sw) = adaptive_geometry(h, w, h_out, w_out)
    if mode == "back" and kh * kw == 1:
        raise ValueError(
            f"BackPool with 1x1 windows (a {h}x{w} map pooled to {h_out}x{w_out}) is identically 0 "
            "(eq. 2); use a larger input or a smaller pool size"
        )
    cols = F.unfold(x, kernel_size=(kh, kw), stride=(sh, sw))  # (B, C*kh*kw, L)
    cols = cols.view(b, c, kh * kw, h_out * w_out)
    # softmax in fp32 at least: e^x overflows fp16 for x > 11
    t = torch.softmax(cols.float(), dim=2)
    if mode == "back":
        t = 1.0 - t
    out = (t * cols.float()).sum(dim=2).to(x.dtype)
    return out.view(b, c, h_out, w_out)


class ForePool(nn.Module):
    """Eq. 1 pooling to a fixed ``output_size`` (adaptive stride and kernel)."""

    def __init__(self, output_size: int | tuple[int, int] = 1):
        super().__init__()
        self.output_size = _pair(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weighted_pool(x, self.output_size, "fore")

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class BackPool(ForePool):
    """Eq. 2 pooling to a fixed ``output_size`` (adaptive stride and kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weighted_pool(x, self.output_size, "back")
