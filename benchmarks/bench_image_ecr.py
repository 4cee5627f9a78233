"""Training throughput of E_CR: the image backbone on pixels against the embedding MLP.

Times traversal-contrastive training steps exactly as ``pretrain_loop`` takes them (balanced
batches of real JPEG files decoded by ``pipelines.images.batch_loader`` with TMCR's
augmentation, autocast per precision, AdamW) and reports training images/s, decode
included. On CUDA it also runs ``swin_base_patch4_window7_224`` at 224 in bf16 and fp32 side by
side. Writes ``benchmarks/results/image_ecr.json``.

Usage: ``python benchmarks/bench_image_ecr.py [--backbone mobilenetv3_small_050] [--size 112 --resize 128]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.images import batch_loader, to_device, view_batch  # noqa: E402
from pipelines.ranking.backbone import ImageCREncoder  # noqa: E402
from pipelines.ranking.encoder import CREncoder  # noqa: E402
from pipelines.ranking.loss import traversal_contrastive_loss  # noqa: E402
from pipelines.train.precision import resolve_precision  # noqa: E402


def write_images(folder: Path, n: int, side: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        x = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
        im = Image.fromarray(x).resize((side, side), Image.BILINEAR)  # smooth content, realistic JPEG size
        paths.append(str(folder / f"{i:04d}.jpg"))
        im.save(paths[-1], quality=90)
    return paths


def _batch(paths, size, resize, spec):
    rows, seed = spec
    return view_batch([paths[i] for i in rows], size, resize, seed=seed)


def time_image(paths, backbone: str, size: int, resize: int, batch: int, steps: int, workers: int, precision: str,
               device: torch.device) -> dict:
    import functools

    torch.manual_seed(0)
    enc = ImageCREncoder(backbone, 512, 128, 0.1, image_size=size, resize=resize).to(device).train()
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-4)
    dtype = resolve_precision(precision, device, key="pretrain.image.precision").dtype
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    rng = np.random.default_rng(0)
    bins = torch.arange(batch, device=device) % 7
    specs = [(rng.choice(len(paths), batch).tolist(), (0, 0, k)) for k in range(steps + 2)]
    loader = batch_loader(specs, functools.partial(_batch, paths, size, resize), workers=workers, device=device)
    t0 = None
    for k, x in enumerate(loader):
        if k == 2:  # two warm-up steps
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x = to_device(x, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            z = enc(x)
        loss = traversal_contrastive_loss(z.float(), bins, tau=0.07)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"backbone": backbone, "size": size, "resize": resize, "batch": batch, "steps": steps, "loader_workers": workers,
            "precision": str(dtype or torch.float32).removeprefix("torch."), "device": device.type,
            "n_params": sum(p.numel() for p in enc.parameters()), "images_per_s": round(steps * batch / seconds, 2)}


def time_embedding(batch: int, steps: int, dim: int = 512) -> dict:
    torch.manual_seed(0)
    enc = CREncoder(dim, 512, 128, 0.1).train()
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-3)
    emb = torch.randn(2000, dim)
    bins = torch.arange(batch) % 7
    rows = torch.randint(0, 2000, (steps + 2, batch))
    for k in range(steps + 2):
        if k == 2:
            t0 = time.perf_counter()
        loss = traversal_contrastive_loss(enc(emb[rows[k]]), bins, tau=0.07)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"encoder": "embedding MLP", "in_dim": dim, "batch": batch, "steps": steps,
            "images_per_s": round(steps * batch / (time.perf_counter() - t0), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="mobilenetv3_small_050")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--resize", type=int, default=128)
    ap.add_argument("--batch", type=int, default=14, help="a demo balanced batch: 7 bins x N_s 2")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/image_ecr.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        paths = write_images(Path(d), args.images, 224)
        for workers in (0, 2):
            rows.append(time_image(paths, args.backbone, args.size, args.resize, args.batch, args.steps, workers, "fp32", cpu))
            print(rows[-1], flush=True)
        rows.append(time_embedding(args.batch, 200))
        print(rows[-1], flush=True)
        gpu = None
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
            big = write_images(Path(d), 256, 256, seed=1)
            for precision in ("bf16", "fp32"):
                rows.append(time_image(big, "swin_base_patch4_window7_224", 224, 256, 64, 20, 8, precision, torch.device("cuda")))
                print(rows[-1], flush=True)
    out = {"load_average_1min": round(os.getloadavg()[0], 1), "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "gpu": gpu or "none available", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
