"""Gated mixed precision (M+MNet sec. 3.3, eq. 5) on standard ``torch.autocast`` + ``GradScaler``.

**The gate.** Training starts in full precision (FP32). After each epoch, with ``O`` = the number
of overflowed epochs among the last ``window`` (5) and ``E`` = the epochs trained so far::

    theta = l1 * O^2 - l2 * E          (paper: l1 = 1, l2 = 0.2)

and when ``theta <= 0`` training switches to mixed precision **from the next epoch on** (one-way;
the switch epoch is recorded). ``E`` is the epochs elapsed (the paper: "as the number of training
epochs increases, the network will eventually enter the mixed-precision stage"). An epoch
overflows when any of its steps did, in either phase.

**The mixed phase** (``dtype`` fp16, the paper's FP16) is plain ``torch.autocast(fp16)`` with a
dynamic loss scaler, ``torch.amp.GradScaler``: the forward pass and the loss run under autocast on
the one model; ``scaler.scale(loss).backward()``; ``scaler.step`` unscales the gradients and skips
the batch when one of them is not finite (found-inf); ``scaler.update`` halves the scale on a
found-inf and doubles it after ``growth_interval`` clean steps. A found-inf -- read as the scale
dropping after ``update`` -- is an overflow step and feeds ``O``. The scale is kept in
``[2^0, 2^MAX_TAU]`` (``tau`` = log2 of it).

How this maps onto the paper's recipe: autocast keeps the parameters in FP32 and casts them to
fp16 per op, so **the FP32 parameters are the paper's master weights** (the optimizer updates them
in FP32, and updates smaller than fp16's resolution accumulate); **the GradScaler is its loss
scaling** (loss x ``2^tau``, overflow -> skip the batch and ``tau - 1``, growth after clean steps).
There is no second, low-precision copy of the model and nothing is copied per step (an earlier
version copied the FP32 masters into an fp16 working model every step, which made the mixed phase
slower than FP32 on a GPU).

**The FP32 phase** cannot meet an fp16 overflow, so it *monitors* the overflows the fp16 run would
meet, with an emulated scaler (``grads_overflow``): a step "overflows" when a gradient times the
current scale is not finite or beyond the monitored format's range (``|g| * 2^tau > max``); the
monitor backs off (tau - 1) and grows (tau + 1 after ``growth_interval`` clean steps) like the real
scaler, so ``O`` counts a burst while the scale finds its level, then only the occasional probe.
At the switch the real GradScaler starts from the monitor's scale and growth count. Only parameter
gradients are seen (an fp16 backward could also overflow in an intermediate activation gradient).

**DDP.** Gradients are averaged inside ``backward`` (``ray.train.torch.prepare_model`` = torch
DDP), so after ``backward`` every worker holds the same gradients; an inf or NaN on one worker is
inf / NaN in the average. The GradScaler's found-inf and the FP32 monitor are computed on those
averaged gradients, hence agree on every worker with no extra collective, and the scale evolves
identically everywhere. (The FP32 monitor sees the averaged gradient, whose peak is at most the
largest worker's: it may miss an overflow only one worker's local fp16 gradient would meet; with
one worker it is exact.) The only collective is one tiny all-reduce of the epoch's overflow flag in
``end_epoch`` (a safety net: it changes nothing when the workers agree).

**What runs where** (``low_dtype``, the project's precision policy, never a timing):

- CUDA, ``auto`` / ``fp16``: FP32 phase with the fp16 monitor, then autocast fp16 + GradScaler.
- CPU, ``auto`` (= ``fp32``): the FP32 stand-in. Both phases compute in FP32; the monitor checks
  fp16's range (``monitor_dtype("auto", fp32) = fp16``), so the gate and the schedule that hangs
  on it (Corner Grid, stage 2) behave as on a GPU, and the "mixed" phase skips the batches fp16
  would have lost (emulated scaler, no autocast).
- ``bf16`` (a GPU with it, or a CPU with native bf16): autocast bf16 with the emulated scaler on
  bf16's range (bf16 has FP32's range, so in practice only non-finite gradients overflow).
- ``fp16`` on CPU: autocast fp16 + GradScaler, as on CUDA (slow; for tests of tiny models).

Calling it (one worker or DDP; ``model`` is the module the forward runs through, e.g. the DDP
wrapper)::

    low = low_dtype(amp.dtype, device)
    trainer = MixedPrecisionTrainer(model, opt, dtype=low, gate=PrecisionGate(l1=amp.l1, l2=amp.l2,
        window=amp.window, enabled=amp.enabled), init_tau=amp.init_tau,
        growth_interval=amp.growth_interval, monitor=monitor_dtype(amp.monitor, low))
    loss, overflowed = trainer.step(lambda m: loss_of(m(x), y))  # forward + loss, autocast applied by step
    metrics = trainer.end_epoch(epoch)                            # every epoch, on every worker
    state["amp"] = trainer.state_dict()                           # gate, scale, GradScaler (resume)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.io import DataError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MAX_TAU = 20
KEY = "model.amp"


def theta(overflow_epochs: Sequence[bool], epochs_elapsed: int, l1: float = 1.0, l2: float = 0.2, window: int = 5) -> float:
    """Eq. 5: ``l1 * O^2 - l2 * E``, O = overflowed epochs among the last ``window``."""
    if epochs_elapsed < 0 or window < 1:
        raise ValueError(f"need epochs_elapsed >= 0 and window >= 1, got {epochs_elapsed}, {window}")
    o = sum(bool(v) for v in list(overflow_epochs)[-window:])
    return l1 * o * o - l2 * epochs_elapsed


def low_dtype(name: str, device: torch.device | str, *, key: str = f"{KEY}.dtype") -> torch.dtype:
    """The mixed phase's dtype under the project's precision policy (``pipelines.train.precision``).

    ``auto``: fp16 on CUDA (the paper's FP16; the gate is about fp16 overflows), fp32 on CPU (the
    stand-in). ``fp16`` / ``bf16`` / ``fp32``: that dtype; a value the device cannot run (bf16 on a
    GPU or CPU without it) is a ``DataError`` naming ``key``."""
    from pipelines.train.precision import resolve_precision

    device = torch.device(device)
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DataError(f"params.yaml: {key} = {name!r}; use one of auto, fp16, bf16, fp32.")
    return resolve_precision(name, device, key=key).dtype or torch.float32


def monitor_dtype(name: str, low: torch.dtype, *, key: str = f"{KEY}.monitor") -> torch.dtype:
    """The format whose range the overflow monitor checks: ``auto`` = ``low``, but fp16 when
    ``low`` is fp32 (the CPU stand-in); or an explicit ``fp16`` / ``bf16`` / ``fp32``."""
    if name == "auto":
        return torch.float16 if low == torch.float32 else low
    if name not in DTYPES:
        raise DataError(f"params.yaml: {key} = {name!r} (the amp monitor dtype); use one of auto, fp16, bf16, fp32.")
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
    """FP32 steps (monitored) until the gate opens, then autocast steps with a dynamic loss scaler.

    ``model`` is the module the forward runs through (the DDP wrapper under DDP); its FP32
    parameters are the master weights the optimizer updates. ``dtype``: the mixed phase's dtype
    (``low_dtype``); ``monitor``: the format the emulated scaler checks (``monitor_dtype``;
    default ``dtype``). ``device``: where autocast runs (default: the model's parameters').
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
        monitor: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        if not 0 <= init_tau <= MAX_TAU:
            raise ValueError(f"init_tau must be in [0, {MAX_TAU}], got {init_tau}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES.values())}, got {dtype}")
        self.model, self.opt, self.dtype = model, optimizer, dtype
        self.monitor = monitor or dtype  # the format whose range the emulated scaler judges against
        self.gate = gate or PrecisionGate()
        self.growth_interval = growth_interval
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self._tau, self._good = init_tau, 0  # the emulated scaler (FP32 phase; bf16 / fp32 mixed phase)
        self.scaler: torch.amp.GradScaler | None = None  # the real one (fp16 mixed phase), made at the switch
        self._scale = 0.0  # the GradScaler's scale after the last update (host copy)
        self.epoch_overflow = False
        self.skipped = 0
        self.overflow_steps = 0  # this epoch's, in either phase

    # ----------------------------------------------------------------------------- the loss scale
    @property
    def scaled(self) -> bool:
        """True when the mixed phase uses the real GradScaler (fp16)."""
        return self.dtype == torch.float16

    @property
    def tau(self) -> int:
        """log2 of the loss scale now in use (the GradScaler's in the fp16 mixed phase)."""
        if self.scaler is not None:
            return int(round(math.log2(self._scale)))
        return self._tau

    @property
    def scale(self) -> float:
        return float(2 ** self.tau)

    def _count(self, over: bool) -> None:
        if over:
            self.epoch_overflow = True
            self.overflow_steps += 1

    def _emulate(self, over: bool) -> None:
        """The emulated dynamic scaler: back off on an overflow, grow after ``growth_interval`` clean steps."""
        self._count(over)
        if over:
            self._tau, self._good = max(self._tau - 1, 0), 0
            return
        self._good += 1
        if self._good >= self.growth_interval:
            self._tau, self._good = min(self._tau + 1, MAX_TAU), 0

    def _make_scaler(self, state: dict | None = None) -> torch.amp.GradScaler:
        scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0 ** self._tau, growth_factor=2.0, backoff_factor=0.5,
                                      growth_interval=self.growth_interval)
        # the real scaler starts where the monitor left off: its scale and its clean-step count
        scaler.load_state_dict(state or {"scale": 2.0 ** self._tau, "growth_factor": 2.0, "backoff_factor": 0.5,
                                         "growth_interval": self.growth_interval, "_growth_tracker": self._good})
        self._scale = float(scaler.state_dict()["scale"])
        return scaler

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # ------------------------------------------------------------------------------------ a step
    def step(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> tuple[float, bool]:
        """One optimisation step; ``loss_fn(model)`` runs the forward pass and returns the loss
        (in the mixed phase it runs under autocast; the loss is taken in FP32).

        Returns ``(loss value, overflowed)``. In the FP32 phase an overflow is only recorded
        (monitoring) and the step is taken; in the mixed phase the batch is skipped.
        """
        self.opt.zero_grad(set_to_none=True)
        if not self.gate.mixed:
            loss = loss_fn(self.model).float()
            loss.backward()
            # monitoring only: the FP32 step is taken either way (averaged gradients under DDP)
            over = grads_overflow(self.model.parameters(), self.scale, self.monitor)
            self._emulate(over)
            self.opt.step()
            return float(loss.detach()), over
        if not self.scaled:  # bf16 autocast, or the fp32 stand-in: the emulated scaler decides
            with self._autocast():
                loss = loss_fn(self.model).float()
            loss.backward()
            over = grads_overflow(self.model.parameters(), self.scale, self.monitor)
            self._emulate(over)
            if over:
                self.skipped += 1
            else:
                self.opt.step()
            return float(loss.detach()), over
        if self.scaler is None:
            self.scaler = self._make_scaler()
        with self._autocast():
            loss = loss_fn(self.model).float()  # the loss in FP32
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)  # unscales; skips the step on a found-inf
        self.scaler.update()  # found-inf: scale / 2, else growth after growth_interval clean steps
        new = self.scaler.get_scale()  # the one host sync of the step
        over = new < self._scale  # the scale only drops on a found-inf
        if new > 2.0 ** MAX_TAU or new < 1.0:
            new = min(max(new, 1.0), 2.0 ** MAX_TAU)
            self.scaler.update(new)
        self._scale = new
        self._count(over)
        if over:
            self.skipped += 1
        return float(loss.detach()), over

    # ------------------------------------------------------------------------------- the epoch
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
        """The gate, the emulated scaler and the GradScaler (None before the fp16 mixed phase)."""
        return {"gate": self.gate.state_dict(), "tau": self.tau, "good": self._good,
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        """Restore ``state_dict()``'s output (also one written before the GradScaler was kept:
        the scaler is then rebuilt from ``tau`` at the next mixed step)."""
        self.gate.load_state_dict(s["gate"])
        self._tau, self._good = int(s["tau"]), int(s["good"])
        scaler = s.get("scaler")
        self.scaler = self._make_scaler(scaler) if scaler and self.scaled else None


def _any_worker(flag: bool) -> bool:
    """``flag`` on any worker (one all-reduce of one number; ``flag`` itself without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t.item() > 0)
