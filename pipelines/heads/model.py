"""The TMCR prediction head (sec. 3.4, eq. 12-13).

TM features and CR features are each projected ("dimension transformation"), concatenated
into F_aes, and a two-layer score MLP gives logits over the L levels (softmax -> the
predicted vote distribution). ELTA's TFA and FLSA act on F_aes.

Two options for features that are not the paper's (both off by default):

- ``cr_features="input"``: the CR branch projects E_CR's *input* (the embedding) instead of
  one of E_CR's layers, so the head contains a plain MLP on the embedding beside TM (E_CR
  itself is then unused and frozen);
- ``tm_whiten=True``: the standardised TM features are also PCA-whitened with the training
  rows' correlation matrix (``fit_normaliser``), for a tag library whose similarities are
  concentrated in a few directions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from pipelines.ranking.encoder import LAYERS, CREncoder

CR_INPUTS = (*LAYERS, "input")  # what the CR branch can read: an E_CR layer, or E_CR's input (the embedding)


def pca_whitener(corr: torch.Tensor, eps: float) -> torch.Tensor:
    """The PCA-whitening matrix W (x @ W has identity covariance up to the shrinkage) of
    standardised features with correlation matrix ``corr``: the eigenvectors scaled by
    1 / sqrt(eigenvalue + eps * mean eigenvalue), so near-empty directions are not blown up.
    Eigenvector signs are fixed (largest entry positive), so the matrix is reproducible."""
    vals, vecs = torch.linalg.eigh(corr)
    vals = vals.clamp_min(0)
    vals, vecs = vals.flip(0), vecs.flip(1)  # largest first
    sign = torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True)))
    vecs = vecs * torch.where(sign == 0, torch.ones_like(sign), sign)
    return (vecs / (vals + eps * vals.mean()).sqrt()).to(torch.float32)


class TMCRHead(nn.Module):
    def __init__(
        self,
        tm_in: int,
        n_levels: int,
        cr_encoder: CREncoder | None,
        *,
        tm_dim: int = 128,
        cr_dim: int = 128,
        hidden: int = 256,
        dropout: float = 0.2,
        use_tm: bool = True,
        use_cr: bool = True,
        fine_tune: bool = False,
        cr_features: str = "output",
        tm_whiten: bool = False,
        tm_whiten_eps: float = 1e-2,
    ):
        super().__init__()
        if not (use_tm or use_cr):
            raise ValueError("the head needs TM features, CR features, or both")
        if use_cr and cr_encoder is None:
            raise ValueError("use_cr needs a pretrained CR encoder")
        if cr_features not in CR_INPUTS:
            raise ValueError(f"cr_features must be one of {CR_INPUTS}, got {cr_features!r}")
        self.use_tm, self.use_cr, self.fine_tune, self.cr_features = use_tm, use_cr, fine_tune, cr_features
        self.tm_whiten, self.tm_whiten_eps = tm_whiten, tm_whiten_eps
        # Training-set statistics of the TM features (set by ``fit_normaliser``), kept in
        # the state dict so inference normalises exactly as training did.
        self.register_buffer("tm_mean", torch.zeros(tm_in))
        self.register_buffer("tm_std", torch.ones(tm_in))
        if tm_whiten:  # only then: the state dicts of heads without the option stay as they were
            self.register_buffer("tm_white", torch.eye(tm_in))
        fused = 0
        if use_tm:
            self.tm_proj = nn.Linear(tm_in, tm_dim)
            fused += tm_dim
        if use_cr:
            self.cr = cr_encoder
            self.cr.requires_grad_(fine_tune and cr_features != "input")  # "input" reads no E_CR layer
            in_dim = cr_encoder.in_dim if cr_features == "input" else cr_encoder.out_dim(cr_features)
            self.cr_proj = nn.Linear(in_dim, cr_dim)
            fused += cr_dim
        self.fused_dim = fused
        self.mlp = nn.Sequential(
            nn.Linear(fused, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_levels)
        )

    def fit_normaliser(self, chunks: Callable[[], Iterable[torch.Tensor]],
                       all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Set ``tm_mean`` / ``tm_std`` (unbiased) from the training rows' TM features, streamed.

        ``chunks()`` yields the TM features of the rows block by block (it is called twice:
        the sums, then the squared deviations from the mean, in float64); no N x (M + A)
        table exists. ``all_reduce`` sums a tensor in place across workers whose chunks are
        their own shards, so every worker gets the statistics of all training rows.
        """
        reduce = all_reduce or (lambda t: None)
        total = torch.zeros(self.tm_mean.numel() + 1, dtype=torch.float64, device=self.tm_mean.device)
        for tm in chunks():
            total[:-1] += tm.to(total).sum(0)
            total[-1] += len(tm)
        reduce(total)
        n = float(total[-1])
        if n < 2:
            raise ValueError(f"the TM normaliser needs at least 2 training rows, got {int(n)}")
        mean = total[:-1] / n
        if not self.tm_whiten:
            sq = torch.zeros_like(mean)
            for tm in chunks():
                sq += ((tm.to(mean) - mean) ** 2).sum(0)
            reduce(sq)
            self.tm_mean.copy_(mean)
            self.tm_std.copy_((sq / (n - 1)).sqrt().clamp_min(1e-6))
            return
        cov = torch.zeros(len(mean), len(mean), dtype=mean.dtype, device=mean.device)
        for tm in chunks():
            dev = tm.to(mean) - mean
            cov += dev.T @ dev
        reduce(cov)
        cov /= n - 1
        std = cov.diagonal().sqrt().clamp_min(1e-6)
        self.tm_mean.copy_(mean)
        self.tm_std.copy_(std)
        self.tm_white.copy_(pca_whitener(cov / std[:, None] / std[None, :], self.tm_whiten_eps))

    def train(self, mode: bool = True) -> "TMCRHead":
        super().train(mode)
        if self.use_cr and not self.fine_tune:
            self.cr.eval()  # linear probe: the encoder stays frozen, dropout off
        return self

    def fuse(self, tm: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """F_aes (eq. 12)."""
        parts = []
        if self.use_tm:
            parts.append(self.tm_proj(self.normalise_tm(tm)))
        if self.use_cr:
            parts.append(self.cr_proj(emb if self.cr_features == "input" else self.cr.features(emb, self.cr_features)))
        return torch.cat(parts, dim=1)

    def normalise_tm(self, tm: torch.Tensor) -> torch.Tensor:
        """TM standardised per dimension with the training rows' statistics (and whitened, with ``tm_whiten``)."""
        z = (tm - self.tm_mean) / self.tm_std
        return z @ self.tm_white if self.tm_whiten else z

    def classify(self, fused: torch.Tensor) -> torch.Tensor:
        """Logits over the levels (eq. 13 before the softmax)."""
        return self.mlp(fused)

    def forward(self, tm: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.classify(self.fuse(tm, emb))
