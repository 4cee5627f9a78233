"""The embed stage's Ray Data engine: 2 local CPU actors write the cache the local engine writes.

One local Ray for the module (4 logical CPUs: 2 actors + a decode task); a dozen demo images
(64 px) and the tiny open_clip config in tests/assets, random weights, offline.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import EmbedRayParams, params_from_dict
from pipelines.data.demo import generate_demo
from pipelines.embed.cache import read_image_embeddings
from pipelines.embed.clip import load_clip
from pipelines.embed.encode import embed_images
from pipelines.embed.cache import list_parts, read_meta
from pipelines.embed.ray_engine import check_ray_params, embed_images_ray
from pipelines.io import DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests/assets/iaa-tiny-clip.json")
TWO = EmbedRayParams(actors=2, batch_size=3)  # 2 CPU actors, several batches each


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle():
    return load_clip(TINY, "none", seed=0)


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """12 demo images and one file that is not an image (listed mid-manifest)."""
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, n_images=12, image_size=64, progress=False)
    found = sorted((p.stem, str(p)) for p in (out / "images").glob("*.jpg"))
    bad = out / "images" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    return found[:6] + [("broken", str(bad))] + found[6:]


def chunks(cache: Path) -> list[list[str]]:
    """The image ids of each chunk, in chunk order."""
    import pyarrow.parquet as pq

    return [pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist() for p in list_parts(cache)]


def test_ray_engine_writes_the_local_engines_cache(ray_local, bundle, items, tmp_path: Path) -> None:
    local, ray_dir = tmp_path / "local", tmp_path / "ray"
    ref = embed_images(bundle, items, local, batch_size=4, chunk_rows=5, precision="fp32", progress=False)
    rep = embed_images_ray(bundle, items, ray_dir, TWO, chunk_rows=5, precision="fp32", progress=False)
    assert rep["engine"] == "ray" and rep["n_embedded_now"] == ref["n_embedded_now"] == 12
    assert [s["image_id"] for s in rep["skipped"]] == [s["image_id"] for s in ref["skipped"]] == ["broken"]
    assert read_meta(ray_dir)["fingerprint"] == read_meta(local)["fingerprint"]
    assert read_meta(ray_dir)["precision_used"] == "fp32"
    assert chunks(ray_dir) == chunks(local)  # same images per chunk, in manifest order
    ids_l, emb_l = read_image_embeddings(local)
    ids_r, emb_r = read_image_embeddings(ray_dir)
    assert ids_r == ids_l
    np.testing.assert_allclose(emb_r, emb_l, rtol=0, atol=1e-5)
    assert not np.allclose(emb_r[0], emb_r[1])  # distinct images, distinct embeddings
    # the local engine resumes the Ray engine's cache: nothing left to embed
    again = embed_images(bundle, items, ray_dir, batch_size=4, chunk_rows=5, precision="fp32", progress=False)
    assert again["n_embedded_now"] == 0 and again["n_resumed"] == 12 and not again["cache_wiped"]


def test_ray_engine_embeds_only_what_a_partial_cache_lacks(ray_local, bundle, items, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # a run stopped after 5 images: the local engine, precision auto (the path it picked is recorded)
    first = embed_images(bundle, items[:5], cache, batch_size=4, chunk_rows=2, precision="auto", progress=False)
    used = first["precision"]
    kept = {p.name: p.stat().st_mtime_ns for p in list_parts(cache)}
    damaged = list_parts(cache)[1]  # a chunk truncated on disk: its 2 images are redone
    damaged.write_bytes(damaged.read_bytes()[:-7])
    del kept[damaged.name]
    rep = embed_images_ray(bundle, items, cache, TWO, chunk_rows=2, precision="auto", progress=False)
    assert rep["n_resumed"] == 3 and rep["n_embedded_now"] == 12 - 3 and rep["n_skipped"] == 1
    assert [b["part"] for b in rep["bad_chunks"]] == [damaged.name]
    assert rep["precision"] == used and rep["device"] == "cpu" and not rep["cache_wiped"]  # the same path: resumed
    after = {p.name: p.stat().st_mtime_ns for p in list_parts(cache)}
    assert all(after.get(name) == mtime for name, mtime in kept.items())  # valid chunks untouched
    # the same embeddings as one local run over all images on that path
    full = tmp_path / "full"
    embed_images(bundle, items, full, batch_size=4, chunk_rows=2, precision=used, progress=False)
    ids_f, emb_f = read_image_embeddings(full)
    ids_c, emb_c = read_image_embeddings(cache)
    order = np.argsort(ids_c)
    assert sorted(ids_c) == sorted(ids_f)
    cos = (emb_c[order] * emb_f[np.argsort(ids_f)]).sum(1)
    assert cos.min() > (1 - 1e-6 if used == "fp32" else 0.999)  # int8 quantises per batch


def test_a_ray_run_stopped_midway_leaves_whole_chunks(ray_local, bundle, items, tmp_path: Path, monkeypatch) -> None:
    from pipelines.embed.encode import CacheRun

    cache, add, calls = tmp_path / "cache", CacheRun.add, []

    def crash_on_second_batch(self, ids, emb):  # the stage process dies while batches stream in
        add(self, ids, emb)
        calls.append(len(ids))
        if len(calls) == 2:
            raise RuntimeError("stopped")

    monkeypatch.setattr(CacheRun, "add", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="stopped"):
        embed_images_ray(bundle, items, cache, TWO, chunk_rows=2, precision="fp32", progress=False)
    monkeypatch.undo()
    done = sum(calls) // 2 * 2  # rows in whole chunks; the rest was only buffered
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp" or p.name.startswith(".")]
    assert len(read_image_embeddings(cache)[0]) == done > 0  # every chunk on disk is whole and valid
    rep = embed_images(bundle, items, cache, batch_size=4, chunk_rows=2, precision="fp32", progress=False)
    assert rep["n_resumed"] == done and rep["n_embedded_now"] == 12 - done and not rep["bad_chunks"]


def test_bad_ray_params_name_the_key(bundle, items, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"embed\.ray\.actors = 0 .*embed\.ray\.gpus_per_actor = -1"):
        check_ray_params(EmbedRayParams(actors=0, gpus_per_actor=-1))
    with pytest.raises(DataError, match=r"embed\.ray\.batch_size = 0"):
        embed_images_ray(bundle, items, tmp_path / "c", EmbedRayParams(batch_size=0), progress=False)
    assert not (tmp_path / "c").exists()  # refused before the cache is touched
    with pytest.raises(DataError, match=r"unknown param 'embed\.ray\.actor'"):
        params_from_dict({"embed": {"engine": "ray", "ray": {"actor": 2}}})
    with pytest.raises(DataError, match=r"'embed\.ray\.gpus_per_actor' must be a number"):
        params_from_dict({"embed": {"ray": {"gpus_per_actor": True}}})
    assert params_from_dict({"embed": {"ray": {"gpus_per_actor": 1}}}).embed.ray.gpus_per_actor == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_actors_on_a_cluster_without_gpus_fail_fast(ray_local, bundle, items, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        embed_images_ray(bundle, items, tmp_path / "c", EmbedRayParams(actors=2, gpus_per_actor=1), progress=False)
    msg = str(err.value)
    assert "embed.ray.gpus_per_actor = 1 with embed.ray.actors = 2 asks for 2 GPU(s)" in msg
    assert "has 0 GPU(s)" in msg and "-S embed.ray.gpus_per_actor=0" in msg
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "c").exists()  # refused before the files are hashed and the cache opened
