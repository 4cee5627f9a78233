"""The one precision policy and the speed options (pipelines.train.precision), CUDA branches included:
the device features they read are set here, so every choice is checked on any CPU."""

from __future__ import annotations

import pytest
import torch

import pipelines.hardware as hardware
import pipelines.train.precision as precision
from pipelines.io import DataError
from pipelines.train.precision import Speed, check_speed, maybe_compile, optimizer, prepare_module, resolve_precision

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture()
def gpu(monkeypatch):
    """Pretend the GPU has bf16 (``True``) or not (``False``); the CPU's flags likewise."""

    def set_(cuda_bf16: bool, cpu_bf16: bool = False):
        monkeypatch.setattr(precision, "cuda_bf16", lambda device: cuda_bf16 and torch.device(device).type == "cuda")
        monkeypatch.setattr(precision, "cpu_native_bf16", lambda: cpu_bf16)

    return set_


def test_auto_is_a_function_of_the_device(gpu):
    gpu(cuda_bf16=True)
    assert resolve_precision("auto", CUDA, key="k") == precision.Precision("bf16", torch.bfloat16)
    gpu(cuda_bf16=False)
    p = resolve_precision("auto", CUDA, key="k")
    assert p.name == "fp16" and p.scaled  # fp16 needs the loss scaler
    assert resolve_precision("auto", CPU, key="k").dtype is None  # CPU: fp32 unless asked
    gpu(cuda_bf16=True, cpu_bf16=True)
    assert resolve_precision("auto", CPU, key="k").dtype is None  # even with native bf16: only when asked
    assert resolve_precision("bf16", CPU, key="k").dtype == torch.bfloat16
    assert resolve_precision("fp32", CUDA, key="k").dtype is None


def test_a_precision_the_device_cannot_run_names_the_key_and_the_fix(gpu):
    gpu(cuda_bf16=False, cpu_bf16=False)
    with pytest.raises(DataError, match=r"pretrain\.image\.precision = bf16.*no bf16.*set pretrain\.image\.precision: fp16"):
        resolve_precision("bf16", CUDA, key="pretrain.image.precision")
    with pytest.raises(DataError, match=r"model\.amp\.dtype = bf16.*CPU has no native bf16.*fp32"):
        resolve_precision("bf16", CPU, key="model.amp.dtype")
    with pytest.raises(DataError, match=r"k = 'half'; use one of auto, fp32, bf16, fp16"):
        resolve_precision("half", CPU, key="k")


def test_cpu_bf16_is_read_from_the_cpu_flags_not_timed():
    assert hardware.cpu_native_bf16(frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert hardware.cpu_native_bf16(frozenset({"amx_bf16"}))
    assert not hardware.cpu_native_bf16(frozenset({"avx2", "fma"}))  # emulated bf16: ~100x slower than fp32


def test_fp16_scaler_skips_an_overflowed_step_and_backs_off():
    p = resolve_precision("fp16", CPU, key="k")
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = p.scaler(CPU)
    assert scaler.is_enabled()
    scale = scaler.get_scale()
    loss = (w * torch.tensor([1.0, float("inf"), 1.0])).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w.detach(), torch.ones(3)) and scaler.get_scale() < scale  # skipped, scale halved


def test_speed_options_the_device_cannot_honour_fail_before_training(monkeypatch):
    monkeypatch.setattr(precision.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match=r"model\.compile is true, but no C compiler.*set model\.compile: false"):
        check_speed(Speed(compile=True), CPU, key="model")
    check_speed(Speed(), CPU, key="model")  # the defaults run anywhere


def test_cpu_keeps_layout_and_the_unfused_optimizer():
    conv = torch.nn.Conv2d(3, 4, 3)
    m = prepare_module(conv, CPU, Speed(channels_last=True))
    assert m.weight.is_contiguous()  # channels_last is for CUDA: CPU numerics stay as they were
    opt = optimizer(m.parameters(), lr=1e-3, weight_decay=0.0, device=CPU, speed=Speed(fused_optimizer=True))
    assert not opt.defaults.get("fused")
    same, seconds = maybe_compile(m, Speed(compile=False))
    assert same is m and seconds == 0.0


@pytest.mark.slow
@pytest.mark.skipif(precision.compile_problem(CPU) is not None, reason="torch.compile cannot run on this machine")
def test_compile_flag_compiles_a_tiny_model_to_the_same_outputs():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    compiled, _ = maybe_compile(m, Speed(compile=True))
    x = torch.randn(4, 8)
    assert compiled is not m
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-6)


def _jpegs(tmp_path, n: int = 4) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):  # smooth gradients with noise: JPEG-friendly, not flat
        base = np.linspace(0, 200, 80)[None, :, None] + rng.normal(0, 10, (50 + 9 * i, 80, 3))
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path, quality=95)
        paths.append(str(path))
    return paths


def test_views_decoded_on_the_device_match_the_loaders_views(tmp_path):
    """decode: gpu builds the same views as the CPU loader: the same seeded crops and flips, pixels
    within about one grey level (libjpeg-turbo decodes as PIL does; the resize differs in rounding).
    Run here on the CPU device: the CUDA run differs only in where the decode and resize run."""
    from pipelines.images import TrainViews, device_views, read_bytes, view_batch

    paths = _jpegs(tmp_path)
    grey = 1 / 255 / 0.225  # one grey level after normalisation
    for seed in ([0, 1, 2], [3, 4, 5], None):
        a = view_batch(paths, 24, 32, seed=seed)
        b = device_views([read_bytes(p) for p in paths], 24, 32, seed=seed)
        assert a.shape == b.shape == (4, 3, 24, 24)
        assert (a - b).abs().max() <= 1.5 * grey and (a - b).abs().mean() < 0.1 * grey
    cpu, gpu = TrainViews(paths, 24, 32, decode="cpu"), TrainViews(paths, 24, 32, decode="gpu")
    spec = ([3, 1], [7, 0, 2])
    raw = gpu.load(spec)  # what a loader worker hands over: the files' bytes
    assert isinstance(raw, list) and all(r.dtype == torch.uint8 for r in raw)
    got, want = gpu.finish(raw, spec, CPU), cpu.finish(cpu.load(spec), spec, CPU)
    assert (got - want).abs().max() <= 1.5 * grey


def test_gpu_decode_without_a_gpu_names_the_key():
    from pipelines.images import check_decode

    with pytest.raises(DataError, match=r"pretrain\.image\.decode is gpu, but training runs on the CPU; set pretrain\.image\.decode: cpu"):
        check_decode("gpu", CPU, key="pretrain.image.decode")
    with pytest.raises(DataError, match=r"pretrain\.image\.decode = 'nvjpeg'; use one of cpu, gpu"):
        check_decode("nvjpeg", CUDA, key="pretrain.image.decode")
    check_decode("gpu", CUDA, key="pretrain.image.decode")
    check_decode("cpu", CPU, key="pretrain.image.decode")


def test_fused_optimizers_are_for_cuda_and_reach_the_family_optimizer():
    from pipelines.models import make_optimizer
    from pipelines.train.precision import use_fused

    assert use_fused(Speed(fused_optimizer=True), CUDA) and not use_fused(Speed(fused_optimizer=True), CPU)
    assert not use_fused(Speed(fused_optimizer=False), CUDA)
    w = [torch.nn.Parameter(torch.zeros(2))]
    for name in ("adam", "sgd"):
        assert make_optimizer(w, name, 1e-3, fused=True).defaults["fused"]
        assert not make_optimizer(w, name, 1e-3).defaults.get("fused")
