"""The one image path of the project: decode, resize / augment, and a parallel batch loader.

Both pixel trainers read images through here: the image families of ``pipelines.models``
(``image_loop``) and the image E_CR (``pipelines.ranking.pretrain``), as do the scoring models.

- ``open_image`` / ``image_tensor`` / ``load_image``: decode a file to an RGB float tensor
  (3, h, w) in [0, 1]; an unreadable file is a ``DataError`` naming it.
- ``crop_view``: the TMCR augmentation (sec. 4.1): resize to ``resize`` squared, random crop
  ``size`` squared, random horizontal flip; at evaluation, the centre crop and no flip. The
  random draws come from a generator the caller seeds, so a batch is the same whichever
  loader worker decodes it.
- ``batch_loader``: a ``DataLoader`` over whole batches (``batch_size=None``): each item is
  one batch that ``make(spec)`` builds, in ``workers`` parallel processes, with pinned memory
  on CUDA; ``to_device`` then copies without blocking.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipelines.io import DataError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def open_image(path: str | Path) -> Image.Image:
    """The file as a loaded RGB PIL image; an unreadable file is a ``DataError`` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}); fix or remove it from the label file.") from exc


def to_tensor(im: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float tensor (3, h, w) in [0, 1]."""
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


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
        from pipelines.models.augment import pad_box

        x0, y0, x1, y1 = pad_box(im.width, im.height, size)
        canvas = Image.new("RGB", (w, h), (0, 0, 0))
        canvas.paste(im.resize((x1 - x0, y1 - y0), Image.BILINEAR), (x0, y0))
        im = canvas
    else:
        raise ValueError(f"mode must be 'resize', 'short_side' or 'pad', got {mode!r}")
    return to_tensor(im)


def load_image(path: str | Path, size: tuple[int, int], mode: str = "resize") -> torch.Tensor:
    """``image_tensor(open_image(path), size, mode)``: the file as a float tensor (3, h, w) in [0, 1]."""
    return image_tensor(open_image(path), size, mode)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean / std normalisation of a (..., 3, h, w) tensor in [0, 1]."""
    return (x - MEAN) / STD


def crop_view(im: Image.Image, size: int, resize: int, rng: np.random.Generator | None = None, hflip: bool = True) -> torch.Tensor:
    """TMCR's view of an image, normalised: resize to ``resize`` squared, then a ``size`` squared
    crop -- random (and a horizontal flip with probability 1/2 when ``hflip``) when ``rng`` is
    given, else the centre crop (evaluation and scoring)."""
    if not 1 <= size <= resize:
        raise ValueError(f"need 1 <= size <= resize, got size={size}, resize={resize}")
    x = image_tensor(im, (resize, resize))
    if rng is None:
        top = left = (resize - size) // 2
        flip = False
    else:
        top, left = (int(v) for v in rng.integers(0, resize - size + 1, size=2))
        flip = hflip and bool(rng.random() < 0.5)
    x = x[:, top : top + size, left : left + size]
    return normalise(x.flip(-1) if flip else x)


def view_batch(paths: Sequence[str], size: int, resize: int, seed: Sequence[int] | None = None, hflip: bool = True) -> torch.Tensor:
    """(B, 3, size, size) views of the files (``crop_view``). ``seed`` (e.g. ``[seed, epoch, batch]``)
    seeds the random crops and flips; ``None`` gives the evaluation view."""
    rng = None if seed is None else np.random.default_rng([int(s) for s in seed])
    return torch.stack([crop_view(open_image(p), size, resize, rng, hflip) for p in paths])


class _Batches(torch.utils.data.Dataset):
    def __init__(self, specs: Sequence[Any], make: Callable[[Any], Any]):
        self.specs, self.make = list(specs), make

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> Any:
        return self.make(self.specs[i])


def batch_loader(specs: Sequence[Any], make: Callable[[Any], Any], *, workers: int = 0, device: torch.device | str = "cpu"):
    """Iterate ``make(spec)`` for each spec, in order, built by ``workers`` processes (0: in this
    one). ``make`` returns a tensor or a tuple of tensors; on CUDA they come in pinned memory."""
    workers = int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return torch.utils.data.DataLoader(
        _Batches(specs, make), batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=torch.device(device).type == "cuda", prefetch_factor=2 if workers else None,
    )


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy to ``device``; from pinned memory the copy overlaps with compute."""
    return x.to(device, non_blocking=True)


def missing_images(paths: Sequence[str]) -> list[str]:
    """The paths that are not files."""
    return [p for p in paths if not Path(p).is_file()]


def check_images(paths: Sequence[str], *, what: str, fix: str) -> None:
    """A ``DataError`` when any of ``paths`` is not a file: how many, the first few, and ``fix``."""
    if missing := missing_images(paths):
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} image file(s) missing on disk for {what} (e.g. {shown}); {fix}")
