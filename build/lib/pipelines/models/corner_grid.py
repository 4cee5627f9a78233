"""Corner Grid augmentation (M+MNet sec. 3.4, eq. 6-9), ratio r = 0.1, gray-world fill.

Cells: ``(w_g, h_g) = (floor(w r), floor(h r))``; the four cells, as (x0, y0, x1, y1) with the
end exclusive, are ``(0, 0, w_g, h_g)``, ``(w - w_g, 0, w, h_g)``, ``(0, h - h_g, w_g, h)`` and
``(w - w_g, h - h_g, w, h)``.

Fill (gray world): with the whole-image channel means (eq. 6) ``R, G, B`` and
``W = (R + G + B) / 3``, every pixel inside a cell becomes ``W / R * I_r``, ``W / G * I_g``,
``W / B * I_b`` (eq. 7-9). The paper's eq. 9 prints ``W / R`` for the blue channel; that is a
typo (the gray-world rule scales each channel by its own mean), so blue uses ``B``. The means
are taken over the original image, before any cell is changed. A channel whose mean is 0 is
all zeros and keeps gain 1. Results are clipped to ``[0, clip]`` (1 for float images in
[0, 1], 255 for uint8) so that the augmented image stays a valid image.

On a padded input (the 248 x 312 canvas of M+MNet's stage 2) the grid belongs on the image, not
the canvas: ``box`` names the content rectangle, whose corners get the cells and whose pixels
alone give the means; the padding is left as it is.
"""

from __future__ import annotations

import numpy as np
import torch


def corner_cells(h: int, w: int, r: float = 0.1) -> list[tuple[int, int, int, int]]:
    """The four (x0, y0, x1, y1) cells, end exclusive; empty cells when ``w r < 1``."""
    if not 0.0 <= r <= 0.5:
        raise ValueError(f"r must be in [0, 0.5] so that the cells do not overlap, got {r}")
    wg, hg = int(w * r), int(h * r)
    return [(0, 0, wg, hg), (w - wg, 0, w, hg), (0, h - hg, wg, h), (w - wg, h - hg, w, h)]


def corner_grid(img: torch.Tensor, r: float = 0.1, clip: float | None = 1.0,
                box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Corner Grid on a float image (3, H, W) or batch (B, 3, H, W) of RGB in [0, clip]; returns a copy.
    ``box`` (x0, y0, x1, y1), end exclusive: apply it to that content rectangle only (a padded image)."""
    if img.ndim not in (3, 4) or img.shape[-3] != 3:
        raise ValueError(f"need an RGB image (3, H, W) or batch (B, 3, H, W), got {tuple(img.shape)}")
    if box is not None:
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= img.shape[-1] and 0 <= y0 < y1 <= img.shape[-2]):
            raise ValueError(f"box {box} is not inside the {img.shape[-2]}x{img.shape[-1]} image")
        out = img.clone()
        out[..., y0:y1, x0:x1] = corner_grid(img[..., y0:y1, x0:x1], r, clip)
        return out
    x = img.clone()
    h, w = x.shape[-2:]
    work = torch.promote_types(img.dtype, torch.float32)
    means = img.to(work).mean(dim=(-2, -1), keepdim=True)  # (..., 3, 1, 1), eq. 6
    gray = means.mean(dim=-3, keepdim=True)
    gain = torch.where(means > 0, gray / torch.where(means > 0, means, torch.ones_like(means)), torch.ones_like(means))
    for x0, y0, x1, y1 in corner_cells(h, w, r):
        if x1 <= x0 or y1 <= y0:
            continue
        cell = img[..., y0:y1, x0:x1].to(work) * gain
        if clip is not None:
            cell = cell.clamp(0.0, clip)
        x[..., y0:y1, x0:x1] = cell.to(x.dtype)
    return x


def corner_grid_uint8(img: np.ndarray, r: float = 0.1) -> np.ndarray:
    """Corner Grid on an (H, W, 3) uint8 array (rounded, clipped to 0..255)."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"need an (H, W, 3) image, got {img.shape}")
    t = torch.from_numpy(np.ascontiguousarray(img).transpose(2, 0, 1)).float()
    out = corner_grid(t, r, clip=255.0).round().to(torch.uint8)
    return out.numpy().transpose(1, 2, 0).copy()
