"""Stage `head`: TM + CR features -> MLP -> level distribution, EMD loss, ELTA TFA/FLSA."""

from pipelines.config import as_dict
from pipelines.io import DataError
from pipelines.ranking.encoder import LAYERS as CR_LAYERS
from pipelines.train.data import embedding_files
from pipelines.train.loops import HEAD_LOSSES, supervised_loop
from stages.common import FEATURES, IMAGE_EMB, MODELS, cli, params
from stages.training import train_stage

PROTOCOLS = ("linear_probe", "fine_tune")


def head_config(p) -> dict:
    h = as_dict(p.head)
    h.pop("ray")
    if h["protocol"] not in PROTOCOLS:
        raise DataError(f"params.yaml: head.protocol = {h['protocol']!r}; use one of {PROTOCOLS}.")
    if h["loss"] not in HEAD_LOSSES:
        raise DataError(f"params.yaml: head.loss = {h['loss']!r}; use one of {HEAD_LOSSES}.")
    if h["cr_features"] not in CR_LAYERS:
        raise DataError(f"params.yaml: head.cr_features = {h['cr_features']!r}; use one of {CR_LAYERS}.")
    return {"features_path": FEATURES, "embeddings_path": IMAGE_EMB, "cr_path": MODELS / "cr_encoder.pt" if h["use_cr"] else None, "head": h}


@cli
def main() -> None:
    p = params()
    config = {**head_config(p), "epochs": p.head.epochs, "lr": p.head.lr, "desc": "head"}
    inputs = [FEATURES, *embedding_files(IMAGE_EMB)] + ([MODELS / "cr_encoder.pt"] if p.head.use_cr else [])
    train_stage("head", supervised_loop, config, p.head.ray, inputs=inputs, model_out=MODELS / "head.pt")


if __name__ == "__main__":
    main()
