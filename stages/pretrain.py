"""Stage `pretrain`: traversal contrastive learning of the CR encoder (Ray Train)."""

from pipelines.train.data import embedding_files
from pipelines.train.loops import pretrain_loop
from stages.common import FEATURES, IMAGE_EMB, INDEX, MODELS, cli, params
from stages.training import train_stage


@cli
def main() -> None:
    p = params()
    c = p.pretrain
    config = {
        "features_path": FEATURES, "embeddings_path": IMAGE_EMB, "index_path": INDEX, "epochs": c.epochs, "lr": c.lr,
        "weight_decay": c.weight_decay, "tau": c.tau, "hidden": c.hidden, "dim": c.dim, "dropout": c.dropout,
        "batches_per_cluster": c.batches_per_cluster, "low": p.index.low, "high": p.index.high,
    }
    inputs = [FEATURES, *embedding_files(IMAGE_EMB), INDEX]
    train_stage("pretrain", pretrain_loop, config, c.ray, inputs=inputs, model_out=MODELS / "cr_encoder.pt")


if __name__ == "__main__":
    main()
