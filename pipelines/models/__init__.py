"""Image model families trained end to end on pixels (the seeds beside TMCR).

A registry: family name -> builder and loss. ``build(name, n_levels, options)`` returns the
model; ``loss_terms(name, model, out, target, options, image)`` its training loss dict
(``loss`` plus detached parts for logging). Options are the family's params block
(``model.mnet`` / ``model.aesaf``); an unknown option is a ``DataError``.

- ``mnet``  : M+MNet (seed 003) -- ``pipelines.models.mnet``; Re-EMD loss; Corner Grid and gated
  mixed precision live in ``corner_grid`` / ``amp`` and are applied by the training loop.
- ``aesaf`` : auto-encoder semantic-aesthetic fusion (seed 002) -- ``pipelines.models.aesaf``;
  EMD + reconstruction + L1 activation loss.

Each family also carries its paper's training recipe as defaults (``Family.defaults``), which
the ``auto`` value of ``model.optimizer`` / ``model.crop`` / ``model.corner_grid`` resolves to
(``resolve``): M+MNet trains with Adam, a 256 -> 224 random crop in stage 1 and Corner Grid from
the precision switch on; the AE-fusion model with horizontal flips only (see ``FAMILIES``).
Seed 002 trains with SGD, momentum 0.9, but its learning rate is lost from the seed text, and on
the demo SGD learns far slower than Adam in a short run (README, choices), so ``auto`` keeps Adam
for both and ``model.optimizer: sgd`` gives the paper's optimiser.

The formula parts are reusable on their own: ``pooling.ForePool/BackPool``, ``losses.re_emd_loss``,
``corner_grid.corner_grid``, ``amp.MixedPrecisionTrainer``, ``aesaf.spp``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipelines.io import DataError


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[..., nn.Module]
    arch_keys: tuple[str, ...]  # options passed to the constructor
    loss_keys: tuple[str, ...]  # options read by the loss
    defaults: dict[str, str] = field(default_factory=dict)  # what ``auto`` means for the training keys


OPTIMIZERS = ("adam", "sgd")
CROPS = ("off", "random")
def _build_mnet(n_levels: int, **kw: Any) -> nn.Module:
    from pipelines.models.mnet import MNet

    return MNet(n_levels, **kw)


def _build_aesaf(n_levels: int, **kw: Any) -> nn.Module:
    from pipelines.models.aesaf import AESAF

    if "widths" in kw:
        kw["widths"] = tuple(kw["widths"])
    return AESAF(n_levels, **kw)


FAMILIES: dict[str, Family] = {
    # seed 003 sec. 4: Adam; stage 1 resizes to 256 and crops 224 at random (with flips);
    # Corner Grid with the mixed-precision stage
    "mnet": Family("mnet", _build_mnet, ("branch_blocks", "attn_reduction", "pool_size", "fuse_channels", "dropout"),
                   ("loss", "alpha", "beta"), {"optimizer": "adam", "crop": "random", "corner_grid": "with_mixed"}),
    # seed 002: horizontal flips are its only augmentation; its SGD (momentum 0.9) is
    # ``optimizer: sgd`` -- Adam by default, see the module docstring
    "aesaf": Family("aesaf", _build_aesaf, ("backbone", "widths", "group_maps", "hidden", "split"),
                    ("rec_weight", "act_weight"), {"optimizer": "adam", "crop": "off", "corner_grid": "off"}),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise DataError(f"model.family = {name!r}; known families: {', '.join(sorted(FAMILIES))}.")
    return FAMILIES[name]


def resolve(name: str, key: str, value: str) -> str:
    """``value``, or the family's own default for ``key`` when ``value`` is ``auto``."""
    return family(name).defaults[key] if value == "auto" else value


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9, fused: bool = False) -> torch.optim.Optimizer:
    """``adam`` or ``sgd`` (with ``momentum``), as ``model.optimizer`` names it (resolved);
    ``fused``: the fused CUDA kernel (parameters on a GPU; ``model.fused_optimizer``)."""
    extra = {"fused": True} if fused else {}
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **extra)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **extra)
    raise DataError(f"model.optimizer = {name!r}; use auto, {' or '.join(OPTIMIZERS)}.")


def build(name: str, n_levels: int, options: dict[str, Any] | None = None) -> nn.Module:
    """The model of family ``name``; ``options`` = arch + loss keys (+ ``weights``, a local checkpoint path or empty)."""
    fam = family(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(fam.arch_keys) - set(fam.loss_keys) - {"weights"})
    if unknown:
        raise DataError(
            f"model.{name}: unknown option(s) {unknown}; known: {', '.join(sorted((*fam.arch_keys, *fam.loss_keys, 'weights')))}."
        )
    model = fam.build(n_levels, **{k: v for k, v in options.items() if k in fam.arch_keys})
    if options.get("weights"):
        model.load_weights(options["weights"])
    return model


def loss_terms(name: str, model: nn.Module, out: dict, target, options: dict, image) -> dict:
    if family(name).name == "mnet":
        from pipelines.models.mnet import loss_terms as f

        return f(model, out, target, options)
    from pipelines.models.aesaf import loss_terms as g

    return g(model, out, target, options, image)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
