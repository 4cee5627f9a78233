"""The contrastive-ranking encoder E_CR (TMCR sec. 3.3).

The paper trains a whole image backbone (Swin-B) with the traversal contrastive loss.
Here E_CR is a trainable MLP over the frozen CLIP image embedding: it runs on a laptop
CPU, reuses the embedding cache, and keeps the loss, sampler and protocols (linear probe
/ fine-tune) of the paper. Image backbones plug in through ``pipelines.models``.
"""

from __future__ import annotations

import torch
from torch import nn


LAYERS = ("output", "hidden")  # what a head can read from E_CR (``head.cr_features``)


def _layer(layer: str) -> str:
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    return layer


class CREncoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 512, dim: int = 128, dropout: float = 0.1):
        super().__init__()
        self.in_dim, self.hidden, self.dim, self.dropout = in_dim, hidden, dim, dropout
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor, layer: str = "output") -> torch.Tensor:
        """``output``: the contrastive embedding z (what the loss sees); ``hidden``: the layer
        below it (SimCLR / SupCon practice: the representation before the projection)."""
        return self.net(x) if _layer(layer) == "output" else self.net[:3](x)

    def out_dim(self, layer: str = "output") -> int:
        return self.dim if _layer(layer) == "output" else self.hidden

    def spec(self) -> dict:
        return {"in_dim": self.in_dim, "hidden": self.hidden, "dim": self.dim, "dropout": self.dropout}
