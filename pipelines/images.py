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
- ``decode_batch`` / ``decode_images``: a batch of files decoded on a device (JPEGs with
  ``torchvision.io.decode_jpeg``, batched: nvjpeg on CUDA), with PIL as the fallback for other
  formats and for files the batch decoder rejects; bad files are reported, not fatal.
  ``resize_center_crop`` then resizes and crops the batch on that device.
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


def pad_box(width: int, height: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where a ``width`` x ``height`` image lands on a ``size`` (h, w) canvas when fitted inside with its
    aspect ratio kept and centred: (x0, y0, x1, y1), end exclusive."""
    h, w = size
    s = min(w / width, h / height)
    nw, nh = max(1, round(width * s)), max(1, round(height * s))
    x0, y0 = (w - nw) // 2, (h - nh) // 2
    return x0, y0, x0 + nw, y0 + nh


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


DECODES = ("cpu", "gpu")  # where training views are decoded (``pretrain.image.decode``)


def check_decode(decode: str, device: torch.device | str, *, key: str) -> None:
    """Refuse, before training starts, a decode place the training device cannot honour."""
    if decode not in DECODES:
        raise DataError(f"params.yaml: {key} = {decode!r}; use one of {', '.join(DECODES)}.")
    if decode == "gpu" and torch.device(device).type != "cuda":
        raise DataError(f"params.yaml: {key} is gpu, but training runs on the CPU; set {key}: cpu "
                        "(or train on GPUs: the stage's ray.use_gpu: true).")


def device_views(datas: Sequence[torch.Tensor], size: int, resize: int, seed: Sequence[int] | None = None,
                 hflip: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """``view_batch`` of encoded files (``read_bytes``), computed on ``device``: decoded there
    (``decode_images``: nvjpeg on CUDA), resized to ``resize`` squared (bilinear, antialiased: within
    a few grey levels of PIL's), then the same seeded crop and flip draws as ``crop_view``, normalised."""
    from torchvision.transforms.v2 import functional as TF

    if not 1 <= size <= resize:
        raise ValueError(f"need 1 <= size <= resize, got size={size}, resize={resize}")
    device = torch.device(device)
    images, errors = decode_images(list(datas), device)
    if bad := [e for e in errors if e]:
        raise DataError(f"{len(bad)} image(s) of a training batch could not be decoded ({bad[0]}); fix or remove them.")
    rng = None if seed is None else np.random.default_rng([int(v) for v in seed])
    out = []
    for im in images:
        x = TF.resize(im, [resize, resize], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        if rng is None:
            top = left = (resize - size) // 2
            flip = False
        else:
            top, left = (int(v) for v in rng.integers(0, resize - size + 1, size=2))
            flip = hflip and bool(rng.random() < 0.5)
        x = x[:, top : top + size, left : left + size]
        out.append(x.flip(-1) if flip else x)
    x = torch.stack(out).float() / 255.0
    return (x - MEAN.to(device)) / STD.to(device)


class TrainViews:
    """TMCR's training views of files, by batch spec ``(rows, seed)``. ``load`` runs in the
    loader's workers, ``finish`` on the training process: with ``decode="cpu"`` the workers build
    the views (``view_batch``: PIL); with ``"gpu"`` they only read the files' bytes and the
    training device decodes, resizes, crops and flips them (``device_views``), for when the
    CPU's decode rate is what limits training."""

    def __init__(self, paths: Sequence[str], size: int, resize: int, hflip: bool = True, decode: str = "cpu"):
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
        self.paths, self.size, self.resize, self.hflip, self.decode = list(paths), size, resize, hflip, decode

    def load(self, spec) -> torch.Tensor | list[torch.Tensor]:
        rows, seed = spec
        files = [self.paths[int(i)] for i in rows]
        if self.decode == "cpu":
            return view_batch(files, self.size, self.resize, seed=seed, hflip=self.hflip)
        return [read_bytes(f) for f in files]

    def finish(self, batch, spec, device: torch.device | str) -> torch.Tensor:
        """The batch's views on ``device``."""
        if self.decode == "cpu":
            return to_device(batch, device)
        return device_views(batch, self.size, self.resize, spec[1], self.hflip, device)


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


# --------------------------------------------------------------------------- batched decode on a device

JPEG_MAGIC = b"\xff\xd8\xff"


def read_bytes(path: str | Path) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 tensor (the input of :func:`decode_images`). Raises ``OSError``."""
    data = Path(path).read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and bytes(data[:3].tolist()) == JPEG_MAGIC


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29's deprecation notice of its image codecs
        out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    return list(out)


def _decode_pil(data: torch.Tensor) -> torch.Tensor:
    import io

    with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_images(
    datas: Sequence[torch.Tensor | None], device: torch.device | str = "cpu"
) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """Decode encoded images (``read_bytes``) to RGB uint8 tensors (3, h, w) on ``device``.

    The JPEGs go through ``torchvision.io.decode_jpeg`` in one batch on ``device`` (nvjpeg on
    CUDA; libjpeg-turbo on the CPU, which gives PIL's pixels exactly). Other formats, and
    JPEGs the batch decoder rejects (CMYK on some GPUs, a truncated file that sinks the batch),
    fall back to one decode each: ``decode_jpeg`` alone, then PIL on the CPU. A file that
    nothing decodes gives ``None`` and its error (as text); ``None`` input (a file that could
    not be read) stays ``None`` with error ``"unreadable"``. Returns (images, errors), in input
    order.
    """
    device = torch.device(device)
    images: list[torch.Tensor | None] = [None] * len(datas)
    errors: list[str | None] = [None] * len(datas)
    jpegs = [i for i, d in enumerate(datas) if d is not None and is_jpeg(d)]
    if jpegs:
        try:
            for i, im in zip(jpegs, _decode_jpegs([datas[i] for i in jpegs], device), strict=True):
                images[i] = im
        except Exception:  # noqa: BLE001 - one bad file fails the whole batch: decode one by one below
            pass
    for i, data in enumerate(datas):
        if images[i] is not None:
            continue
        if data is None:
            errors[i] = "unreadable"
            continue
        try:
            if i in jpegs:
                try:
                    images[i] = _decode_jpegs([data], device)[0]
                    continue
                except Exception:  # noqa: BLE001 - e.g. a JPEG kind this device's decoder lacks
                    pass
            images[i] = _decode_pil(data).to(device)
        except Exception as exc:  # noqa: BLE001 - any undecodable file is reported, not fatal
            errors[i] = f"{type(exc).__name__}: {exc}"
    return images, errors


def resize_center_crop(
    images: Sequence[torch.Tensor], resize: int, crop: tuple[int, int], interpolation: str = "bicubic"
) -> torch.Tensor:
    """(B, 3, crop_h, crop_w) uint8: each image (3, h, w) resized, short side = ``resize``
    (antialiased, like ``torchvision.transforms.Resize(int)``), then centre-cropped, on the
    images' own device. On the CPU this is torchvision's uint8 path, within a few grey levels
    of PIL's resize."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    mode = InterpolationMode(interpolation)
    out = []
    for im in images:
        x = TF.resize(im, [resize], interpolation=mode, antialias=True)
        out.append(TF.center_crop(x, list(crop)))
    return torch.stack(out)


def decode_batch(
    paths: Sequence[str | Path], resize: int, crop: tuple[int, int], device: torch.device | str = "cpu",
    interpolation: str = "bicubic",
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Read, decode (:func:`decode_images`) and resize + centre-crop a batch of files on ``device``.

    Returns (B', 3, h, w) uint8 for the files that decoded, their indices in ``paths``, and
    one error text per path (``""`` for the good ones): bad files are skipped and reported,
    not fatal. An empty batch gives a (0, 3, h, w) tensor.
    """
    datas: list[torch.Tensor | None] = []
    read_errors: list[str] = []
    for p in paths:
        try:
            datas.append(read_bytes(p))
            read_errors.append("")
        except OSError as exc:
            datas.append(None)
            read_errors.append(f"{type(exc).__name__}: {exc}")
    images, errors = decode_images(datas, device)
    ok = [i for i, im in enumerate(images) if im is not None]
    msgs = [read_errors[i] or (errors[i] or "") for i in range(len(paths))]
    if not ok:
        return torch.empty(0, 3, *crop, dtype=torch.uint8, device=device), ok, msgs
    return resize_center_crop([images[i] for i in ok], resize, crop, interpolation), ok, msgs
