"""TM only / CR(embedding) / CR(image) / TM + CR(embedding) / TM + CR(image) on the demo, over seeds.

Builds the demo up to the `index` stage once (the project's own stage CLIs, default params,
random CLIP weights: the demo), then per seed, in Ray Train local mode with the stages' loops:

1. pretrain the embedding E_CR (MLP over the CLIP embedding) and the image E_CR (a timm
   backbone on pixels), writing the CR-feature cache of the latter;
2. train the head (linear probe, default `head` params; no self-training) five ways;
3. score the test split: SRCC, PLCC, ELTA L/M/H MAE.

The data (demo images, tags, CLIP features, clusters) stay those of seed 0; the seed changes
the samplers, augmentations and inits. Writes `benchmarks/results/demo_table.json` after each
seed. Usage: `python benchmarks/bench_demo_table.py [--seeds 0 1 2] [--image-size 112 ...]`; or one
process per seed (`--seeds 0 --out a.json`, ...) and `--merge a.json b.json c.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> (use_tm, E_CR or None)
    "TM only": (True, None), "CR(embedding)": (False, "embedding"), "CR(image)": (False, "image"),
    "TM + CR(embedding)": (True, "embedding"), "TM + CR(image)": (True, "image"),
}
KEYS = ("srcc", "plcc", "mae_L", "mae_M", "mae_H")


def build_demo(work: Path) -> None:
    """demo_data -> prepare -> tags -> embed -> features -> index, with the stage CLIs, in ``work``."""
    if (work / "data/index/index.parquet").exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    for f in ("params.yaml", "config", "data/byo"):
        src, dst = ROOT / f, work / f
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "IAA_RUNS_DIR": str(work / "runs")}
    for stage in ("demo_data", "prepare", "tags", "embed", "features", "index"):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
        print(f"{stage}: {time.perf_counter() - t:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default="/tmp/iaa-demo-table")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/demo_table.json"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--image-size", type=int, default=None, help="override pretrain.image.image_size")
    ap.add_argument("--resize", type=int, default=None, help="override pretrain.image.resize")
    ap.add_argument("--image-epochs", type=int, default=None, help="override pretrain.image.epochs")
    ap.add_argument("--image-batches", type=int, default=None, help="override pretrain.image.batches_per_cluster")
    ap.add_argument("--merge", nargs="+", help="combine the JSON files of runs of single seeds into --out, and stop")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        results = {"settings": {**parts[0]["settings"], "seeds": [r["seed"] for p in parts for r in p["runs"]]},
                   "runs": [r for p in parts for r in p["runs"]]}
        write_summary(results, args.out)
        return
    work = Path(args.work).resolve()
    build_demo(work)
    os.chdir(work)
    os.environ["IAA_RUNS_DIR"] = str(work / "runs")

    import torch

    from pipelines.config import TrainParams, as_dict, load_params
    from pipelines.metrics import evaluate
    from pipelines.data.manifest import image_paths
    from pipelines.ranking.cr_features import encoder_from_state, write_cr_features
    from pipelines.train.data import load_features
    from pipelines.semantics import load_matcher
    from pipelines.heads.build import predict_logits
    from pipelines.heads.train import supervised_loop
    from pipelines.ranking.pretrain import pretrain_loop
    from pipelines.train.runner import run_training
    from stages.common import FEATURES, IMAGE_EMB, TAG_EMB
    from stages.pretrain import pretrain_config

    torch.set_num_threads(args.threads)
    local = TrainParams(num_workers=0)
    p = load_params("params.yaml")
    over = {k: v for k, v in (("image_size", args.image_size), ("resize", args.resize), ("epochs", args.image_epochs),
                              ("batches_per_cluster", args.image_batches)) if v is not None}
    image = dataclasses.replace(p.pretrain.image, **over)
    results: dict = {"settings": {"image": as_dict(image), "embedding_epochs": p.pretrain.epochs, "head_epochs": p.head.epochs,
                                  "seeds": args.seeds, "data": "demo (seed-0 data, random CLIP weights)"}, "runs": []}
    feats = load_features(FEATURES, None)
    ids = [str(i) for i in feats.image_id]
    for seed in args.seeds:
        run: dict = {"seed": seed, "seconds": {}}
        cr_inputs = {}
        for enc in ("embedding", "image"):
            q = dataclasses.replace(p, seed=seed, pretrain=dataclasses.replace(p.pretrain, encoder=enc, image=image))
            config, inputs = pretrain_config(q)
            config = {**config, "seed": seed, **{k: str(Path(v).resolve()) for k, v in config.items() if k.endswith("_path") and v}}
            t = time.perf_counter()
            cr_path = work / f"cr_{enc}_{seed}.pt"
            if cr_path.exists():  # an earlier run of this seed trained it (same params)
                state = torch.load(cr_path, weights_only=True)
            else:
                state = run_training(pretrain_loop, config, local, stage=f"table-pretrain-{enc}-{seed}", inputs=[str(i) for i in inputs])
                torch.save(state, cr_path)
            emb_path = IMAGE_EMB
            if enc == "image":
                emb_path = work / f"cr_features_{seed}"
                write_cr_features(encoder_from_state(state), ids, image_paths("data/manifest.parquet", ids, work), emb_path,
                                  batch_size=image.batch_size, workers=image.loader_workers)
            run["seconds"][f"pretrain {enc}"] = round(time.perf_counter() - t, 1)
            cr_inputs[enc] = (cr_path, Path(emb_path).resolve())
            print(f"seed {seed} pretrain {enc}: {run['seconds'][f'pretrain {enc}']} s", flush=True)
        for name, (use_tm, enc) in VARIANTS.items():
            h = {**as_dict(p.head), "use_tm": use_tm, "use_cr": enc is not None}
            h.pop("ray")
            cr_path, emb_path = cr_inputs[enc or "embedding"]
            config = {"features_path": str(FEATURES.resolve()), "embeddings_path": str(emb_path),
                      "clip_path": str(IMAGE_EMB.resolve()), "tags_path": str(TAG_EMB.resolve()),
                      "cr_path": str(cr_path) if enc else None, "head": h, "epochs": p.head.epochs, "lr": p.head.lr, "seed": seed}
            t = time.perf_counter()
            state = run_training(supervised_loop, config, local, stage=f"table-head-{seed}", inputs=[str(cr_path)])
            from pipelines.heads.build import head_from_arch

            model = head_from_arch(state["arch"])
            model.load_state_dict(state["model"])
            fs = load_features(FEATURES, emb_path, clip_path=IMAGE_EMB)
            train, test = fs.split_of("train"), fs.split_of("test")
            probs = torch.softmax(torch.from_numpy(predict_logits(model, load_matcher(FEATURES, TAG_EMB), test.clip, test.emb)), 1).numpy()
            res = evaluate(probs, test.dist, train.score, threshold=p.data.threshold, seed=seed)
            run[name] = {k: float(res[k]) for k in KEYS}
            run["seconds"][f"head {name}"] = round(time.perf_counter() - t, 1)
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in run[name].items()), flush=True)
        results["runs"].append(run)
        write_summary(results, args.out)


def write_summary(results: dict, out: str) -> None:
    """Mean and sd over the runs per variant; write ``out``; print the README table."""
    import numpy as np

    summary = {}
    for name in VARIANTS:
        vals = np.array([[r[name][k] for k in KEYS] for r in results["runs"]])
        summary[name] = {k: {"mean": float(vals[:, i].mean()), "sd": float(vals[:, i].std(ddof=1)) if len(vals) > 1 else 0.0}
                         for i, k in enumerate(KEYS)}
    results["summary"] = summary
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    for name, row in summary.items():
        print(f"| {name} | " + " | ".join(f"{row[k]['mean']:.3f} ± {row[k]['sd']:.3f}" for k in KEYS) + " |")


if __name__ == "__main__":
    main()
