"""Time the demo DAG: a full `dvc repro` in a scratch git + DVC repo, per stage, then a no-op rerun.

    python benchmarks/bench_pipeline.py [--tiny] [--out benchmarks/results/pipeline.json]

Uses the repo's params.yaml (the demo default) unless --tiny (the e2e test's config).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_e2e import TINY, make_repo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiny", action="store_true", help="the end-to-end test's tiny config")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/pipeline.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo, env = make_repo(Path(tmp), TINY if args.tiny else {})
        stages, t0 = {}, time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-v"], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        current, since = None, t0
        for line in proc.stdout:
            if m := re.search(r"Running stage '([\w-]+)'", line):
                now = time.perf_counter()
                if current:
                    stages[current] = round(now - since, 2)
                current, since = m.group(1), now
        if proc.wait() != 0:
            raise SystemExit("dvc repro failed")
        stages[current] = round(time.perf_counter() - since, 2)
        total = time.perf_counter() - t0
        noop = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, check=True, capture_output=True)
            noop.append(time.perf_counter() - t)
        metrics = json.loads((repo / "metrics/eval.json").read_text())
    result = {
        "config": "tiny" if args.tiny else "demo default",
        "stage_seconds": stages,
        "total_seconds": round(total, 1),
        "noop_repro_seconds": round(min(noop), 2),
        "test_srcc": {k: round(metrics[k]["srcc"], 3) for k in ("head", "selftrain")},
        "random_weights": metrics["random_weights"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
