"""`iaa score` against `python -m stages.score` on the same folder and registered model (the tiny
random test model: this measures the CLI's own overhead, not CLIP's speed).

    PYTHONPATH=. python benchmarks/bench_cli_score.py --images 256 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    from pipelines import cli
    from stages import score
    from tests.test_serve import register_served_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    uri = register_served_model(tmp)
    rng = np.random.default_rng(0)
    (tmp / "imgs").mkdir()
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(tmp / "imgs" / f"{i:05d}.jpg")
    common = ["--tracking-uri", uri, "--batch-size", str(args.batch_size), "--no-progress"]
    runs = {
        "stages.score": lambda: score.run(["--model", "models:/served@champion", "--images", str(tmp / "imgs"),
                                           "--out", str(tmp / "a.csv"), *common]),
        "iaa score": lambda: cli.main(["score", "models:/served@champion", str(tmp / "imgs"), "--out", str(tmp / "b.csv"),
                                       "--overwrite", *common]),
    }
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    shutil.rmtree(tmp, ignore_errors=True)
    for name, ts in times.items():
        print(f"{name:13s} {args.images} images: median {np.median(ts):.2f} s ({args.images / np.median(ts):.1f} img/s), runs {[round(x, 2) for x in ts]}")


if __name__ == "__main__":
    main()
