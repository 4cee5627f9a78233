"""Does a fresh `dvc repro` reproduce committed metrics?

    python tools/repro_check.py demo              # the demo DAG (dvc.yaml as committed) in a
                                                  # clone of HEAD, against HEAD's metrics/*.json
    python tools/repro_check.py dag               # the test suite's tiny DAG (tests/dag_repo.py)
                                                  # against tests/assets/dag_metrics.json
    python tools/repro_check.py dag --update      # regenerate that reference after a change
                                                  # that is meant to move the numbers

Both run every stage from nothing in a temporary directory (nothing in this checkout is
touched but, with --update, the reference file), then compare every value of the metrics
files: strings, booleans and integers (epochs, selected epoch, counts) must be equal, floats
equal to within ``atol + rtol * |reference|`` (wider for the family stage's files; README,
"Reproducing the committed metrics", says how the tolerances were measured). A key that is missing or new is a mismatch
too. Values that name a registry version or alias (``registered``, ``alias``) depend on the
MLflow store's history, not on the run, and are not compared; nor are the random-weights
warning texts.

`demo` took 28 minutes on 2 busy cores, `dag` 10 to 26 (README); the test suite runs the `dag`
comparison on the DAG it builds anyway (tests/test_reproduce.py), so it costs the suite nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root holds pipelines/ and tests/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
DAG_REFERENCE = ROOT / "tests" / "assets" / "dag_metrics.json"
# Measured on the tiny DAG (README, "Reproducing the committed metrics"): two runs with one
# thread per process are identical to the bit; one thread against two moves the TMCR path's
# floats by at most 5e-8 (relative), so RTOL keeps a margin of 2000x for other CPUs' summation
# order. The family stage (a CNN trained on pixels) is not that stable: one thread against two
# moves its errors (MSE, EMD, MAE) by up to 0.4% and its correlations on 19 test images by up
# to 0.03, so its files get their own, wider tolerance.
RTOL = 1e-4
ATOL = 1e-6
WIDER = {"metrics/family.json": (1e-2, 0.05), "metrics/details/family.json": (1e-2, 0.05)}  # file: (rtol, atol)
IGNORED_KEYS = frozenset({"registered", "alias", "WARNING", "CR_WARNING"})
UPDATE_DAG = "python tools/repro_check.py dag --update"


def read_metrics(repo: Path) -> dict[str, object]:
    """Every metrics JSON of a repo's ``metrics/`` folder (details included), by relative path."""
    files = sorted((repo / "metrics").rglob("*.json"))
    return {f.relative_to(repo).as_posix(): json.loads(f.read_text()) for f in files}


def _flatten(obj, prefix: str, out: dict[str, object]) -> dict[str, object]:
    """{"file:key.key": value} of a {file: metrics} map (``prefix`` "" at the top)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in IGNORED_KEYS:
                _flatten(v, f"{prefix}{'.' if ':' in prefix else ':'}{k}" if prefix else str(k), out)
    else:
        out[prefix] = obj
    return out


def compare(reference: dict, actual: dict, rtol: float = RTOL, atol: float = ATOL,
            wider: dict[str, tuple[float, float]] = WIDER) -> list[str]:
    """The differences between two {file: metrics} maps, one line each (empty: reproduced).
    Floats of the files in ``wider`` are compared to the larger of their own and the given
    tolerance."""
    ref = _flatten(reference, "", {})
    act = _flatten(actual, "", {})
    problems = []
    for key in sorted(ref.keys() | act.keys()):
        if key not in act:
            problems.append(f"{key}: missing (reference {ref[key]!r})")
        elif key not in ref:
            problems.append(f"{key}: not in the reference (got {act[key]!r})")
        else:
            a, r = act[key], ref[key]
            if type(a) is not type(r):  # e.g. 30 -> 30.0: the code now writes something else
                problems.append(f"{key}: {a!r} ({type(a).__name__}) != reference {r!r} ({type(r).__name__})")
            elif isinstance(a, float):
                if math.isnan(a) and math.isnan(r):
                    continue
                file_rtol, file_atol = wider.get(key.split(":")[0], (0.0, 0.0))
                tol = max(atol, file_atol) + max(rtol, file_rtol) * abs(r)
                if not abs(a - r) <= tol:
                    problems.append(f"{key}: {a!r} != reference {r!r} (diff {a - r:.3g}, tolerance {tol:.3g})")
            elif a != r:
                problems.append(f"{key}: {a!r} != reference {r!r}")
    return problems


def max_rel_diff(reference: dict, actual: dict) -> float:
    """The largest relative difference of the float values both maps have (for measuring)."""
    ref, act = _flatten(reference, "", {}), _flatten(actual, "", {})
    worst = 0.0
    for key, r in ref.items():
        a = act.get(key)
        if isinstance(r, float) and isinstance(a, float) and not (math.isnan(a) or math.isnan(r)):
            worst = max(worst, abs(a - r) / max(abs(r), 1e-12))
    return worst


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    bindir = str(Path(sys.executable).parent)
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = ""  # the clone's own code, not this checkout's
    return env


def run_demo(rev: str, workdir: Path, threads: int | None) -> tuple[dict, dict, float]:
    """(committed metrics at ``rev``, metrics of a fresh `dvc repro` of a clone, seconds)."""
    repo = workdir / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=repo, check=True)
    committed = read_metrics(repo)
    env = _env()
    env["PYTHONPATH"] = str(repo)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed in {repo} after {seconds:.0f} s:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return committed, read_metrics(repo), seconds


def run_dag(workdir: Path) -> tuple[dict, float]:
    """Metrics of the test suite's tiny DAG built from this checkout, and the seconds it took."""
    from tests.dag_repo import build, cleanup

    start = time.perf_counter()
    dag = build(workdir)
    try:
        return dag.metrics, time.perf_counter() - start
    finally:
        cleanup(dag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["demo", "dag"])
    parser.add_argument("--update", action="store_true", help="dag: write the reference instead of comparing")
    parser.add_argument("--rev", default="HEAD", help="demo: the commit to clone (default HEAD)")
    parser.add_argument("--threads", type=int, default=None, help="demo: OMP/MKL threads of every stage")
    parser.add_argument("--rtol", type=float, default=RTOL)
    parser.add_argument("--atol", type=float, default=ATOL)
    parser.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--save", type=Path, default=None, help="also write the fresh metrics to this JSON file")
    args = parser.parse_args(argv)
    if args.update and args.what != "dag":
        parser.error("--update only applies to `dag`; the demo's reference is metrics/*.json: rerun `dvc repro` and commit")

    with tempfile.TemporaryDirectory(prefix="iaa-repro-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.what == "demo":
            reference, actual, seconds = run_demo(args.rev, workdir, args.threads)
            fix = "find the change that moved them, or rerun `dvc repro` and commit dvc.lock and metrics/"
            source = f"metrics/ at {args.rev}"
        else:
            actual, seconds = run_dag(workdir)
            if args.update:
                from pipelines.io import write_json

                write_json(DAG_REFERENCE, actual)
                print(f"wrote {DAG_REFERENCE.relative_to(ROOT)} ({seconds:.0f} s)")
                return 0
            if not DAG_REFERENCE.is_file():
                print(f"{DAG_REFERENCE.relative_to(ROOT)} is missing; create it: {UPDATE_DAG}", file=sys.stderr)
                return 2
            reference = json.loads(DAG_REFERENCE.read_text())
            fix = f"if the change is meant to move the numbers: {UPDATE_DAG}"
            source = DAG_REFERENCE.relative_to(ROOT).as_posix()
    if args.save:
        from pipelines.io import write_json

        write_json(args.save, actual)
    problems = compare(reference, actual, args.rtol, args.atol)
    print(f"{args.what}: dvc repro took {seconds:.0f} s; largest relative float difference "
          f"{max_rel_diff(reference, actual):.2e} (rtol {args.rtol:g}, atol {args.atol:g}; wider for {', '.join(WIDER)})")
    if problems:
        print(f"{len(problems)} values differ from {source}:\n  " + "\n  ".join(problems) + f"\n{fix}")
        return 1
    print(f"reproduced {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
