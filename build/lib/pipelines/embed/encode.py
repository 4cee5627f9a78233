"""Embed images (into the chunked Parquet cache) and texts with a frozen open_clip model.

Where the CPU speed comes from (measured by ``benchmarks/bench_embed.py``; ViT-B-32 on
2 AVX2 cores: naive per-image fp32 loop ~10 img/s, this module ~35 img/s steady state):

1. Decoding overlaps inference: a thread pool runs PIL (which releases the GIL) on the
   next batches while the model works. Workers stop at the PIL stage (uint8 arrays);
   ToTensor + Normalize run once per batch with torchvision's arithmetic, so the input
   tensor is bit-identical to ``preprocess(image)``.
2. Batched inference under ``torch.inference_mode``, in slices of ~``MICRO_TOKENS`` tokens
   whose activations stay in cache (~15% faster than one 64-image batch).
3. A faster numeric path for the image tower, picked by ``precision``:

   * ``fp32``: the model's own ``encode_image`` (the reference).
   * ``int8``: ``FastVisionTower`` (the same ViT maths with every matmul a Linear: patch
     embedding as a Linear, SDPA attention behind a fused qkv Linear, and the last block
     run for the class token only), then every Linear dynamically quantised to int8
     (weights per channel, packed for oneDNN). LayerNorm, softmax, GELU stay fp32.
     ~1.9x fp32; cosine to fp32 ~0.9997.
   * ``bf16``: a bf16 copy of the (fast) tower with LayerNorm kept in fp32. Only fast on
     CPUs with native bf16 matmul (AVX-512 BF16 / AMX) or on GPUs; on plain AVX2, torch's
     bf16 matmul is ~40x slower than fp32.
   * ``auto``: on the first batch, build and time each candidate against fp32 and keep
     the fastest whose embeddings match fp32 with cosine >= 0.999 on every calibration
     image and that is >= 1.1x faster (else fp32). bf16 is tried only when a quick matmul
     probe shows bf16 beating fp32. A resumed cache reuses the path it was started with
     (``meta.json``), so one cache never mixes paths.

Rejected after measuring: bf16 autocast (slower than fp32 here), torch.compile with
inductor freezing / oneDNN fusions (30 s compile for +2% in fp32), fbgemm int8 packing
(~15% slower than oneDNN), and low-priority decode threads (no gain; slower on large
JPEGs). Not pursued: channels_last (only the patchify conv sees NCHW, and it is a Linear
here).
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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
from pipelines.hardware import bf16_matmul_speedup
from pipelines.io import DataError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "int8", "bf16")
MIN_COSINE = 0.999
MIN_SPEEDUP = 1.1  # auto leaves exact fp32 only for a clear win
CALIB_IMAGES = 8
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

    def collate(self, images: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        if self.pil_stage is None:
            return torch.stack([torch.as_tensor(i) for i in images])
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        x = x.to(torch.float32).div_(255)
        if self.mean is not None:
            x.sub_(self.mean).div_(self.std)
        return x


@dataclass
class Batch:
    ids: list[str]
    images: list[Any]
    failed: list[dict[str, str]]  # image_id, path, error


def decoded_batches(
    items: Sequence[tuple[str, str]], decoder: ImageDecoder, batch_size: int, num_workers: int
) -> Iterator[Batch]:
    """Yield batches of decoded images in order; ``num_workers`` threads decode ahead."""

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
        self.linear = torch.nn.Linear(in_ch * ph * pw, out_ch, bias=conv.bias is not None)
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
        with torch.inference_mode():
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


def micro_batched(bundle: ClipBundle, forward: Callable[[torch.Tensor], torch.Tensor]) -> Encoder:
    """Run ``forward`` on slices of ~MICRO_TOKENS tokens and L2-normalise the fp32 result.

    Keeping the activations of one slice in cache is ~15% faster than one big batch
    (ViT-B-32 on 2 AVX2 cores, fp32 and int8 alike: slices of 32 images beat 64).
    """
    grid = getattr(bundle.model.visual, "grid_size", (7, 7))
    rows = max(1, MICRO_TOKENS // (int(np.prod(grid)) + 1))

    def encode(x: torch.Tensor) -> torch.Tensor:
        parts = [forward(x[i : i + rows]).float() for i in range(0, len(x), rows)]
        return F.normalize(torch.cat(parts), dim=-1)

    return encode


def build_fp32(bundle: ClipBundle) -> Encoder:
    """The reference: the model's own ``encode_image``."""
    return micro_batched(bundle, bundle.model.encode_image)


def build_int8(bundle: ClipBundle) -> Encoder:
    """Image tower with every Linear dynamically quantised to int8.

    Weights: int8 per output channel; activations: uint8 per tensor, scaled per call.
    """
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
    """bf16 copy of the image tower; LayerNorm stays fp32."""
    tower = _fast_copy(_image_tower(bundle)).to(torch.bfloat16)
    replace_modules(tower, lambda m: isinstance(m, torch.nn.LayerNorm), Fp32LayerNorm)
    tower.eval()
    return micro_batched(bundle, lambda x: tower(x.to(torch.bfloat16)))


BUILDERS: dict[str, Callable[[ClipBundle], Encoder]] = {
    "fp32": build_fp32,
    "int8": build_int8,
    "bf16": build_bf16,
}


def calibrate(
    bundle: ClipBundle, x: torch.Tensor, reps: int = 2
) -> tuple[str, dict[str, Any], Encoder]:
    """Pick the fastest path whose embeddings match fp32 (cosine >= MIN_COSINE) on ``x``.

    Each path is built and run once (its output checked against fp32); the paths that
    pass are then timed ``reps`` times, interleaved so that a burst of load from another
    process hits them alike, and the best time of each counts.

    Returns the chosen precision, a table {path: {img_per_s, min_cosine, status}} and the
    chosen encoder (already built, so the caller need not build it again).
    """
    encoders = {"fp32": BUILDERS["fp32"](bundle)}
    table: dict[str, dict[str, Any]] = {"fp32": {"min_cosine": 1.0, "status": "ok"}}
    if x.device.type != "cpu":  # accelerators: bf16 is the candidate; int8 kernels are CPU-only
        candidates = ["bf16"]
    else:
        candidates = ["int8"]
        bf16_gain = bf16_matmul_speedup()
        if bf16_gain > 1.0:
            candidates.append("bf16")
        else:
            slower = f"{1 / bf16_gain:.1f}x slower"
            table["bf16"] = {"status": f"skipped: bf16 matmul is {slower} than fp32 here"}
    with torch.inference_mode():
        ref = encoders["fp32"](x)
        for name in candidates:
            try:
                encoders[name] = BUILDERS[name](bundle)
                cos = float(F.cosine_similarity(encoders[name](x), ref, dim=-1).min())
            except Exception as exc:  # noqa: BLE001 - an unsupported path is just not chosen
                table[name] = {"status": f"unavailable: {type(exc).__name__}: {exc}"}
                continue
            table[name] = {"min_cosine": cos, "status": "ok" if cos >= MIN_COSINE else "inexact"}
        timed = [name for name, row in table.items() if row["status"] == "ok"]
        best_s = dict.fromkeys(timed, float("inf"))
        for _ in range(reps):
            for name in timed:
                start = time.perf_counter()
                encoders[name](x)
                best_s[name] = min(best_s[name], time.perf_counter() - start)
    for name in timed:
        table[name]["img_per_s"] = len(x) / best_s[name]
    ref_speed = table["fp32"]["img_per_s"]
    fast_enough = [n for n in timed if n != "fp32" and table[n]["img_per_s"] >= MIN_SPEEDUP * ref_speed]
    best = max(fast_enough, key=lambda n: table[n]["img_per_s"], default="fp32")
    return best, table, encoders[best]


# --------------------------------------------------------------------------- image cache


class CacheRun:
    """One run over an image cache, shared by both engines (this module's and ``ray_engine``).

    Opening it validates the items, hashes their files, opens the cache (wiping it on a new
    fingerprint, dropping bad chunks and stale rows) and lists the ``pending`` items. The
    engine then calls :meth:`start` once the precision path is known (``meta.json`` is
    written before any chunk), :meth:`add` for each embedded batch (rows are written in
    chunks of ``chunk_rows``, each atomically) and :meth:`report` at the end.
    """

    def __init__(
        self,
        bundle: ClipBundle,
        items: Sequence[tuple[str, str]],
        out_dir: str | os.PathLike,
        *,
        precision: str,
        fingerprint: dict[str, Any] | None,
        chunk_rows: int,
        num_workers: int,
    ) -> None:
        self.started = time.perf_counter()
        if precision not in PRECISIONS:
            raise DataError(f"precision {precision!r} is not one of {PRECISIONS}; fix embed.precision.")
        if chunk_rows < 1 or num_workers < 0:
            raise DataError("embed: batch_size and chunk_rows must be >= 1, num_workers >= 0.")
        self.items = [(str(image_id), str(path)) for image_id, path in items]
        _check_items(self.items)
        self.out_dir, self.chunk_rows, self.precision = out_dir, chunk_rows, precision
        self.fp = normalise_fingerprint({**bundle.fingerprint(), **(fingerprint or {}), "precision": precision})
        self.hashes = file_hashes([path for _, path in self.items], num_workers)
        self.state = open_cache(out_dir, self.fp, wanted={i: self.hashes[p] for i, p in self.items})
        self.pending = [item for item in self.items if item[0] not in self.state.done]
        self.meta = self.state.meta
        # the precision path of a resumed cache, or the requested one (None: auto, not yet chosen)
        self.used: str | None = precision if precision != "auto" else (self.meta or {}).get("precision_used")
        self.calibration: dict[str, Any] | None = (self.meta or {}).get("calibration")
        self.skipped: list[dict[str, str]] = []
        self.n_now = 0
        self._path_of = dict(self.pending)
        self._index = self.state.next_index
        self._ids: list[str] = []
        self._emb: list[np.ndarray] = []

    def start(self, used: str, calibration: dict[str, Any] | None) -> None:
        """The precision path is chosen: record it in ``meta.json`` (a new cache only)."""
        self.used, self.calibration = used, calibration
        if self.meta is None:
            self.meta = {"fingerprint": self.fp, "precision_used": used, "calibration": calibration}
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
            write_meta(self.out_dir, {"fingerprint": self.fp, "precision_used": self.used, "calibration": self.calibration})
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
            "calibration": self.calibration,
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
    num_workers: int = 2,
    chunk_rows: int = 512,
    precision: str = "auto",
    fingerprint: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed ``items`` ((image_id, path) pairs) into the chunked Parquet cache ``out_dir``.

    Incremental within one fingerprint (the bundle's model/weights/embed_dim, ``precision``
    and the caller's ``fingerprint``): a cached row is reused while its image id is in
    ``items`` and its file has the same SHA-256, so a killed run resumes and a grown or
    edited manifest embeds only its new or changed images. A different fingerprint wipes
    the cache. Unreadable images are skipped and listed in the report.

    Returns:
        A report: n_total, n_embedded_now, n_resumed (rows reused), n_changed (re-embedded
        because the file changed), n_removed (dropped: no longer in ``items``), bad_chunks
        (deleted for a checksum mismatch, then recomputed), n_skipped, skipped (image_id,
        path, error), img_per_s, precision (the path used), calibration, seconds.

    Raises:
        DataError: bad arguments, duplicate ids, the image directory is missing, or every
            image failed to load.
    """
    if batch_size < 1:
        raise DataError("embed: batch_size and chunk_rows must be >= 1, num_workers >= 0.")
    run = CacheRun(
        bundle, items, out_dir, precision=precision, fingerprint=fingerprint, chunk_rows=chunk_rows,
        num_workers=num_workers,
    )
    decoder = ImageDecoder(bundle.preprocess)
    encoder: Encoder | None = None
    calib_s = setup_s = 0.0
    bar = tqdm(total=len(run.pending), unit="img", desc="embed images", disable=not progress)
    loop_start = time.perf_counter()
    for batch in decoded_batches(run.pending, decoder, batch_size, num_workers):
        run.skipped.extend(batch.failed)
        bar.update(len(batch.failed))
        if not batch.ids:
            continue
        x = decoder.collate(batch.images).to(bundle.device)
        if encoder is None:
            t = time.perf_counter()
            if run.used is None:
                used, calibration, encoder = calibrate(bundle, x[:CALIB_IMAGES])
                calib_s = time.perf_counter() - t
                log.info("precision auto -> %s (%s)", used, calibration)
                run.start(used, calibration)
            else:
                encoder = BUILDERS[run.used](bundle)
                run.start(run.used, run.calibration)
            setup_s = time.perf_counter() - t
        with torch.inference_mode():
            run.add(batch.ids, encoder(x).cpu().numpy())
        bar.update(len(batch.ids))
    loop_s = time.perf_counter() - loop_start - setup_s  # excludes calibration, path set-up
    bar.close()
    return run.report(
        loop_s,
        engine="local",
        calibration_s=calib_s,
        setup_s=setup_s,  # calibration + building the chosen path (excluded from img_per_s)
    )


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
    "PRECISIONS",
    "ImageDecoder",
    "calibrate",
    "embed_images",
    "embed_texts",
    "read_image_embeddings",
    "read_text_embeddings",
    "write_text_embeddings",
]
