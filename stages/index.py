"""Stage `index`: the balanced score-bin index per semantic cluster (TMCR "Balanced Sampling")."""


from pipelines.io import write_json, write_parquet
from pipelines.ranking.index import build_index
from pipelines.train.data import load_features
from stages.common import FEATURES, INDEX, cli, params


@cli
def main() -> None:
    p = params()
    train = load_features(FEATURES, None).split_of("train")  # no embeddings needed
    index, report = build_index(train.cluster, train.score, low=p.index.low, high=p.index.high, n_per_bin=p.index.n_per_bin)
    write_parquet(INDEX, index)
    write_json(INDEX.parent / "report.json", {**report, "n_train": len(train)})


if __name__ == "__main__":
    main()
