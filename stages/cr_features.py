"""Stage `cr_features`: the image E_CR's backbone features of every image, cached once for the
linear probe (``pipelines.ranking.cr_features``). With ``pretrain.encoder: embedding`` the head
reads the CLIP cache, and this stage only records that in ``meta.json``."""

import os
import shutil
from pathlib import Path

import torch

from pipelines.io import load_torch, write_json
from pipelines.ranking.cr_features import encoder_from_state, image_paths, write_cr_features
from pipelines.images import check_images
from pipelines.train.data import load_features
from stages.common import DATA, FEATURES, IMAGE_EMB, MANIFEST, MODELS, cli, params

CR_FEATURES = DATA / "cr_features"
CR_ENCODER = MODELS / "cr_encoder.pt"


def cr_input_path(cr_spec: dict | None) -> Path:
    """Where a head's CR input comes from: the CR-feature cache for the image E_CR, else the CLIP cache."""
    return CR_FEATURES if (cr_spec or {}).get("kind") == "image" else IMAGE_EMB


def head_cr_input(head_path: str | Path) -> Path:
    """``cr_input_path`` of a trained head file (head / selftrain stage output)."""
    return cr_input_path(load_torch(head_path)["arch"].get("cr_input"))


@cli
def main() -> None:
    p = params()
    state = load_torch(CR_ENCODER)
    if state["spec"].get("kind") != "image":
        shutil.rmtree(CR_FEATURES, ignore_errors=True)
        write_json(CR_FEATURES / "meta.json", {"encoder": "embedding", "head_reads": str(IMAGE_EMB)})
        return
    encoder = encoder_from_state(state)
    ids = [str(i) for i in load_features(FEATURES, None).image_id]
    paths = image_paths(MANIFEST, ids, os.getcwd())
    check_images(paths, what="the CR-feature cache (pretrain.encoder: image)",
                 fix="restore the files or rebuild the manifest (`dvc repro prepare`).")
    img = p.pretrain.image
    device = "cuda" if p.pretrain.ray.use_gpu and torch.cuda.is_available() else "cpu"
    write_cr_features(encoder, ids, paths, CR_FEATURES, batch_size=img.batch_size, workers=img.loader_workers, device=device)


if __name__ == "__main__":
    main()
