"""Image-embedding throughput: a naive per-image open_clip loop vs `embed_images`, side by side.

    python benchmarks/bench_embed.py [--model ViT-B-32] [--n-images 128] [--batch-size 64]
    python benchmarks/bench_embed.py --device cuda --model ViT-L-14 --n-images 2048 --batch-size 256 \
        --num-workers auto [--ray]

Images are real photographs (random crops, 224..600 px, of the scikit-image sample images
that ship in the wheel; no download), written as JPEGs to a temporary directory. The model
has random weights (``pretrained: none``): no pretrained weights exist on this machine, and
speed does not depend on the weight values. Every method is compared with the naive fp32
embeddings (cosine per image; on CUDA the naive loop runs in true fp32, TF32 off).

Methods: the naive loop; ``embed_images`` for each precision the device runs (``auto``
resolves to one of them; on CUDA ``fp32`` means TF32 matmuls) with CPU decoding (PIL in
threads) and with batched device decoding (``decode="gpu"``: nvjpeg on CUDA, torchvision's
libjpeg-turbo batch decode on the CPU); with ``--ray``, the Ray Data engine (one actor per
GPU on CUDA). On CUDA also ``model only``: the encoder on a GPU-resident random batch (the
ceiling without decoding).

Two speeds per method: ``wall`` is the whole call (building the bf16/int8 tower, hashing,
decoding, inference, Parquet writes); ``steady`` is embed_images' own ``img_per_s``, which
leaves out the one-time set-up (``setup s``) that a real data set amortises. Because the
machine may be shared, every run first waits (up to ``--wait-idle`` s) for the other
processes to go quiet, the methods run ``--repeats`` times, interleaved, the best run counts,
and the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.embed.cache import read_image_embeddings  # noqa: E402
from pipelines.embed.clip import load_clip  # noqa: E402
from pipelines.embed.encode import embed_images  # noqa: E402
from pipelines.hardware import bf16_matmul_speedup  # noqa: E402

PHOTOS = [
    "astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "brick", "grass", "gravel",
    "colorwheel", "hubble_deep_field", "immunohistochemistry", "retina", "coins", "clock", "cat",
]  # fmt: skip
NAIVE = "naive fp32 per-image"


def make_images(folder: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` JPEG crops (224..600 px a side; some grayscale) of skimage's photographs."""
    import skimage.data

    rng = np.random.default_rng(seed)
    sources = []
    for name in PHOTOS:
        try:
            sources.append(Image.fromarray(np.asarray(getattr(skimage.data, name)())))
        except Exception:  # noqa: BLE001 - a sample missing from this wheel is simply not used
            continue
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        img = sources[i % len(sources)]
        side = int(rng.integers(224, 601))
        img = img.resize((max(side, img.width), max(side, img.height)), Image.BICUBIC)
        w = int(rng.integers(224, min(side, img.width) + 1))
        h = int(rng.integers(224, min(side, img.height) + 1))
        x0, y0 = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        path = folder / f"img{i:04d}.jpg"
        img.crop((x0, y0, x0 + w, y0 + h)).save(path, quality=90)
        items.append((f"img{i:04d}", str(path)))
    return items


def cpu_idle_fraction(seconds: float = 2.0) -> float | None:
    """Share of CPU time the whole machine spent idle over ``seconds`` (None: not Linux)."""
    try:
        def sample() -> list[int]:
            return [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]

        a = sample()
        time.sleep(seconds)
        b = sample()
    except (OSError, ValueError):
        return None
    delta = [y - x for x, y in zip(a, b)]
    return delta[3] / max(1, sum(delta))


def wait_for_idle(max_wait_s: float, threshold: float = 0.9) -> bool:
    """On a shared machine, wait (up to ``max_wait_s``) until other processes are quiet."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        idle = cpu_idle_fraction()
        if idle is None or idle >= threshold:
            return True
    return False


def naive(bundle, items) -> tuple[np.ndarray, float]:
    """The README loop: PIL open + preprocess + encode_image, one image at a time, true fp32."""
    out = []
    cuda = torch.device(bundle.device).type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    with torch.no_grad():
        for _, path in tqdm(items, desc="naive", leave=False):
            x = bundle.preprocess(Image.open(path)).unsqueeze(0).to(bundle.device)
            out.append(F.normalize(bundle.model.encode_image(x), dim=-1)[0].cpu().numpy())
    return np.stack(out), len(items) / (time.perf_counter() - start)


def cached(bundle, items, tmp: Path, **kwargs) -> tuple[np.ndarray, float, dict]:
    """embed_images into a fresh cache: (embeddings in item order, wall img/s, report)."""
    return _fresh(lambda out_dir: embed_images(bundle, items, out_dir, progress=False, **kwargs), items, tmp)


def cached_ray(bundle, items, tmp: Path, params, **kwargs) -> tuple[np.ndarray, float, dict]:
    """The Ray Data engine into a fresh cache (Ray already started)."""
    from pipelines.embed.ray_engine import embed_images_ray

    return _fresh(lambda out_dir: embed_images_ray(bundle, items, out_dir, params, progress=False, **kwargs), items, tmp)


def _fresh(call, items, tmp: Path) -> tuple[np.ndarray, float, dict]:
    out_dir = tmp / "cache"
    shutil.rmtree(out_dir, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    report = call(out_dir)
    wall = time.perf_counter() - start
    ids, emb = read_image_embeddings(out_dir)
    row = {image_id: k for k, image_id in enumerate(ids)}
    return emb[[row[i] for i, _ in items]], len(items) / wall, report


def model_only(bundle, precision: str, batch: int, reps: int = 10) -> float:
    """img/s of the encoder alone on a device-resident random batch (the ceiling without decoding)."""
    size = bundle.model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    from pipelines.embed.encode import BUILDERS

    x = torch.randn(batch, 3, *size, device=bundle.device)
    encode = BUILDERS[precision](bundle)
    with torch.inference_mode():
        for _ in range(3):
            encode(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            encode(x)
        torch.cuda.synchronize()
    return batch * reps / (time.perf_counter() - start)


def methods_for(device: str, items: list, bf16_items: list, ray: bool) -> list[tuple[str, dict, list]]:
    """(label, embed_images kwargs, items) for every path ``device`` runs, CPU and device decode."""
    from pipelines.embed.encode import supported_precisions

    out = [("embed_images default (auto)", {}, items)]
    for prec in supported_precisions(device):
        its = bf16_items if prec == "bf16" else items
        out.append((f"embed_images {prec}", {"precision": prec}, its))
        out.append((f"embed_images {prec}, decode gpu", {"precision": prec, "decode": "gpu"}, its))
    if ray:
        for prec in supported_precisions(device):
            if prec != "int8":
                out.append((f"ray engine {prec}", {"precision": prec, "ray": True}, items))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--n-images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", default="2", help="decode threads, or auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ray", action="store_true", help="also the Ray Data engine (one actor per GPU on CUDA)")
    ap.add_argument("--wait-idle", type=float, default=300, help="max s to wait for a quiet machine per run")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/embed.json (embed_cuda.json on CUDA)")
    args = ap.parse_args()
    from pipelines.embed.encode import supported_precisions
    from pipelines.hardware import device_bf16

    cuda = args.device.startswith("cuda")
    out_path = Path(args.out or ROOT / f"benchmarks/results/{'embed_cuda' if cuda else 'embed'}.json")
    workers = args.num_workers if args.num_workers == "auto" else int(args.num_workers)

    torch.manual_seed(0)
    bundle = load_clip(args.model, "none", device=args.device, seed=0)
    bf16_gain = None if cuda else bf16_matmul_speedup()  # informative only: no path is chosen by it
    opts = {"batch_size": args.batch_size, "num_workers": workers}
    runs: dict[str, list[tuple[float, dict]]] = {}  # method -> [(wall img/s, report)]
    embs: dict[str, np.ndarray] = {}
    load = [os.getloadavg()[0]]
    quiet: list[bool] = []  # whether the machine was idle before each timed run
    ray_params = None
    if args.ray:
        from pipelines.config import EmbedRayParams
        from pipelines.embed.ray_engine import start_ray

        n_gpu = torch.cuda.device_count() if cuda else 0
        ray_params = EmbedRayParams(
            actors=max(1, n_gpu) if cuda else 2, batch_size=args.batch_size, gpus_per_actor=1.0 if cuda else 0.0,
            cpus_per_actor=1.0, decode_cpus=1.0,
        )
        start_ray(ray_params)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        items = make_images(tmp / "images", args.n_images)
        bf16_items = items if device_bf16(args.device) else items[:8]  # not run: refused without native bf16
        methods = methods_for(args.device, items, bf16_items, args.ray)
        for rep in range(args.repeats):
            quiet.append(wait_for_idle(args.wait_idle))
            embs[NAIVE], speed = naive(bundle, items)
            runs.setdefault(NAIVE, []).append((speed, {}))
            for label, kw, its in methods:
                quiet.append(wait_for_idle(args.wait_idle))
                kw = dict(kw)
                try:
                    if kw.pop("ray", False):
                        embs[label], speed, report = cached_ray(bundle, its, tmp, ray_params, num_workers=2, **kw)
                    else:
                        embs[label], speed, report = cached(bundle, its, tmp, **opts, **kw)
                except Exception as exc:  # noqa: BLE001 - a path that fails is reported, the others still run
                    print(f"{label}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    runs.setdefault(label, [])
                    continue
                runs.setdefault(label, []).append((speed, report))
            load.append(os.getloadavg()[0])

    base = max(speed for speed, _ in runs[NAIVE])
    table = [summarise(label, runs[label], embs[label], embs[NAIVE], base) for label in runs if runs[label]]
    ceiling = {}
    if cuda:
        for prec in supported_precisions(args.device):
            ceiling[prec] = round(model_only(bundle, prec, args.batch_size), 1)
    result = {
        "model": args.model,
        "device": args.device,
        "weights": "random (pretrained: none)",
        "n_images": args.n_images,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "repeats": args.repeats,
        "speeds": "img/s, best of repeats; wall = whole call, steady = excluding one-time set-up",
        "failed": sorted(label for label, r in runs.items() if not r),
        "model_only_img_per_s": ceiling or None,
        "bf16_matmul_speedup_over_fp32": None if bf16_gain is None else round(bf16_gain, 3),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "processor": platform.processor() or platform.machine(),
            "loadavg_1min_during": load,
            "runs_started_on_idle_machine": f"{sum(quiet)}/{len(quiet)}",
        },
        "results": table,
    }
    print_table(args, table)
    if ceiling:
        print(f"model only (device-resident batch of {args.batch_size}): {ceiling}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


def summarise(label: str, runs: list[tuple[float, dict]], emb: np.ndarray, ref: np.ndarray, base: float) -> dict:
    """One table row: best wall / steady speeds, set-up time, cosine to the naive fp32."""
    wall = max(speed for speed, _ in runs)
    steady = max(report.get("img_per_s") or speed for speed, report in runs)
    report = runs[-1][1]
    cos = np.sum(emb * ref[: len(emb)], axis=1)
    return {
        "method": label,
        "n_images": len(emb),
        "wall_img_per_s": round(wall, 2),
        "wall_speedup_vs_naive": round(wall / base, 2),
        "steady_img_per_s": round(steady, 2),
        "steady_speedup_vs_naive": round(steady / base, 2),
        "setup_s": round(report.get("setup_s", 0.0), 2),
        "wall_img_per_s_runs": [round(speed, 2) for speed, _ in runs],
        "min_cosine_vs_fp32": round(float(cos.min()), 6),
        "mean_cosine_vs_fp32": round(float(cos.mean()), 6),
        "precision_used": report.get("precision", "fp32"),
        "decode": report.get("decode", "-"),
    }


def print_table(args: argparse.Namespace, table: list[dict]) -> None:
    print(f"\n{args.model} on {args.device}, {args.n_images} JPEG photos, batch {args.batch_size}, {args.num_workers} decode threads")
    head = ("method", "n", "wall", "x naive", "steady", "x naive", "setup s", "min cos", "mean cos", "path")
    print("{:30s} {:>4s} {:>7s} {:>8s} {:>7s} {:>8s} {:>8s} {:>8s} {:>8s}  {}".format(*head))
    for r in table:
        print(
            f"{r['method']:30s} {r['n_images']:4d} {r['wall_img_per_s']:7.2f} {r['wall_speedup_vs_naive']:7.2f}x "
            f"{r['steady_img_per_s']:7.2f} {r['steady_speedup_vs_naive']:7.2f}x {r['setup_s']:8.2f} "
            f"{r['min_cosine_vs_fp32']:8.5f} {r['mean_cosine_vs_fp32']:8.5f}  {r['precision_used']}"
        )


if __name__ == "__main__":
    main()
