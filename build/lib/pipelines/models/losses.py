"""Losses of the model families: Re-EMD (M+MNet eq. 4) and plain EMD (seed 002).

Re-EMD (eq. 4)::

    Re-EMD(p, p_hat) = ( (1/N) sum_k | M_k(p) (F_p(k) - F_phat(k)) |^gamma )^(1/gamma)
    M(p) = alpha * ( p / sum_j p_j + beta )          (a weight per level k)

``M(p)`` is a vector (one weight per level); the paper writes it as multiplying the CDF
difference at level k, so we use its k-th component there. alpha = 10, beta = 0.1 (paper).
gamma = 2 as in the TMCR EMD. The batch loss is the mean over images.
"""

from __future__ import annotations

import torch

from pipelines.heads.losses import emd_loss

_EPS = 1e-12  # same floor as pipelines.heads.losses: no NaN gradient at an exact match

__all__ = ["emd_loss", "re_emd_loss", "reemd_weights"]


def reemd_weights(target: torch.Tensor, alpha: float = 10.0, beta: float = 0.1) -> torch.Tensor:
    """``M(p) = alpha * (p / sum p + beta)`` per row of ``target`` (B, N)."""
    t = target.to(torch.promote_types(target.dtype, torch.float32))
    return alpha * (t / t.sum(dim=1, keepdim=True).clamp_min(_EPS) + beta)


def re_emd_loss(
    pred: torch.Tensor, target: torch.Tensor, *, alpha: float = 10.0, beta: float = 0.1, gamma: float = 2.0
) -> torch.Tensor:
    """Batch mean of Re-EMD (eq. 4); ``pred`` and ``target`` are (B, N) distributions."""
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred and target must both be (B, N); got {tuple(pred.shape)} and {tuple(target.shape)}")
    if gamma <= 0 or alpha <= 0 or beta < 0:
        raise ValueError(f"need gamma > 0, alpha > 0, beta >= 0; got {gamma}, {alpha}, {beta}")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    m = reemd_weights(target.detach(), alpha, beta).to(dtype)
    diff = torch.cumsum(target.to(dtype), dim=1) - torch.cumsum(pred.to(dtype), dim=1)
    per_image = (m * diff).abs().pow(gamma).mean(dim=1).clamp_min(_EPS).pow(1.0 / gamma)
    return per_image.mean()
