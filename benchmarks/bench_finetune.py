"""TM + CR(image) on the demo: the linear probe against fine-tuning the backbone with the head.

Reads a demo work folder that ``benchmarks/bench_demo_table.py`` built (its data up to the
index stage, and per seed the pretrained image E_CR ``cr_image_<seed>.pt``), and writes
nothing there. Per seed, in Ray Train
local mode with the stages' loops and the default ``head`` params:

1. linear probe: the pretrained backbone's CR-feature cache, then the head over it (``supervised_loop``);
2. fine-tune: backbone + head on pixels (``finetune_loop``, ``head.backbone_lr`` or ``--backbone-lr``),
   then the tuned backbone's features of the test images;
3. test SRCC, PLCC, ELTA L/M/H MAE of each, and the seconds each took.

Usage: ``python benchmarks/bench_finetune.py [--work /tmp/iaa-demo-table] [--seeds 0] [--out ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KEYS = ("srcc", "plcc", "mae_L", "mae_M", "mae_H")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iaa-demo-table", help="a bench_demo_table.py work folder (read only)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--backbone-lr", type=float, default=None, help="override head.backbone_lr")
    ap.add_argument("--epochs", type=int, default=None, help="override head.epochs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/finetune.json"))
    args = ap.parse_args()
    work = Path(args.work).resolve()
    scratch = Path(tempfile.mkdtemp(prefix="iaa-ft-"))
    os.environ["IAA_RUNS_DIR"] = str(scratch / "runs")

    import torch

    from pipelines.config import TrainParams, as_dict, load_params
    from pipelines.metrics import evaluate
    from pipelines.data.manifest import image_paths
    from pipelines.ranking.cr_features import encoder_from_state, write_cr_features
    from pipelines.heads.finetune import FineTuneModel, finetune_loop, tuned_encoder
    from pipelines.train.data import load_features
    from pipelines.semantics import load_matcher
    from pipelines.heads.build import head_from_arch, predict_logits
    from pipelines.heads.train import supervised_loop
    from pipelines.train.runner import run_training

    torch.set_num_threads(args.threads)
    local = TrainParams(num_workers=0)
    p = load_params(work / "params.yaml")
    h = as_dict(p.head)
    h.pop("ray")
    epochs = args.epochs or p.head.epochs
    backbone_lr = args.backbone_lr if args.backbone_lr is not None else p.head.backbone_lr
    features = work / "data/features/features.parquet"
    clip_cache, tags = work / "data/embeddings/images", work / "data/embeddings/tags.parquet"  # what TM reads
    matcher = load_matcher(features, tags)
    feats = load_features(features, None, clip_path=clip_cache)
    test = feats.split_of("test")
    test_paths = image_paths(work / "data/manifest.parquet", test.image_id, work)
    results = {"settings": {"work": str(work), "head_epochs": epochs, "head_lr": p.head.lr, "backbone_lr": backbone_lr,
                            "data": "demo (seed-0 data, random CLIP weights), TM + CR(image)"}, "runs": []}

    def scores(model, clip, emb):
        train = feats.split_of("train")
        probs = torch.softmax(torch.from_numpy(predict_logits(model, matcher, clip, emb)), 1).numpy()
        res = evaluate(probs, test.dist, train.score, threshold=p.data.threshold, seed=0)
        return {k: float(res[k]) for k in KEYS}

    for seed in args.seeds:
        cr_path, cache = work / f"cr_image_{seed}.pt", scratch / f"cr_features_{seed}"
        run: dict = {"seed": seed, "seconds": {}}
        t = time.perf_counter()
        ids = [str(i) for i in feats.image_id]  # the pretrained backbone's cache, as the cr_features stage writes it
        write_cr_features(encoder_from_state(torch.load(cr_path, weights_only=True)), ids,
                          image_paths(work / "data/manifest.parquet", ids, work), cache, batch_size=64)
        config = {"features_path": str(features), "embeddings_path": str(cache), "cr_path": str(cr_path),
                  "clip_path": str(clip_cache), "tags_path": str(tags), "head": {**h, "protocol": "linear_probe"}, "epochs": epochs, "lr": p.head.lr, "seed": seed}
        state = run_training(supervised_loop, config, local, stage=f"bench-probe-{seed}", inputs=[str(cr_path)])
        model = head_from_arch(state["arch"])
        model.load_state_dict(state["model"])
        fs = load_features(features, cache, clip_path=clip_cache).split_of("test")
        run["linear_probe"] = {**scores(model, fs.clip, fs.emb), "selected_epoch": state["selected_epoch"]}
        run["seconds"]["linear_probe"] = round(time.perf_counter() - t, 1)
        print(f"seed {seed} linear probe: {run['linear_probe']} ({run['seconds']['linear_probe']} s)", flush=True)

        t = time.perf_counter()
        img = p.pretrain.image
        config = {"features_path": str(features), "embeddings_path": None, "cr_path": str(cr_path),
                  "clip_path": str(clip_cache), "tags_path": str(tags), "manifest_path": str(work / "data/manifest.parquet"), "root": str(work), "head": {**h, "protocol": "fine_tune"},
                  "epochs": epochs, "lr": p.head.lr, "backbone_lr": backbone_lr, "seed": seed,
                  "image": {"hflip": img.hflip, "precision": img.precision, "loader_workers": img.loader_workers, "batch_size": img.batch_size}}
        state = run_training(finetune_loop, config, local, stage=f"bench-ft-{seed}", inputs=[str(cr_path)])
        model = head_from_arch(state["arch"])
        model.load_state_dict(state["model"])
        enc = tuned_encoder(state["cr_backbone"])
        emb = FineTuneModel(enc.backbone, model, h).features(test_paths, enc.image_size, enc.resize, 64, "cpu")
        run["fine_tune"] = {**scores(model, test.clip, emb), "selected_epoch": state["selected_epoch"]}
        run["seconds"]["fine_tune"] = round(time.perf_counter() - t, 1)
        print(f"seed {seed} fine-tune: {run['fine_tune']} ({run['seconds']['fine_tune']} s)", flush=True)
        results["runs"].append(run)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["runs"], indent=1))


if __name__ == "__main__":
    main()
