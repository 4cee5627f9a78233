"""Gated mixed precision (M+MNet sec. 3.3, eq. 5).

Training starts in full precision (FP32). Every step the gradients are *monitored* by a dynamic
loss scaler, the one the mixed phase will use: a step "overflows" when a gradient, multiplied by
the current loss scale ``2^tau``, is not finite or would not fit the monitored low-precision
format (``|g| * 2^tau > max``). Like a real scaler, the monitor backs off on an overflow (tau - 1)
and grows again after ``growth_interval`` clean steps (tau + 1, tau <= 20), so ``O`` counts what
the mixed phase would really have met: a burst of overflows while the scale finds its level,
then only the occasional probe after a growth. (A fixed scale would flag every step whose
largest gradient exceeds ``max / 2^16`` -- about 1 for fp16 --, which M+MNet's early steps all do,
and keep the gate shut for over a hundred epochs.) An epoch overflows when any of its steps did.
After each epoch, with ``O`` = the number of overflowed epochs among the last ``window`` (5)
epochs and ``E`` = the number of epochs trained so far::

    theta = l1 * O^2 - l2 * E          (paper: l1 = 1, l2 = 0.2)

and when ``theta <= 0`` training switches to mixed precision **from the next epoch on** (the
switch is one-way; the switch epoch is recorded). ``E`` is read as the epochs elapsed (the paper:
"as the number of training epochs increases, the network will eventually enter the
mixed-precision stage", which only holds for the elapsed count).

Mixed-precision steps (``MixedPrecisionTrainer.step``):

1. the FP32 master weights are copied into a low-precision working copy of the model;
2. forward in low precision, loss in FP32, multiplied by the loss scale ``2^tau`` (tau <= 20);
3. backward through the working copy (low-precision gradients);
4. overflow (a non-finite gradient, or one beyond the monitored format's range): the batch is
   skipped, tau is decreased by 1;
5. otherwise the gradients are converted to FP32, divided by ``2^tau`` and accumulated into the
   FP32 master weights by the optimizer; after ``growth_interval`` clean steps tau grows by 1.

Low-precision dtype: ``auto`` = fp16 on CUDA; on CPU bf16 only where a bf16 matmul beats fp32
(a quick probe), else fp32. On this project's CPU machines (AVX2 without AVX512-BF16) bf16
matmuls are ~100x slower than fp32, so ``auto`` picks fp32 there: the gate, the loss scaling
and the master-weight update all still run, in fp32 arithmetic. ``bf16`` forces bf16 (slow here);
fp16 on CPU works for tests of tiny models but is slow too.

Monitored format (``monitor``): ``auto`` = the low-precision dtype, except that an fp32 stand-in
(CPU) is monitored as fp16 -- the overflows an fp16 run would meet are counted, the gate and the
schedule that hangs on it (Corner Grid, stage 2) behave as on a GPU, and the mixed phase skips the
batches fp16 would have lost. Only parameter gradients are checked (an fp16 backward could also
overflow in an intermediate activation gradient, which the fp32 stand-in cannot see).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.hardware import bf16_matmul_speedup

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MAX_TAU = 20


def theta(overflow_epochs: Sequence[bool], epochs_elapsed: int, l1: float = 1.0, l2: float = 0.2, window: int = 5) -> float:
    """Eq. 5: ``l1 * O^2 - l2 * E``, O = overflowed epochs among the last ``window``."""
    if epochs_elapsed < 0 or window < 1:
        raise ValueError(f"need epochs_elapsed >= 0 and window >= 1, got {epochs_elapsed}, {window}")
    o = sum(bool(v) for v in list(overflow_epochs)[-window:])
    return l1 * o * o - l2 * epochs_elapsed


def low_dtype(name: str, device: torch.device | str, probe: Callable[[], float] = bf16_matmul_speedup) -> torch.dtype:
    """The mixed phase's dtype. ``auto``: fp16 on CUDA; on CPU bf16 when a bf16 matmul is
    faster than fp32 there (``probe() > 1``, CPUs with AVX512-BF16 / AMX), else fp32 (the
    gate, loss scaling and master weights still run). Or an explicit ``fp16`` / ``bf16`` / ``fp32``."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.float16
        return torch.bfloat16 if probe() > 1.0 else torch.float32
    if name not in DTYPES:
        raise ValueError(f"low precision dtype must be auto, fp16, bf16 or fp32, got {name!r}")
    return DTYPES[name]


def monitor_dtype(name: str, low: torch.dtype) -> torch.dtype:
    """The format whose range the overflow monitor checks: ``auto`` = ``low``, but fp16 when
    ``low`` is fp32 (the CPU stand-in); or an explicit ``fp16`` / ``bf16`` / ``fp32``."""
    if name == "auto":
        return torch.float16 if low == torch.float32 else low
    if name not in DTYPES:
        raise ValueError(f"amp monitor dtype must be auto, fp16, bf16 or fp32, got {name!r}")
    return DTYPES[name]


def grads_overflow(params: Iterable[nn.Parameter], scale: float, dtype: torch.dtype) -> bool:
    """True when some gradient times ``scale`` is non-finite or exceeds ``dtype``'s range."""
    peaks = [p.grad.detach().abs().max().float() for p in params if p.grad is not None and p.grad.numel()]
    if not peaks:
        return False
    peak = torch.stack(peaks).max()  # NaN and inf propagate
    return bool(not torch.isfinite(peak) or peak * scale > torch.finfo(dtype).max)


@dataclass
class PrecisionGate:
    """The eq. 5 switch: feed it each epoch's overflow flag; it says when to go mixed."""

    l1: float = 1.0
    l2: float = 0.2
    window: int = 5
    enabled: bool = True
    history: list[bool] = field(default_factory=list)
    switch_epoch: int | None = None  # first epoch trained in mixed precision
    thetas: list[float] = field(default_factory=list)

    @property
    def mixed(self) -> bool:
        return self.switch_epoch is not None

    def end_epoch(self, epoch: int, overflowed: bool) -> bool:
        """Record epoch ``epoch`` (0-based); return True when the *next* epoch is mixed."""
        self.history.append(bool(overflowed))
        value = theta(self.history, epoch + 1, self.l1, self.l2, self.window)
        self.thetas.append(value)
        if self.enabled and not self.mixed and value <= 0:
            self.switch_epoch = epoch + 1
        return self.mixed

    def state_dict(self) -> dict:
        return {"history": list(self.history), "switch_epoch": self.switch_epoch, "thetas": list(self.thetas)}

    def load_state_dict(self, s: dict) -> None:
        self.history, self.switch_epoch, self.thetas = list(s["history"]), s["switch_epoch"], list(s["thetas"])


class MixedPrecisionTrainer:
    """Full-precision steps until the gate opens, then loss-scaled low-precision steps on FP32 masters.

    ``model`` holds the FP32 master weights and is what the optimizer updates.
    ``grad_hook(model)`` runs on the FP32 gradients before the optimizer step (e.g.
    ``sync_gradients``); it must be called on every worker in the same order.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        dtype: torch.dtype,
        gate: PrecisionGate | None = None,
        init_tau: int = 16,
        growth_interval: int = 200,
        grad_hook: Callable[[nn.Module], None] | None = None,
        monitor: torch.dtype | None = None,
    ):
        if not 0 <= init_tau <= MAX_TAU:
            raise ValueError(f"init_tau must be in [0, {MAX_TAU}], got {init_tau}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.model, self.opt, self.dtype = model, optimizer, dtype
        self.monitor = monitor or dtype  # the format whose range an overflow is judged against
        self.gate = gate or PrecisionGate()
        self.tau, self.growth_interval, self.grad_hook = init_tau, growth_interval, grad_hook
        self._good = 0
        self._work: nn.Module | None = None
        self.epoch_overflow = False
        self.skipped = 0
        self.overflow_steps = 0  # this epoch's, in either phase

    @property
    def scale(self) -> float:
        return float(2 ** self.tau)

    def _working_copy(self) -> nn.Module:
        if self._work is None:
            self._work = copy.deepcopy(self.model).to(self.dtype)
        with torch.no_grad():
            for w, m in zip(self._work.parameters(), self.model.parameters()):
                w.copy_(m)
                w.grad = None
            for w, m in zip(self._work.buffers(), self.model.buffers()):
                w.copy_(m)
        self._work.train(self.model.training)
        return self._work

    def _update_scale(self, over: bool) -> None:
        """The dynamic loss scaler: back off on an overflow, grow after ``growth_interval`` clean steps."""
        if over:
            self.epoch_overflow = True
            self.overflow_steps += 1
            self.tau, self._good = max(self.tau - 1, 0), 0
            return
        self._good += 1
        if self._good >= self.growth_interval:
            self.tau, self._good = min(self.tau + 1, MAX_TAU), 0

    def step(self, loss_fn: Callable[[nn.Module, torch.dtype], torch.Tensor]) -> tuple[float, bool]:
        """One optimisation step; ``loss_fn(model, dtype)`` runs the forward pass and returns the loss.

        Returns ``(loss value, overflowed)``. In the FP32 phase an overflow is only recorded
        (monitoring); in the mixed phase the batch is skipped.
        """
        if not self.gate.mixed:
            self.opt.zero_grad(set_to_none=True)
            loss = loss_fn(self.model, torch.float32)
            loss.backward()
            # monitoring only: the FP32 step is taken either way; every worker keeps the same scale
            over = _any_worker(grads_overflow(self.model.parameters(), self.scale, self.monitor))
            self._update_scale(over)
            if self.grad_hook:
                self.grad_hook(self.model)
            self.opt.step()
            return float(loss.detach()), over
        work = self._working_copy()
        loss = loss_fn(work, self.dtype).float()  # loss in FP32
        (loss * self.scale).backward()
        over = grads_overflow(work.parameters(), 1.0, self.monitor)  # the gradients are already scaled
        # every worker must agree on skipping (and call grad_hook the same number of times)
        over = _any_worker(over)
        self._update_scale(over)
        if over:
            self.skipped += 1
            return float(loss.detach()), True
        self.opt.zero_grad(set_to_none=True)
        for m, w in zip(self.model.parameters(), work.parameters()):
            if w.grad is not None:
                m.grad = w.grad.float() / self.scale  # FP32 gradient into the master weights
        with torch.no_grad():  # BatchNorm running statistics updated by the working copy
            for m, w in zip(self.model.buffers(), work.buffers()):
                m.copy_(w)
        if self.grad_hook:
            self.grad_hook(self.model)
        self.opt.step()
        return float(loss.detach()), False

    def end_epoch(self, epoch: int) -> dict:
        """Close epoch ``epoch``: feed the gate; return the precision metrics to log."""
        over = _any_worker(self.epoch_overflow)
        was_mixed = self.gate.mixed
        self.gate.end_epoch(epoch, over)
        out = {
            "mixed_precision": float(was_mixed),
            "overflow_epoch": float(over),
            "theta": self.gate.thetas[-1],
            "loss_scale_log2": float(self.tau),
            "skipped_batches": float(self.skipped),
            "overflow_steps": float(self.overflow_steps),
        }
        self.epoch_overflow, self.skipped, self.overflow_steps = False, 0, 0
        return out

    def state_dict(self) -> dict:
        return {"gate": self.gate.state_dict(), "tau": self.tau, "good": self._good}

    def load_state_dict(self, s: dict) -> None:
        self.gate.load_state_dict(s["gate"])
        self.tau, self._good = s["tau"], s["good"]


def _any_worker(flag: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t.item() > 0)
