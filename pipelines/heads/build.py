"""Build, load and run the TMCR head: what training, evaluation and scoring share.

Imports no Ray and no training code, so the served model and the evaluation stay light.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.heads.losses import emd_loss
from pipelines.heads.model import TMCRHead
from pipelines.ranking.backbone import sub_state
from pipelines.ranking.encoder import CREncoder


def build_head(h: dict, cr_path, tm_in: int, emb_dim: int, n_levels: int) -> tuple[TMCRHead, dict]:
    """The head described by ``h`` (the ``head`` params block as a dict, as model files keep it),
    with the pretrained E_CR of ``cr_path`` when ``h["use_cr"]``.

    With the image E_CR (linear probe), the head's E_CR is its projection MLP over the
    backbone features that the CR-feature cache holds (``emb``); ``arch["cr_input"]`` records
    the whole encoder's spec, so scoring knows to compute those features from pixels.
    Returns the model and its architecture dict (``head_from_arch`` rebuilds it).
    """
    cr_spec, cr_weights, cr_input = None, None, None
    if h["use_cr"]:
        cr_state = torch.load(cr_path, map_location="cpu", weights_only=True)
        cr_spec, cr_weights = cr_state["spec"], cr_state["model"]
        if cr_spec.get("kind") == "image":
            cr_input, cr_weights = cr_spec, sub_state(cr_weights, "proj")
            cr_spec = {k: cr_spec[k] for k in ("in_dim", "hidden", "dim", "dropout")}
        if cr_spec["in_dim"] != emb_dim:
            raise ValueError(f"CR encoder expects {cr_spec['in_dim']}-d embeddings, features have {emb_dim}")
    arch = {"tm_in": tm_in, "n_levels": n_levels, "cr_spec": cr_spec, "cr_input": cr_input, "head": h}
    model = head_from_arch(arch)
    if cr_weights is not None:
        model.cr.load_state_dict(cr_weights)
    return model, arch


def head_from_arch(arch: dict) -> TMCRHead:
    """An untrained head of the given architecture (load a state dict into it)."""
    h = arch["head"]
    cr = CREncoder(**arch["cr_spec"]) if arch["cr_spec"] else None
    return TMCRHead(
        arch["tm_in"], arch["n_levels"], cr, tm_dim=h["tm_dim"], cr_dim=h["cr_dim"], hidden=h["hidden"],
        dropout=h["dropout"], use_tm=h["use_tm"], use_cr=h["use_cr"], fine_tune=h["protocol"] == "fine_tune",
        cr_features=h.get("cr_features", "output"),  # models saved before the option: output
        tm_whiten=h.get("tm_whiten", False),
    )


def load_head(path) -> TMCRHead:
    """A trained head from a model file written by the head / selftrain stage."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = head_from_arch(state["arch"])
    model.load_state_dict(state["model"])
    return model.eval()


def _logits(model: TMCRHead, matcher, clip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    return model(matcher(clip), emb)


@torch.no_grad()
def predict_logits(model: TMCRHead, matcher, clip: np.ndarray, emb: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The head's logits of N rows: TM computed per batch from the CLIP embeddings ``clip``,
    E_CR's input ``emb``; on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        _logits(model, matcher, torch.from_numpy(clip[i : i + batch]).to(device), torch.from_numpy(emb[i : i + batch]).to(device)).cpu().numpy()
        for i in range(0, len(clip), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.mlp[-1].out_features), np.float32)


HEAD_LOSSES = ("emd", "re_emd")


def head_loss(h: dict):
    """The distribution loss of ``head.loss``: TMCR's EMD_r (eq. 14), or M+MNet's Re-EMD
    (eq. 4, alpha 10, beta 0.1, gamma = emd_r), which weights each level's CDF gap by the
    target's mass there."""
    from pipelines.models.losses import re_emd_loss

    r = h["emd_r"]
    if h.get("loss", "emd") == "re_emd":
        return lambda pred, target: re_emd_loss(pred, target, gamma=r)
    return lambda pred, target: emd_loss(pred, target, r=r)


def input_paths(embeddings_path, clip_path=None, tags_path=None) -> tuple[str, str, str]:
    """(E_CR input cache, CLIP cache for TM, tag table) of a head; the CLIP cache defaults to the
    E_CR input, the tag table to ``tags.parquet`` beside the CLIP cache (the embed stage's layout)."""
    clip = clip_path or embeddings_path
    return embeddings_path, clip, tags_path or str(Path(clip).parent / "tags.parquet")
