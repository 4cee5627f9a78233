"""The CR-feature cache: the image E_CR's backbone features of every image, for the linear probe.

Written once after pretraining, in the embed cache's format (``pipelines.embed.cache``:
chunked, atomic, resumable Parquet keyed by ``image_id``), so ``load_features`` joins it as
it joins the CLIP cache and every reader of ``FeatureSet.emb`` (head, pseudo labels,
evaluation) takes it unchanged. The fingerprint holds the backbone's weights hash and the
view (size, resize): new weights wipe the cache; a killed run keeps its finished chunks.

``pipelines.data.manifest.image_paths`` maps feature-table ids to image files; ``cr_views`` is
the evaluation view every reader of pixels for E_CR uses (the scoring model too).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipelines.embed.cache import file_sha256, normalise_fingerprint, open_cache, write_chunk, write_meta
from pipelines.images import batch_loader, crop_view, to_device, view_batch
from pipelines.io import DataError
from pipelines.ranking.backbone import ImageCREncoder, state_fingerprint, sub_state
from pipelines.train.data import CR_FEATURES_KIND


def cr_views(encoder: ImageCREncoder, images) -> torch.Tensor:
    """The evaluation views (centre crop, no flip) of PIL images for ``encoder``."""
    return torch.stack([crop_view(im, encoder.image_size, encoder.resize) for im in images])


@torch.no_grad()
def cr_image_features(encoder: ImageCREncoder, images) -> torch.Tensor:
    """Backbone features of PIL images (what the cache holds for files), (N, D) float32."""
    encoder.eval()
    return encoder.embed(cr_views(encoder, images)).float()


def cache_fingerprint(encoder: ImageCREncoder) -> dict:
    return normalise_fingerprint({
        "kind": CR_FEATURES_KIND, "backbone": encoder.backbone_name, "weights": state_fingerprint(encoder.backbone.state_dict()),
        "image_size": encoder.image_size, "resize": encoder.resize, "embed_dim": int(encoder.proj.in_dim),
    })


def _eval_batch(size: int, resize: int, spec) -> torch.Tensor:
    return view_batch(spec, size, resize)


@torch.no_grad()
def write_cr_features(encoder: ImageCREncoder, ids: Sequence[str], paths: Sequence[str], out_dir: str | Path, *,
                      batch_size: int = 64, chunk_rows: int = 512, workers: int = 0, device: str | torch.device = "cpu") -> dict:
    """Encode the images not yet in the cache at ``out_dir``; returns ``{"n_total", "n_encoded"}``."""
    if len(ids) != len(paths):
        raise ValueError(f"{len(ids)} ids but {len(paths)} paths")
    fp = cache_fingerprint(encoder)
    digests = {i: file_sha256(p) for i, p in zip(ids, paths, strict=True)}  # a changed file is encoded again
    state = open_cache(out_dir, fp, wanted=digests)
    if state.meta is None:
        write_meta(out_dir, {"fingerprint": fp, "encoder": encoder.spec()})
    pending = [(i, p) for i, p in zip(ids, paths, strict=True) if i not in state.done]
    encoder.eval().to(device)
    specs = [[p for _, p in pending[k : k + batch_size]] for k in range(0, len(pending), batch_size)]
    make = functools.partial(_eval_batch, encoder.image_size, encoder.resize)
    index, buf_ids, buf = state.next_index, [], []
    for k, x in enumerate(batch_loader(specs, make, workers=workers, device=device)):
        buf.append(encoder.embed(to_device(x, device)).float().cpu().numpy())
        buf_ids.extend(i for i, _ in pending[k * batch_size : (k + 1) * batch_size])
        if len(buf_ids) >= chunk_rows or k == len(specs) - 1:
            write_chunk(out_dir, index, buf_ids, np.concatenate(buf), file_hashes=[digests[i] for i in buf_ids])
            index, buf_ids, buf = index + 1, [], []
    return {"n_total": len(ids), "n_encoded": len(pending)}


def encoder_from_state(state: dict) -> torch.nn.Module:
    """The trained E_CR of a pretrain state (``spec`` + ``model``)."""
    from pipelines.ranking.backbone import encoder_from_spec

    enc = encoder_from_spec(state["spec"])
    enc.load_state_dict(state["model"])
    return enc.eval()


def backbone_state(state: dict) -> dict:
    """The backbone's weights in a pretrain state."""
    return sub_state(state["model"], "backbone")


def bundle_cr_encoder(cr_state: dict | None) -> dict | None:
    """What a scoring bundle needs of an image E_CR to compute CR features from pixels: its spec
    and backbone weights (the projection is in the head); None for the embedding E_CR."""
    if cr_state is None or cr_state["spec"].get("kind") != "image":
        return None
    return {"spec": cr_state["spec"], "backbone": backbone_state(cr_state)}


def cr_backbone_from_bundle(entry: dict | None) -> ImageCREncoder | None:
    """The image E_CR whose ``embed`` gives a bundled head its CR input (``bundle_cr_encoder``), or None."""
    if entry is None:
        return None
    from pipelines.ranking.backbone import encoder_from_spec

    enc = encoder_from_spec(entry["spec"])
    enc.backbone.load_state_dict(entry["backbone"])
    return enc.eval()
