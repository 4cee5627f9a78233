"""Traversal contrastive loss, TMCR sec. 3.3, eq. 9-10 (SupCon-style normalised form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def traversal_contrastive_loss(z: torch.Tensor, bins: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Mean traversal contrastive loss of a balanced-level batch.

    ``z`` (B, D) embeddings (L2-normalised here), ``bins`` (B,) integer score-bin ids,
    ``s_xy = cos(z_x, z_y)``. For every anchor ``a`` (bin ``b_a``) the rounds are:

    * round 0: positives = the other samples of bin ``b_a``; negatives = every other bin;
    * round k >= 1, direction d in {+1, -1}: positives = bin ``b_a + d k``; negatives = the
      bins strictly beyond it on that side, ``d (b - b_a) > k``.

    Every (anchor, round, positive p) whose negative set N is non-empty contributes
    ``-log( e^{s_ap/tau} / (e^{s_ap/tau} + sum_{n in N} e^{s_an/tau}) )`` (eq. 10 with the
    SupCon denominator; the paper prints only the negative term). The loss is the mean over
    all terms (eq. 9 sums; the mean keeps the scale independent of the batch make-up), or a
    zero that still carries a gradient if there is none.

    Each ordered pair (a, p), p != a, belongs to exactly one round (``k = |b_p - b_a|``,
    ``d = sign``), and its negative set depends only on (a, d, k), so we loop over the
    distinct bin distances only, O(B^2) work per distance.
    """
    if z.ndim != 2 or bins.ndim != 1 or z.shape[0] != bins.shape[0]:
        raise ValueError(f"need z (B, D) and bins (B,); got {tuple(z.shape)} and {tuple(bins.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if bins.is_floating_point():
        raise ValueError("bins must be integer bin ids")
    # at least float32 (bf16 / fp16 embeddings under autocast), float64 kept as is
    zn = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1, eps=1e-8)
    sim = zn @ zn.T / tau  # (B, B), s_ax / tau
    b = bins.to(z.device).long()
    delta = b[None, :] - b[:, None]  # delta[a, x] = b_x - b_a
    n = z.shape[0]
    off_diag = ~torch.eye(n, dtype=torch.bool, device=z.device)

    neg_lse = torch.zeros_like(sim)  # log sum_{n in N(a, p)} e^{s_an / tau}, per pair (a, p)
    has_neg = torch.zeros_like(off_diag)

    def fill(pos_mask: torch.Tensor, neg_mask: torch.Tensor) -> None:
        nonlocal neg_lse, has_neg
        row_has = neg_mask.any(dim=1, keepdim=True)
        # Rows with no negatives get a constant (finite) row so logsumexp has no NaN gradient;
        # their terms are dropped through ``has_neg``.
        logits = sim.masked_fill(~neg_mask, -torch.inf).masked_fill(~row_has, 0.0)
        lse = torch.logsumexp(logits, dim=1, keepdim=True)
        neg_lse = torch.where(pos_mask, lse, neg_lse)
        has_neg = has_neg | (pos_mask & row_has)

    fill(delta == 0, delta != 0)  # round 0
    for k in torch.unique(delta.abs()).tolist():
        if k == 0:
            continue
        for d in (1, -1):
            fill(delta == d * k, d * delta > k)

    valid = has_neg & off_diag
    if not bool(valid.any()):
        return (zn * 0.0).sum()
    terms = torch.logaddexp(sim, neg_lse) - sim
    return terms[valid].mean()
