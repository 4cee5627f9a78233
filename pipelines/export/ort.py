"""Score images with an exported ONNX file (``pipelines.export.onnx``) on ONNX Runtime, without torch.

Preprocessing is numpy + PIL and replays the torch path step for step: for TMCR, open_clip's
``Resize(short side, bicubic)`` (torchvision's output-size rule: the long side is truncated)
and ``CenterCrop`` (torchvision's rounding; zero padding when the image is smaller); for the
image families, ``pipelines.images.image_tensor`` (``resize`` to a square, or ``short_side``
with the long side rounded), both bilinear. The graph gets the uint8 pixels and does the
float conversion and normalisation itself, so the arithmetic is torch's.

API (stable; ``iaa score --onnx`` calls it):

- ``OnnxScorer(onnx_path, threads=None, max_pixels=50_000_000)``
- ``OnnxScorer.score_paths(paths, top_k=3, batch_size=None) -> list[dict]``: one row per path
  with ``path``, ``score`` (mean level 1..L), ``distribution``, ``error`` (None when scored),
  and for TMCR ``top_semantic`` / ``top_attribute``; a bad image gives its ``error`` and a
  None score, never an exception.
- ``score_folder(onnx_path, folder, top_k=3, batch_size=None, threads=None) -> list[dict]``:
  ``score_paths`` on the folder's images (``IMAGE_SUFFIXES``, sorted, recursive).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.io import DataError

META_KEY = "iaa"
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_PIXELS = 50_000_000


def clip_pixels(im: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """open_clip's PIL stage (Resize short side bicubic, CenterCrop, RGB) as an HxWx3 uint8 array."""
    im = im.convert("RGB") if im.mode != "RGB" else im
    w, h = im.size
    size = int(spec["size"])
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        im = im.resize((new_w, new_h), Image.BICUBIC)
    ch, cw = spec["crop"]
    if cw > new_w or ch > new_h:  # torchvision pads with zeros first
        left, top = (cw - new_w) // 2 if cw > new_w else 0, (ch - new_h) // 2 if ch > new_h else 0
        canvas = Image.new("RGB", (max(cw, new_w), max(ch, new_h)), (0, 0, 0))
        canvas.paste(im, (left, top))
        im = canvas
        new_w, new_h = im.size
        if (new_h, new_w) == (ch, cw):
            return np.asarray(im, dtype=np.uint8)
    top, left = int(round((new_h - ch) / 2.0)), int(round((new_w - cw) / 2.0))
    return np.asarray(im.crop((left, top, left + cw, top + ch)), dtype=np.uint8)


def family_pixels(im: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """``pipelines.images.image_tensor``'s resize (``resize`` / ``short_side``, bilinear) as uint8 HxWx3."""
    im = im.convert("RGB")
    s = int(spec["size"])
    if spec["resize"] == "resize":
        im = im.resize((s, s), Image.BILINEAR)
    elif spec["resize"] == "short_side":
        k = s / min(im.width, im.height)
        im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.BILINEAR)
    else:
        raise DataError(f"ONNX file: unknown resize {spec['resize']!r}; export it again with this version.")
    return np.asarray(im, dtype=np.uint8)


def decode(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The RGB image of a file: known formats only, at most ``max_pixels`` (checked from the header)."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        with Image.open(path, formats=FORMATS) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"the image is {im.width} x {im.height} pixels; the limit is {max_pixels}.")
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable {', '.join(FORMATS)} image ({type(exc).__name__}: {exc}).") from None


class OnnxScorer:
    """An exported scoring model on ONNX Runtime's CPU provider (see the module docstring)."""

    def __init__(self, onnx_path: str | Path, *, threads: int | None = None, max_pixels: int = MAX_PIXELS) -> None:
        import onnxruntime as ort

        path = Path(onnx_path).expanduser()
        if not path.is_file():
            raise DataError(f"ONNX file {str(path)!r} not found; write it with `iaa export` (pipelines.export.onnx.export_model).")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own kinds for a bad file
            raise DataError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {exc}).") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if raw is None:
            raise DataError(f"{path}: an ONNX file without this pipeline's '{META_KEY}' metadata; export it with "
                            "`iaa export` (pipelines.export.onnx.export_model).")
        self.meta = json.loads(raw)
        self.kind, self.pre = self.meta["kind"], self.meta["preprocess"]
        self.levels = np.arange(1, int(self.meta["n_levels"]) + 1, dtype=np.float64)
        self.max_pixels = int(max_pixels)
        self.batch_size = int(self.meta.get("batch_size", 32)) if self.batched else 1

    @property
    def batched(self) -> bool:
        """Whether images of one run share a size (TMCR crops; square families); ``keep`` runs one at a time."""
        return self.kind == "tmcr" or self.pre["resize"] == "resize"

    def pixels(self, im: Image.Image) -> np.ndarray:
        return clip_pixels(im, self.pre) if self.kind == "tmcr" else family_pixels(im, self.pre)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probs, tm or None) of an N x H x W x 3 uint8 batch."""
        names = ["probs", "tm"] if self.kind == "tmcr" else ["probs"]
        out = self.session.run(names, {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})
        return out[0], (out[1] if len(out) > 1 else None)

    def rows(self, probs: np.ndarray, tm: np.ndarray | None, top_k: int) -> list[dict[str, Any]]:
        probs = np.asarray(probs, dtype=np.float64)
        scores = probs @ self.levels / probs.sum(1)
        out = []
        n_sem = len(self.meta.get("semantic", []))
        for i, (s, p) in enumerate(zip(scores, probs)):
            if not (np.isfinite(s) and np.isfinite(p).all()):
                out.append({"score": None, "distribution": None, "error": "the model gave a non-finite score for this image."})
                continue
            row: dict[str, Any] = {"score": float(s), "distribution": p.tolist(), "error": None}
            if tm is not None:
                sem, attr = tm[i, :n_sem], tm[i, n_sem:]
                row["top_semantic"] = [self.meta["semantic"][j] for j in np.argsort(-sem, kind="stable")[:top_k]]
                row["top_attribute"] = [self.meta["attribute"][j] for j in np.argsort(-attr, kind="stable")[:top_k]]
            out.append(row)
        return out

    def score_paths(self, paths: Sequence[str | Path], *, top_k: int = 3, batch_size: int | None = None) -> list[dict[str, Any]]:
        """One output row per path, in order (see the module docstring)."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise DataError(f"top_k = {top_k!r}; give a whole number >= 0.")
        step = max(1, int(batch_size or self.batch_size)) if self.batched else 1
        rows: list[dict[str, Any] | None] = [None] * len(paths)
        for start in range(0, len(paths), step):
            ready: list[tuple[int, np.ndarray]] = []
            for i in range(start, min(start + step, len(paths))):
                try:
                    ready.append((i, self.pixels(decode(paths[i], self.max_pixels))))
                except Exception as exc:  # noqa: BLE001 - one bad image must not sink the folder
                    rows[i] = {"score": None, "distribution": None, "error": str(exc)}
            if ready:
                probs, tm = self.run(np.stack([p for _, p in ready]))
                for (i, _), row in zip(ready, self.rows(probs, tm, top_k)):
                    rows[i] = row
        for p, row in zip(paths, rows):
            row["path"] = str(p)
            if self.kind == "tmcr":
                row.setdefault("top_semantic", None)
                row.setdefault("top_attribute", None)
        return rows  # type: ignore[return-value]


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (``IMAGE_SUFFIXES``, any case), sorted."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"images folder {str(root)!r} not found; give a folder of images.")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def score_folder(onnx_path: str | Path, folder: str | Path, *, top_k: int = 3, batch_size: int | None = None,
                 threads: int | None = None) -> list[dict[str, Any]]:
    """``OnnxScorer(onnx_path).score_paths`` on every image under ``folder``."""
    return OnnxScorer(onnx_path, threads=threads).score_paths([str(p) for p in image_files(folder)], top_k=top_k,
                                                              batch_size=batch_size)
