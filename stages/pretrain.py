"""Stage `pretrain`: traversal contrastive learning of the CR encoder (Ray Train).

``pretrain.encoder: embedding`` trains the MLP over the cached CLIP embedding;
``image`` trains ``pretrain.image.backbone`` on the images (the paper's design).
"""

import os
from pathlib import Path

import torch

from pipelines.images import check_decode
from pipelines.io import DataError
from pipelines.ranking.backbone import cr_card, create_backbone
from pipelines.train.data import embedding_files, load_features
from pipelines.ranking.pretrain import ENCODERS, PretrainConfig, pretrain_images, pretrain_loop, steps_of
from pipelines.train.precision import PRECISIONS, check_speed, resolve_precision, speed_of
from stages.common import FEATURES, IMAGE_EMB, INDEX, MANIFEST, MODELS, cli, params
from stages.training import train_stage


def pretrain_config(p, root: Path = Path(".")) -> tuple[PretrainConfig, list]:
    """The loop's config and its input files (for the resume fingerprint), with the data under ``root``
    (the stage: the repo, relative; a Tune trial: the repo's absolute path). Bad params fail here, before
    Ray starts. The stage and Tune both build their config with it."""
    c = p.pretrain
    features, emb, index = root / FEATURES, root / IMAGE_EMB, root / INDEX
    if c.encoder not in ENCODERS:
        raise DataError(f"params.yaml: pretrain.encoder = {c.encoder!r}; use one of {', '.join(ENCODERS)}.")
    try:
        steps_of(c.batches_per_step, max(c.ray.num_workers, 1))
    except ValueError as exc:
        raise DataError(f"params.yaml: {exc}.") from None
    common = dict(features_path=features, index_path=index, lr=c.lr, weight_decay=c.weight_decay, tau=c.tau, hidden=c.hidden,
                  dim=c.dim, dropout=c.dropout, batches_per_step=c.batches_per_step, low=p.index.low, high=p.index.high)
    if c.encoder == "embedding":
        config = PretrainConfig(encoder="embedding", embeddings_path=emb, epochs=c.epochs, batches_per_cluster=c.batches_per_cluster,
                                **common)
        return config, [features, *embedding_files(emb), index]
    img = c.image
    if img.precision not in PRECISIONS:
        raise DataError(f"params.yaml: pretrain.image.precision = {img.precision!r}; use one of {', '.join(PRECISIONS)}.")
    if not 1 <= img.image_size <= img.resize:
        raise DataError(f"params.yaml: pretrain.image: need 1 <= image_size <= resize, got {img.image_size} and {img.resize}.")
    check_device_options(img, c.ray.use_gpu, "pretrain.image")
    create_backbone(img.backbone, img.weights)  # unknown name, unfit checkpoint, offline hub: a clear error now
    manifest = root / MANIFEST
    config = PretrainConfig(encoder="image", manifest_path=manifest, root=str(root.resolve()), image=img, epochs=img.epochs,
                            batches_per_cluster=img.batches_per_cluster, **common)
    pretrain_images(config, load_features(features, None).split_of("train"))
    weights = [img.weights] if os.path.isfile(img.weights) else []
    return config, [features, index, manifest, *weights]


def check_device_options(img, use_gpu: bool, key: str) -> None:
    """Refuse, before Ray starts, a precision or speed option that the training device cannot
    honour (checked here when this machine has that device; the workers check again at start).
    ``img``: ``pretrain.image`` (``ImageEncoderParams``) or the fine-tune loop's image options."""
    if use_gpu and not torch.cuda.is_available():
        return  # the GPUs are on the cluster's workers
    device = torch.device("cuda" if use_gpu else "cpu")
    resolve_precision(img.precision, device, key=f"{key}.precision")
    check_speed(speed_of(img), device, key=key)
    check_decode(img.decode, device, key=f"{key}.decode")


@cli
def main() -> None:
    p = params()
    config, inputs = pretrain_config(p)
    train_stage("pretrain", pretrain_loop, config, p.pretrain.ray, inputs=inputs, model_out=MODELS / "cr_encoder.pt",
                cr=lambda state: cr_card(state["spec"]))


if __name__ == "__main__":
    main()
