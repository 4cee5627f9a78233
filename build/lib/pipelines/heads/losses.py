"""Losses for the prediction head (torch): EMD (TMCR eq. 14) and FLSA (ELTA eq. 5-6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Floor on the mean |CDF difference|^r before the 1/r power: d/dx x^(1/r) is infinite at 0,
# which would turn an exact match into a NaN gradient. The floor changes the value of an
# exact match from 0 to EPS^(1/r) (1e-6 for r=2) and gives it a zero gradient.
_EMD_EPS = 1e-12


def emd_loss(pred: torch.Tensor, target: torch.Tensor, r: float = 2.0) -> torch.Tensor:
    """Batch mean of the EMD loss, TMCR eq. 14.

    ``L_i = ( (1/D) sum_d |CDF_target_i(d) - CDF_pred_i(d)|^r )^(1/r)`` with D levels;
    returns ``mean_i L_i``. ``pred`` and ``target`` are (B, D) probability vectors (rows
    sum to 1; not renormalised here). ``r=2`` is the paper's training loss.
    """
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred and target must both be (B, D); got {tuple(pred.shape)} and {tuple(target.shape)}")
    if r <= 0:
        raise ValueError(f"r must be > 0, got {r}")
    dtype = torch.promote_types(pred.dtype, torch.float32)  # fp16/bf16 cumsums drift
    diff = (torch.cumsum(pred.to(dtype), dim=1) - torch.cumsum(target.to(dtype), dim=1)).abs()
    per_image = diff.pow(r).mean(dim=1).clamp_min(_EMD_EPS).pow(1.0 / r)
    return per_image.mean()


def flsa_loss(features: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Feature-label similarity alignment, ELTA eq. 5-6: ``MSE(M^f, M^l)``.

    ``M^f_ij = cos(z_i, z_j)`` (eq. 5) over the batch features (B, D), and
    ``M^l_ij = 1 - |s_i - s_j| / (max_k s_k - min_k s_k)`` (eq. 6) from the scores (B,).
    The MSE is the mean over all B x B entries (the diagonal contributes ~0). When all
    scores in the batch are equal the range is 0; we then set ``M^l = 1`` everywhere (every
    pair shares an identical label, the meaning eq. 6 gives to 1). Scores are labels: no
    gradient flows into them.
    """
    if features.ndim != 2 or scores.ndim != 1 or features.shape[0] != scores.shape[0]:
        raise ValueError(f"need features (B, D) and scores (B,); got {tuple(features.shape)} and {tuple(scores.shape)}")
    dtype = torch.promote_types(features.dtype, torch.float32)
    z = F.normalize(features.to(dtype), dim=1, eps=1e-8)
    m_f = z @ z.T
    s = scores.detach().to(device=features.device, dtype=dtype)
    rng = s.max() - s.min()
    gap = (s[:, None] - s[None, :]).abs()
    m_l = torch.where(rng > 0, 1.0 - gap / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.ones_like(gap))
    return F.mse_loss(m_f, m_l)


def masked_mean_loss(loss_fn, pred: torch.Tensor, target: torch.Tensor, *, n_total: int) -> torch.Tensor:
    """A batch-mean loss over the ``len(pred)`` kept rows, re-expressed as a mean over
    ``n_total`` rows whose other rows contribute zero: ``loss_fn(pred, target) * len(pred) / n_total``
    (ELTA eq. 10's indicator-weighted mean). ``loss_fn`` must average over the batch."""
    if n_total < len(pred) or n_total <= 0:
        raise ValueError(f"n_total must be >= the {len(pred)} kept rows and > 0, got {n_total}")
    if len(pred) == 0:
        return torch.zeros((), device=pred.device)
    return loss_fn(pred, target) * (len(pred) / n_total)
