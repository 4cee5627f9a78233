"""Stage `pseudo_search`: APDS (beta, t) grid search on labelled validation data, then pseudo labels.

The search scores candidate pairs on a labelled VALIDATION subset only. (The ELTA authors'
code scores it on the evaluated set's ground truth, which leaks test labels.)
"""

import numpy as np
import pyarrow as pa

from pipelines.config import as_dict
from pipelines.io import DataError, write_json, write_parquet
from pipelines.metrics import dist_to_score
from pipelines.selftrain.apds import apds_sharpen, grid_search, select_pseudo_labels
from pipelines.tracking.runs import stage_run, weights_tags
from pipelines.train.data import load_features
from pipelines.train.loops import load_head, predict_logits
from stages.common import FEATURES, METRICS, MODELS, PSEUDO, cli, params, stamp, weights_card


@cli
def main() -> None:
    p = params()
    s = p.pseudo_search
    card = weights_card()
    feats = load_features(FEATURES)
    train, val, unl = feats.split_of("train"), feats.split_of("val"), feats.split_of("unlabeled")
    if len(val) == 0:
        raise DataError(f"{FEATURES}: no 'val' rows; the (beta, t) search needs labelled validation images.")
    rng = np.random.default_rng(p.seed)
    n_sub = max(1, int(round(s.val_fraction * len(val))))
    val = val.take(np.sort(rng.choice(len(val), n_sub, replace=False)))
    model = load_head(MODELS / "head.pt")
    mean_score = float(np.mean(train.score))
    try:
        result = grid_search(
            predict_logits(model, val.tm, val.emb), val.score, mean_score, s.betas, s.thresholds,
            min_selected=max(1, int(np.ceil(s.min_selected * len(val)))),
        )
    except ValueError as exc:
        raise DataError(
            f"params.yaml pseudo_search: {exc}. Add lower values to pseudo_search.thresholds, larger ones to "
            "pseudo_search.betas, or lower pseudo_search.min_selected."
        ) from exc
    beta, t = result["beta"], result["t"]
    probs = apds_sharpen(predict_logits(model, unl.tm, unl.emb), mean_score, beta)
    selected = select_pseudo_labels(probs, t)
    table = pa.table({
        "image_id": pa.array(unl.image_id.tolist(), pa.string()),
        "pseudo_dist": pa.array([row.tolist() for row in probs.astype(np.float32)], pa.list_(pa.float32())),
        "pred_score": pa.array(dist_to_score(probs).astype(np.float32)),
        "max_prob": pa.array(probs.max(1).astype(np.float32) if len(probs) else np.zeros(0, np.float32)),
        "selected": pa.array(selected.astype(bool)),
    })
    write_parquet(PSEUDO, table)
    metrics = stamp({
        "beta": beta, "t": t, "val_mae": result["mae"], "val_n": len(val), "val_n_selected": result["n_selected"],
        "unlabeled_n": len(unl), "unlabeled_selected": int(selected.sum()), "mean_score": mean_score,
    }, card)
    write_json(METRICS / "pseudo_search.json", metrics)
    write_json(PSEUDO.parent / "grid.json", result["grid"])
    with stage_run(p.mlflow, "pseudo_search", config={"pseudo_search": as_dict(s), "seed": p.seed}, tags={"data": p.data.name, **weights_tags(card)}):
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_artifact(str(PSEUDO.parent / "grid.json"))


if __name__ == "__main__":
    main()
