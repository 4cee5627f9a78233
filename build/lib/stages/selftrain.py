"""Stage `selftrain`: one round of self-training on labelled + pseudo-labelled data (ELTA eq. 10)."""

from pipelines.io import load_torch
from pipelines.heads.train import supervised_loop
from stages.common import MODELS, PSEUDO, cli, params
from stages.cr_features import state_cr_input
from stages.head import cr_of, head_config, input_files
from stages.training import train_stage


@cli
def main() -> None:
    p = params()
    s = p.selftrain
    head = load_torch(MODELS / "head.pt")
    config = {
        **head_config(p), "epochs": s.epochs, "lr": s.lr, "unlabeled_weight": s.unlabeled_weight,
        "init_path": MODELS / "head.pt", "pseudo_path": PSEUDO, "desc": "selftrain",
        "embeddings_path": state_cr_input(head),  # a fine-tuned head's backbone stays as it is (its cached features)
    }
    extra = {"cr_backbone": head["cr_backbone"]} if "cr_backbone" in head else None
    inputs = [*input_files(config), MODELS / "head.pt", PSEUDO]
    train_stage("selftrain", supervised_loop, config, s.ray, inputs=inputs, model_out=MODELS / "selftrain.pt", cr=cr_of, extra=extra)


if __name__ == "__main__":
    main()
