"""One precision policy and the GPU speed options of every training loop.

``precision`` (a params key such as ``pretrain.image.precision``):
- ``auto``: CUDA -> autocast bf16 where the GPU has it, else autocast fp16 with a ``GradScaler``;
  CPU -> fp32 (bf16 only when asked: on AVX2-only CPUs a bf16 matmul is ~100x slower);
- ``bf16`` / ``fp16``: autocast in that dtype (fp16 with a ``GradScaler``); refused where the device
  cannot run it (bf16 on a GPU without it, or on a CPU without native bf16 matmul);
- ``fp32``: no autocast. On CUDA, what stays fp32 uses TF32 matmuls and convolutions.

The choice is a pure function of the params and the device's features (``pipelines.hardware``),
never of a timing, and is recorded in every checkpoint.

Speed options (``Speed``): channels_last memory format, fused AdamW (CUDA), ``torch.compile``
(opt-in), pinned memory with non-blocking copies.
An option the device cannot honour fails before training starts, naming the params key.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass

import torch

from pipelines.hardware import cpu_native_bf16, cuda_bf16
from pipelines.images import to_device as images_to_device
from pipelines.io import DataError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """What a loop runs in: the autocast dtype (None: fp32) and whether a GradScaler is needed."""

    name: str  # "fp32" | "bf16" | "fp16": what ran (recorded in checkpoints)
    dtype: torch.dtype | None

    @property
    def scaled(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self, device: torch.device):
        """The forward pass's context: autocast in ``dtype`` on ``device``, or nothing under fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A dynamic loss scaler, enabled for fp16 only (a disabled one passes everything through)."""
        return torch.amp.GradScaler(device.type, enabled=self.scaled)


FP32 = Precision("fp32", None)


def resolve_precision(precision: str, device: torch.device | str, *, key: str) -> Precision:
    """The precision ``precision`` (the value of params key ``key``) means on ``device``.

    A value the device cannot run is a ``DataError`` naming ``key`` and what to set instead.
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise DataError(f"params.yaml: {key} = {precision!r}; use one of {', '.join(PRECISIONS)}.")
    cuda = device.type == "cuda"
    if precision == "fp32" or (precision == "auto" and not cuda):
        return FP32
    if precision == "auto":
        return Precision("bf16", torch.bfloat16) if cuda_bf16(device) else Precision("fp16", torch.float16)
    if precision == "bf16":
        if cuda and not cuda_bf16(device):
            raise DataError(f"params.yaml: {key} = bf16, but this GPU has no bf16 (compute capability < 8.0); "
                            f"set {key}: fp16 (or auto).")
        if not cuda and not cpu_native_bf16():
            raise DataError(f"params.yaml: {key} = bf16, but this CPU has no native bf16 matmul (no AVX512-BF16 / AMX); "
                            f"set {key}: fp32 (or auto).")
        return Precision("bf16", torch.bfloat16)
    return Precision("fp16", torch.float16)


def enable_tf32(device: torch.device) -> None:
    """TF32 for what stays fp32 on CUDA (matmuls and cuDNN convolutions); nothing on CPU."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


@dataclass(frozen=True)
class Speed:
    """The speed options a loop honours (validated by ``check_speed``)."""

    channels_last: bool = True  # CUDA only (NHWC convolutions); CPU runs keep their layout and numerics
    fused_optimizer: bool = True  # fused AdamW on CUDA; ignored on CPU (no fused CPU kernel pays)
    compile: bool = False


def speed_of(block) -> Speed:
    """The speed options of a params block (``pretrain.image``, ``model``: the dataclasses of
    ``pipelines.config``); an option the block does not have keeps its default."""
    return Speed(channels_last=getattr(block, "channels_last", True), fused_optimizer=getattr(block, "fused_optimizer", True),
                 compile=getattr(block, "compile", False))


def check_speed(speed: Speed, device: torch.device | str, *, key: str) -> None:
    """Refuse, before training starts, an option that ``device`` cannot honour (``key``: the params block)."""
    device = torch.device(device)
    if speed.compile:
        problem = compile_problem(device)
        if problem:
            raise DataError(f"params.yaml: {key}.compile is true, but {problem}; set {key}.compile: false.")


def compile_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run here (None when it can): it needs a C compiler on CPU and Triton on CUDA."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (torch.compile's GPU backend)"
        return None
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        return "no C compiler (cc / gcc / clang) is on PATH (torch.compile's CPU backend)"
    return None


def use_fused(speed: Speed, device: torch.device | str) -> bool:
    """Whether an optimizer on ``device`` takes the fused CUDA kernel: asked for, and on a GPU."""
    return speed.fused_optimizer and torch.device(device).type == "cuda"


def optimizer(groups, *, lr: float, weight_decay: float, device: torch.device, speed: Speed) -> torch.optim.Optimizer:
    """AdamW over ``groups``: the fused CUDA kernel when the parameters are on a GPU and ``speed`` asks for it."""
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **({"fused": True} if use_fused(speed, device) else {}))


def prepare_module(model: torch.nn.Module, device: torch.device, speed: Speed) -> torch.nn.Module:
    """``model`` on ``device``, channels_last on CUDA when ``speed`` asks for it."""
    model = model.to(device)
    if speed.channels_last and torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(model: torch.nn.Module, speed: Speed) -> tuple[torch.nn.Module, float]:
    """``torch.compile(model)`` when asked (else ``model``), and the seconds the wrapper took.

    The compile itself happens on the first forward pass; loops report that step's time as
    ``compile_s`` (``first_step_seconds``)."""
    if not speed.compile:
        return model, 0.0
    t = time.perf_counter()
    return torch.compile(model), time.perf_counter() - t


def to_device(x: torch.Tensor, device: torch.device, speed: Speed) -> torch.Tensor:
    """A batch on ``device`` (``pipelines.images.to_device``: non-blocking from pinned memory), channels_last
    for 4-D images on CUDA when ``speed`` asks for it (as ``prepare_module`` lays out the model)."""
    x = images_to_device(x, device)
    if speed.channels_last and device.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
