"""Parameter count and CPU inference throughput (images/s at 224x224, fp32, eval mode) per
image model family. Writes ``benchmarks/results/models.json``.

    python benchmarks/bench_models.py [--batch-size 16] [--batches 4] [--repeats 3] [--threads N]

Random weights (no pretrained weights on this machine; speed does not depend on the values).
The machine may be shared: each family runs ``--repeats`` times, interleaved, the best run
counts, and the load average before and after is recorded. Pre-processing (JPEG decoding,
resizing) is not included: this is the model's forward pass only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.io import write_json
from pipelines.models import build, n_params

# (family, options, paper's parameter count); aesaf-vgg16 is the paper's backbone for seed 002
VARIANTS = {"mnet": ("mnet", {}, 4.5e6), "aesaf": ("aesaf", {}, None), "aesaf-vgg16": ("aesaf", {"backbone": "vgg16"}, None)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--variants", default="", help=f"comma-separated subset of {list(VARIANTS)}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "models.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ap_variants = args.variants.split(",") if args.variants else list(VARIANTS)
    models = {v: build(VARIANTS[v][0], 10, VARIANTS[v][1]).eval() for v in ap_variants}
    x = torch.rand(args.batch_size, 3, args.size, args.size)
    load_before = os.getloadavg()
    best: dict[str, float] = {}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(x[:2])
        for _ in range(args.repeats):
            for name, m in models.items():
                t = time.perf_counter()
                for _ in range(args.batches):
                    m(x)
                dt = time.perf_counter() - t
                best[name] = max(best.get(name, 0.0), args.batch_size * args.batches / dt)
    rows = {
        name: {
            "params": n_params(m),
            "params_M": round(n_params(m) / 1e6, 3),
            "family": VARIANTS[name][0], "options": VARIANTS[name][1],
            "paper_params": VARIANTS[name][2],
            "img_per_s_224_cpu_fp32": round(best[name], 2),
        }
        for name, m in models.items()
    }
    result = {
        "families": rows,
        "setup": {
            "size": args.size, "batch_size": args.batch_size, "batches": args.batches, "repeats": args.repeats,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        },
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
