"""Tests for pipelines.embed: model loading, the resumable image cache, fast paths, texts.

All on the tiny open_clip config in tests/assets (64-px images, 64-d embeddings), offline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.embed.cache import read_image_embeddings, read_text_embeddings, write_text_embeddings
from pipelines.embed.clip import load_clip
from pipelines.embed.encode import embed_images, embed_texts
from pipelines.embed import clip as clip_mod
from pipelines.embed.cache import file_sha256, list_parts
from pipelines.embed.encode import (
    BUILDERS,
    FastVisionTower,
    ImageDecoder,
    PatchEmbedLinear,
    choose_precision,
    decode_workers,
    micro_batched,
    resolve_device,
    resolve_precision,
)
from pipelines.hardware import cpu_native_bf16
from pipelines.io import DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests/assets/iaa-tiny-clip.json")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub access: offline mode, an empty HF cache, and restore the live constant after."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return load_clip(TINY, "none")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, bundle) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(bundle.model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """24 small JPEG/PNG crops of real photographs (skimage samples), some grayscale."""
    import skimage.data

    sources = [getattr(skimage.data, name)() for name in ("astronaut", "coffee", "camera", "chelsea")]
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    items = []
    for i in range(24):
        src = sources[i % len(sources)]
        h, w = int(rng.integers(70, 140)), int(rng.integers(70, 140))
        y, x = int(rng.integers(0, src.shape[0] - h)), int(rng.integers(0, src.shape[1] - w))
        img = Image.fromarray(src[y : y + h, x : x + w])
        path = folder / (f"p{i:02d}.png" if i % 7 == 3 else f"p{i:02d}.jpg")
        img.save(path)
        items.append((f"p{i:02d}", str(path)))
    return items


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, photos) -> list[tuple[str, str]]:
    folder = tmp_path_factory.mktemp("bad")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(Path(photos[0][1]).read_bytes()[:300])
    text = folder / "notes.jpg"
    text.write_text("not an image")
    missing = folder / "missing.jpg"
    return [("missing", str(missing)), ("truncated", str(truncated)), ("text", str(text))]


def naive_embeddings(bundle, items) -> np.ndarray:
    """The reference: preprocess + encode_image one image at a time, fp32."""
    rows = []
    with torch.inference_mode():
        for _, path in items:
            x = bundle.preprocess(Image.open(path).convert("RGB"))[None]
            rows.append(F.normalize(bundle.model.encode_image(x), dim=-1)[0])
    return torch.stack(rows).numpy()


def by_id(out_dir: Path) -> dict[str, np.ndarray]:
    ids, emb = read_image_embeddings(out_dir)
    return dict(zip(ids, emb))


# --------------------------------------------------------------------------- load_clip


def test_tiny_config_random(bundle) -> None:
    assert bundle.name == "iaa-tiny-clip"
    assert (bundle.weights, bundle.random_weights, bundle.embed_dim) == ("random", True, 64)
    assert not bundle.model.training
    assert not any(p.requires_grad for p in bundle.model.parameters())
    assert bundle.tokenizer(["a photo"]).shape == (1, 32)


def test_checkpoint_roundtrip(bundle, checkpoint: Path) -> None:
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = load_clip(TINY, str(checkpoint))
    assert loaded.weights == f"checkpoint:{checkpoint}"
    assert loaded.random_weights is False
    assert loaded.weights_sha256 and len(loaded.weights_sha256) == 64
    x = torch.randn(3, 3, 64, 64)
    tokens = bundle.tokenizer(["a cat", "blue sky"])
    with torch.inference_mode():
        assert torch.equal(loaded.model.encode_image(x), bundle.model.encode_image(x))
        assert torch.equal(loaded.model.encode_text(tokens), bundle.model.encode_text(tokens))


def test_bad_checkpoint_and_names(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(DataError, match="garbage.pt"):
        load_clip(TINY, str(garbage))
    with pytest.raises(DataError, match="does not exist"):
        load_clip(TINY, str(tmp_path / "nope.pt"))
    with pytest.warns(RuntimeWarning, match="RANDOM WEIGHTS"):
        fallback = load_clip(TINY, str(tmp_path / "nope.pt"), allow_random_fallback=True)
    assert fallback.random_weights and fallback.weights == "random"
    with pytest.raises(DataError, match="Known tags"):
        load_clip("ViT-B-32", "no_such_tag")
    with pytest.raises(DataError, match="unknown open_clip model"):
        load_clip("ViT-Nope-99", "none")
    with pytest.raises(DataError, match="not found"):
        load_clip(str(tmp_path / "missing.json"), "none")


def test_hub_tag_offline_is_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "laion2b_s34b_b79k" in message and "ViT-B-32" in message
    assert "allow_random_fallback" in message and "checkpoint" in message

    start = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="RANDOM WEIGHTS"):
        fallback = load_clip(TINY, "hf-hub:nobody/no-such-clip", allow_random_fallback=True)
    assert time.perf_counter() - start < 5
    assert fallback.random_weights and fallback.weights == "random" and fallback.embed_dim == 64


def test_reachability_probe_is_bounded() -> None:
    with socket.socket() as s:  # a local port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    assert not clip_mod._reachable("127.0.0.1", port)
    assert not clip_mod._reachable("hub.invalid")
    assert time.perf_counter() - start < 6


# --------------------------------------------------------------------------- image cache


def test_decoder_matches_preprocess(bundle, photos) -> None:
    decoder = ImageDecoder(bundle.preprocess)
    assert decoder.pil_stage is not None  # the fast split applies to open_clip's transform
    paths = [p for _, p in photos[:8]]
    fast = decoder.collate([decoder.load(p) for p in paths])
    slow = torch.stack([bundle.preprocess(Image.open(p).convert("RGB")) for p in paths])
    assert torch.equal(fast, slow)


def test_embed_images_skips_bad_files(bundle, photos, bad_files, tmp_path: Path) -> None:
    items = photos[:10] + bad_files + photos[10:]
    kw = dict(batch_size=5, num_workers=2, chunk_rows=8, precision="fp32", progress=False)
    report = embed_images(bundle, items, tmp_path, **kw)
    assert report["n_total"] == len(items) and report["n_embedded_now"] == len(photos)
    assert report["n_skipped"] == 3 and report["n_resumed"] == 0
    assert {s["image_id"] for s in report["skipped"]} == {"missing", "truncated", "text"}
    assert all(s["error"] and s["path"] for s in report["skipped"])
    assert report["precision"] == "fp32" and report["img_per_s"] > 0

    parts = sorted(tmp_path.glob("part-*.parquet"))
    assert [p.name[:10] for p in parts] == ["part-00000", "part-00001", "part-00002"]
    for part in parts:  # each name carries the checksum of the chunk's bytes
        assert part.name == f"{part.name[:10]}-{file_sha256(part)[:16]}.parquet"
    schema = pq.read_schema(parts[0])
    assert schema.field("image_id").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert schema.field("file_sha256").type == pa.string()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["fingerprint"]["precision"] == "fp32" and meta["fingerprint"]["embed_dim"] == 64

    ids, emb = read_image_embeddings(tmp_path)
    assert ids == [i for i, _ in photos] and emb.dtype == np.float32 and emb.shape == (24, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(emb, naive_embeddings(bundle, photos), atol=1e-5)


def test_fast_paths_match_fp32(bundle, photos) -> None:
    decoder = ImageDecoder(bundle.preprocess)
    x = decoder.collate([decoder.load(p) for _, p in photos])
    with torch.inference_mode():
        ref = BUILDERS["fp32"](bundle)(x)
        for name in ("int8", "bf16"):
            out = BUILDERS[name](bundle)(x)
            assert out.shape == ref.shape and out.dtype == torch.float32
            cos = F.cosine_similarity(out, ref, dim=-1)
            assert cos.min() >= 0.999, (name, float(cos.min()))
            assert not torch.equal(out, ref)  # it really is a different numeric path


def test_precision_is_a_function_of_the_device_only() -> None:
    # auto: bf16 where the device has it natively, else fp32; int8 only when asked for
    assert choose_precision("auto", "cuda", bf16=True) == "bf16"
    assert choose_precision("auto", "cuda", bf16=False) == "fp32"
    assert choose_precision("auto", "cpu", bf16=True) == "bf16"
    assert choose_precision("auto", "cpu", bf16=False) == "fp32"
    assert choose_precision("int8", "cpu", bf16=False) == "int8"
    assert choose_precision("fp32", "cuda", bf16=False) == "fp32"
    with pytest.raises(DataError, match=r"embed\.precision = 'int8' cannot run on this cuda device.*supports fp32, bf16"):
        choose_precision("int8", "cuda", bf16=True)
    with pytest.raises(DataError, match=r"embed\.precision = 'bf16' cannot run on this cuda.*supports fp32 \(auto picks fp32"):
        choose_precision("bf16", "cuda", bf16=False)
    with pytest.raises(DataError, match=r"'bf16' cannot run on this cpu device: this CPU has no native bf16.*fp32, int8"):
        choose_precision("bf16", "cpu", bf16=False)
    with pytest.raises(DataError, match=r"embed\.precision = 'fp8' is not one of"):
        choose_precision("fp8", "cpu", bf16=True)
    # this machine: read from its CPU flags, the same answer every call (no timing)
    want = "bf16" if cpu_native_bf16() else "fp32"
    assert {resolve_precision("auto", "cpu") for _ in range(3)} == {want}
    import pipelines.embed.encode as enc

    assert not hasattr(enc, "calibrate") and "perf_counter" not in Path(enc.__file__).read_text().split("def resolve_precision")[1].split("def check_decode")[0]


def test_devices_and_decode_workers() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DataError, match=r"embed\.device = 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match=r"embed\.device = 'cuda', but this machine has 0 CUDA device"):
            resolve_device("cuda")
    assert decode_workers("auto", "cpu", cpus=16) == 2 and decode_workers("auto", "cpu", cpus=1) == 1
    assert decode_workers("auto", "cuda", cpus=16) == 15 and decode_workers("auto", "cuda", cpus=64) == 16
    assert decode_workers(3, "cuda") == 3
    with pytest.raises(DataError, match=r"embed\.num_workers = -1"):
        decode_workers(-1, "cpu")


def test_an_unrunnable_precision_fails_before_any_image_is_read(bundle, photos, tmp_path: Path, monkeypatch) -> None:
    import pipelines.embed.encode as enc

    monkeypatch.setattr(enc, "device_bf16", lambda device: False)  # a CPU without native bf16
    opened = []
    monkeypatch.setattr(enc, "file_hashes", lambda *a, **k: opened.append(1) or {})
    with pytest.raises(DataError, match=r"embed\.precision = 'bf16' cannot run .* supports fp32, int8"):
        embed_images(bundle, photos, tmp_path / "c", precision="bf16", progress=False)
    assert not opened and not (tmp_path / "c").exists()  # no file hashed, no cache opened


def test_patch_embed_linear_lives_on_the_convs_device_and_dtype() -> None:
    conv = torch.nn.Conv2d(3, 8, 4, stride=4, bias=True).to(torch.bfloat16)
    lin = PatchEmbedLinear(conv)
    assert lin.linear.weight.dtype == torch.bfloat16 and lin.linear.weight.device == conv.weight.device
    if torch.cuda.is_available():
        conv = torch.nn.Conv2d(3, 8, 4, stride=4).cuda()
        assert PatchEmbedLinear(conv).linear.weight.is_cuda


def test_path_change_re_embeds_the_cache(bundle, photos, tmp_path: Path) -> None:
    kw = dict(batch_size=6, chunk_rows=6, progress=False)
    first = embed_images(bundle, photos[:12], tmp_path, precision="fp32", **kw)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["precision_used"] == "fp32" and meta["device"] == "cpu" and meta["decode"] == "cpu"
    assert meta["fingerprint"]["precision"] == "fp32" and first["precision_requested"] == "fp32"
    again = embed_images(bundle, photos[:12], tmp_path, precision="fp32", **kw)
    assert again["n_resumed"] == 12 and again["n_embedded_now"] == 0
    other = embed_images(bundle, photos[:12], tmp_path, precision="int8", **kw)  # another path: a new cache
    assert other["cache_wiped"] and other["n_resumed"] == 0 and other["n_embedded_now"] == 12
    assert json.loads((tmp_path / "meta.json").read_text())["precision_used"] == "int8"
    gpu_decoded = embed_images(bundle, photos[:12], tmp_path, precision="int8", decode="gpu", **kw)
    assert gpu_decoded["cache_wiped"] and gpu_decoded["decode"] == "gpu"


def test_fast_tower_is_the_same_vit(bundle) -> None:
    visual = bundle.model.visual
    fast = FastVisionTower.build(visual)
    assert fast is not None  # the tiny config is a plain class-token ViT
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in fast.modules())
    x = torch.randn(5, 3, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(fast(x).numpy(), visual(x).numpy(), atol=1e-5)
        slices = micro_batched(bundle, visual)(x.repeat(40, 1, 1, 1))  # > one slice of tokens
        ref = F.normalize(visual(x), dim=-1)
        np.testing.assert_allclose(slices[:5].numpy(), ref.numpy(), atol=1e-5)
    assert visual.conv1.__class__ is torch.nn.Conv2d  # the bundle's own model is untouched


def test_auto_precision_recorded_and_kept_on_resume(bundle, photos, tmp_path: Path) -> None:
    first = embed_images(bundle, photos[:12], tmp_path, batch_size=6, chunk_rows=6, progress=False)
    assert first["precision_requested"] == "auto" and first["precision"] == resolve_precision("auto", "cpu")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["precision_used"] == first["precision"] == meta["fingerprint"]["precision"]
    again = embed_images(bundle, photos, tmp_path, batch_size=6, chunk_rows=6, progress=False)
    assert again["n_resumed"] == 12 and again["n_embedded_now"] == 12
    assert again["precision"] == first["precision"] and not again["cache_wiped"]
    got = by_id(tmp_path)
    ref = naive_embeddings(bundle, photos)
    cos = np.array([got[i] @ ref[k] for k, (i, _) in enumerate(photos)])
    assert cos.min() >= 0.999


def test_gpu_decode_path_on_the_cpu_matches_pil(bundle, photos, bad_files, tmp_path: Path) -> None:
    """decode="gpu" with a CPU model: the batched torchvision decode + resize on the CPU (the CUDA
    code path minus nvjpeg), PNGs through the PIL fallback, bad files skipped and reported."""
    from pipelines.images import decode_batch, decode_images, read_bytes

    paths = [p for _, p in photos[:8]] + [bad_files[1][1], bad_files[2][1]]
    datas = [read_bytes(p) for p in paths]
    images, errors = decode_images(datas, "cpu")
    for path, im in zip(paths[:8], images[:8]):  # libjpeg-turbo on the CPU: PIL's pixels exactly
        assert torch.equal(im, torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
    assert images[8] is None and images[9] is None and errors[8] and errors[9] and errors[0] is None
    x, ok, msgs = decode_batch(paths + [bad_files[0][1]], 64, (64, 64))
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.uint8 and ok == list(range(8))
    assert msgs[:8] == [""] * 8 and all(msgs[8:]) and "FileNotFoundError" in msgs[10]
    decoder = ImageDecoder(bundle.preprocess)
    assert decoder.device_plan() == (64, (64, 64), "bicubic")
    pil = decoder.collate([decoder.load(p) for p in paths[:8]])
    assert (decoder.normalise_uint8(x) - pil).abs().max() < 0.02  # resize rounding: one grey level at most

    items = photos[:10] + bad_files
    kw = dict(batch_size=5, chunk_rows=8, precision="fp32", progress=False)
    rep = embed_images(bundle, items, tmp_path / "gpu", decode="gpu", **kw)
    assert rep["decode"] == "gpu" and rep["n_embedded_now"] == 10 and rep["n_skipped"] == 3
    assert {s["image_id"] for s in rep["skipped"]} == {"missing", "truncated", "text"}
    ref = embed_images(bundle, items, tmp_path / "cpu", **kw)
    a, b = by_id(tmp_path / "gpu"), by_id(tmp_path / "cpu")
    assert min(float(a[i] @ b[i]) for i in b) >= 0.999
    with pytest.raises(DataError, match=r"embed\.decode = 'nvjpeg' is not one of"):
        embed_images(bundle, items, tmp_path / "x", decode="nvjpeg", **kw)
    assert ref["decode"] == "cpu"


def test_fingerprint_change_wipes_and_manifest_shrink(bundle, photos, tmp_path: Path) -> None:
    kw = dict(batch_size=4, chunk_rows=4, precision="fp32", progress=False)
    embed_images(bundle, photos, tmp_path, fingerprint={"data": 1}, **kw)
    (tmp_path / ".part-00009.parquet.x1.tmp").write_bytes(b"half-written")  # a killed write
    report = embed_images(bundle, photos[:10], tmp_path, fingerprint={"data": 1}, **kw)
    assert (report["n_resumed"], report["n_embedded_now"], report["cache_wiped"]) == (10, 0, False)
    assert sorted(by_id(tmp_path)) == [i for i, _ in photos[:10]]  # rows of dropped ids removed
    assert not list(tmp_path.glob(".*.tmp"))
    report = embed_images(bundle, photos[:10], tmp_path, fingerprint={"data": 2}, **kw)
    assert (report["n_resumed"], report["n_embedded_now"], report["cache_wiped"]) == (0, 10, True)
    assert json.loads((tmp_path / "meta.json").read_text())["fingerprint"]["data"] == 2


def test_resume_after_sigkill(checkpoint: Path, photos, tmp_path: Path) -> None:
    """Kill a real embedding run right after its first chunk lands, rerun, compare."""
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    kw = dict(batch_size=3, num_workers=1, chunk_rows=3, precision="fp32", fingerprint={"run": "kill"})
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from pipelines.embed.clip import load_clip
        from pipelines.embed.encode import embed_images
        bundle = load_clip({TINY!r}, {str(checkpoint)!r})
        bundle.model.visual.register_forward_pre_hook(lambda *a: time.sleep(0.15))  # slow it down
        embed_images(bundle, {photos!r}, {str(killed_dir)!r}, progress=False, **{kw!r})
    """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 300  # a loaded machine starts Python slowly
        while not list(killed_dir.glob("part-00000-*.parquet")):
            assert proc.poll() is None, "embedding subprocess ended before writing a chunk"
            assert time.monotonic() < deadline, "no chunk within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done_before = len(by_id(killed_dir))
    assert 0 < done_before < len(photos)

    bundle = load_clip(TINY, str(checkpoint))
    report = embed_images(bundle, photos, killed_dir, progress=False, **kw)
    assert report["n_resumed"] == done_before
    assert report["n_resumed"] + report["n_embedded_now"] == len(photos)
    ids, emb = read_image_embeddings(killed_dir)
    assert sorted(ids) == sorted(i for i, _ in photos)  # every id exactly once
    embed_images(bundle, photos, clean_dir, progress=False, **kw)
    clean = by_id(clean_dir)
    np.testing.assert_allclose(emb, np.stack([clean[i] for i in ids]), atol=1e-5)


def test_missing_root_all_bad_and_duplicates(bundle, photos, bad_files, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        embed_images(bundle, [("a", str(tmp_path / "nowhere/a.jpg"))], tmp_path / "c1", progress=False)
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(DataError, match="none of the 3 images"):
        embed_images(bundle, bad_files, tmp_path / "c2", precision="fp32", progress=False)
    with pytest.raises(DataError, match="duplicate"):
        embed_images(bundle, photos[:2] + photos[:1], tmp_path / "c3", progress=False)
    with pytest.raises(DataError, match="precision"):
        embed_images(bundle, photos[:2], tmp_path / "c4", precision="fp8", progress=False)


def test_read_cache_errors(bundle, photos, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_image_embeddings(tmp_path / "absent")
    embed_images(bundle, photos[:4], tmp_path, chunk_rows=2, precision="fp32", progress=False)
    list_parts(tmp_path)[1].write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match="part-00001.*does not match its checksum"):
        read_image_embeddings(tmp_path)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json"):
        read_image_embeddings(tmp_path)


def test_corrupt_chunks_are_detected_and_recomputed(bundle, photos, tmp_path: Path) -> None:
    """A truncated chunk and one with a flipped byte (still valid Parquet) are refused by the
    reader and recomputed by the next embed run, which reuses every intact chunk."""
    kw = dict(batch_size=4, chunk_rows=4, precision="fp32", progress=False)
    embed_images(bundle, photos, tmp_path, **kw)
    before = by_id(tmp_path)
    parts = list_parts(tmp_path)
    truncated, flipped = parts[1], parts[4]
    truncated.write_bytes(truncated.read_bytes()[:-40])
    data = bytearray(flipped.read_bytes())
    table = pq.read_table(flipped)
    first = np.asarray(table.column("embedding").combine_chunks().flatten()[0].as_py(), np.float32).tobytes()
    at = bytes(data).index(first)  # a byte inside the first embedding value: the file still parses
    data[at] ^= 0x10
    flipped.write_bytes(bytes(data))
    assert pq.read_table(flipped).num_rows == 4  # Parquet alone does not notice
    with pytest.raises(DataError, match=f"{truncated.name}.*does not match its checksum"):
        read_image_embeddings(tmp_path)

    report = embed_images(bundle, photos, tmp_path, **kw)
    assert sorted(b["part"] for b in report["bad_chunks"]) == sorted([truncated.name, flipped.name])
    assert (report["n_resumed"], report["n_embedded_now"]) == (len(photos) - 8, 8)
    after = by_id(tmp_path)
    assert sorted(after) == sorted(before)
    for image_id, emb in after.items():
        np.testing.assert_allclose(emb, before[image_id], atol=1e-6)


def test_incremental_embeds_only_new_and_changed_images(bundle, photos, tmp_path: Path) -> None:
    """Add an image, replace one file's content, drop one id: only the new and the changed image
    are embedded, and every other row is reused byte for byte."""
    cache, fresh = tmp_path / "cache", tmp_path / "fresh"
    kw = dict(batch_size=4, chunk_rows=8, precision="fp32", progress=False)
    first = photos[:20]
    embed_images(bundle, first, cache, **kw)
    before = by_id(cache)

    changed = tmp_path / "changed.jpg"
    changed.write_bytes(Path(photos[22][1]).read_bytes())
    items = [(i, str(changed) if i == "p05" else p) for i, p in first if i != "p09"] + [photos[20]]
    report = embed_images(bundle, items, cache, **kw)
    assert (report["n_resumed"], report["n_embedded_now"]) == (18, 2)
    assert (report["n_changed"], report["n_removed"], report["cache_wiped"]) == (1, 1, False)
    after = by_id(cache)
    assert sorted(after) == sorted(i for i, _ in items)
    assert all(np.array_equal(after[i], before[i]) for i in after if i not in ("p05", "p20"))
    embed_images(bundle, items, fresh, **kw)  # the same as embedding everything from scratch
    for image_id, emb in by_id(fresh).items():
        np.testing.assert_allclose(after[image_id], emb, atol=1e-5)
    assert not np.allclose(after["p05"], before["p05"])

    again = embed_images(bundle, items, cache, **kw)  # nothing new: nothing embedded
    assert (again["n_resumed"], again["n_embedded_now"]) == (len(items), 0)


# --------------------------------------------------------------------------- texts


def test_embed_texts_matches_encode_text(bundle, tmp_path: Path) -> None:
    texts = ["sunset", "a portrait of an old man with a long grey beard!", "", "bokeh", "macro"] * 3
    emb = embed_texts(bundle, texts, batch_size=4)
    assert emb.shape == (len(texts), 64) and emb.dtype == np.float32
    with torch.inference_mode():
        ref = F.normalize(bundle.model.encode_text(bundle.tokenizer(texts)), dim=-1).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert embed_texts(bundle, []).shape == (0, 64)

    kinds = ["semantic"] * 10 + ["attribute"] * 5
    write_text_embeddings(tmp_path / "tags.parquet", texts, kinds, emb)
    tags, got_kinds, got = read_text_embeddings(tmp_path / "tags.parquet")
    assert tags == texts and got_kinds == kinds and np.array_equal(got, emb)
    with pytest.raises(DataError, match="not found"):
        read_text_embeddings(tmp_path / "missing.parquet")


def test_random_init_is_reproducible_from_seed_after_failed_hub_load(monkeypatch) -> None:
    """The registry rebuilds a random-init CLIP from its seed: the fallback path (which first
    builds a model for the failed hub load) must give the same weights as `pretrained: none`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(123)  # RNG state before the call must not matter
    fallback = load_clip(TINY, "hf-hub:nobody/no-such-clip", allow_random_fallback=True, seed=7)
    direct = load_clip(TINY, "none", seed=7)
    other = load_clip(TINY, "none", seed=8)
    a, b, c = (m.model.state_dict() for m in (fallback, direct, other))
    assert fallback.random_weights and direct.random_weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_dvc_repro_after_adding_an_image_embeds_only_that_image(dag_repo, tmp_path: Path) -> None:
    """In a copy of the tiny DAG: one more labelled photo, `dvc repro` of prepare and embed, and the
    embed stage (its cache a `persist` output, kept by DVC) embeds that photo alone."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(dag_repo.repo, repo, symlinks=True)
    before = by_id(repo / "data/embeddings/images")
    with Image.open(repo / "data/demo/images/img00000.jpg") as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(repo / "data/demo/images/img_added.jpg")
    with open(repo / "data/demo/labels.csv", "a", encoding="utf-8") as fh:
        fh.write("img_added,train,0,1,2,6,9,6,3,1,0,0\n")
    for stage in ("prepare", "embed"):
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "-s", stage], cwd=repo, env=dag_repo.env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert f"Running stage '{stage}'" in proc.stdout
    report = json.loads((repo / "data/embeddings/report.json").read_text())
    assert (report["n_embedded_now"], report["n_resumed"], report["cache_wiped"]) == (1, len(before), False)
    after = by_id(repo / "data/embeddings/images")
    assert sorted(after) == sorted([*before, "img_added"])
    assert all(np.array_equal(after[i], before[i]) for i in before)
