"""Embed images (into the chunked Parquet cache) and texts with a frozen open_clip model.

The numeric path (``precision``) is a pure function of the device and the params, never of
a stopwatch, so the same params on the same kind of device give the same embeddings:

* ``fp32``: ``FastVisionTower`` (below) in fp32, the same maths as the model's own
  ``encode_image`` (checked against it when built; ``encode_image`` itself for towers it does
  not cover). On CUDA its matmuls use TF32.
* ``bf16``: ``FastVisionTower`` (below) in bf16 with LayerNorm kept in fp32. Runs on CUDA
  GPUs with bf16 (compute capability >= 8.0) and on CPUs with native bf16 matmul
  (AVX512-BF16 / AMX); without them it is refused (emulated bf16 is ~40-100x slower).
* ``int8``: ``FastVisionTower`` with every Linear dynamically quantised to int8 (weights per
  channel, packed for oneDNN); LayerNorm, softmax, GELU stay fp32. CPU only, and only when
  asked for: ~1.9x fp32 on AVX2, cosine to fp32 ~0.9997.
* ``auto``: ``bf16`` where the device runs it natively (``pipelines.hardware.device_bf16``),
  else ``fp32``. int8 is never chosen by ``auto``.

:func:`resolve_precision` makes that choice before any image is read; a precision the
device cannot run is a ``DataError`` naming ``embed.precision`` and the paths it supports.
The path used is part of the cache's fingerprint (a cache written by another path is
re-embedded, never mixed) and of the report.

Where the speed comes from (``benchmarks/bench_embed.py``):

1. Decoding overlaps inference: a thread pool runs PIL (which releases the GIL) on the next
   batches while the model works. Workers stop at the PIL stage (uint8 arrays); ToTensor +
   Normalize run once per batch, so the input is bit-identical to ``preprocess(image)``.
   With ``decode="gpu"`` the workers only read the files' bytes and the batch is decoded
   on the model's device (``pipelines.images.decode_batch``: nvjpeg on CUDA).
2. Batched inference under ``torch.inference_mode``. On the CPU in slices of
   ~``MICRO_TOKENS`` tokens whose activations stay in cache (~15% faster than one 64-image
   batch); on a GPU the whole batch at once, copied from pinned memory without blocking.
3. ``FastVisionTower``: the same ViT maths with every matmul a Linear (patch embedding as a
   Linear, SDPA attention behind a fused qkv Linear, the last block run for the class token
   only), for the fp32, bf16 and int8 paths.

Rejected after measuring on an AVX2 CPU: bf16 autocast (slower than fp32), torch.compile with
inductor freezing (30 s compile for +2% in fp32), fbgemm int8 packing (~15% slower than
oneDNN), low-priority decode threads (no gain).
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from pipelines.embed.cache import (
    file_sha256,
    normalise_fingerprint,
    open_cache,
    read_image_embeddings,
    read_text_embeddings,
    write_chunk,
    write_meta,
    write_text_embeddings,
)
from pipelines.embed.clip import ClipBundle
from pipelines.hardware import device_bf16
from pipelines.images import read_bytes
from pipelines.io import DataError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "int8", "bf16")
DECODERS = ("cpu", "gpu")  # where images are decoded: PIL in threads | the model's device (nvjpeg on CUDA)
MIN_COSINE = 0.999  # bf16 / int8 embeddings match fp32 at least this well (tests, benchmarks)
MICRO_TOKENS = 1600  # tokens per forward slice (32 images of ViT-B-32)

Encoder = Callable[[torch.Tensor], torch.Tensor]  # NCHW fp32 -> N x D, L2-normalised fp32


# --------------------------------------------------------------------------- decoding


class ImageDecoder:
    """Path -> model input, split so workers do the PIL part and the batch does the rest.

    When ``preprocess`` is the usual ``Compose([..PIL transforms.., ToTensor, Normalize])``,
    ``load`` returns an HxWx3 uint8 array and ``collate`` turns a list of them into the
    normalised NCHW float tensor (exactly what ToTensor + Normalize compute). Any other
    transform is applied whole in ``load`` and ``collate`` just stacks.
    """

    def __init__(self, preprocess: Callable[[Any], torch.Tensor]) -> None:
        from torchvision.transforms import Compose, Normalize, ToTensor

        self.preprocess = preprocess
        self.pil_stage: list[Callable[[Any], Any]] | None = None
        self.mean = self.std = None
        steps = list(preprocess.transforms) if isinstance(preprocess, Compose) else []
        if steps and isinstance(steps[-1], Normalize):
            self.mean = torch.tensor(steps[-1].mean, dtype=torch.float32).view(1, -1, 1, 1)
            self.std = torch.tensor(steps[-1].std, dtype=torch.float32).view(1, -1, 1, 1)
            steps = steps[:-1]
        if steps and isinstance(steps[-1], ToTensor):
            self.pil_stage = steps[:-1]
        else:
            self.mean = self.std = None

    def load(self, path: str) -> np.ndarray | torch.Tensor:
        """Decode one image (RGB) and apply the per-image transforms. Raises on bad files."""
        with Image.open(path) as im:
            im = im.convert("RGB")
        return self.transform(im)

    def transform(self, im: Image.Image) -> np.ndarray | torch.Tensor:
        """The per-image transforms of a decoded RGB image (``load`` after decoding)."""
        if self.pil_stage is None:
            return self.preprocess(im)
        for step in self.pil_stage:
            im = step(im)
        return np.asarray(im, dtype=np.uint8)

    def collate(self, images: Sequence[np.ndarray | torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
        """The batch as the normalised NCHW float tensor, on ``device`` (default: the CPU).

        On a GPU the uint8 batch is copied (from pinned memory, without blocking) and
        converted there: a quarter of the bytes of a float copy, and the arithmetic is the
        same ToTensor + Normalize.
        """
        device = torch.device("cpu" if device is None else device)
        if self.pil_stage is None:
            x = torch.stack([torch.as_tensor(i) for i in images])
            return x if device.type == "cpu" else x.pin_memory().to(device, non_blocking=True)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        if device.type != "cpu":
            x = x.contiguous().pin_memory().to(device, non_blocking=True)
        return self.normalise_uint8(x)

    def normalise_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """ToTensor + Normalize of an NCHW uint8 batch, on the batch's device."""
        x = x.contiguous().to(torch.float32).div_(255)
        if self.mean is not None:
            x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))
        return x

    def device_plan(self) -> tuple[int, tuple[int, int], str] | None:
        """(resize, crop, interpolation) when the per-image transforms are the usual CLIP
        ``Resize(short side) -> CenterCrop -> RGB`` that ``pipelines.images.decode_batch``
        reproduces on a device; None for any other transform."""
        from torchvision.transforms import CenterCrop, Resize

        steps = [s for s in (self.pil_stage or []) if not _is_rgb_convert(s)]
        if self.mean is None or len(steps) != 2 or not isinstance(steps[0], Resize) or not isinstance(steps[1], CenterCrop):
            return None
        resize, crop = steps[0], steps[1]
        size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
        if size is None or resize.max_size is not None or resize.antialias is False:
            return None
        return int(size), (int(crop.size[0]), int(crop.size[1])), resize.interpolation.value


def _is_rgb_convert(step: Any) -> bool:
    """open_clip's RGB conversion step (``MaybeConvertMode`` / ``_convert_to_rgb``): a no-op on RGB input."""
    name = getattr(step, "__name__", type(step).__name__)
    return name in ("_convert_to_rgb", "MaybeConvertMode", "convert_to_rgb")


@dataclass
class Batch:
    ids: list[str]
    images: Any  # a list of decoded images (or of file bytes, for decode="gpu"), or a batch tensor
    failed: list[dict[str, str]]  # image_id, path, error
    paths: list[str] = field(default_factory=list)


def decoded_batches(
    items: Sequence[tuple[str, str]], decoder: Any, batch_size: int, num_workers: int
) -> Iterator[Batch]:
    """Yield batches of ``decoder.load(path)`` in order; ``num_workers`` threads load ahead."""

    def load(path: str) -> Any:
        try:
            return decoder.load(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, not fatal
            return _Failure(f"{type(exc).__name__}: {exc}")

    def batch_of(pairs: list[tuple[tuple[str, str], Any]]) -> Batch:
        out = Batch([], [], [])
        for (image_id, path), img in pairs:
            if isinstance(img, _Failure):
                out.failed.append({"image_id": image_id, "path": path, "error": img.error})
            else:
                out.ids.append(image_id)
                out.images.append(img)
                out.paths.append(path)
        return out

    if num_workers <= 0:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            yield batch_of([(it, load(it[1])) for it in chunk])
        return

    lookahead = 2 * batch_size + num_workers
    with ThreadPoolExecutor(num_workers, thread_name_prefix="decode") as pool:
        queue: deque[tuple[tuple[str, str], Future]] = deque()
        it = iter(items)
        pending: list[tuple[tuple[str, str], Any]] = []
        exhausted = False
        while queue or not exhausted:
            while not exhausted and len(queue) < lookahead:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                queue.append((item, pool.submit(load, item[1])))
            if not queue:
                break
            item, fut = queue.popleft()
            pending.append((item, fut.result()))
            if len(pending) == batch_size:
                yield batch_of(pending)
                pending = []
        if pending:
            yield batch_of(pending)


@dataclass
class _Failure:
    error: str


# --------------------------------------------------------------------------- precision paths


class SdpaSelfAttention(torch.nn.Module):
    """Drop-in for a self-attention ``nn.MultiheadAttention``: fused qkv Linear + SDPA.

    Makes the in-projection a real ``nn.Linear`` so that dynamic quantisation reaches it.
    """

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=mha.in_proj_bias is not None)
        self.out = torch.nn.Linear(dim, dim, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.out.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.qkv.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out.bias.copy_(mha.out_proj.bias)

    @staticmethod
    def supports(mha: torch.nn.Module) -> bool:
        return (
            isinstance(mha, torch.nn.MultiheadAttention)
            and mha._qkv_same_embed_dim
            and mha.bias_k is None
            and not mha.add_zero_attn
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """The ``nn.MultiheadAttention`` call signature (self-attention only)."""
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("SdpaSelfAttention handles self-attention only")
        x = query if self.batch_first else query.transpose(0, 1)
        y = self.attend(x, attn_mask)
        return (y if self.batch_first else y.transpose(0, 1)), None

    def attend(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, query_rows: int | None = None
    ) -> torch.Tensor:
        """Batch-first self-attention; with ``query_rows``, outputs only the first rows."""
        n, length, dim = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if query_rows is not None:
            q = q[:, :, :query_rows]
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(n, q.shape[2], dim))


class PatchEmbedLinear(torch.nn.Module):
    """A patchify conv (kernel == stride, no padding) as a Linear over flattened patches.

    Returns batch-first tokens (B, N, D). As a Linear it can be quantised; its int8 input
    loses nothing that the 8-bit pixels had not already lost.
    """

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        out_ch, in_ch, ph, pw = conv.weight.shape
        self.patch = (ph, pw)
        w = conv.weight  # the Linear lives where the conv does (CPU or GPU), in its dtype
        self.linear = torch.nn.Linear(in_ch * ph * pw, out_ch, bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.reshape(out_ch, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    @staticmethod
    def supports(conv: torch.nn.Module) -> bool:
        return (
            isinstance(conv, torch.nn.Conv2d)
            and tuple(conv.stride) == tuple(conv.kernel_size)
            and tuple(conv.padding) == (0, 0)
            and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        (ph, pw), gh, gw = self.patch, h // self.patch[0], w // self.patch[1]
        x = x[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw)
        return self.linear(x.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw))


class FastVisionTower(torch.nn.Module):
    """open_clip's ``VisionTransformer.forward`` for class-token pooling, rearranged for speed.

    Same maths, three changes: the patch embedding is a Linear, attention is SDPA behind a
    fused qkv Linear (so every matmul is a quantisable Linear), and the last block is run
    for the class token only (its other outputs are never used with 'tok' pooling; only
    their keys and values are). ``build`` checks it against the original and returns None
    for towers it does not cover.
    """

    def __init__(self, visual: torch.nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.embed = PatchEmbedLinear(visual.conv1)
        replace_modules(visual.transformer, SdpaSelfAttention.supports, SdpaSelfAttention)
        visual.conv1 = torch.nn.Identity()  # replaced by self.embed

    @classmethod
    def build(cls, visual: torch.nn.Module) -> FastVisionTower | None:
        """A checked fast copy of ``visual``, or None when the structure is not the usual ViT."""
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        usual = (
            isinstance(visual, VisionTransformer)
            and visual.attn_pool is None
            and visual.pool_type == "tok"
            and not visual.output_tokens
            and visual.transformer.batch_first
            and PatchEmbedLinear.supports(visual.conv1)
            and all(
                isinstance(b, ResidualAttentionBlock)
                and not hasattr(b, "ln_1_kv")
                and SdpaSelfAttention.supports(b.attn)
                for b in visual.transformer.resblocks
            )
        )
        if not usual:
            return None
        fast = cls(copy.deepcopy(visual)).eval()
        size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
        x = x.to(next(visual.parameters()).device)
        with torch.inference_mode(), _tf32(False):  # the check in true fp32 (cuDNN convs default to TF32)
            cos = F.cosine_similarity(fast(x), visual(x), dim=-1).min()
        if cos < 0.99999:
            log.warning("fast image tower differs from open_clip's (cosine %.6f); not used", cos)
            return None
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = self.embed(x)
        cls_tok = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_tok, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        *blocks, last = v.transformer.resblocks
        for blk in blocks:
            x = blk(x)
        # last block, class token only: keys/values from all tokens, one query row
        x = x[:, :1] + last.ls_1(last.attn.attend(last.ln_1(x), query_rows=1))
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
        pooled = v.ln_post(x[:, 0])
        return pooled @ v.proj if v.proj is not None else pooled


class Fp32LayerNorm(torch.nn.Module):
    """LayerNorm computed in fp32 whatever the input dtype (for the bf16 path)."""

    def __init__(self, ln: torch.nn.LayerNorm) -> None:
        super().__init__()
        self.shape, self.eps = ln.normalized_shape, ln.eps
        self.weight = None if ln.weight is None else torch.nn.Parameter(ln.weight.float(), False)
        self.bias = None if ln.bias is None else torch.nn.Parameter(ln.bias.float(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.shape, self.weight, self.bias, self.eps).to(x.dtype)


def replace_modules(
    root: torch.nn.Module,
    match: Callable[[torch.nn.Module], bool],
    make: Callable[[Any], torch.nn.Module],
) -> int:
    """Replace every submodule for which ``match`` is true by ``make(module)``; returns count."""
    targets = [name for name, mod in root.named_modules() if name and match(mod)]
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, make(getattr(parent, attr)))
    return len(targets)


def _image_tower(bundle: ClipBundle) -> torch.nn.Module:
    """The image tower, when ``encode_image(x)`` is just ``visual(x)`` (CLIP, CustomTextCLIP)."""
    import open_clip

    if not isinstance(bundle.model, (open_clip.CLIP, open_clip.CustomTextCLIP)):
        raise DataError(
            f"precision int8/bf16 supports CLIP-style models only, not "
            f"{type(bundle.model).__name__}; set embed.precision: fp32."
        )
    return bundle.model.visual


def _fast_copy(visual: torch.nn.Module) -> torch.nn.Module:
    """FastVisionTower when it applies, else a copy with SDPA attention modules."""
    fast = FastVisionTower.build(visual)
    if fast is not None:
        return fast
    tower = copy.deepcopy(visual)
    replace_modules(tower, SdpaSelfAttention.supports, SdpaSelfAttention)
    return tower


def on_gpu(bundle: ClipBundle) -> bool:
    return torch.device(bundle.device).type != "cpu"


@contextmanager
def _tf32(on: bool = True) -> Iterator[None]:
    """TF32 matmuls and convolutions on CUDA (the fp32 path) or, ``on=False``, none (restored after)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def micro_batched(bundle: ClipBundle, forward: Callable[[torch.Tensor], torch.Tensor]) -> Encoder:
    """Run ``forward`` and L2-normalise the fp32 result: on the CPU in slices of ~MICRO_TOKENS
    tokens, on a GPU the whole batch at once.

    Keeping the activations of one slice in cache is ~15% faster than one big batch on a CPU
    (ViT-B-32 on 2 AVX2 cores, fp32 and int8 alike: slices of 32 images beat 64); a GPU wants
    the largest batch it is given.
    """
    if on_gpu(bundle):
        return lambda x: F.normalize(forward(x).float(), dim=-1)
    grid = getattr(bundle.model.visual, "grid_size", (7, 7))
    rows = max(1, MICRO_TOKENS // (int(np.prod(grid)) + 1))

    def encode(x: torch.Tensor) -> torch.Tensor:
        parts = [forward(x[i : i + rows]).float() for i in range(0, len(x), rows)]
        return F.normalize(torch.cat(parts), dim=-1)

    return encode


def build_fp32(bundle: ClipBundle) -> Encoder:
    """fp32: ``FastVisionTower`` in fp32 where it applies (the same maths as ``encode_image``,
    checked against it to cosine >= 0.99999 when built), else the
    model's own ``encode_image``. TF32 matmuls on CUDA."""
    tower = _fast_tower_or_none(bundle)
    forward: Callable[[torch.Tensor], torch.Tensor] = tower if tower is not None else bundle.model.encode_image
    if torch.device(bundle.device).type == "cuda":
        plain = forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            with _tf32():
                return plain(x)

    return micro_batched(bundle, forward)


def _fast_tower_or_none(bundle: ClipBundle) -> torch.nn.Module | None:
    """A FastVisionTower copy of a CLIP-style model's image tower, or None (other models, other towers)."""
    import open_clip

    if not isinstance(bundle.model, (open_clip.CLIP, open_clip.CustomTextCLIP)):
        return None
    return FastVisionTower.build(bundle.model.visual)


def build_int8(bundle: ClipBundle) -> Encoder:
    """Image tower with every Linear dynamically quantised to int8 (CPU only).

    Weights: int8 per output channel; activations: uint8 per tensor, scaled per call.
    """
    if on_gpu(bundle):
        raise DataError(f"embed.precision: int8 runs on the CPU only (its kernels are CPU kernels), not on "
                        f"{bundle.device}; use {' or '.join(supported_precisions(bundle.device))}.")
    tower = _fast_copy(_image_tower(bundle))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        except ImportError as exc:
            raise DataError("this torch has no dynamic quantisation; use precision fp32") from exc
        engine = torch.backends.quantized.engine
        if "onednn" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "onednn"  # packs for oneDNN: ~15% faster than fbgemm
        try:
            qconfig = {torch.nn.Linear: per_channel_dynamic_qconfig}  # weights per output channel
            tower = quantize_dynamic(tower, qconfig, dtype=torch.qint8)
        finally:
            torch.backends.quantized.engine = engine
    tower.eval()
    return micro_batched(bundle, tower)


def build_bf16(bundle: ClipBundle) -> Encoder:
    """bf16 copy of the (fast) image tower, on the model's device; LayerNorm stays fp32."""
    tower = _fast_copy(_image_tower(bundle)).to(torch.bfloat16)
    replace_modules(tower, lambda m: isinstance(m, torch.nn.LayerNorm), Fp32LayerNorm)
    tower.eval()
    return micro_batched(bundle, lambda x: tower(x.to(torch.bfloat16)))


BUILDERS: dict[str, Callable[[ClipBundle], Encoder]] = {
    "fp32": build_fp32,
    "int8": build_int8,
    "bf16": build_bf16,
}


# --------------------------------------------------------------------------- choosing the path


def device_precisions(device_type: str, bf16: bool) -> tuple[str, ...]:
    """The precision paths a device of ``device_type`` runs (``bf16``: it has native bf16)."""
    if device_type == "cpu":
        return ("fp32", "int8", "bf16") if bf16 else ("fp32", "int8")
    return ("fp32", "bf16") if bf16 else ("fp32",)


def choose_precision(requested: str, device_type: str, bf16: bool, key: str = "embed.precision") -> str:
    """The path for ``requested`` on a device of ``device_type`` with (``bf16``) or without
    native bf16: a pure function, no timing. ``auto``: bf16 with native bf16, else fp32.

    Raises:
        DataError: an unknown precision, or one this device cannot run (naming ``key`` and
            the paths the device supports).
    """
    if requested not in PRECISIONS:
        raise DataError(f"{key} = {requested!r} is not one of {PRECISIONS}; fix {key}.")
    ok = device_precisions(device_type, bf16)
    if requested == "auto":
        return "bf16" if "bf16" in ok else "fp32"
    if requested not in ok:
        if requested == "int8":
            why = "int8 kernels run on the CPU only"
        elif device_type == "cpu":
            why = "this CPU has no native bf16 matmul (AVX512-BF16 / AMX), where bf16 is emulated ~40-100x slower than fp32"
        else:
            why = f"this {device_type} device has no bf16 support (CUDA compute capability < 8.0)"
        raise DataError(
            f"{key} = {requested!r} cannot run on this {device_type} device: {why}. It supports "
            f"{', '.join(ok)} (auto picks {'bf16' if 'bf16' in ok else 'fp32'} here); set {key} to one of them."
        )
    return requested


def supported_precisions(device: torch.device | str) -> tuple[str, ...]:
    """``device_precisions`` of this machine's ``device`` (read from CPU flags / CUDA capability)."""
    device = torch.device(device)
    return device_precisions(device.type, device_bf16(device))


def resolve_precision(requested: str, device: torch.device | str, key: str = "embed.precision") -> str:
    """``choose_precision`` for this machine's ``device``: the path ``requested`` runs as."""
    device = torch.device(device)
    return choose_precision(requested, device.type, device_bf16(device), key)


def resolve_device(spec: str, key: str = "embed.device") -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when this machine has a CUDA device) as a
    device string; a CUDA device that is not there is a ``DataError`` naming ``key``."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"{key} = {spec!r} is not a device; use cpu, cuda, cuda:N or auto.") from exc
    if device.type not in ("cpu", "cuda"):
        raise DataError(f"{key} = {spec!r}: the embed stage runs on cpu or cuda; use cpu, cuda, cuda:N or auto.")
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (device.index or 0) >= n:
            raise DataError(f"{key} = {spec!r}, but this machine has {n} CUDA device(s); set {key}: cpu (or auto).")
    return str(device)


def check_decode(decode: str, decoder: ImageDecoder, key: str = "embed.decode") -> None:
    """``decode`` is one of DECODERS, and ``gpu`` only with a transform it reproduces."""
    if decode not in DECODERS:
        raise DataError(f"{key} = {decode!r} is not one of {DECODERS}; fix {key}.")
    if decode == "gpu" and decoder.device_plan() is None:
        raise DataError(
            f"{key} = gpu reproduces the usual CLIP preprocess (Resize short side -> CenterCrop -> "
            f"Normalize) only, and this model's is {decoder.preprocess}; set {key}: cpu."
        )


def decode_workers(requested: int | str, device: torch.device | str, cpus: int | None = None) -> int:
    """Decode threads: ``requested``, or for ``auto`` sized to the machine: on a GPU every core
    but one (up to 16: the GPU waits on decoding), on the CPU 2 (the model needs the cores)."""
    if requested == "auto":
        cpus = cpus or os.cpu_count() or 1
        return max(1, min(16, cpus - 1)) if torch.device(device).type != "cpu" else min(2, cpus)
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 0:
        raise DataError(f"embed.num_workers = {requested!r}: use an integer >= 0 or auto.")
    return requested


# --------------------------------------------------------------------------- image cache


class CacheRun:
    """One run over an image cache, shared by both engines (this module's and ``ray_engine``).

    Opening it checks the arguments, validates the items, hashes their files, opens the cache
    (wiping it on a new fingerprint, dropping bad chunks and stale rows) and lists the
    ``pending`` items. ``used`` is the precision path already resolved for the device that
    will run the model (``resolve_precision``); with ``device_type`` and ``decode`` it is part
    of the fingerprint, so a cache written by another path is re-embedded, not mixed. The
    engine then calls :meth:`start` (``meta.json`` is written before any chunk), :meth:`add`
    for each embedded batch (rows are written in chunks of ``chunk_rows``, each atomically)
    and :meth:`report` at the end.
    """

    def __init__(
        self,
        bundle: ClipBundle,
        items: Sequence[tuple[str, str]],
        out_dir: str | os.PathLike,
        *,
        precision: str,
        used: str,
        device_type: str,
        decode: str = "cpu",
        fingerprint: dict[str, Any] | None,
        chunk_rows: int,
        num_workers: int,
    ) -> None:
        self.started = time.perf_counter()
        if precision not in PRECISIONS or used not in BUILDERS:
            raise DataError(f"precision {precision!r} is not one of {PRECISIONS}; fix embed.precision.")
        if decode not in DECODERS:
            raise DataError(f"embed.decode = {decode!r} is not one of {DECODERS}; fix embed.decode.")
        if chunk_rows < 1 or num_workers < 0:
            raise DataError("embed: batch_size and chunk_rows must be >= 1, num_workers >= 0.")
        self.items = [(str(image_id), str(path)) for image_id, path in items]
        _check_items(self.items)
        self.out_dir, self.chunk_rows, self.precision = out_dir, chunk_rows, precision
        self.used, self.device_type, self.decode = used, device_type, decode
        path = {"precision": used, "device": device_type, "decode": decode}
        self.fp = normalise_fingerprint({**bundle.fingerprint(), **(fingerprint or {}), **path})
        self.hashes = file_hashes([p for _, p in self.items], num_workers)
        self.state = open_cache(out_dir, self.fp, wanted={i: self.hashes[p] for i, p in self.items})
        self.pending = [item for item in self.items if item[0] not in self.state.done]
        self.meta = self.state.meta
        self.skipped: list[dict[str, str]] = []
        self.n_now = 0
        self._path_of = dict(self.pending)
        self._index = self.state.next_index
        self._ids: list[str] = []
        self._emb: list[np.ndarray] = []

    def _new_meta(self) -> dict[str, Any]:
        return {"fingerprint": self.fp, "precision_used": self.used, "device": self.device_type, "decode": self.decode}

    def start(self) -> None:
        """Record the path in ``meta.json`` (a new cache only), before any chunk."""
        if self.meta is None:
            self.meta = self._new_meta()
            write_meta(self.out_dir, self.meta)

    def add(self, ids: Sequence[str], emb: np.ndarray) -> None:
        """Buffer embedded rows; write every full chunk."""
        if self.meta is None:
            raise RuntimeError("CacheRun.start must be called before add")
        self._ids.extend(ids)
        self._emb.append(np.asarray(emb, dtype=np.float32))
        self.n_now += len(ids)
        while len(self._ids) >= self.chunk_rows:
            self._flush(self.chunk_rows)

    def _flush(self, n: int) -> None:
        emb = np.concatenate(self._emb)
        ids = self._ids[:n]
        write_chunk(self.out_dir, self._index, ids, emb[:n], [self.hashes[self._path_of[i]] for i in ids])
        self._index += 1
        self._ids, self._emb = self._ids[n:], [emb[n:]]

    def report(self, loop_s: float, **extra: Any) -> dict[str, Any]:
        """Write the last partial chunk (and ``meta.json`` if nothing was embedded); the report.

        ``loop_s``: seconds spent embedding, without one-time set-up (for ``img_per_s``).
        """
        if self._ids:
            self._flush(len(self._ids))
        if self.meta is None:  # nothing was embedded this run: still mark the directory as a cache
            self.start()
        items, skipped = self.items, self.skipped
        if items and len(skipped) == len(items):
            raise DataError(
                f"none of the {len(items)} images could be read (first: {skipped[0]['path']}: "
                f"{skipped[0]['error']}); check the image paths in the manifest."
            )
        if skipped:
            log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[:3])
        state = self.state
        return {
            "n_total": len(items),
            "n_embedded_now": self.n_now,
            "n_resumed": len(state.done),
            "n_changed": state.n_changed,
            "n_removed": state.n_removed,
            "bad_chunks": state.bad_chunks,
            "n_skipped": len(skipped),
            "skipped": skipped,
            "img_per_s": self.n_now / loop_s if self.n_now and loop_s > 0 else None,
            "precision": self.used,
            "precision_requested": self.precision,
            "device": self.device_type,
            "decode": self.decode,
            **extra,
            "cache_wiped": state.wiped,
            "seconds": time.perf_counter() - self.started,
        }


def embed_images(
    bundle: ClipBundle,
    items: Sequence[tuple[str, str]],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    num_workers: int | str = 2,
    chunk_rows: int = 512,
    precision: str = "auto",
    decode: str = "cpu",
    fingerprint: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed ``items`` ((image_id, path) pairs) into the chunked Parquet cache ``out_dir``.

    The model runs where ``bundle.device`` is. ``precision`` is resolved for that device by
    :func:`resolve_precision` before any image is read (``auto``: bf16 where the device has
    it natively, else fp32). ``decode``: ``cpu`` (PIL in ``num_workers`` threads) or ``gpu``
    (the threads read bytes; the batch is decoded, resized and cropped on ``bundle.device``
    by ``pipelines.images.decode_batch``, with PIL as the fallback for other formats).
    ``num_workers``: an integer, or ``auto`` (:func:`decode_workers`).

    Incremental within one fingerprint (the bundle's model/weights/embed_dim, the path used:
    precision, device type and decode, and the caller's ``fingerprint``): a cached row is
    reused while its image id is in ``items`` and its file has the same SHA-256, so a killed
    run resumes and a grown or edited manifest embeds only its new or changed images. A
    different fingerprint wipes the cache. Unreadable images are skipped and listed in the
    report.

    Returns:
        A report: n_total, n_embedded_now, n_resumed (rows reused), n_changed (re-embedded
        because the file changed), n_removed (dropped: no longer in ``items``), bad_chunks
        (deleted for a checksum mismatch, then recomputed), n_skipped, skipped (image_id,
        path, error), img_per_s, precision (the path used), precision_requested, device,
        decode, setup_s, seconds.

    Raises:
        DataError: bad arguments (a precision or decode the device cannot run: before any
            image is read), duplicate ids, the image directory is missing, or every image
            failed to load.
    """
    if batch_size < 1:
        raise DataError("embed: batch_size and chunk_rows must be >= 1, num_workers >= 0.")
    device = torch.device(bundle.device)
    used = resolve_precision(precision, device)
    decoder = ImageDecoder(bundle.preprocess)
    check_decode(decode, decoder)
    workers = decode_workers(num_workers, device)
    run = CacheRun(
        bundle, items, out_dir, precision=precision, used=used, device_type=device.type, decode=decode,
        fingerprint=fingerprint, chunk_rows=chunk_rows, num_workers=workers,
    )
    bar = tqdm(total=len(run.pending), unit="img", desc="embed images", disable=not progress)
    t = time.perf_counter()
    encoder = BUILDERS[used](bundle) if run.pending else None
    run.start()
    setup_s = time.perf_counter() - t
    loop_start = time.perf_counter()
    plan = decoder.device_plan() if decode == "gpu" else None
    source = _ByteDecoder(plan, device, decoder) if plan else decoder
    for batch in decoded_batches(run.pending, source, batch_size, workers):
        if plan:  # decode the batch's bytes on the device; files it cannot decode are skipped
            batch = source.finish(batch)
        run.skipped.extend(batch.failed)
        bar.update(len(batch.failed))
        if not batch.ids:
            continue
        x = batch.images if plan else decoder.collate(batch.images, device)
        with torch.inference_mode():
            run.add(batch.ids, encoder(x).cpu().numpy())
        bar.update(len(batch.ids))
    loop_s = time.perf_counter() - loop_start
    bar.close()
    return run.report(loop_s, engine="local", num_workers=workers, setup_s=setup_s)  # set-up: building the path


class _ByteDecoder:
    """``decode="gpu"``: workers read the files' bytes (``load``); ``finish`` decodes a batch
    on the device (``pipelines.images.decode_images``) and normalises it there."""

    def __init__(self, plan: tuple[int, tuple[int, int], str], device: torch.device, decoder: ImageDecoder) -> None:
        self.plan, self.device, self.decoder = plan, device, decoder

    def load(self, path: str) -> torch.Tensor:
        return read_bytes(path)

    def finish(self, batch: Batch) -> Batch:
        from pipelines.images import decode_images, resize_center_crop

        resize, crop, interpolation = self.plan
        images, errors = decode_images(batch.images, self.device)
        ok = [i for i, im in enumerate(images) if im is not None]
        failed = list(batch.failed) + [
            {"image_id": batch.ids[i], "path": batch.paths[i], "error": str(errors[i])} for i in range(len(images)) if images[i] is None
        ]
        x = None
        if ok:
            x = self.decoder.normalise_uint8(resize_center_crop([images[i] for i in ok], resize, crop, interpolation))
        return Batch([batch.ids[i] for i in ok], x, failed, [batch.paths[i] for i in ok])


def file_hashes(paths: Sequence[str], num_workers: int) -> dict[str, str | None]:
    """SHA-256 of each file (None when it cannot be read), ``num_workers`` threads at a time."""

    def digest(path: str) -> str | None:
        try:
            return file_sha256(path)
        except OSError:
            return None

    if num_workers <= 1:
        return {p: digest(p) for p in paths}
    with ThreadPoolExecutor(num_workers, thread_name_prefix="hash") as pool:
        return dict(zip(paths, pool.map(digest, paths), strict=True))


def _check_items(items: list[tuple[str, str]]) -> None:
    """Unique ids, and the images' root directory must exist."""
    seen: set[str] = set()
    dup = [i for i, _ in items if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    if dup:
        raise DataError(f"duplicate image ids in the manifest (e.g. {dup[:3]}); ids must be unique.")
    if not items:
        return
    parents = {os.path.dirname(os.path.abspath(p)) for _, p in items}
    root = Path(os.path.commonpath(sorted(parents)))
    if not root.is_dir():
        raise DataError(
            f"image directory {root} does not exist; download or unpack the images there, or "
            f"fix the data set's image root in params.yaml."
        )


# --------------------------------------------------------------------------- texts


def embed_texts(bundle: ClipBundle, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Encode raw strings (no prompt template) with the text tower: N x D, L2-normalised.

    For causal CLIP text towers, each batch is cut to its longest token sequence (texts
    are sorted by length first): positions after the end token cannot influence it, so the
    result equals ``encode_text`` on the full context; this is checked on the first batch.
    """
    if not texts:
        return np.zeros((0, bundle.embed_dim), dtype=np.float32)
    tokens = bundle.tokenizer(list(texts))
    model = bundle.model
    trim = _trimmable(model)
    lengths = _token_lengths(model, tokens) if trim else torch.full((len(texts),), tokens.shape[1])
    order = torch.argsort(lengths, stable=True)
    out = torch.empty(len(texts), bundle.embed_dim)
    with torch.inference_mode():
        if trim and not _trim_matches(model, tokens[order[-4:]].to(bundle.device)):
            log.warning("trimmed text encoding differs from encode_text; using the full context")
            trim = False
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = tokens[idx].to(bundle.device)
            feats = _encode_text_trimmed(model, batch) if trim else model.encode_text(batch)
            out[idx] = F.normalize(feats.float(), dim=-1).cpu()
    return out.numpy()


def _trimmable(model: torch.nn.Module) -> bool:
    import open_clip

    return (
        type(model) is open_clip.CLIP
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
    )


def _token_lengths(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Index of the pooled (end) token + 1, per row."""
    if model.text_pool_type == "argmax":
        return tokens.argmax(dim=-1) + 1
    return (tokens == model.text_eos_id).int().argmax(dim=-1) + 1


def _encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``CLIP.encode_text`` on tokens cut to the batch's longest sequence."""
    from open_clip.transformer import text_global_pool

    n = int(_token_lengths(model, tokens).max())
    tokens = tokens[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    eos = getattr(model, "text_eos_id", None)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=eos)
    if model.text_projection is not None:
        if isinstance(model.text_projection, torch.nn.Linear):
            x = model.text_projection(x)
        else:
            x = x @ model.text_projection
    return x


def _trim_matches(model: torch.nn.Module, tokens: torch.Tensor) -> bool:
    full = F.normalize(model.encode_text(tokens).float(), dim=-1)
    cut = F.normalize(_encode_text_trimmed(model, tokens).float(), dim=-1)
    return bool(F.cosine_similarity(full, cut, dim=-1).min() >= 0.99999)


__all__ = [
    "DECODERS",
    "PRECISIONS",
    "ImageDecoder",
    "choose_precision",
    "resolve_device",
    "resolve_precision",
    "embed_images",
    "embed_texts",
    "read_image_embeddings",
    "read_text_embeddings",
    "write_text_embeddings",
]
