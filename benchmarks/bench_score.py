"""Scoring a folder of images on CPU: the served torch model vs ONNX Runtime, side by side, and
the served model's resident memory.

    python benchmarks/bench_score.py [--model ViT-B-32] [--n-images 64] [--repeats 2] [--threads 2]
    python benchmarks/bench_score.py --rss-only [--before ../main]   # memory only (score_rss.json)

The demo-like TMCR model: open_clip ``--model`` with random weights (no pretrained weights
exist on this machine; speed and memory do not depend on the weight values), a 300 + 200 tag
library, and an untrained head of the demo's shape. Images: the real AVA photos in
``$IAA_SHARED_DATA/images/ava`` (default ``../shared/data``) cycled to ``--n-images`` paths,
else random JPEGs. Every method scores the same paths end to end (decode, preprocess, model),
``--repeats`` times interleaved; the best run counts.

Methods: ``torch <precision>`` is the served pyfunc scorer (``ScoringModel``) with the bundle's
embed precision (int8: the demo's ``auto`` pick on AVX2; fp32: the reference); ``onnx fp32`` /
``onnx int8`` are ``pipelines.export.ort.OnnxScorer`` on ``export_model``'s graphs. Scores are
compared with ``torch fp32`` (max abs difference).

Memory (each in a fresh process): the served model's RSS after load (idle), and after three
24 MP JPEGs; the ONNX scorer's idle RSS. Results: ``benchmarks/results/score.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IAA_SHARED_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "benchmarks" / "results" / "score.json"
CARD = {"weights": "random", "random_weights": True, "pretrained": "none", "init_seed": 0}
HEAD = {"protocol": "linear_probe", "lr_decay": 0.95, "weight_decay": 1e-4, "batch_size": 64, "tm_dim": 256, "cr_dim": 256,
        "hidden": 256, "dropout": 0.0, "emd_r": 2, "use_tm": True, "use_cr": True, "tfa": False, "tfa_tau1": 0.5,
        "tfa_tau2": 2.0, "tfa_n_mix": 1, "flsa": False, "flsa_weight": 0.1, "keep_best": True, "loss": "emd",
        "cr_features": "output"}

RSS_CHILD = r"""
import json, sys, io
from pathlib import Path
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS"))
kind, path, big = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
if kind == "onnx":
    from pipelines.export.ort import OnnxScorer
    s = OnnxScorer(path)
    out["idle_mb"] = rss()
    for _ in range(3):
        s.score_paths([big])
    out["after_big_mb"] = rss()
else:
    import mlflow.pyfunc, pandas as pd
    from pipelines.tracking.scoring import ScoringModel
    m = ScoringModel()
    m.load_context(mlflow.pyfunc.PythonModelContext(artifacts={"bundle": path}, model_config=None))
    out["idle_mb"] = rss()
    data = Path(big).read_bytes()
    for _ in range(3):
        m.predict(None, pd.DataFrame({"image": [data]}))
    out["after_big_mb"] = rss()
print("RSS", json.dumps(out))
"""


def demo_bundle(path: Path, model: str, precision: str) -> None:
    import torch

    from pipelines.embed.clip import load_clip
    from pipelines.heads.build import head_from_arch
    from pipelines.tracking.scoring import make_bundle

    clip = load_clip(model, "none", seed=0)
    rng = np.random.default_rng(0)
    n_sem, n_attr = 300, 200
    tag_emb = rng.normal(size=(n_sem + n_attr, clip.embed_dim)).astype(np.float32)
    tag_emb /= np.linalg.norm(tag_emb, axis=1, keepdims=True)
    arch = {"tm_in": n_sem + n_attr, "n_levels": 10,
            "cr_spec": {"in_dim": clip.embed_dim, "hidden": 512, "dim": 128, "dropout": 0.0}, "head": HEAD}
    torch.manual_seed(1)
    head = head_from_arch(arch)
    make_bundle(path, head_state={"arch": arch, "model": head.state_dict()}, card={**CARD, "model": model},
                tags=[f"sem{i}" for i in range(n_sem)] + [f"attr{i}" for i in range(n_attr)],
                kinds=["semantic"] * n_sem + ["attribute"] * n_attr, tag_emb=tag_emb, logit_scale=100.0,
                precision=precision, batch_size=64)


def image_paths(folder: Path, n: int) -> list[str]:
    real = sorted((SHARED / "images" / "ava").glob("*.jpg"))
    if real:
        return [str(real[i % len(real)]) for i in range(n)]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(min(n, 16)):
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        out.append(str(folder / f"r{i}.jpg"))
        Image.fromarray(small).resize((640, 480), Image.BICUBIC).save(out[-1], quality=90)
    return [out[i % len(out)] for i in range(n)]


def big_jpeg(path: Path) -> None:
    from PIL import Image

    small = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 45, 3), dtype=np.uint8))
    small.resize((6000, 4000), Image.BICUBIC).save(path, quality=90)


def rss(kind: str, path: Path, big: Path, pythonpath: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath or str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD, kind, str(path), str(big)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=pythonpath or str(ROOT))  # `-c` puts the cwd first on sys.path
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.split("RSS ", 1)[1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--before", default=None, help="with --rss-only: a checkout whose served model's RSS to report beside")
    ap.add_argument("--rss-only", action="store_true", help="only the memory figures (to --out, default score_rss.json)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.rss_only:
        return rss_only(a)

    import mlflow.pyfunc
    import pandas as pd
    import torch

    from pipelines.export.onnx import export_model
    from pipelines.export.ort import OnnxScorer
    from pipelines.tracking.scoring import ScoringModel

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp_s:
        tmp = Path(tmp_s)
        paths = image_paths(tmp, a.n_images)
        for precision in ("fp32", "int8"):
            demo_bundle(tmp / f"{precision}.pt", a.model, precision)
        t0 = time.perf_counter()
        export_model(tmp / "fp32.pt", tmp / "fp32.onnx")
        export_s = time.perf_counter() - t0
        export_model(tmp / "fp32.pt", tmp / "int8.onnx", quantize="int8")
        methods = {}
        for precision in ("int8", "fp32"):
            m = ScoringModel()
            m.load_context(mlflow.pyfunc.PythonModelContext(artifacts={"bundle": str(tmp / f"{precision}.pt")},
                                                            model_config={"path_root": "/"}))
            methods[f"torch {precision}"] = lambda m=m: m.predict(None, pd.DataFrame({"path": paths}))["score"].to_numpy(float)
        for q in ("fp32", "int8"):
            s = OnnxScorer(tmp / f"{q}.onnx", threads=a.threads)
            methods[f"onnx {q}"] = lambda s=s: np.array([r["score"] for r in s.score_paths(paths, batch_size=64)])
        best = {k: float("inf") for k in methods}
        scores = {}
        for k, fn in methods.items():  # warm-up (first-call set-up), also the scores
            scores[k] = fn()
        for _ in range(a.repeats):
            for k, fn in methods.items():
                t = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t)
        ref = scores["torch fp32"]
        result = {"model": a.model, "n_images": len(paths), "threads": a.threads, "images": "AVA photos" if "ava" in paths[0] else "random JPEGs",
                  "load_avg": os.getloadavg()[0], "export_s": round(export_s, 1), "methods": {}}
        for k in methods:
            result["methods"][k] = {"img_per_s": round(len(paths) / best[k], 1), "max_abs_diff_vs_torch_fp32": float(np.abs(scores[k] - ref).max())}
        result["onnx_fp32_vs_torch_int8_speedup"] = round(best["torch int8"] / best["onnx fp32"], 2)
        result["onnx_int8_vs_torch_int8_speedup"] = round(best["torch int8"] / best["onnx int8"], 2)
        big_jpeg(tmp / "big.jpg")
        del methods
        result["rss_mb"] = {"served int8 (this checkout)": rss("torch", tmp / "int8.pt", tmp / "big.jpg"),
                            "onnx int8 scorer": rss("onnx", tmp / "int8.onnx", tmp / "big.jpg")}
    return _write(result, a.out or OUT)


def _write(result: dict, out: str | Path) -> dict:
    from pipelines.io import write_json

    write_json(Path(out), result)
    print(json.dumps(result, indent=2))
    return result


def rss_only(a) -> dict:
    """The served model's RSS (this checkout, and ``--before``) and the ONNX scorer's, int8 demo model."""
    from pipelines.export.onnx import export_model

    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp_s:
        tmp = Path(tmp_s)
        demo_bundle(tmp / "int8.pt", a.model, "int8")
        demo_bundle(tmp / "fp32.pt", a.model, "fp32")
        export_model(tmp / "fp32.pt", tmp / "int8.onnx", quantize="int8")
        big_jpeg(tmp / "big.jpg")
        result = {"model": a.model, "big_image": "6000 x 4000 JPEG, scored 3 times", "rss_mb": {
            "served int8 (this checkout)": rss("torch", tmp / "int8.pt", tmp / "big.jpg"),
            "served fp32 (this checkout)": rss("torch", tmp / "fp32.pt", tmp / "big.jpg"),
            "onnx int8 scorer": rss("onnx", tmp / "int8.onnx", tmp / "big.jpg")}}
        if a.before:
            result["rss_mb"][f"served int8 ({a.before})"] = rss("torch", tmp / "int8.pt", tmp / "big.jpg", a.before)
            result["rss_mb"][f"served fp32 ({a.before})"] = rss("torch", tmp / "fp32.pt", tmp / "big.jpg", a.before)
    return _write(result, a.out or OUT.with_name("score_rss.json"))


if __name__ == "__main__":
    main()
