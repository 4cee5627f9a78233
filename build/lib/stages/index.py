"""Stage `index`: the balanced score-bin index per semantic cluster (TMCR "Balanced Sampling")."""

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.io import DataError, write_json, write_parquet
from pipelines.ranking.index import build_index
from stages.common import FEATURES, INDEX, cli, params


@cli
def main() -> None:
    p = params()
    if not FEATURES.is_file():
        raise DataError(f"{FEATURES}: features table not found; run `dvc repro features`.")
    # only the three columns the index needs (not the N x (M + A) TM features)
    table = pq.read_table(FEATURES, columns=["split", "score", "cluster"])
    train = pc.equal(table.column("split"), "train").to_numpy(zero_copy_only=False)  # rows in table order
    cluster = table.column("cluster").to_numpy()[train].astype(np.int64)
    score = pc.fill_null(table.column("score"), np.nan).to_numpy()[train].astype(np.float32)
    index, report = build_index(cluster, score, low=p.index.low, high=p.index.high, n_per_bin=p.index.n_per_bin)
    write_parquet(INDEX, index)
    write_json(INDEX.parent / "report.json", {**report, "n_train": int(train.sum())})


if __name__ == "__main__":
    main()
