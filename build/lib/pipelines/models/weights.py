"""Local checkpoints for the image families' ``weights`` option (no download is ever attempted).

``read_weights`` reads a ``state_dict`` file and tells the family's own saved weights apart from
torchvision backbone weights, whose ``features.*`` keys it strips to the backbone's own names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.io import DataError


def read_weights(path: str | Path, *, option: str, own_prefix: str) -> tuple[bool, dict[str, torch.Tensor]]:
    """(own, tensors): ``own`` when a key starts with ``own_prefix`` (a saved model of the family:
    the whole ``state_dict``); else the torchvision ``features.*`` tensors, prefix stripped (may be
    empty). ``option`` names the param in the file-not-found error (e.g. ``model.mnet.weights``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{option} = {str(path)!r}: file not found (no download is attempted).")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if any(k.startswith(own_prefix) for k in sd):
        return True, sd
    return False, {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
