"""Stage `selftrain`: one round of self-training on labelled + pseudo-labelled data (ELTA eq. 10)."""

from pipelines.train.loops import supervised_loop
from stages.common import MODELS, PSEUDO, cli, params
from stages.head import cr_of, head_config, input_files
from stages.training import train_stage


@cli
def main() -> None:
    p = params()
    s = p.selftrain
    config = {
        **head_config(p), "epochs": s.epochs, "lr": s.lr, "unlabeled_weight": s.unlabeled_weight,
        "init_path": MODELS / "head.pt", "pseudo_path": PSEUDO, "desc": "selftrain",
    }
    inputs = [*input_files(config), MODELS / "head.pt", PSEUDO]
    train_stage("selftrain", supervised_loop, config, s.ray, inputs=inputs, model_out=MODELS / "selftrain.pt", cr=cr_of)


if __name__ == "__main__":
    main()
