"""The embed stage's Ray Data engine (``embed.engine: ray``): the same image cache, from a cluster.

::

    pending manifest rows (image_id, path)      ray.data.from_items, in manifest order
      -> map_batches(decode_batch)              Ray tasks, embed.ray.decode_cpus each: read the
                                                file, PIL decode + the CLIP resize / crop (uint8)
      -> map_batches(ClipActor)                 ActorPoolStrategy(size=embed.ray.actors), each
                                                actor embed.ray.cpus_per_actor CPUs and
                                                embed.ray.gpus_per_actor GPUs: ToTensor +
                                                Normalize per batch, the image tower
      -> iter_batches in this process           CacheRun: checksummed chunks, meta.json

What stays in this (driver) process is the single-process path's own code
(``encode.CacheRun``): hashing the image files, opening the cache (rows already in a valid
chunk are not embedded again), writing each chunk atomically and ``meta.json``. The
fingerprint is the same as the local engine's, so either engine resumes the other's cache.

Numerics: the actors run the driver's model, shipped once through the object store (every
actor has the very same weights; no node downloads any), with the collate and encoders of
``encode`` (``BUILDERS``) on the precision path the cache records. ``auto`` is calibrated
once, in a Ray task with one actor's resources (so on the actors' kind of device), and
recorded before any chunk, so one cache never mixes paths. fp32 embeddings equal the local
engine's to float tolerance (batches are composed differently, which moves the last bits);
int8 quantises activations per batch, so there the two agree at the int8 noise level
(cosine ~0.9997), as a resumed local run does.

Rows come back in manifest order (``preserve_order``), so the chunks hold the same images
as the local engine's. Every image path must be readable at the same path from this
process (which hashes the files) and from every node (a shared file system).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipelines.config import EmbedRayParams
from pipelines.embed.clip import ClipBundle
from pipelines.embed.encode import BUILDERS, CALIB_IMAGES, CacheRun, ImageDecoder, calibrate
from pipelines.io import DataError

log = logging.getLogger(__name__)

KEY = "embed.ray"


def check_ray_params(r: EmbedRayParams, source: str = "params.yaml") -> None:
    """Values that cannot work, named by their key (before Ray starts)."""
    bad = []
    if not (isinstance(r.actors, int) and r.actors >= 1):
        bad.append(f"{KEY}.actors = {r.actors!r} (an integer >= 1)")
    if r.batch_size < 1:
        bad.append(f"{KEY}.batch_size = {r.batch_size!r} (an integer >= 1)")
    if r.cpus_per_actor <= 0:
        bad.append(f"{KEY}.cpus_per_actor = {r.cpus_per_actor!r} (a number > 0)")
    if r.gpus_per_actor < 0:
        bad.append(f"{KEY}.gpus_per_actor = {r.gpus_per_actor!r} (a number >= 0; 0 = CPU actors)")
    if r.decode_cpus <= 0:
        bad.append(f"{KEY}.decode_cpus = {r.decode_cpus!r} (a number > 0)")
    if bad:
        raise DataError(f"{source}: {'; '.join(bad)}: fix the value(s) and rerun.")


def required_cpus(r: EmbedRayParams) -> float:
    """The actors' CPUs and one decode task's: less than this and the pipeline cannot run."""
    return r.actors * r.cpus_per_actor + r.decode_cpus


def start_ray(r: EmbedRayParams) -> None:
    """Join the cluster named by ``RAY_ADDRESS``, else start a local Ray with at least
    :func:`required_cpus` logical CPUs (this machine's count, or more: Ray's CPUs are
    scheduling slots, and on one machine the actors and decode tasks then share the cores)."""
    from pipelines.train.runner import ensure_ray

    ensure_ray(max(os.cpu_count() or 1, math.ceil(required_cpus(r))))


def check_resources(r: EmbedRayParams, source: str = "params.yaml") -> None:
    """Fail in seconds, not hang, when the cluster lacks the GPUs or CPUs that params ask for.

    A cluster named by ``RAY_ADDRESS`` may be autoscaling, so there the check waits up to
    ``IAA_GPU_WAIT_S`` seconds (default 600) for the resources to join.
    """
    from pipelines.train.runner import wait_for_resources

    need_gpu, need_cpu = r.actors * r.gpus_per_actor, required_cpus(r)
    res = wait_for_resources({"GPU": need_gpu, "CPU": need_cpu})
    gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 0.0)
    if gpus >= need_gpu and cpus >= need_cpu:
        return
    where = "a Ray cluster with such nodes, named by RAY_ADDRESS"
    if gpus < need_gpu:
        raise DataError(
            f"{source}: {KEY}.gpus_per_actor = {r.gpus_per_actor:g} with {KEY}.actors = {r.actors} asks "
            f"for {need_gpu:g} GPU(s), but the Ray cluster has {gpus:g} GPU(s) (and {cpus:g} CPUs). "
            f"Set {KEY}.gpus_per_actor: 0 for CPU actors (e.g. `dvc exp run -S {KEY}.gpus_per_actor=0`), "
            f"fewer {KEY}.actors, or run on {where}."
        )
    raise DataError(
        f"{source}: {KEY}.actors = {r.actors} x {KEY}.cpus_per_actor = {r.cpus_per_actor:g} plus "
        f"{KEY}.decode_cpus = {r.decode_cpus:g} need {need_cpu:g} CPUs, but the Ray cluster has "
        f"{cpus:g}. Lower them, or run on {where}."
    )


def decode_batch(batch: dict[str, np.ndarray], preprocess: Any, shape: tuple[int, ...], dtype: str) -> dict[str, Any]:
    """Ray task: decode a batch of files into the per-image model input (``ImageDecoder.load``).

    An unreadable file is a row with ``error`` set (and zeros), skipped by the actors and
    listed in the report, as in the local engine.
    """
    start = time.perf_counter()
    decoder = ImageDecoder(preprocess)
    paths = batch["path"]
    images = np.zeros((len(paths), *shape), dtype=dtype)
    errors = [""] * len(paths)
    for i, path in enumerate(paths):
        try:
            img = np.asarray(decoder.load(str(path)))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, not fatal
            errors[i] = f"{type(exc).__name__}: {exc}"
            continue
        if img.shape != shape:
            raise DataError(
                f"{path}: the CLIP preprocess gave a {img.shape} input where every other image gives "
                f"{shape}; the ray engine needs a fixed-size transform (use embed.engine: local)."
            )
        images[i] = img
    seconds = np.full(len(paths), (time.perf_counter() - start) / max(1, len(paths)))  # per row: sums to the task's
    return {"image_id": batch["image_id"], "path": paths, "error": np.array(errors, dtype=object), "image": images,
            "decode_s": seconds}


def on_actor_device(bundle: ClipBundle, use_gpu: bool, threads: int) -> ClipBundle:
    """The bundle on this Ray worker's device: its GPU when the pool asks for GPUs, else the CPU."""
    torch.set_num_threads(threads)
    if not use_gpu:
        return bundle
    if not torch.cuda.is_available():
        raise DataError(f"{KEY}.gpus_per_actor > 0, but a Ray worker given a GPU sees no CUDA device; check the node's driver.")
    return dataclasses.replace(bundle, model=bundle.model.to("cuda"), device="cuda")


class ClipActor:
    """One actor of the pool: the driver's model on this actor's device, on the cache's path."""

    def __init__(self, shipped: Any, precision: str, use_gpu: bool, threads: int) -> None:
        import ray

        bundle = on_actor_device(ray.get(shipped[0]), use_gpu, threads)  # the model, from the object store
        self.device = bundle.device
        self.dim = bundle.embed_dim
        self.decoder = ImageDecoder(bundle.preprocess)
        self.encode = BUILDERS[precision](bundle)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        start = time.perf_counter()
        ok = batch["error"] == ""
        emb = np.zeros((len(ok), self.dim), dtype=np.float32)
        if ok.any():
            x = self.decoder.collate(list(batch["image"][ok])).to(self.device)
            with torch.inference_mode():
                emb[ok] = self.encode(x).cpu().numpy()
        seconds = np.full(len(ok), (time.perf_counter() - start) / max(1, len(ok)))
        return {"image_id": batch["image_id"], "path": batch["path"], "error": batch["error"], "embedding": emb,
                "decode_s": batch["decode_s"], "encode_s": seconds}


def _calibrate_task(bundle: ClipBundle, images: list[np.ndarray], use_gpu: bool, threads: int) -> tuple[str, dict[str, Any]]:
    """Ray task with one actor's resources: ``calibrate`` on that kind of device."""
    bundle = on_actor_device(bundle, use_gpu, threads)
    x = ImageDecoder(bundle.preprocess).collate(images).to(bundle.device)
    used, table, _ = calibrate(bundle, x)
    return used, table


def embed_images_ray(
    bundle: ClipBundle,
    items: Sequence[tuple[str, str]],
    out_dir: str | os.PathLike,
    params: EmbedRayParams,
    *,
    chunk_rows: int = 512,
    precision: str = "auto",
    fingerprint: dict[str, Any] | None = None,
    num_workers: int = 2,
    progress: bool = True,
    source: str = "params.yaml",
) -> dict[str, Any]:
    """``encode.embed_images`` on a Ray Data pipeline: the same cache, arguments and report.

    ``params`` sizes the actor pool (``EmbedRayParams``); ``num_workers`` is the number of
    threads hashing files in this process. Starts (or joins, with ``RAY_ADDRESS``) Ray.

    Raises:
        DataError: bad params (named by key), a cluster without the GPUs or CPUs they ask
            for, or what ``embed_images`` raises.
    """
    import ray

    check_ray_params(params, source)
    start_ray(params)
    check_resources(params, source)  # in seconds, before the files are hashed
    run = CacheRun(
        bundle, items, out_dir, precision=precision, fingerprint=fingerprint, chunk_rows=chunk_rows,
        num_workers=num_workers,
    )
    if not run.pending:
        return run.report(0.0, engine="ray", actors=params.actors, calibration_s=0.0, setup_s=0.0)
    t0 = time.perf_counter()
    threads, use_gpu = max(1, int(params.cpus_per_actor)), params.gpus_per_actor > 0
    resources = {"num_cpus": params.cpus_per_actor, "num_gpus": params.gpus_per_actor or None}
    shipped = ray.put(dataclasses.replace(bundle, tokenizer=None))  # the model, once, for every actor
    decoder = ImageDecoder(bundle.preprocess)
    probe = np.asarray(decoder.transform(Image.new("RGB", (256, 256))))  # the model input's shape

    if run.used is None:  # auto on a new cache: calibrate once, where the actors will run
        sample = _first_decodable(run.pending, decoder, CALIB_IMAGES)
        if sample:
            task = ray.remote(**resources)(_calibrate_task)
            used, table = ray.get(task.remote(shipped, sample, use_gpu, threads))
            log.info("precision auto -> %s (%s)", used, table)
            run.start(used, table)
    else:
        run.start(run.used, run.calibration)
    calib_s = time.perf_counter() - t0

    bar = tqdm(total=len(run.pending), unit="img", desc="embed images (ray)", disable=not progress)
    first: float | None = None  # when the first batch came back
    busy = [0.0, 0.0]  # seconds the decode tasks and the actors spent on the batches, all together
    if run.used is not None:
        with _data_context():  # active when the dataset is made: it keeps a copy
            ds = _pipeline(run.pending, shipped, bundle.preprocess, run.used, probe, params, (use_gpu, threads), resources)
            for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                if first is None:  # actors started, first batch through
                    first = time.perf_counter()
                busy[0] += float(out["decode_s"].sum())
                busy[1] += float(out["encode_s"].sum())
                failed = out["error"] != ""
                for image_id, path, error in zip(out["image_id"][failed], out["path"][failed], out["error"][failed]):
                    run.skipped.append({"image_id": str(image_id), "path": str(path), "error": str(error)})
                ids = [str(i) for i in out["image_id"][~failed]]
                if ids:
                    run.add(ids, out["embedding"][~failed])
                bar.update(len(failed))  # every row of the batch
    else:  # no image could be decoded at all: the report says so
        run.skipped.extend(_failures(run.pending, decoder))
    bar.close()
    loop_s = time.perf_counter() - t0 - calib_s  # the pipeline, actor start-up included
    return run.report(
        loop_s,
        engine="ray",
        actors=params.actors,
        calibration_s=calib_s,
        setup_s=calib_s,  # the auto calibration task (excluded from img_per_s)
        first_batch_s=None if first is None else first - t0 - calib_s,  # actor start-up + the first batch
        decode_busy_s=busy[0],  # summed over the decode tasks (fused into the actors when both ask the same resources)
        encode_busy_s=busy[1],  # summed over the actors
    )


def _pipeline(
    pending: list[tuple[str, str]], shipped: Any, preprocess: Any, used: str, probe: np.ndarray, r: EmbedRayParams,
    device: tuple[bool, int], resources: dict[str, Any],
) -> Any:
    import ray.data
    from ray.data import ActorPoolStrategy

    from pipelines.logs import quiet_ray_loggers

    quiet_ray_loggers()  # Ray Data's logger, set up on import, writes to the terminal itself
    rows = [{"image_id": i, "path": p} for i, p in pending]
    blocks = max(1, min(len(rows), math.ceil(len(rows) / r.batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        decode_batch,
        batch_size=r.batch_size,
        num_cpus=r.decode_cpus,
        fn_kwargs={"preprocess": preprocess, "shape": probe.shape, "dtype": probe.dtype.str},
        udf_modifying_row_count=False,
    )
    return ds.map_batches(
        ClipActor,
        batch_size=r.batch_size,
        compute=ActorPoolStrategy(size=r.actors),
        fn_constructor_args=([shipped], used, *device),  # the actor fetches the model itself
        udf_modifying_row_count=False,
        **resources,
    )


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data settings for one run: rows in input order (so chunks hold the same images as
    the local engine's), and this module's progress bar instead of Ray Data's."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def _first_decodable(pending: list[tuple[str, str]], decoder: ImageDecoder, n: int) -> list[Any]:
    out = []
    for _, path in pending:
        try:
            out.append(decoder.load(path))
        except Exception:  # noqa: BLE001 - the pipeline reports it
            continue
        if len(out) == n:
            break
    return out


def _failures(pending: list[tuple[str, str]], decoder: ImageDecoder) -> list[dict[str, str]]:
    out = []
    for image_id, path in pending:
        try:
            decoder.load(path)
        except Exception as exc:  # noqa: BLE001
            out.append({"image_id": image_id, "path": path, "error": f"{type(exc).__name__}: {exc}"})
    return out
