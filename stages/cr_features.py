"""Stage `cr_features`: the image E_CR's backbone features of every image, cached once for the
linear probe (``pipelines.ranking.cr_features``). With ``pretrain.encoder: embedding`` the head
reads the CLIP cache, and this stage only records that in ``meta.json``."""

import os
import shutil
from pathlib import Path

import torch

from pipelines.io import DataError, load_torch, write_json
from pipelines.data.manifest import image_paths
from pipelines.ranking.cr_features import encoder_from_state, write_cr_features
from pipelines.images import check_images
from pipelines.train.data import load_features
from stages.common import DATA, FEATURES, IMAGE_EMB, MANIFEST, MODELS, cli, params

CR_FEATURES = DATA / "cr_features"
TUNED_CR_FEATURES = DATA / "cr_features_tuned"  # the fine-tuned backbone's (head stage, head.protocol: fine_tune)
CR_ENCODER = MODELS / "cr_encoder.pt"


def cr_input_path(cr_spec: dict | None) -> Path:
    """Where a head's CR input comes from: the CR-feature cache for the image E_CR, else the CLIP cache."""
    return CR_FEATURES if (cr_spec or {}).get("kind") == "image" else IMAGE_EMB


def state_cr_input(state: dict) -> Path:
    """Where a trained head's CR input comes from: ``cr_input_path``, or, for a head whose image
    E_CR was fine-tuned (``cr_backbone`` in its file), the cache of that backbone's features,
    checked to hold exactly those weights' features."""
    if (tuned := state.get("cr_backbone")) is None:
        return cr_input_path(state["arch"].get("cr_input"))
    from pipelines.embed.cache import read_meta
    from pipelines.heads.finetune import tuned_fingerprint

    held = ((read_meta(TUNED_CR_FEATURES) or {}).get("fingerprint") or {}).get("weights")
    if held != tuned_fingerprint(tuned):
        raise DataError(f"{TUNED_CR_FEATURES}: holds the features of backbone weights {held!r}, not those of the fine-tuned "
                        f"head's backbone ({tuned_fingerprint(tuned)}); rerun `dvc repro head`.")
    return TUNED_CR_FEATURES


def head_cr_input(head_path: str | Path) -> Path:
    """``state_cr_input`` of a trained head file (head / selftrain stage output)."""
    return state_cr_input(load_torch(head_path))


def cache_features(encoder, out_dir: Path, p, what: str) -> dict:
    """Write ``encoder``'s backbone features of every image of the features table to ``out_dir``."""
    ids = [str(i) for i in load_features(FEATURES, None).image_id]
    paths = image_paths(MANIFEST, ids, os.getcwd())
    check_images(paths, what=what, fix="restore the files or rebuild the manifest (`dvc repro prepare`).")
    img = p.pretrain.image
    device = "cuda" if p.pretrain.ray.use_gpu and torch.cuda.is_available() else "cpu"
    return write_cr_features(encoder, ids, paths, out_dir, batch_size=img.batch_size, workers=img.loader_workers, device=device)


@cli
def main() -> None:
    p = params()
    state = load_torch(CR_ENCODER)
    if state["spec"].get("kind") != "image":
        shutil.rmtree(CR_FEATURES, ignore_errors=True)
        write_json(CR_FEATURES / "meta.json", {"encoder": "embedding", "head_reads": str(IMAGE_EMB)})
        return
    cache_features(encoder_from_state(state), CR_FEATURES, p, "the CR-feature cache (pretrain.encoder: image)")


if __name__ == "__main__":
    main()
