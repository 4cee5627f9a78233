"""Tail Features Augmentation (TFA), ELTA sec. 3.2, eq. 1-4: feature-level mixup that favours
the minority (scores far from the batch mean) and pairs samples of similar score.

Sampling is done on the CPU in float64 (a batch is small), so ``generator`` must be a CPU
``torch.Generator``; the mixing itself runs on the features' device and keeps their gradient.

Defaults: ``tau1 = 0.2`` and ``tau2 = 4.0``, where ELTA's Fig. 5 (AVA) puts the best SRCC. The
paper gives no number of mixed samples per batch; ``DEFAULT_N_MIX`` is this project's choice,
made by a sweep on the real-feature benchmark's validation split (README, "Choices").
"""

from __future__ import annotations

import torch

# |s_i - s_j| below this counts as a tie in eq. 3 (see ``partner_probs``).
_TIE = 1e-12

TAU1 = 0.2  # ELTA Fig. 5: best SRCC on AVA
TAU2 = 4.0  # ELTA Fig. 5
DEFAULT_N_MIX = 4  # not in the paper: chosen on DEV val (benchmarks/results/real_tfa_sweep.json)


def first_sample_probs(scores: torch.Tensor, tau1: float = TAU1) -> torch.Tensor:
    """ELTA eq. 2: ``P(i) = softmax_i(|mean(s) - s_i| / tau1)`` over the batch (float64)."""
    if tau1 <= 0:
        raise ValueError(f"tau1 must be > 0, got {tau1}")
    s = scores.detach().to("cpu", torch.float64)
    return torch.softmax((s.mean() - s).abs() / tau1, dim=0)


def partner_probs(scores: torch.Tensor, first: torch.Tensor, tau2: float = TAU2) -> torch.Tensor:
    """ELTA eq. 3: ``P(j|i) ∝ exp(tau2 / |s_i - s_j|)`` over ``j != i``, one row per i in ``first``.

    Ties: as ``|s_i - s_j| -> 0`` the weight ``exp(tau2 / |s_i - s_j|)`` grows without bound,
    so the limit of eq. 3 puts all mass on the partners whose score equals ``s_i``. We use
    exactly that limit: if any ``j != i`` has ``|s_i - s_j| <= 1e-12``, ``P(j|i)`` is uniform
    over those tied partners (0 elsewhere); otherwise eq. 3 as written, via a stable softmax.
    Returns (len(first), B) float64 rows summing to 1, with ``P(i|i) = 0``.
    """
    if tau2 <= 0:
        raise ValueError(f"tau2 must be > 0, got {tau2}")
    s = scores.detach().to("cpu", torch.float64)
    i = first.to("cpu", torch.long)
    d = (s[i][:, None] - s[None, :]).abs()
    self_mask = torch.arange(s.numel())[None, :] == i[:, None]
    tied = (d <= _TIE) & ~self_mask
    has_tie = tied.any(dim=1, keepdim=True)
    logits = tau2 / d.clamp_min(_TIE)
    logits = torch.where(has_tie, torch.where(tied, 0.0, -torch.inf), logits)
    logits = logits.masked_fill(self_mask, -torch.inf)
    return torch.softmax(logits, dim=1)


def tfa_sample_pairs(
    scores: torch.Tensor,
    *,
    tau1: float = TAU1,
    tau2: float = TAU2,
    n_mix: int = DEFAULT_N_MIX,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``n_mix`` pairs: ``i ~ P(i)`` (eq. 2), ``j ~ P(j|i)`` (eq. 3), independently per pair
    (with replacement across pairs). Returns CPU tensors ``(i, j, lam)`` with
    ``lam = P(i) / (P(i) + P(j))`` (eq. 4), both P from eq. 2.
    """
    if scores.ndim != 1 or scores.numel() < 2:
        raise ValueError(f"TFA needs a 1-D batch of at least 2 scores, got shape {tuple(scores.shape)}")
    if n_mix < 0:
        raise ValueError(f"n_mix must be >= 0, got {n_mix}")
    p = first_sample_probs(scores, tau1)
    if n_mix == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty, torch.empty(0, dtype=torch.float64)
    i = torch.multinomial(p, n_mix, replacement=True, generator=generator)
    j = torch.multinomial(partner_probs(scores, i, tau2), 1, generator=generator).squeeze(1)
    lam = p[i] / (p[i] + p[j])
    return i, j, lam


def tfa_mix(
    features: torch.Tensor,
    targets: torch.Tensor | None,
    scores: torch.Tensor,
    *,
    tau1: float = TAU1,
    tau2: float = TAU2,
    n_mix: int = DEFAULT_N_MIX,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """ELTA eq. 1: ``z~ = lam z_i + (1 - lam) z_j``, and the same mix of targets and scores.

    ``features`` (B, D) keep their gradient; ``targets`` (B, L) distributions (or ``None``
    for score-only data); ``scores`` (B,). Returns ``n_mix`` mixed rows of each; the caller
    appends them to the batch. ELTA gives tau1 0.2 and tau2 4.0 (Fig. 5) and no mix count.
    """
    if features.shape[0] != scores.shape[0] or (targets is not None and targets.shape[0] != scores.shape[0]):
        raise ValueError("features, targets and scores must share the batch dimension")
    i, j, lam = tfa_sample_pairs(scores, tau1=tau1, tau2=tau2, n_mix=n_mix, generator=generator)
    i, j = i.to(features.device), j.to(features.device)

    def mix(x: torch.Tensor) -> torch.Tensor:
        x = x if x.is_floating_point() else x.float()
        w = lam.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return w * x[i] + (1 - w) * x[j]

    return mix(features), None if targets is None else mix(targets), mix(scores)
