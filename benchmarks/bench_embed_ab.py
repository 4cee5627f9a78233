"""Before / after timing of `embed_images` on the same photos, for the code on PYTHONPATH.

    git archive <old-commit> | tar -x -C /tmp/old
    for r in 1 2; do
      AB=before PYTHONPATH=/tmp/old python benchmarks/bench_embed_ab.py 32 auto,fp32
      AB=after  PYTHONPATH=$PWD     python benchmarks/bench_embed_ab.py 32 fp32,auto
    done

Prints one JSON line per precision: the path used, whole-call and steady img/s, set-up
seconds (building / calibrating the path), process CPU seconds per image (all threads), and
the 1-minute load average. ViT-B-32 with random weights (``pretrained: none``), batch 64,
2 decode threads, the JPEG photos of ``bench_embed.make_images``. Interleave the two codes
on a shared machine: load moves the absolute numbers a lot.
"""

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipelines.embed.clip import load_clip  # the code on PYTHONPATH, imported first
from pipelines.embed.encode import embed_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import make_images  # noqa: E402


def main() -> None:
    n, precisions = int(sys.argv[1]), sys.argv[2].split(",")
    torch.manual_seed(0)
    bundle = load_clip("ViT-B-32", "none", seed=0)
    tmp = Path(tempfile.mkdtemp())
    items = make_images(tmp / "images", n)
    for prec in precisions:
        out = tmp / "cache"
        shutil.rmtree(out, ignore_errors=True)
        t, c = time.perf_counter(), time.process_time()
        rep = embed_images(bundle, items, out, batch_size=64, num_workers=2, precision=prec, progress=False)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        print(json.dumps({
            "code": os.environ.get("AB"), "precision": prec, "used": rep["precision"], "wall_img_s": round(n / wall, 2),
            "steady_img_s": round(rep["img_per_s"], 2), "setup_s": round(rep.get("setup_s", 0), 2),
            "cpu_s_per_img": round(cpu / n, 3), "load1": round(os.getloadavg()[0], 1),
        }), flush=True)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
