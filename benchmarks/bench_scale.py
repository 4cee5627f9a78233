"""The data stages at AVA's full size: wall time, CPU time and peak RSS of every stage process.

    nice -n 10 python benchmarks/bench_scale.py [--rows 20000] [--out benchmarks/results/scale.json]
    nice -n 10 python benchmarks/bench_scale.py --rows 20000 --head --before DIR   # before / after, side by side

``--head`` also runs the head stage (one epoch, TM only, Ray Train's local mode: the loop runs in
the stage's process, so its peak RSS is what one Ray worker holds). ``--before DIR`` runs
``features``, ``index`` (and ``head``) a second time with the code of another checkout (``DIR``,
e.g. ``git archive main | tar -x -C DIR``), on a copy of the same workspace after ``embed``, and
reports both.

Inputs, in a scratch workspace (the stages run exactly as `dvc repro` runs them:
``python -m stages.<name>`` in a folder with ``params.yaml``, ``config/`` and ``data/``):

- labels: ``../shared/data/labels/ava/ava_merged_labels.csv`` (all 255,502 AVA rows, or the first
  ``--rows``), adapter ``ava`` with the TANet split;
- images: one empty file per row (``prepare`` only checks that each image is there; BYO embed
  reads no pixels);
- comments: DPC-Captions, with the tag caps at the TMCR paper's library sizes (2,145 semantic +
  1,659 attribute). When the lexical extractor finds fewer, the libraries are padded with
  synthetic phrases up to those sizes before `embed` (counted in the JSON), so that `features`
  works at the paper's width;
- embeddings: bring-your-own tables (``embed.source: byo``) of synthetic L2-normalised 768-d
  vectors (CLIP ViT-L/14's width) around Zipf-popular topics
  (:func:`bench_kmeans.synthetic_embeddings`), logit scale 100, for every image and every tag;
- 15 clusters (the paper's), K-means as in ``params.yaml`` (``features.kmeans*``).

Each stage is one process; ``os.wait4`` gives its CPU time, its ``/proc`` VmHWM its own peak RSS. Building the
inputs is not timed. Targets: all data stages together under 60 s, and no process above 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipelines.embed.cache import embedding_table  # noqa: E402
from pipelines.io import write_json  # noqa: E402
from bench_kmeans import N_ATTRIBUTE, N_SEMANTIC, SHARED, synthetic_embeddings  # noqa: E402

STAGES = ("prepare", "tags", "embed", "features", "index")
TARGET_TOTAL_S, TARGET_RSS_GB = 60.0, 4.0


HEAD_PARAMS = {"use_cr": False, "epochs": 1, "keep_best": False}  # TM only: no pretrain needed; one epoch
PRETRAIN_PARAMS = {"encoder": "embedding", "epochs": 1}  # --train: one epoch of the embedding E_CR


def epoch_metrics(ws: Path, stage: str, keys: tuple[str, ...]) -> dict:
    """The last epoch's ``keys`` that the stage's loop logged to the workspace's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    run = client.search_runs(ids, f"tags.stage = '{stage}'", order_by=["start_time DESC"], max_results=1)[0]
    return {k: round(run.data.metrics[k], 3) for k in keys if k in run.data.metrics}


# runs a stage as `python -m stages.<name>` does, then writes its own peak RSS (VmHWM: this process
# since exec; wait4's ru_maxrss would also count the pages of the forked benchmark process)
RUNNER = """
import atexit, os, runpy, sys
def hwm():
    with open("/proc/self/status") as fh:
        kb = next(line.split()[1] for line in fh if line.startswith("VmHWM"))
    with open(os.environ["BENCH_HWM_FILE"], "w") as out:
        out.write(kb)
atexit.register(hwm)
sys.argv = [sys.argv[1]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_stage(name: str, cwd: Path, env: dict) -> dict:
    """Run stage ``name`` as ``python -m stages.<name>``; its wall time, CPU time (``wait4``) and peak RSS (VmHWM)."""
    hwm = cwd / f".hwm-{name}"
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, f"stages.{name}"], cwd=cwd, env={**env, "BENCH_HWM_FILE": str(hwm)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"stage {name} failed ({proc.returncode}):\n{out.decode()[-4000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_gb": round(int(hwm.read_text()) / 2**20, 3)}  # kB


def workspace(base: Path, rows: int | None) -> tuple[Path, int]:
    ws = base / "ws"
    (ws / "data" / "byo").mkdir(parents=True)
    shutil.copytree(ROOT / "config", ws / "config")
    src = SHARED / "labels" / "ava" / "ava_merged_labels.csv"
    if not src.is_file():
        raise SystemExit(f"{src}: not found; set IAA_SHARED_DATA to the shared data folder.")
    labels = ws / "data" / "ava_labels.csv"
    with open(src, encoding="utf-8") as fh:
        lines = fh.readlines()
    lines = lines if rows is None else lines[: rows + 1]
    labels.write_text("".join(lines), encoding="utf-8")
    images = ws / "data" / "images"
    images.mkdir()
    for line in lines[1:]:
        (images / f"{line.split(',', 1)[0]}.jpg").touch()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(name="ava", adapter="ava", labels=str(labels), images=str(images),
                          comments=str(SHARED / "comments" / "dpc_captions" / "impression_and_subject.json"),
                          comments_format="dpc", options={"split": "tanet"})
    params["tags"].update(max_semantic=N_SEMANTIC, max_attribute=N_ATTRIBUTE)
    params["embed"].update(source="byo", byo_items="data/byo/items.parquet", byo_texts="data/byo/texts.parquet",
                           byo_logit_scale=100.0)
    params["features"]["n_clusters"] = 15
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return ws, len(lines) - 1


def pad_libraries(ws: Path) -> dict:
    """Pad data/tags/*.txt to the paper's sizes with synthetic phrases; the counts before and after."""
    out = {}
    for kind, size in (("semantic", N_SEMANTIC), ("attribute", N_ATTRIBUTE)):
        f = ws / "data" / "tags" / f"{kind}.txt"
        tags = [t for t in f.read_text().split("\n") if t]
        out[kind] = {"from_corpus": len(tags), "padded_to": max(size, len(tags))}
        tags += [f"synthetic {kind} tag {i}" for i in range(size - len(tags))]
        f.write_text("".join(t + "\n" for t in tags))
    return out


def byo_tables(ws: Path, seed: int = 0) -> None:
    ids = pq.read_table(ws / "data" / "manifest.parquet", columns=["image_id"]).column("image_id").to_pylist()
    sem = [t for t in (ws / "data/tags/semantic.txt").read_text().split("\n") if t]
    attr = [t for t in (ws / "data/tags/attribute.txt").read_text().split("\n") if t]
    emb, tags = synthetic_embeddings(len(ids), 768, seed=seed, n_semantic=len(sem), n_attribute=len(attr))
    pq.write_table(embedding_table(ids, emb), ws / "data/byo/items.parquet")
    del emb
    pq.write_table(embedding_table(sem + attr, tags, id_column="phrase"), ws / "data/byo/texts.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="first N AVA rows (default: all 255,502)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    ap.add_argument("--head", action="store_true", help="also run the head stage (1 epoch, TM only, local mode)")
    ap.add_argument("--train", action="store_true",
                    help="also run pretrain (1 epoch, embedding E_CR) and head, local mode; their epoch time and rows/s")
    ap.add_argument("--before", type=Path, default=None,
                    help="a checkout of the code before a change: features / index / head run with it too")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "MLFLOW_", "RAY_ADDRESS"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    base = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    load = [os.getloadavg()[0]]
    args.head = args.head or args.train
    after = STAGES + (("pretrain",) if args.train else ()) + (("head",) if args.head else ())
    before: dict[str, dict] = {}
    try:
        ws, n_rows = workspace(base, args.rows)
        if args.head:
            params = yaml.safe_load((ws / "params.yaml").read_text())
            params["head"].update(HEAD_PARAMS)
            params["head"]["ray"]["num_workers"] = 0
            params["pretrain"].update(PRETRAIN_PARAMS)
            params["pretrain"]["ray"]["num_workers"] = 0
            (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        stages: dict[str, dict] = {}
        for name in after:
            if name == "embed":
                libraries = pad_libraries(ws)
                byo_tables(ws)
            if name == "features" and args.before:  # the same inputs for the code before
                shutil.copytree(ws, base / "ws_before", symlinks=True)
            stages[name] = run_stage(name, ws, env)
            if name in ("pretrain", "head"):  # the loop's own epoch time and throughput
                stages[name]["epoch"] = epoch_metrics(ws, name, ("epoch_s", "rows_per_s", "images_per_s", "batches"))
            load.append(os.getloadavg()[0])
            print(name, stages[name], flush=True)
        manifest = json.loads((ws / "data" / "manifest_report.json").read_text())
        clusters = json.loads((ws / "data" / "features" / "clusters.json").read_text())
        sizes = {p: round((ws / p).stat().st_size / 2**20, 1) for p in ("data/byo/items.parquet",
                                                                        "data/features/features.parquet")}
        if args.before:
            env_before = {**env, "PYTHONPATH": str(args.before.resolve()) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            for name in after[after.index("features"):]:
                before[name] = run_stage(name, base / "ws_before", env_before)
                load.append(os.getloadavg()[0])
                print("before", name, before[name], flush=True)
            sizes["data/features/features.parquet (before)"] = round(
                (base / "ws_before/data/features/features.parquet").stat().st_size / 2**20, 1)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    data = {k: v for k, v in stages.items() if k in STAGES}
    total = sum(s["wall_s"] for s in data.values())
    peak = max(s["peak_rss_gb"] for s in stages.values())
    p = yaml.safe_load((ROOT / "params.yaml").read_text())["features"]
    result = {
        "benchmark": "scale (data stages)",
        "rows": n_rows, "splits": manifest["splits"], "embed_dim": 768, "libraries": libraries,
        "clusters": 15, "kmeans": {k: p[k] for k in p if k.startswith("kmeans")},
        "cluster_sizes": sorted((c["size"] for c in clusters["clusters"].values()), reverse=True),
        "file_mb": sizes, "cpu_count": os.cpu_count(), "load_average_1min": [round(x, 1) for x in load],
        "stages": stages,
        **({"head_params": HEAD_PARAMS} if args.head else {}),
        **({"before": {"code": str(args.before), "stages": before}} if args.before else {}),
        "total_wall_s": round(total, 1), "total_cpu_s": round(sum(s["cpu_s"] for s in data.values()), 1),
        "max_peak_rss_gb": peak,
        "targets": {"total_under_60_s": total < TARGET_TOTAL_S, "every_process_under_4_gb": peak < TARGET_RSS_GB},
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
