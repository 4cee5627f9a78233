"""What a device can run, read from its features, never from a stopwatch.

Precision choices depend only on what these functions return, so a stage's result is a function
of its inputs and of the device's *kind*, not of the machine's load at the moment. A choice that
depends on them is recorded (cache metadata, checkpoints, reports) so that a different path is a
different, visible result.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# CPU flags (Linux /proc/cpuinfo names) that give native bf16 matrix products.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16). Without it a bf16
    matmul is emulated and runs about 100x slower than fp32 (AVX2-only machines)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_CPU_FLAGS)


def cuda_bf16(device: torch.device | str) -> bool:
    """True when ``device`` is a CUDA GPU with bf16 support (compute capability 8.0 or newer)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def device_bf16(device: torch.device | str) -> bool:
    """True when ``device`` runs bf16 natively (a CUDA GPU with it, or a CPU with native bf16 matmul)."""
    device = torch.device(device)
    return cuda_bf16(device) if device.type == "cuda" else cpu_native_bf16()


def bf16_matmul_speedup(n: int = 128, k: int = 512, reps: int = 3) -> float:
    """fp32 time / bf16 time of an n x k @ k x k matmul (best of ``reps``); > 1: bf16 faster.

    For benchmarks and reports only: no library path is chosen by it (a timing depends on load).
    """
    import time

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, k, dtype=dtype)
        a @ b
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
            if times[-1] > 0.05:  # hopelessly slow: stop early
                break
        return min(times)

    with torch.inference_mode():
        return best(torch.float32) / best(torch.bfloat16)
