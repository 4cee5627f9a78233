"""Stage `head`: TM + CR features -> MLP -> level distribution, EMD loss, ELTA TFA/FLSA."""

import dataclasses
import os
import shutil
from pathlib import Path

from pipelines.io import DataError, load_torch, write_json
from pipelines.heads.finetune import FineTuneConfig, finetune_images, finetune_loop, tuned_encoder
from pipelines.ranking.backbone import cr_card
from pipelines.heads.model import CR_INPUTS
from pipelines.train.data import embedding_files, load_features
from pipelines.heads.build import HEAD_LOSSES
from pipelines.heads.train import HeadConfig, supervised_loop
from pipelines.train.core import SELECT_ON
from stages.pretrain import check_device_options
from stages.common import FEATURES, IMAGE_EMB, MANIFEST, MODELS, PSEUDO, TAG_EMB, cli, params
from stages.cr_features import CR_ENCODER, TUNED_CR_FEATURES, cache_features, cr_input_path, state_cr_input
from stages.training import train_stage

PROTOCOLS = ("linear_probe", "fine_tune")


def head_config(p, cr_spec: dict | None = None, root: Path = Path(".")) -> HeadConfig:
    """The head loop's config, with the data under ``root`` (the stage: the repo, relative; a Tune
    trial: its absolute path). ``cr_spec`` is E_CR's spec when it is not yet on disk (a Tune trial's
    own encoder), else it is read from ``models/cr_encoder.pt``. Bad params fail here, before Ray
    starts; the stages and Tune all build their config with it."""
    h = p.head
    for key, value, allowed in (("protocol", h.protocol, PROTOCOLS), ("loss", h.loss, HEAD_LOSSES),
                                ("select_on", h.select_on, tuple(SELECT_ON)), ("cr_features", h.cr_features, CR_INPUTS)):
        if value not in allowed:
            raise DataError(f"params.yaml: head.{key} = {value!r}; use one of {', '.join(allowed)}.")
    if h.use_cr and cr_spec is None:
        cr_spec = load_torch(root / CR_ENCODER)["spec"]
    # fine-tuning the image E_CR: the head stage trains on pixels; the stages after it read the tuned backbone's cache
    cr_input = TUNED_CR_FEATURES if fine_tunes_image(h, cr_spec) else cr_input_path(cr_spec)
    return HeadConfig(features_path=root / FEATURES, embeddings_path=root / cr_input, clip_path=root / IMAGE_EMB,
                      tags_path=root / TAG_EMB, cr_path=root / CR_ENCODER if h.use_cr else None, head=h, epochs=h.epochs, lr=h.lr)


def selftrain_config(p, head_state: dict, root: Path = Path(".")) -> HeadConfig:
    """The self-training loop's config: the head's, from the trained head (``models/head.pt``,
    ``head_state``) with the pseudo labels; a fine-tuned head's backbone stays as it is (its cached features)."""
    s = p.selftrain
    return dataclasses.replace(
        head_config(p, head_state["arch"].get("cr_input") or {}, root=root), epochs=s.epochs, lr=s.lr, unlabeled_weight=s.unlabeled_weight, desc="selftrain",
        init_path=root / MODELS / "head.pt", pseudo_path=root / PSEUDO, embeddings_path=root / state_cr_input(head_state))


def finetune_config(p) -> FineTuneConfig:
    """The fine-tune loop's config (``head.protocol: fine_tune`` with the image E_CR): the head's,
    plus the images, ``head.backbone_lr`` and ``pretrain.image``'s loader, precision and speed options."""
    if not p.head.backbone_lr >= 0:
        raise DataError(f"params.yaml: head.backbone_lr = {p.head.backbone_lr!r}; give a learning rate >= 0 (0 freezes the backbone).")
    check_device_options(p.pretrain.image, p.head.ray.use_gpu, "pretrain.image")
    head = {f.name: getattr(head_config(p), f.name) for f in dataclasses.fields(HeadConfig) if f.name not in ("desc", "embeddings_path")}
    return FineTuneConfig(**head, manifest_path=MANIFEST, root=os.getcwd(), backbone_lr=p.head.backbone_lr, image=p.pretrain.image)


def input_files(config: HeadConfig) -> list:
    """The files a head / self-training run reads (for its resume fingerprint): the features
    table, the tag table, the CLIP cache TM reads and E_CR's input cache."""
    caches = dict.fromkeys(map(str, (config.clip_path, config.embeddings_path)))
    return [FEATURES, TAG_EMB, *(f for c in caches for f in embedding_files(c))]


def fine_tunes_image(h, cr_spec: dict | None) -> bool:
    """``head.protocol: fine_tune`` with the image E_CR: backbone + head trained end to end on pixels."""
    return bool(h.use_cr and (cr_spec or {}).get("kind") == "image" and h.protocol == "fine_tune")


def cr_of(state: dict) -> dict:
    """The E_CR card of a trained head / self-trained state."""
    return cr_card(state["arch"].get("cr_input"))


@cli
def main() -> None:
    p = params()
    config = head_config(p)
    if config.embeddings_path == TUNED_CR_FEATURES:
        fine_tune(p)
        return
    shutil.rmtree(TUNED_CR_FEATURES, ignore_errors=True)  # no fine-tuned backbone: the stages after read `embeddings_path`
    write_json(TUNED_CR_FEATURES / "meta.json", {"protocol": p.head.protocol, "head_reads": str(config.embeddings_path)})
    inputs = input_files(config) + ([CR_ENCODER] if p.head.use_cr else [])
    train_stage("head", supervised_loop, config, p.head.ray, inputs=inputs, model_out=MODELS / "head.pt", cr=cr_of)


def fine_tune(p) -> None:
    """The image E_CR fine-tuned with the head on pixels (``pipelines.heads.finetune``), then
    the tuned backbone's features of every image cached for the stages after the head."""
    config = finetune_config(p)
    finetune_images(config, load_features(FEATURES, None))  # images missing on disk: a clear error before Ray starts
    state = train_stage("head", finetune_loop, config, p.head.ray, inputs=[FEATURES, MANIFEST, CR_ENCODER, TAG_EMB, *embedding_files(IMAGE_EMB)],
                        model_out=MODELS / "head.pt", cr=cr_of)
    cache_features(tuned_encoder(state["cr_backbone"]), TUNED_CR_FEATURES, p, "the fine-tuned CR-feature cache (head.protocol: fine_tune)")


if __name__ == "__main__":
    main()
