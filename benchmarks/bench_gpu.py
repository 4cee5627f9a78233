"""Ray-free GPU benchmark of the library's own training steps: image E_CR and M+MNet.

Times what the training loops run, built from the library's pieces (no Ray, MLflow or DVC is
imported: the script blocks them, so a stray import fails the run):

- ecr: image E_CR training -- ``pipelines.ranking.backbone.ImageCREncoder`` (a timm backbone,
  random weights) + ``pipelines.ranking.loss.traversal_contrastive_loss``, with the precision,
  optimizer and speed options of ``pipelines.train.precision`` -- per precision (bf16 / fp16 /
  fp32) and option (channels_last, fused AdamW, torch.compile, batch 64 vs 256). Two inputs:
  ``decode`` (JPEG files this script writes to a temporary folder, decoded and augmented by the
  ``pipelines.images`` loader with ``--workers`` processes), ``gpu_decode`` (the same files, the
  workers only reading their bytes: decoded, resized, cropped and flipped on the device, as
  ``pretrain.image.decode: gpu`` trains) and ``resident`` (the same step on tensors already on
  the device: the compute ceiling).
- mnet: M+MNet training steps through ``pipelines.models.amp.MixedPrecisionTrainer`` (the model
  built as the family loop builds it, ``pipelines.models.build``): the FP32 phase (with its fp16
  overflow monitor), the mixed phase (autocast fp16 + GradScaler), the mixed phase with
  channels_last, and plain ``torch.autocast`` + ``GradScaler`` as a reference; then the precision
  gate over a few short epochs from a fresh model (when does it open on this device?).

Each row: images/s over the timed steps (after warm-up; CUDA synchronised), ms per step, peak
device memory (``torch.cuda.max_memory_allocated``, CUDA only), the first step's seconds (the
compile time for ``compile`` rows). A row that fails (e.g. out of memory, or an option the
device cannot honour) is recorded with its error and the run goes on.

Usage:
  python benchmarks/bench_gpu.py                 # CUDA, full size (Swin-B 224, batch 64 / 256;
                                                 # M+MNet 224, batch 64) -> benchmarks/results/gpu.json
  python benchmarks/bench_gpu.py --quick         # tiny sizes, any device (CPU here)
                                                 # -> benchmarks/results/gpu_quick.json
  python benchmarks/bench_gpu.py --parts mnet --no-compile --steps 10
"""

from __future__ import annotations

import importlib.abc
import sys

BLOCKED = ("ray", "mlflow", "dvc")


class _BlockImports(importlib.abc.MetaPathFinder):
    """Make any import of Ray, MLflow or DVC fail: the benchmark must run on a bare CUDA box."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"bench_gpu.py must not import {name!r} (Ray, MLflow and DVC are blocked here)")
        return None


sys.meta_path.insert(0, _BlockImports())

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models and sizes, 1 timed step per row (a check that every row runs, on CPU)")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one) | cuda | cpu")
    ap.add_argument("--parts", default="ecr,mnet", help="comma-separated: ecr, mnet")
    ap.add_argument("--backbone", default=None, help="timm name (default: swin_base_patch4_window7_224; --quick: test_convnext)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20, M+MNet 15; --quick 1)")
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default 8 on CUDA, 0 on CPU)")
    ap.add_argument("--images", type=int, default=None, help="JPEG files to write (default 512 of 512 px; --quick 16 of 64 px)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (on by default on CUDA only)")
    ap.add_argument("--compile", action="store_true", help="run the torch.compile rows on CPU too")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/gpu.json; --quick: gpu_quick.json)")
    ap.add_argument("--imports-only", action="store_true", help="import what the benchmark uses, print it, and stop")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------- plumbing
class Bench:
    def __init__(self, args, device, out: Path):
        import torch

        self.args, self.dev, self.out, self.torch = args, device, out, torch
        self.started = time.perf_counter()
        self.report = {
            "command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:]),
            "quick": bool(args.quick),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 1),
            "rows": [],
        }

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def reset_memory(self):
        gc.collect()
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        return round(self.torch.cuda.max_memory_allocated(self.dev) / 2**30, 2) if self.dev.type == "cuda" else None

    def save(self):
        from pipelines.io import write_json

        self.report["wall_s"] = round(time.perf_counter() - self.started, 1)
        write_json(self.out, self.report)

    def row(self, fn, **what):
        """Run ``fn()`` (a dict of measurements); record it with ``what``, or the error it raised."""
        self.reset_memory()
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001 - recorded, and the next row runs
            got = {"error": f"{type(e).__name__}: {str(e)[:400]}", "traceback": traceback.format_exc()[-1200:]}
            if self.dev.type == "cuda":
                self.torch.cuda.empty_cache()
        rec = {**what, **got}
        self.report["rows"].append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "traceback"}), flush=True)
        self.save()
        return rec

    def timed(self, step, n_warm: int, n_steps: int, batch: int) -> dict:
        """Run ``step(k)`` ``n_warm + n_steps`` times; time the last ``n_steps`` (device synchronised)."""
        t = time.perf_counter()
        step(0)
        self.sync()
        first = time.perf_counter() - t
        for k in range(1, n_warm):
            step(k)
        self.sync()
        t = time.perf_counter()
        for k in range(n_warm, n_warm + n_steps):
            out = step(k)
        self.sync()
        s = time.perf_counter() - t
        finite = bool(self.torch.isfinite(out).all()) if self.torch.is_tensor(out) else None
        return {"images_per_s": round(n_steps * batch / s, 1), "step_ms": round(1000 * s / n_steps, 2),
                "first_step_s": round(first, 2), "peak_gb": self.peak_gb(), "loss_finite": finite}


def write_images(folder: Path, n: int, side: int, seed: int = 0) -> list[str]:
    """``n`` smooth random JPEG photos of ``side`` px (a realistic file size for the decoder)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        x = rng.integers(0, 255, (max(side // 8, 1), max(side // 8, 1), 3), dtype=np.uint8)
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(x).resize((side, side), Image.BILINEAR).save(p, quality=90)
        paths.append(str(p))
    return paths


# ------------------------------------------------------------------------------------ E_CR
def ecr_rows(b: Bench, paths: list[str]) -> None:
    import numpy as np
    import torch

    from pipelines.images import TrainViews, batch_loader
    from pipelines.ranking.backbone import ImageCREncoder
    from pipelines.ranking.loss import traversal_contrastive_loss
    from pipelines.train.precision import (
        Speed,
        check_speed,
        enable_tf32,
        maybe_compile,
        optimizer,
        prepare_module,
        resolve_precision,
        to_device,
    )

    a, dev, quick = b.args, b.dev, b.args.quick
    cuda = dev.type == "cuda"
    backbone = a.backbone or ("test_convnext" if quick else "swin_base_patch4_window7_224")
    size, resize = (32, 40) if quick else (224, 256)
    small, big = (4, 8) if quick else (64, 256)
    steps = a.steps or (1 if quick else 20)
    warm = 1 if quick else 3
    workers = a.workers if a.workers is not None else (8 if cuda else 0)
    compile_rows = (cuda and not a.no_compile) or a.compile
    enable_tf32(dev)

    def run(precision: str, batch: int, speed: Speed, source: str) -> dict:
        prec = resolve_precision(precision, dev, key="bench.precision")  # refuses what the device cannot run
        check_speed(speed, dev, key="bench.speed")
        torch.manual_seed(0)
        enc = prepare_module(ImageCREncoder(backbone, 512, 128, 0.1, image_size=size, resize=resize), dev, speed).train()
        opt = optimizer(enc.parameters(), lr=1e-4, weight_decay=0.0, device=dev, speed=speed)
        model, _ = maybe_compile(enc, speed)
        scaler = prec.scaler(dev)
        bins = torch.arange(batch, device=dev) % 7  # balanced score bins, as TMCR's sampler draws them

        def step_on(x):
            with prec.autocast(dev):
                z = model(x)
            loss = traversal_contrastive_loss(z.float(), bins, tau=0.07)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return loss.detach()

        if source == "resident":
            x = to_device(torch.randn(batch, 3, size, size), dev, speed)
            got = b.timed(lambda k: step_on(x), warm, steps, batch)
        else:
            rng = np.random.default_rng(0)
            specs = [(rng.choice(len(paths), batch).tolist(), (0, 0, k)) for k in range(warm + steps)]
            views = TrainViews(paths, size, resize, decode="gpu" if source == "gpu_decode" else "cpu")  # the training loops' views
            it = iter(batch_loader(specs, views.load, workers=workers, device=dev))
            got = b.timed(lambda k: step_on(to_device(views.finish(next(it), specs[k], dev), dev, speed)), warm, steps, batch)
        return {**got, "precision_ran": prec.name, "fused_ran": bool(speed.fused_optimizer and cuda),
                "n_params": sum(p.numel() for p in enc.parameters())}

    def plan():
        base = Speed(channels_last=False, fused_optimizer=False)
        both = Speed(channels_last=True, fused_optimizer=True)
        for prec in ("bf16", "fp16", "fp32"):
            yield "decode", prec, small, base
        yield "decode", "bf16", small, both
        yield "decode", "bf16", big, both
        yield "gpu_decode", "bf16", small, both  # pretrain.image.decode: gpu (workers read bytes; nvjpeg + augment on the GPU)
        yield "gpu_decode", "bf16", big, both
        for prec in ("bf16", "fp16", "fp32"):
            yield "resident", prec, small, base
        yield "resident", "bf16", small, Speed(channels_last=True, fused_optimizer=False)
        yield "resident", "bf16", small, Speed(channels_last=False, fused_optimizer=True)
        yield "resident", "bf16", small, both
        yield "resident", "fp32", small, both
        yield "resident", "bf16", big, base
        yield "resident", "bf16", big, both
        if compile_rows:
            yield "resident", "bf16", small, Speed(channels_last=True, fused_optimizer=True, compile=True)
            yield "resident", "bf16", big, Speed(channels_last=True, fused_optimizer=True, compile=True)

    for source, prec, batch, speed in plan():
        b.row(functools.partial(run, prec, batch, speed, source), part="ecr", input=source, backbone=backbone, size=size,
              precision=prec, batch=batch, channels_last=speed.channels_last, fused_adamw=speed.fused_optimizer,
              compile=speed.compile, loader_workers=workers if source != "resident" else None, steps=steps)
    if not compile_rows:
        b.report["rows"].append({"part": "ecr", "compile": True, "skipped": "torch.compile rows are off here "
                                 "(on CUDA unless --no-compile; on CPU with --compile: an inductor C++ build takes minutes)"})


# ---------------------------------------------------------------------------------- M+MNet
def mnet_rows(b: Bench) -> None:
    import torch

    from pipelines.config import as_dict, load_params
    from pipelines.models import build, loss_terms, make_optimizer, resolve
    from pipelines.models.amp import MixedPrecisionTrainer, PrecisionGate, low_dtype, monitor_dtype
    from pipelines.train.precision import Speed, enable_tf32, prepare_module, to_device, use_fused

    a, dev, quick = b.args, b.dev, b.args.quick
    params = load_params(ROOT / "params.yaml").model
    opts = {k: v for k, v in as_dict(params.mnet).items() if k != "weights"}
    amp = params.amp
    if quick:
        opts.update(branch_blocks=2, fuse_channels=16)
    size, batch = (32, 4) if quick else (224, 64)
    steps = a.steps or (1 if quick else 15)
    warm = 1 if quick else 3
    enable_tf32(dev)
    g = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(batch, 3, size, size, generator=g)
    y = torch.softmax(torch.randn(batch, 10, generator=g), -1).to(dev)

    def loss_of(m, x):
        return loss_terms("mnet", m, m(x), y, opts, x)["loss"].float()

    def run(mode: str, dtype_name: str, channels_last: bool, fused: bool = False) -> dict:
        torch.manual_seed(0)
        speed = Speed(channels_last=channels_last, fused_optimizer=fused)
        model = prepare_module(build("mnet", 10, dict(opts)), dev, speed).train()
        opt = make_optimizer(model.parameters(), resolve("mnet", "optimizer", params.optimizer), 1e-3, 0.0,
                             fused=use_fused(speed, dev))  # model.fused_optimizer, as the family loop builds it
        x = to_device(x_cpu, dev, speed)
        low = low_dtype(dtype_name, dev)
        if mode == "plain autocast + GradScaler":
            scaler = torch.amp.GradScaler(dev.type, init_scale=2.0 ** amp.init_tau, growth_interval=amp.growth_interval)

            def step(k):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=low):
                    loss = loss_of(model, x)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                return loss.detach()

            return {**b.timed(step, warm, steps, batch), "low_dtype": str(low)}
        gate = PrecisionGate(l1=amp.l1, l2=amp.l2, window=amp.window)
        if mode != "fp32 phase":
            gate.switch_epoch = 0
        tr = MixedPrecisionTrainer(model, opt, dtype=low, gate=gate, init_tau=amp.init_tau, growth_interval=amp.growth_interval,
                                   monitor=monitor_dtype(amp.monitor, low))
        overs = []

        def step(k):
            loss, over = tr.step(lambda m: loss_of(m, x))
            overs.append(over)
            return torch.tensor(loss)

        got = b.timed(step, warm, steps, batch)
        return {**got, "low_dtype": str(low), "overflow_steps": int(sum(overs)), "loss_scale_log2": tr.tau}

    fp16 = "fp16"  # the paper's mixed phase (model.amp.dtype auto = fp16 on CUDA)
    plan = [("fp32 phase", fp16, False, False), ("mixed", fp16, False, False), ("mixed", fp16, True, False),
            ("mixed", fp16, True, True), ("plain autocast + GradScaler", fp16, False, False)]
    if dev.type != "cuda":
        plan.insert(1, ("mixed", "auto", False, False))  # the CPU stand-in (fp32 arithmetic, fp16 monitor)
    for mode, dtype_name, cl, fused in plan:
        b.row(functools.partial(run, mode, dtype_name, cl, fused), part="mnet_step", mode=mode, amp_dtype=dtype_name,
              channels_last=cl, fused_adam=fused and dev.type == "cuda",
              size=size, batch=batch, steps=steps, branch_blocks=opts["branch_blocks"])

    def gate_run() -> dict:
        torch.manual_seed(0)
        model = build("mnet", 10, dict(opts)).to(dev).train()
        opt = make_optimizer(model.parameters(), "adam", 1e-3, 0.0)
        low = low_dtype("auto", dev)
        tr = MixedPrecisionTrainer(model, opt, dtype=low, gate=PrecisionGate(l1=amp.l1, l2=amp.l2, window=amp.window),
                                   init_tau=amp.init_tau, growth_interval=amp.growth_interval, monitor=monitor_dtype(amp.monitor, low))
        epochs, gen = [], torch.Generator().manual_seed(1)
        t = time.perf_counter()
        for ep in range(3 if quick else 8):
            for _ in range(2 if quick else 10):
                xb = torch.randn(batch, 3, size, size, generator=gen).to(dev)
                tr.step(lambda m: loss_of(m, xb))
            epochs.append(tr.end_epoch(ep))
        b.sync()
        return {"switch_epoch": tr.gate.switch_epoch, "low_dtype": str(low), "seconds": round(time.perf_counter() - t, 1),
                "epochs": [{k: epochs[i][k] for k in ("mixed_precision", "overflow_epoch", "overflow_steps", "skipped_batches",
                                                      "loss_scale_log2", "theta")} for i in range(len(epochs))]}

    b.row(gate_run, part="mnet_gate", size=size, batch=batch)


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    if args.imports_only:
        import pipelines.config  # noqa: F401
        import pipelines.images  # noqa: F401
        import pipelines.models  # noqa: F401
        import pipelines.models.amp  # noqa: F401
        import pipelines.models.mnet  # noqa: F401
        import pipelines.ranking.backbone  # noqa: F401
        import pipelines.ranking.loss  # noqa: F401
        import pipelines.train.precision  # noqa: F401
        import timm  # noqa: F401

        print(json.dumps({"pipelines": sorted(m for m in sys.modules if m.startswith("pipelines")),
                          "blocked_loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
        return
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu --quick")
    if dev.type != "cuda" and not args.quick:
        raise SystemExit("the full-size benchmark needs a CUDA device (Swin-B at batch 256 on CPU would take hours); "
                         "run with --quick here")
    out = Path(args.out) if args.out else ROOT / "benchmarks/results" / ("gpu_quick.json" if args.quick else "gpu.json")
    b = Bench(args, dev, out)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"ecr", "mnet"})
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; use ecr and / or mnet")
    if "ecr" in parts:
        with tempfile.TemporaryDirectory() as d:
            n = args.images or (16 if args.quick else 512)
            t = time.perf_counter()
            side = 64 if args.quick else 512
            paths = write_images(Path(d), n, side, seed=1)
            b.report["jpeg_files"] = {"n": n, "side": side, "write_s": round(time.perf_counter() - t, 1)}
            ecr_rows(b, paths)
    if "mnet" in parts:
        mnet_rows(b)
    b.report["blocked_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    b.save()
    print(f"wrote {out} ({b.report['wall_s']} s)", flush=True)


if __name__ == "__main__":
    main()
