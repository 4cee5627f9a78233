"""Training-time augmentation of one decoded image (applied by ``image_loop.load_batch``).

- **Random crop** (``model.crop: random``, M+MNet's stage 1): the image is resized to
  ``crop_source(size)`` -- ``size * 256 / 224``, i.e. 256 x 256 for the paper's 224 -- and a
  ``size`` window is cut at a random offset. Only epochs that resize to a square
  (``aspect: square``) in stage 1 crop; stage 2 (padded) and stage 3 ("without cropping or
  padding") do not, nor does prediction, which resizes to ``size``.
- **Corner Grid** on the image content: on a padded canvas (``pad`` mode) only the pasted
  image, ``pad_box``, gets the cells (``corner_grid(..., box=...)``).
- **Horizontal flip** last (Corner Grid is mirror-symmetric, so the order does not change it).
"""

from __future__ import annotations

import torch

from pipelines.models.corner_grid import corner_grid

CROP_RATIO = 256 / 224  # seed 003: resize to 256 x 256, random crop 224 x 224


def crop_source(size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) an image is resized to before a random ``size`` crop."""
    return round(size[0] * CROP_RATIO), round(size[1] * CROP_RATIO)


def crops_in(stage: int, mode: str, crop: str) -> bool:
    """Whether a training epoch of this stage / resize mode takes random crops (``model.crop``, resolved)."""
    if crop not in ("off", "random"):
        raise ValueError(f"crop must be 'off' or 'random' (auto resolved by the family), got {crop!r}")
    return crop == "random" and stage == 1 and mode == "resize"


def pad_box(width: int, height: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where a ``width`` x ``height`` image lands on a ``size`` (h, w) canvas when fitted inside with its
    aspect ratio kept and centred: (x0, y0, x1, y1), end exclusive."""
    h, w = size
    s = min(w / width, h / height)
    nw, nh = max(1, round(width * s)), max(1, round(height * s))
    x0, y0 = (w - nw) // 2, (h - nh) // 2
    return x0, y0, x0 + nw, y0 + nh


def random_crop(x: torch.Tensor, size: tuple[int, int], frac: torch.Tensor) -> torch.Tensor:
    """The ``size`` window of (3, H, W) ``x`` at offset ``floor(frac * (H - h + 1))``, ``floor(frac * (W - w + 1))``
    (``frac``: two numbers in [0, 1), drawn from the loop's generator)."""
    h, w = size
    big_h, big_w = x.shape[-2:]
    if big_h < h or big_w < w:
        raise ValueError(f"cannot crop {h}x{w} from {big_h}x{big_w}")
    y0 = min(int(float(frac[0]) * (big_h - h + 1)), big_h - h)
    x0 = min(int(float(frac[1]) * (big_w - w + 1)), big_w - w)
    return x[..., y0 : y0 + h, x0 : x0 + w]


def augment(x: torch.Tensor, size: tuple[int, int], *, crop: torch.Tensor | None = None, flip: bool = False,
            grid_r: float | None = None, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """One training image (3, H, W) in [0, 1]: random crop to ``size`` (when ``crop`` fractions are
    given), Corner Grid with ratio ``grid_r`` on the content ``box`` (whole image when None), flip."""
    if crop is not None:
        x = random_crop(x, size, crop)
    if grid_r is not None:
        x = corner_grid(x, grid_r, box=box)
    return x.flip(-1) if flip else x
