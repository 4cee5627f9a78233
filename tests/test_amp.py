"""Gated mixed precision (M+MNet sec. 3.3, eq. 5): the theta switch rule and the
loss-scaling / FP32-master-weight mechanics (fp16 on CPU for tiny models; no speed claims)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.hardware import cpu_native_bf16
from pipelines.io import DataError
from pipelines.models.amp import (
    MAX_TAU,
    MixedPrecisionTrainer,
    PrecisionGate,
    grads_overflow,
    low_dtype,
    monitor_dtype,
    theta,
)

FP16_MAX = 65504.0


def ref_switch_epoch(flags, l1, l2, window=5):
    """Eq. 5 after every epoch e (E = e + 1 epochs trained); switch in the epoch after theta <= 0."""
    for e in range(len(flags)):
        o = sum(1 for f in flags[max(0, e + 1 - window): e + 1] if f)
        if l1 * o ** 2 - l2 * (e + 1) <= 0:
            return e + 1
    return None


def test_theta_is_eq5_over_the_last_five_epochs():
    assert theta([True] * 5, 5) == pytest.approx(25 - 1.0)
    assert theta([True] * 3 + [False] * 5, 8) == pytest.approx(-1.6)  # old overflows leave the window
    assert theta([False, True, False, True, False, True], 6, l1=2.0, l2=0.5) == pytest.approx(2 * 9 - 3.0)
    assert theta([], 0) == 0.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("l1,l2", [(1.0, 0.2), (1.0, 1.0), (0.5, 0.05)])
def test_gate_switches_exactly_when_the_reference_does(seed, l1, l2):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.2, 0.95)
    flags = (rng.random(60) < np.linspace(p, 0.0, 60)).tolist()  # overflows fade as training settles
    gate = PrecisionGate(l1=l1, l2=l2)
    for e, f in enumerate(flags):
        gate.end_epoch(e, f)
    assert gate.switch_epoch == ref_switch_epoch(flags, l1, l2)


def test_gate_waits_while_overflows_are_frequent_and_never_switches_back():
    gate = PrecisionGate(l1=1.0, l2=0.2)
    for e in range(20):  # every epoch overflows: 25 - 0.2 E > 0 until E = 125
        assert not gate.end_epoch(e, True)
    assert gate.switch_epoch is None
    gate.end_epoch(20, False)  # O = 4: 16 - 4.2 > 0
    gate.end_epoch(21, False)  # O = 3: 9 - 4.4 > 0
    assert not gate.mixed
    assert gate.end_epoch(22, False)  # O = 2: 4 - 4.6 <= 0 -> mixed from epoch 23
    assert gate.switch_epoch == 23
    gate.end_epoch(23, True)
    gate.end_epoch(24, True)
    assert gate.mixed and gate.switch_epoch == 23
    off = PrecisionGate(enabled=False)
    for e in range(10):
        off.end_epoch(e, False)
    assert off.switch_epoch is None


def test_overflow_monitor_uses_the_low_precision_range():
    w = nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([1.0, -0.5, 0.0])
    assert grads_overflow([w], 2.0 ** 16, torch.float16)  # 65536 > 65504
    assert not grads_overflow([w], 2.0 ** 15, torch.float16)
    assert not grads_overflow([w], 2.0 ** 20, torch.bfloat16)
    w.grad = torch.tensor([float("nan"), 0.0, 0.0])
    assert grads_overflow([w], 1.0, torch.float32)


def test_low_dtype_follows_the_precision_policy_not_a_timing():
    # auto: the paper's fp16 on CUDA; fp32 on CPU whatever a bf16 matmul would time (the policy
    # never picks by stopwatch; bf16 only when asked, and only where the device has it)
    assert low_dtype("auto", "cuda") == torch.float16
    assert low_dtype("auto", "cpu") == torch.float32
    assert low_dtype("fp16", "cpu") == torch.float16
    assert low_dtype("fp32", "cuda") == torch.float32
    if cpu_native_bf16():
        assert low_dtype("bf16", "cpu") == torch.bfloat16
    else:
        with pytest.raises(DataError, match=r"model\.amp\.dtype = bf16.*set model\.amp\.dtype: fp32"):
            low_dtype("bf16", "cpu")
    with pytest.raises(DataError, match=r"params.yaml: model\.amp\.dtype = 'int8'"):
        low_dtype("int8", "cpu")


def _mixed(model, lr=1.0, tau=16, growth=1000, dtype=torch.float16):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tr = MixedPrecisionTrainer(model, opt, dtype=dtype, init_tau=tau, growth_interval=growth)
    tr.gate.switch_epoch = 0  # already in the mixed phase
    return tr


def _lin(value=0.0):
    m = nn.Linear(4, 1, bias=False)
    nn.init.constant_(m.weight, value)
    return m


def test_loss_scaling_keeps_gradients_that_fp16_would_flush_to_zero():
    x = torch.ones(1, 4)
    # the loss is computed in FP32 (as the paper does); dL/dw = 1e-8 < fp16's smallest subnormal (6e-8)
    loss_fn = lambda m: 1e-8 * m(x).float().sum()
    scaled, unscaled = _lin(), _lin()
    _mixed(scaled, tau=16).step(loss_fn)
    _mixed(unscaled, tau=0).step(loss_fn)
    assert unscaled.weight.abs().max().item() == 0.0  # the gradient underflowed: no update
    np.testing.assert_allclose(scaled.weight.detach().numpy(), -1e-8, rtol=1e-2)  # lr 1 * 1e-8, in the FP32 master
    assert scaled.weight.dtype == torch.float32


def test_master_weights_accumulate_updates_smaller_than_fp16_resolution():
    # an fp16 weight of 1.0 cannot move by 1e-4 (its spacing is ~1e-3); the FP32 master can
    m = _lin(1.0)
    x = torch.ones(1, 4)
    tr = _mixed(m, lr=1e-4, tau=10)
    for _ in range(5):
        tr.step(lambda mod: mod(x).sum())
    np.testing.assert_allclose(m.weight.detach().numpy(), 1.0 - 5e-4, rtol=0, atol=1e-6)
    assert (torch.tensor(1.0, dtype=torch.float16) - 1e-4).item() == 1.0  # what an fp16-only update would do


def test_overflow_skips_the_batch_and_lowers_the_scale():
    m = _lin(0.5)
    before = m.weight.detach().clone()
    tr = _mixed(m, tau=16)
    x = torch.full((1, 4), 1e3)
    _, over = tr.step(lambda mod: 10.0 * mod(x).sum())  # scaled grads 1e4 * 65536 -> inf in fp16
    assert over and torch.equal(m.weight.detach(), before) and tr.tau == 15 and tr.skipped == 1
    metrics = tr.end_epoch(0)
    assert metrics["overflow_epoch"] == 1.0 and metrics["skipped_batches"] == 1.0 and metrics["mixed_precision"] == 1.0
    _, over = tr.step(lambda mod: 1e-3 * mod(torch.ones(1, 4)).float().sum())
    assert not over and not torch.equal(m.weight.detach(), before)


def test_scale_grows_after_clean_steps_up_to_2_pow_20():
    m = _lin(0.0)
    tr = _mixed(m, tau=19, growth=2)
    for _ in range(6):
        tr.step(lambda mod: 1e-6 * mod(torch.ones(1, 4)).float().sum())
    assert tr.tau == MAX_TAU


def test_fp32_phase_monitors_then_the_trainer_switches_and_logs_the_epoch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    tr = MixedPrecisionTrainer(model, opt, dtype=torch.float16, gate=PrecisionGate(l1=1.0, l2=0.5), init_tau=16)
    x = torch.randn(16, 3)
    big = lambda m: 1e4 * m(x).float().pow(2).mean()  # grads * 2^16 beyond fp16's range
    small = lambda m: 1e-4 * m(x).float().pow(2).mean()
    log, phases = [], []
    for epoch in range(8):
        phases.append(tr.gate.mixed)
        for _ in range(2):
            w_dtype_before = next(model.parameters()).dtype
            tr.step(big if epoch < 2 else small)
            assert w_dtype_before == next(model.parameters()).dtype == torch.float32  # masters stay FP32
        log.append(tr.end_epoch(epoch))
    flags = [row["overflow_epoch"] == 1.0 for row in log]
    assert flags[:2] == [True, True] and not any(flags[2:])
    # O = 2 keeps theta > 0 through E = 5 (4 - 2.5); at E = 6 the window holds one overflow: 1 - 3 <= 0
    assert tr.gate.switch_epoch == ref_switch_epoch(flags, 1.0, 0.5) == 6
    assert [row["mixed_precision"] == 1.0 for row in log] == phases == [e >= 6 for e in range(8)]
    tr2 = MixedPrecisionTrainer(model, opt, dtype=torch.float16)
    tr2.load_state_dict(tr.state_dict())
    assert tr2.gate.switch_epoch == 6 and tr2.tau == tr.tau and tr2.gate.history == tr.gate.history


@pytest.mark.parametrize("family,opts", [
    ("mnet", {"branch_blocks": 4, "fuse_channels": 16}),
    ("aesaf", {"widths": [8, 16], "group_maps": 2, "hidden": 8}),
])
def test_families_learn_through_the_gated_trainer(family, opts):
    """Brightness decides the score: each family, trained through the gate (fp32 phase, then the
    loss-scaled phase with fp32 arithmetic), must rank held-out images by it."""
    from pipelines.metrics import dist_to_score, srcc
    from pipelines.models import build, loss_terms

    torch.manual_seed(0)
    n = 40
    bright = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    x = bright.view(n, 1, 1, 1) * torch.ones(n, 3, 32, 32) + 0.05 * torch.randn(n, 3, 32, 32)
    mu = 2 + 6 * bright
    target = torch.softmax(-((torch.arange(1, 11).float()[None] - mu[:, None]) ** 2) / 2, 1)
    train, held = torch.arange(0, 32), torch.arange(32, 40)
    model = build(family, 10, opts)
    tr = MixedPrecisionTrainer(model, torch.optim.Adam(model.parameters(), lr=3e-3), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    for epoch in range(6):
        model.train()
        perm = train[torch.randperm(len(train), generator=g)]
        for b in range(0, len(perm), 16):
            r = perm[b : b + 16]
            tr.step(lambda m, r=r: loss_terms(family, m, m(x[r]), target[r], opts, x[r])["loss"].float())
        tr.end_epoch(epoch)
    assert tr.gate.switch_epoch == 1  # no overflow: theta = -0.2 <= 0 after the first epoch
    model.eval()
    with torch.no_grad():
        pred = dist_to_score(model(x[held])["probs"].numpy())
    assert srcc(pred, mu[held].numpy()) > 0.8


# --------------------------------------------------------------------------- the overflow monitor
def ref_scaler(peaks, init_tau=16, growth=200, limit=FP16_MAX):
    """A dynamic loss scaler, step by step: overflow when peak * 2^tau > limit (or not finite);
    back off by one on an overflow, grow by one after ``growth`` clean steps, tau in [0, 20]."""
    tau, good, flags, taus = init_tau, 0, [], []
    for g in peaks:
        over = not math.isfinite(g) or g * 2.0 ** tau > limit
        if over:
            tau, good = max(tau - 1, 0), 0
        else:
            good += 1
            if good >= growth:
                tau, good = min(tau + 1, 20), 0
        flags.append(over)
        taus.append(tau)
    return flags, taus


def _peak_loss(peak):
    """A loss whose gradient w.r.t. the single weight is exactly ``peak`` (x = 1, w starts at 0)."""
    x = torch.ones(1, 1)
    return lambda m: peak * m(x).float().sum()


def _fp32_monitor(growth=200, tau=16, l1=1.0, l2=0.2):
    m = nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # the weights do not matter here, the gradients do
    return MixedPrecisionTrainer(m, opt, dtype=torch.float32, monitor=torch.float16, init_tau=tau, growth_interval=growth,
                                 gate=PrecisionGate(l1=l1, l2=l2))


@pytest.mark.parametrize("seed", range(4))
def test_fp32_phase_monitor_is_the_dynamic_loss_scaler_step_by_step(seed):
    rng = np.random.default_rng(seed)
    peaks = (10.0 ** rng.uniform(-3, 1.5, 300)).tolist()  # 1e-3 .. 30, the range of M+MNet's early steps
    peaks[50] = float("inf")
    tr = _fp32_monitor(growth=7)
    flags, taus = [], []
    for g in peaks:
        flags.append(tr.step(_peak_loss(g))[1])
        taus.append(tr.tau)
    ref_flags, ref_taus = ref_scaler(peaks, growth=7)
    assert flags == ref_flags and taus == ref_taus
    assert 0 < sum(flags) < len(flags) // 2  # it backs off and grows: overflows are the exception


def test_gate_opens_once_the_scale_settles_and_stays_closed_while_overflows_persist():
    """M+MNet at initialisation: the largest gradient is ~10 on every step. A fixed 2^16 scale
    would call every step an overflow (O = 5 for ever); the scaler backs off to 2^12 within the
    first epoch and then sees none, so only epoch 0 overflows and theta = 1 - 0.2 E reaches 0 at E = 5."""
    tr = _fp32_monitor()
    for epoch in range(8):
        for _ in range(10):
            tr.step(_peak_loss(10.0))
        tr.end_epoch(epoch)
    assert tr.gate.history == [True] + [False] * 7
    assert tr.gate.switch_epoch == ref_switch_epoch(tr.gate.history, 1.0, 0.2) == 5
    assert tr.tau == 12  # 10 * 2^12 = 40960 fits fp16, 10 * 2^13 does not: the scale the mixed phase starts from
    assert 10.0 * 2 ** 16 > FP16_MAX  # what the fixed-scale monitor flagged on every step

    # gradients that keep growing faster than the scaler can back off: every epoch overflows
    tr = _fp32_monitor()
    g = 10.0
    for epoch in range(12):
        for _ in range(4):
            g *= 4.0  # x4 a step, the scaler halves: still an overflow
            tr.step(_peak_loss(g if epoch < 8 else 1e-6))
        tr.end_epoch(epoch)
    assert tr.gate.history == [True] * 8 + [False] * 4
    assert all(t > 0 for t in tr.gate.thetas[:11])  # closed while they persist, and until O = 1 at E = 12
    assert tr.gate.switch_epoch == ref_switch_epoch(tr.gate.history, 1.0, 0.2) == 12


def test_mixed_phase_of_an_fp32_stand_in_skips_what_fp16_would_overflow():
    m = _lin(0.5)
    before = m.weight.detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    tr = MixedPrecisionTrainer(m, opt, dtype=torch.float32, monitor=torch.float16, init_tau=16)
    tr.gate.switch_epoch = 0
    _, over = tr.step(lambda mod: 2.0 * mod(torch.ones(1, 4)).sum())  # 2 * 2^16 > 65504, finite in fp32
    assert over and torch.equal(m.weight.detach(), before) and tr.tau == 15 and tr.skipped == 1
    _, over = tr.step(lambda mod: 2.0 * mod(torch.ones(1, 4)).sum())  # 2 * 2^15 = 65536: still over
    _, over = tr.step(lambda mod: 2.0 * mod(torch.ones(1, 4)).sum())  # 2 * 2^14 fits
    assert not over and tr.tau == 14
    np.testing.assert_allclose(m.weight.detach().numpy(), 0.5 - 2.0)  # unscaled FP32 gradient applied once
    assert tr.end_epoch(0)["overflow_steps"] == 2.0
    same = MixedPrecisionTrainer(_lin(0.5), torch.optim.SGD(_lin().parameters(), lr=1.0), dtype=torch.float32)
    assert same.monitor == torch.float32  # without a monitor, the compute dtype's own range


def test_monitor_dtype_auto_stands_fp16_in_for_fp32():
    assert monitor_dtype("auto", torch.float32) == torch.float16  # CPU fallback: count fp16's overflows
    assert monitor_dtype("auto", torch.float16) == torch.float16
    assert monitor_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert monitor_dtype("fp32", torch.float32) == torch.float32
    with pytest.raises(DataError, match=r"model\.amp\.monitor = 'int8'"):
        monitor_dtype("int8", torch.float32)


# ------------------------------------------------- the mixed phase: autocast + GradScaler, one model
def _cpu_fp16_autocast_problem() -> str | None:
    """Why autocast fp16 + GradScaler cannot run on this CPU's torch (None when it can)."""
    try:
        m = nn.Linear(4, 2)
        with torch.autocast("cpu", dtype=torch.float16):
            out = m(torch.ones(3, 4))
        if out.dtype != torch.float16:
            return f"CPU autocast fp16 gives {out.dtype}"
        torch.amp.GradScaler("cpu").scale(out.float().sum()).backward()
    except (RuntimeError, TypeError, ValueError) as e:  # older torch: no CPU fp16 autocast / scaler
        return f"{type(e).__name__}: {e}"
    return None


CPU_FP16 = pytest.mark.skipif(_cpu_fp16_autocast_problem() is not None,
                              reason=f"this torch cannot run fp16 autocast on CPU: {_cpu_fp16_autocast_problem()}")


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))


@CPU_FP16
def test_mixed_phase_is_autocast_on_the_one_model_without_a_copy(monkeypatch):
    import copy

    def no_copy(*a, **k):
        raise AssertionError("the mixed phase copied the model")

    monkeypatch.setattr(copy, "deepcopy", no_copy)
    model = _net()
    ptrs = [p.data_ptr() for p in model.parameters()]
    tr = _mixed(model, lr=1e-2, tau=8)
    seen = []
    x = torch.randn(5, 3, 8, 8)

    def loss_fn(m):
        out = m(x)
        seen.append((m is model, torch.is_autocast_enabled("cpu"), out.dtype))
        return out.float().pow(2).mean()

    before = [p.detach().clone() for p in model.parameters()]
    _, over = tr.step(loss_fn)
    assert not over and seen == [(True, True, torch.float16)]  # forward through the model itself, in fp16
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # the same FP32 tensors, updated in place
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert model[1].num_batches_tracked.item() == 1  # BatchNorm statistics updated on the model itself
    assert not [k for k, v in vars(tr).items() if isinstance(v, nn.Module) and v is not model]  # no second module
    assert isinstance(tr.scaler, torch.amp.GradScaler) and tr.scaler.is_enabled()


def _plain_autocast_fp16(model, opt, batches, tau, growth):
    """The textbook loop: autocast fp16 + GradScaler (what the mixed phase must equal)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** tau, growth_interval=growth)
    scales = []
    for x, k in batches:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = k * model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


@CPU_FP16
def test_gate_is_fed_by_the_scalers_found_inf_and_the_step_is_skipped():
    """A huge loss (finite in FP32, inf in an fp16 gradient) and an inf loss: the GradScaler finds
    inf, skips the step and halves the scale; O counts those steps. The trainer must equal the
    textbook autocast + GradScaler loop step by step (weights and scales), and its overflow flags
    must be exactly the steps where that loop's scale dropped."""
    g = torch.Generator().manual_seed(3)
    ks = [1.0, 1e9, 1.0, 1.0, float("inf"), 1.0, 1.0, 1.0]
    batches = [(torch.randn(6, 3, 8, 8, generator=g), k) for k in ks]
    ref = _net()
    ref_scales = _plain_autocast_fp16(ref, torch.optim.Adam(ref.parameters(), lr=1e-2), batches, tau=12, growth=2)
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tr = MixedPrecisionTrainer(model, opt, dtype=torch.float16, init_tau=12, growth_interval=2, gate=PrecisionGate())
    tr.gate.switch_epoch = 0
    flags, scales = [], []
    for x, k in batches[:4]:
        flags.append(tr.step(lambda m, x=x, k=k: k * m(x).float().pow(2).mean())[1])
        scales.append(tr.scale)
    e0 = tr.end_epoch(0)
    for x, k in batches[4:]:
        flags.append(tr.step(lambda m, x=x, k=k: k * m(x).float().pow(2).mean())[1])
        scales.append(tr.scale)
    e1 = tr.end_epoch(1)
    dropped = [b < a for a, b in zip([2.0 ** 12] + ref_scales, ref_scales)]
    assert flags == dropped == [k != 1.0 for k in ks]
    assert scales == ref_scales
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # the same arithmetic as the textbook loop: the skipped steps left no trace
    assert e0["overflow_steps"] == e0["skipped_batches"] == 1.0 and e0["overflow_epoch"] == 1.0
    assert e1["overflow_steps"] == 1.0 and e1["loss_scale_log2"] == math.log2(ref_scales[-1])
    assert tr.gate.history == [True, True]  # O = 2 over the window


@CPU_FP16
def test_inf_gradient_skips_the_update_and_leaves_the_optimizer_untouched():
    model = _lin(0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-1)
    tr = MixedPrecisionTrainer(model, opt, dtype=torch.float16, init_tau=10)
    tr.gate.switch_epoch = 0
    before = model.weight.detach().clone()
    _, over = tr.step(lambda m: m(torch.ones(1, 4)).float().sum() * float("inf"))
    assert over and torch.equal(model.weight.detach(), before) and tr.tau == 9
    assert not opt.state  # Adam never stepped: no moments, no step count
    assert tr.end_epoch(0)["overflow_steps"] == 1.0 and tr.gate.history == [True]


@CPU_FP16
def test_scale_stays_within_2_pow_0_and_2_pow_20():
    tr = _mixed(_lin(0.5), tau=1)
    for _ in range(3):  # an inf every step: 2^1 -> 2^0, then it stays (a vanishing scale would zero the loss)
        assert tr.step(lambda m: m(torch.ones(1, 4)).float().sum() * float("inf"))[1]
    assert tr.tau == 0 and tr.scaler.get_scale() == 1.0
    assert tr.end_epoch(0)["overflow_steps"] == 3.0


@CPU_FP16
def test_resume_round_trip_carries_the_grad_scaler():
    """Train through the switch into the fp16 phase (an overflow and a growth on the way), save
    model, optimizer and trainer the way checkpoints are read (weights_only), resume into fresh
    objects: the continued run equals the uninterrupted one exactly."""
    import io

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), 1e9 if i == 7 else 1.0) for i in range(14)]

    def make():
        model = _net()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt, MixedPrecisionTrainer(model, opt, dtype=torch.float16, init_tau=14, growth_interval=3,
                                                 gate=PrecisionGate(l1=1.0, l2=1.0))

    def run(tr, part, first_epoch):
        for e, chunk in enumerate(part):
            for x, k in chunk:
                tr.step(lambda m, x=x, k=k: k * m(x).float().pow(2).mean())
            tr.end_epoch(first_epoch + e)

    epochs = [batches[0:3], batches[3:6], batches[6:10], batches[10:14]]
    model, opt, tr = make()
    run(tr, epochs[:3], 0)
    assert tr.gate.switch_epoch == 1 and tr.scaler is not None
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "amp": tr.state_dict()}, buf)
    saved = tr.state_dict()["scaler"]
    assert saved["_growth_tracker"] == 2 and saved["scale"] == 2.0 ** 14  # 2^14 -> 2^15 (growth) -> 2^14 (overflow) + 2 clean
    run(tr, epochs[3:], 3)

    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model2, opt2, tr2 = make()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    tr2.load_state_dict(state["amp"])
    assert tr2.scaler.state_dict() == saved and tr2.gate.switch_epoch == 1
    run(tr2, epochs[3:], 3)
    assert tr2.scaler.state_dict() == tr.scaler.state_dict() and tr2.gate.history == tr.gate.history
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)

    # a state written before the GradScaler was kept: the scaler is rebuilt from tau
    old = {k: v for k, v in state["amp"].items() if k != "scaler"}
    _, _, tr3 = make()
    tr3.load_state_dict(old)
    assert tr3.scaler is None and tr3.tau == state["amp"]["tau"]
    tr3.step(lambda m: m(batches[0][0]).float().pow(2).mean())
    assert tr3.scaler is not None and tr3.tau in (state["amp"]["tau"], state["amp"]["tau"] + 1)


@CPU_FP16
def test_autocast_fp16_on_cpu_trains_a_tiny_model():
    """fp16 asked for on CPU runs the real autocast + GradScaler path and learns."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    y = x.mean(dim=(1, 2, 3))[:, None] * 3
    model = _net()
    tr = MixedPrecisionTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), dtype=low_dtype("fp16", "cpu"))
    tr.gate.switch_epoch = 0
    losses = [tr.step(lambda m: (m(x).float() - y).pow(2).mean())[0] for _ in range(40)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.2 * losses[0]
    assert tr.scaler.is_enabled() and all(p.dtype == torch.float32 for p in model.parameters())


# ------------------------------------------------------------------ DDP: every worker agrees
DDP_MODES = ("fp16 mixed", "fp32 stand-in mixed", "fp32 phase")


def _ddp_worker(rank, world, init_file, out_dir, modes):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for mode in modes:
            model = _net()  # the same initial weights on both workers
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
            dtype = torch.float16 if mode == "fp16 mixed" else torch.float32
            tr = MixedPrecisionTrainer(ddp, opt, dtype=dtype, init_tau=12, growth_interval=2, monitor=torch.float16)
            if mode != "fp32 phase":
                tr.gate.switch_epoch = 0
            g = torch.Generator().manual_seed(100 + rank)  # each worker its own data
            flags = []
            for i in range(5):
                x = torch.randn(4, 3, 8, 8, generator=g)
                k = 1e9 if (i == 2 and rank == 1) else 1.0  # only worker 1's batch overflows, at step 2
                flags.append(tr.step(lambda m, x=x, k=k: k * m(x).float().pow(2).mean())[1])
            metrics = tr.end_epoch(0)
            params = {n: p.detach().clone() for n, p in model.named_parameters()}  # (BatchNorm buffers stay per worker)
            torch.save({"flags": flags, "tau": tr.tau, "params": params, "metrics": metrics}, f"{out_dir}/{mode}-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_workers_agree_on_overflows_without_a_collective_of_their_own(tmp_path):
    """Two gloo workers under DDP; only worker 1's batch overflows. The gradients are averaged in
    backward, so both workers see the overflow, skip (or, in the FP32 phase, record) the same step,
    keep the same scale and identical weights -- the trainer adds no per-step collective."""
    import torch.distributed as dist
    import torch.multiprocessing as tmp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    modes = [m for m in DDP_MODES if m != "fp16 mixed" or not _cpu_fp16_autocast_problem()]
    tmp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), modes), nprocs=2, join=True)
    assert "fp32 phase" in modes and len(modes) >= 2
    for mode in modes:
        r0, r1 = (torch.load(tmp_path / f"{mode}-{r}.pt", weights_only=True) for r in (0, 1))
        assert r0["flags"] == r1["flags"] == [False, False, True, False, False], mode
        assert r0["tau"] == r1["tau"] == 13 and r0["metrics"] == r1["metrics"], mode  # 12 -> 13 (growth) -> 12 (overflow) -> 13
        assert r0["metrics"]["overflow_steps"] == 1.0 and r0["metrics"]["skipped_batches"] == float(mode != "fp32 phase")
        for name, a in r0["params"].items():
            assert torch.equal(a, r1["params"][name]), (mode, name)
