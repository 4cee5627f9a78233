"""Stage `head`: TM + CR features -> MLP -> level distribution, EMD loss, ELTA TFA/FLSA."""

from pipelines.config import as_dict
from pipelines.io import DataError, load_torch
from pipelines.ranking.backbone import cr_card
from pipelines.ranking.encoder import LAYERS as CR_LAYERS
from pipelines.train.data import embedding_files
from pipelines.train.loops import HEAD_LOSSES, supervised_loop
from stages.common import FEATURES, IMAGE_EMB, MODELS, TAG_EMB, cli, params
from stages.cr_features import CR_ENCODER, cr_input_path
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
    if h["cr_features"] not in CR_LAYERS:
        raise DataError(f"params.yaml: head.cr_features = {h['cr_features']!r}; use one of {CR_LAYERS}.")
    if h["use_cr"] and cr_spec is None:
        cr_spec = load_torch(CR_ENCODER)["spec"]
    if h["use_cr"] and cr_spec.get("kind") == "image" and h["protocol"] == "fine_tune":
        raise DataError("params.yaml: head.protocol = 'fine_tune' with pretrain.encoder = 'image' is not available: "
                        "the head reads the cached backbone features; use head.protocol: linear_probe.")
    cr_input = cr_input_path(cr_spec)
    return {"features_path": FEATURES, "embeddings_path": cr_input, "clip_path": IMAGE_EMB, "tags_path": TAG_EMB,
            "cr_path": CR_ENCODER if h["use_cr"] else None, "head": h}


def input_files(config: dict) -> list:
    """The files a head / self-training run reads (for its resume fingerprint): the features
    table, the tag table, the CLIP cache TM reads and E_CR's input cache."""
    caches = dict.fromkeys(map(str, (config["clip_path"], config["embeddings_path"])))
    return [FEATURES, TAG_EMB, *(f for c in caches for f in embedding_files(c))]


def cr_of(state: dict) -> dict:
    """The E_CR card of a trained head / self-trained state."""
    return cr_card(state["arch"].get("cr_input"))


@cli
def main() -> None:
    p = params()
    config = {**head_config(p), "epochs": p.head.epochs, "lr": p.head.lr, "desc": "head"}
    inputs = input_files(config) + ([CR_ENCODER] if p.head.use_cr else [])
    train_stage("head", supervised_loop, config, p.head.ray, inputs=inputs, model_out=MODELS / "head.pt", cr=cr_of)


if __name__ == "__main__":
    main()
