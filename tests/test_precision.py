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
