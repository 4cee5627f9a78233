"""Image embedding, local engine vs Ray Data engine (2 CPU actors), on the same demo images.

    nice -n 10 python benchmarks/bench_embed_ray.py [--model ViT-B-32] [--n-images 128]
        [--actors 2] [--precisions fp32] [--gpus-per-actor 1 --device cuda]

Both engines write a fresh cache of the same images (demo JPEGs, 224 px, made here) with the
same model (random weights: speed does not depend on them) on the same precision path, and
their embeddings are compared. Speeds are images/s with decoding included:

- ``wall``: the whole call (hashing the files, decoding, inference, Parquet writes; for the
  Ray engine also building the dataset and starting the actors; Ray itself is started once
  beforehand and timed apart, ``ray_init_s``);
- ``steady``: the local engine's own ``img_per_s`` (the call without building the precision
  path); for the Ray engine, n x actors / the seconds its actors spent decoding and encoding
  (all actors together): the pool's speed once its actors are up, if they never wait;
- ``first_batch_s`` (Ray engine): from the dataset's start to its first batch back, i.e.
  mostly actor start-up (a process, torch and open_clip imports, the model from the object
  store).

The machine may be shared: each run first waits (up to ``--wait-idle`` s) for a quiet CPU,
and the load average is recorded. Writes ``benchmarks/results/embed_ray.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_embed import wait_for_idle  # noqa: E402
from pipelines.config import EmbedRayParams  # noqa: E402
from pipelines.data.demo import generate_demo  # noqa: E402
from pipelines.embed.cache import read_image_embeddings  # noqa: E402
from pipelines.embed.clip import load_clip  # noqa: E402
from pipelines.embed.encode import embed_images  # noqa: E402
from pipelines.embed.ray_engine import embed_images_ray, start_ray  # noqa: E402


def embeddings_in_order(cache: Path, items: list[tuple[str, str]]) -> np.ndarray:
    ids, emb = read_image_embeddings(cache)
    row = {image_id: k for k, image_id in enumerate(ids)}
    return emb[[row[i] for i, _ in items]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--n-images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2, help="local engine: decode threads")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--gpus-per-actor", type=float, default=0.0, help="e.g. 1 on a GPU machine")
    ap.add_argument("--device", default="cpu", help="the local engine's device (cuda on a GPU machine)")
    ap.add_argument("--precisions", default="fp32", help="comma-separated, e.g. fp32,int8")
    ap.add_argument("--wait-idle", type=float, default=15, help="max s to wait for a quiet machine per run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/embed_ray.json"))
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bundle = load_clip(args.model, "none", seed=0)  # shipped to the actors from the CPU
    local_bundle = bundle if args.device == "cpu" else load_clip(args.model, "none", seed=0, device=args.device)
    ray_params = EmbedRayParams(actors=args.actors, batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor,
                                gpus_per_actor=args.gpus_per_actor)
    load, quiet, rows = [os.getloadavg()[0]], [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        generate_demo(tmp / "demo", n_images=args.n_images, image_size=224, progress=False)
        items = sorted((p.stem, str(p)) for p in (tmp / "demo" / "images").glob("*.jpg"))
        t = time.perf_counter()
        start_ray(ray_params)
        ray_init_s = time.perf_counter() - t
        for precision in args.precisions.split(","):
            embs = {}
            for engine in ("local", "ray"):
                cache = tmp / f"{engine}-{precision}"
                quiet.append(wait_for_idle(args.wait_idle))
                start = time.perf_counter()
                if engine == "local":
                    rep = embed_images(local_bundle, items, cache, batch_size=args.batch_size, num_workers=args.num_workers,
                                       precision=precision, progress=False)
                    steady = rep["img_per_s"]
                else:
                    rep = embed_images_ray(bundle, items, cache, ray_params, num_workers=args.num_workers,
                                           precision=precision, progress=False)
                    busy = rep["decode_busy_s"] + rep["encode_busy_s"]
                    steady = len(items) * args.actors / busy if busy else None
                wall = time.perf_counter() - start
                load.append(os.getloadavg()[0])
                embs[engine] = embeddings_in_order(cache, items)
                rows.append({
                    "engine": engine, "precision": rep["precision"], "n_images": rep["n_embedded_now"],
                    "wall_s": round(wall, 2), "wall_img_per_s": round(len(items) / wall, 2),
                    "steady_img_per_s": None if steady is None else round(steady, 2),
                    **({"first_batch_s": round(rep["first_batch_s"], 2), "decode_busy_s": round(rep["decode_busy_s"], 2),
                        "encode_busy_s": round(rep["encode_busy_s"], 2)} if engine == "ray" else {}),
                })
            diff = np.abs(embs["ray"] - embs["local"]).max()
            cos = (embs["ray"] * embs["local"]).sum(1).min()
            rows[-1].update(max_abs_diff_vs_local=float(diff), min_cosine_vs_local=round(float(cos), 7))
    import ray

    ray.shutdown()
    result = {
        "model": args.model,
        "weights": "random (pretrained: none)",
        "images": f"{args.n_images} demo JPEGs, 224 px",
        "batch_size": args.batch_size,
        "local": {"device": args.device, "decode_threads": args.num_workers, "torch_threads": torch.get_num_threads()},
        "ray": {"actors": args.actors, "cpus_per_actor": args.cpus_per_actor, "gpus_per_actor": args.gpus_per_actor,
                "ray_init_s": round(ray_init_s, 2)},
        "speeds": "img/s, decode included; wall = whole call; steady = local: img_per_s without the path set-up, ray: n * actors / the actors' decode + encode seconds",
        "machine": {
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_1min_during": [round(x, 2) for x in load],
            "runs_started_on_idle_machine": f"{sum(quiet)}/{len(quiet)}",
        },
        "results": rows,
    }
    print(f"\n{args.model}, {len(items)} demo images, batch {args.batch_size}; Ray started in {ray_init_s:.1f} s")
    print(f"{'engine':6s} {'path':5s} {'wall s':>7s} {'wall img/s':>10s} {'steady':>7s} {'1st batch s':>11s}  vs local")
    for r in rows:
        extra = f"max |diff| {r['max_abs_diff_vs_local']:.2e}, min cos {r['min_cosine_vs_local']}" if "max_abs_diff_vs_local" in r else ""
        print(f"{r['engine']:6s} {r['precision']:5s} {r['wall_s']:7.1f} {r['wall_img_per_s']:10.2f} "
              f"{r['steady_img_per_s'] or 0:7.2f} {r.get('first_batch_s', 0):11.1f}  {extra}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
