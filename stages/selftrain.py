"""Stage `selftrain`: one round of self-training on labelled + pseudo-labelled data (ELTA eq. 10)."""

from pipelines.io import load_torch
from pipelines.heads.train import supervised_loop
from stages.common import MODELS, PSEUDO, cli, params
from stages.head import cr_of, input_files, selftrain_config
from stages.training import train_stage


@cli
def main() -> None:
    p = params()
    head = load_torch(MODELS / "head.pt")
    config = selftrain_config(p, head)
    extra = {"cr_backbone": head["cr_backbone"]} if "cr_backbone" in head else None
    inputs = [*input_files(config), MODELS / "head.pt", PSEUDO]
    train_stage("selftrain", supervised_loop, config, p.selftrain.ray, inputs=inputs, model_out=MODELS / "selftrain.pt", cr=cr_of, extra=extra)


if __name__ == "__main__":
    main()
