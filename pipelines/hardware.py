"""What this machine's CPU is good at, measured rather than assumed."""

from __future__ import annotations

import time

import torch


def bf16_matmul_speedup(n: int = 128, k: int = 512, reps: int = 3) -> float:
    """fp32 time / bf16 time of an n x k @ k x k matmul (best of ``reps``); > 1: bf16 faster.

    CPUs without native bf16 (AVX2 only) run bf16 matmuls ~100x slower than fp32, so fast
    paths that would use bf16 probe first.
    """

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
