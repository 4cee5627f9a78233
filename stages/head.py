"""Stage `head`: TM + CR features -> MLP -> level distribution, EMD loss, ELTA TFA/FLSA."""

import os
import shutil

from pipelines.config import as_dict
from pipelines.io import DataError, load_torch, write_json
from pipelines.heads.finetune import finetune_images, finetune_loop, tuned_encoder
from pipelines.ranking.backbone import cr_card
from pipelines.ranking.encoder import LAYERS as CR_LAYERS
from pipelines.train.data import embedding_files, load_features
from pipelines.heads.build import HEAD_LOSSES
from pipelines.heads.train import supervised_loop
from pipelines.train.core import SELECT_ON
from stages.pretrain import check_device_options
from stages.common import FEATURES, IMAGE_EMB, MANIFEST, MODELS, TAG_EMB, cli, params
from stages.cr_features import CR_ENCODER, TUNED_CR_FEATURES, cache_features, cr_input_path
from stages.training import train_stage

PROTOCOLS = ("linear_probe", "fine_tune")


def head_config(p, cr_spec: dict | None = None) -> dict:
    """The head loop's config; ``cr_spec`` is E_CR's spec when it is not yet on disk (a Tune
    trial's own encoder), else it is read from ``models/cr_encoder.pt``."""
    h = as_dict(p.head)
    h.pop("ray")
    if h["protocol"] not in PROTOCOLS:
        raise DataError(f"params.yaml: head.protocol = {h['protocol']!r}; use one of {PROTOCOLS}.")
    if h["loss"] not in HEAD_LOSSES:
        raise DataError(f"params.yaml: head.loss = {h['loss']!r}; use one of {HEAD_LOSSES}.")
    if h["select_on"] not in SELECT_ON:
        raise DataError(f"params.yaml: head.select_on = {h['select_on']!r}; use one of {', '.join(SELECT_ON)}.")
    if h["cr_features"] not in CR_LAYERS:
        raise DataError(f"params.yaml: head.cr_features = {h['cr_features']!r}; use one of {CR_LAYERS}.")
    if h["use_cr"] and cr_spec is None:
        cr_spec = load_torch(CR_ENCODER)["spec"]
    # fine-tuning the image E_CR: the head stage trains on pixels; the stages after it read the tuned backbone's cache
    cr_input = TUNED_CR_FEATURES if fine_tunes_image(h, cr_spec) else cr_input_path(cr_spec)
    return {"features_path": FEATURES, "embeddings_path": cr_input, "clip_path": IMAGE_EMB, "tags_path": TAG_EMB,
            "cr_path": CR_ENCODER if h["use_cr"] else None, "head": h}


def input_files(config: dict) -> list:
    """The files a head / self-training run reads (for its resume fingerprint): the features
    table, the tag table, the CLIP cache TM reads and E_CR's input cache."""
    caches = dict.fromkeys(map(str, (config["clip_path"], config["embeddings_path"])))
    return [FEATURES, TAG_EMB, *(f for c in caches for f in embedding_files(c))]


def fine_tunes_image(h: dict, cr_spec: dict | None) -> bool:
    """``head.protocol: fine_tune`` with the image E_CR: backbone + head trained end to end on pixels."""
    return bool(h["use_cr"] and (cr_spec or {}).get("kind") == "image" and h["protocol"] == "fine_tune")


def cr_of(state: dict) -> dict:
    """The E_CR card of a trained head / self-trained state."""
    return cr_card(state["arch"].get("cr_input"))


@cli
def main() -> None:
    p = params()
    config = {**head_config(p), "epochs": p.head.epochs, "lr": p.head.lr, "desc": "head"}
    if config["embeddings_path"] == TUNED_CR_FEATURES:
        fine_tune(p, config)
        return
    shutil.rmtree(TUNED_CR_FEATURES, ignore_errors=True)  # no fine-tuned backbone: the stages after read `embeddings_path`
    write_json(TUNED_CR_FEATURES / "meta.json", {"protocol": p.head.protocol, "head_reads": str(config["embeddings_path"])})
    inputs = input_files(config) + ([CR_ENCODER] if p.head.use_cr else [])
    train_stage("head", supervised_loop, config, p.head.ray, inputs=inputs, model_out=MODELS / "head.pt", cr=cr_of)


def fine_tune(p, config: dict) -> None:
    """The image E_CR fine-tuned with the head on pixels (``pipelines.heads.finetune``), then
    the tuned backbone's features of every image cached for the stages after the head."""
    img = p.pretrain.image
    if not p.head.backbone_lr >= 0:
        raise DataError(f"params.yaml: head.backbone_lr = {p.head.backbone_lr!r}; give a learning rate >= 0 (0 freezes the backbone).")
    config.update(embeddings_path=None, manifest_path=MANIFEST, root=os.getcwd(), backbone_lr=p.head.backbone_lr,
                  image={k: getattr(img, k) for k in ("hflip", "precision", "loader_workers", "batch_size", "channels_last",
                                       "fused_optimizer", "compile")})
    check_device_options(config["image"], p.head.ray.use_gpu, "pretrain.image")
    finetune_images(config, load_features(FEATURES, None))  # images missing on disk: a clear error before Ray starts
    state = train_stage("head", finetune_loop, config, p.head.ray, inputs=[FEATURES, MANIFEST, CR_ENCODER, TAG_EMB, *embedding_files(IMAGE_EMB)],
                        model_out=MODELS / "head.pt", cr=cr_of)
    cache_features(tuned_encoder(state["cr_backbone"]), TUNED_CR_FEATURES, p, "the fine-tuned CR-feature cache (head.protocol: fine_tune)")


if __name__ == "__main__":
    main()
