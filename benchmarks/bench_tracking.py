"""How to track a large image folder with DVC: what a no-op `dvc repro` costs per file.

Builds a throw-away git + DVC repo with a synthetic folder of ``--files`` small files and one
stage that depends on it, then times, for three ways of tracking the folder:

- ``stage_dep``: the folder is a plain dependency of the stage (what ``dvc.yaml`` does with
  ``${data.images}``). DVC hashes every file on the first run, and on every later run it
  stats every file and looks it up in its state database;
- ``dvc_add``: ``dvc add`` of the folder (a ``.dvc`` file, the files copied into the cache),
  and the stage depends on the folder;
- ``listing``: an always-run stage writes a listing of (name, size, mtime) with one
  ``os.scandir`` pass, and the stage depends on that one file only.

Each time is CPU seconds (user + system, DVC and its children), the median of ``--repeats`` runs; ``python benchmarks/bench_tracking.py --files 20000``
-> ``benchmarks/results/tracking.json``. Per-file costs are reported so that they can be scaled to
AVA's 255,502 images (the stat costs do not depend on file size; the first hash does, through the
content read: ``md5_mb_per_s``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.io import write_json  # noqa: E402

AVA_IMAGES = 255_502

LISTING = """\
import os, sys
root, out = sys.argv[1], sys.argv[2]
with os.scandir(root) as it:
    rows = sorted(f"{e.name}\\t{e.stat().st_size}\\t{e.stat().st_mtime_ns}" for e in it)
tmp = out + ".tmp"
with open(tmp, "w") as fh:
    fh.write("\\n".join(rows) + "\\n")
os.replace(tmp, out)
"""


def run(cmd: list[str], cwd: Path, env: dict) -> float:
    """CPU seconds (user + system) of the command and its children.

    CPU time, not wall time: on a shared machine the wall time of a 3-second command swings
    by several times with the other load, its CPU time much less.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def make_repo(base: Path, name: str, n_files: int, env: dict) -> Path:
    repo = base / name
    images = repo / "images"
    images.mkdir(parents=True)
    payload = os.urandom(1024)
    for i in range(n_files):
        (images / f"{i}.jpg").write_bytes(payload[: 512 + i % 512] + i.to_bytes(4, "little"))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    (repo / ".gitignore").write_text("/images/\n/out.txt\n/listing.tsv\n")
    return repo


def stage(dep: str) -> str:
    return (f"  consume:\n    cmd: python -c \"open('out.txt','w').write('ok')\"\n"
            f"    deps: [{dep}]\n    outs: [out.txt]\n")


def noop_times(repo: Path, env: dict, repeats: int) -> list[float]:
    return [run([sys.executable, "-m", "dvc", "repro"], repo, env) for _ in range(repeats)]


def measure(base: Path, n_files: int, repeats: int, env: dict) -> dict:
    dvc = [sys.executable, "-m", "dvc"]
    out: dict = {}

    repo = make_repo(base, "stage_dep", n_files, env)
    (repo / "dvc.yaml").write_text("stages:\n" + stage("images"))
    first = run([*dvc, "repro"], repo, env)
    noop = noop_times(repo, env, repeats)
    status = run([*dvc, "status"], repo, env)
    out["stage_dep"] = {"first_repro_s": first, "noop_repro_s": statistics.median(noop), "status_s": status}

    repo = make_repo(base, "dvc_add", n_files, env)
    add = run([*dvc, "add", "-q", "images"], repo, env)
    (repo / "dvc.yaml").write_text("stages:\n" + stage("images"))
    first = run([*dvc, "repro"], repo, env)
    noop = noop_times(repo, env, repeats)
    out["dvc_add"] = {"add_s": add, "first_repro_s": first, "noop_repro_s": statistics.median(noop)}

    repo = make_repo(base, "listing", n_files, env)
    (repo / "list_images.py").write_text(LISTING)
    (repo / "dvc.yaml").write_text(
        "stages:\n  list_images:\n    cmd: python list_images.py images listing.tsv\n    always_changed: true\n"
        "    deps: [list_images.py]\n    outs: [listing.tsv]\n" + stage("listing.tsv"))
    first = run([*dvc, "repro"], repo, env)
    noop = noop_times(repo, env, repeats)
    scan = run([sys.executable, "list_images.py", "images", "listing.tsv"], repo, env)
    out["listing"] = {"first_repro_s": first, "noop_repro_s": statistics.median(noop), "scan_s": scan}

    repo = base / "empty"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    (repo / "dep.txt").write_text("x")
    (repo / "dvc.yaml").write_text("stages:\n" + stage("dep.txt"))
    run([*dvc, "repro"], repo, env)
    out["baseline_noop_repro_s"] = statistics.median(noop_times(repo, env, repeats))
    return out


def md5_throughput(base: Path, mb: int = 256) -> float:
    f = base / "blob"
    f.write_bytes(os.urandom(mb << 20))
    t = time.process_time()
    h = hashlib.md5()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    f.unlink()
    return mb / (time.process_time() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tracking.json")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "IAA_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", DVC_NO_ANALYTICS="1")
    base = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    try:
        t0 = time.perf_counter()
        res = measure(base, args.files, args.repeats, env)
        res["md5_mb_per_s"] = md5_throughput(base)
        res["wall_s"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(base, ignore_errors=True)
    n, base_s = args.files, res["baseline_noop_repro_s"]
    per_file = {k: (res[k]["noop_repro_s"] - base_s) / n for k in ("stage_dep", "dvc_add", "listing")}
    res["per_file_noop_ms"] = {k: 1e3 * v for k, v in per_file.items()}
    res["ava_noop_repro_cpu_s_extrapolated"] = {k: base_s + v * AVA_IMAGES for k, v in per_file.items()}
    res["ava_first_hash_cpu_s_extrapolated"] = (res["stage_dep"]["first_repro_s"] - base_s) / n * AVA_IMAGES
    result = {"benchmark": "tracking", "time": "CPU seconds (user + system) of DVC and its children", "files": n, "repeats": args.repeats, "cpu_count": os.cpu_count(),
              "dvc": subprocess.run([sys.executable, "-m", "dvc", "--version"], capture_output=True, text=True,
                                    env=env).stdout.strip(),
              **res}
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
