"""Stage `pseudo_search`: APDS (beta, t) grid search on labelled validation data, then pseudo labels.

The search scores candidate pairs on a labelled VALIDATION subset only (see
``pipelines/selftrain/pseudo.py``; the ELTA authors' code scores it on the evaluated set's
ground truth, which leaks test labels).
"""

from pipelines.config import as_dict
from pipelines.io import write_json, write_parquet
from pipelines.selftrain.pseudo import pseudo_labels
from pipelines.tracking.runs import stage_run, weights_tags
from pipelines.io import load_torch
from pipelines.ranking.backbone import cr_card, cr_tags
from stages.common import FEATURES, IMAGE_EMB, METRICS, MODELS, PSEUDO, TAG_EMB, cli, params, weights_card
from stages.cr_features import state_cr_input


@cli
def main() -> None:
    p = params()
    s = p.pseudo_search
    card = weights_card()
    head = load_torch(MODELS / "head.pt")  # read once: E_CR's input and its card
    cr_input = head["arch"].get("cr_input")
    labels = pseudo_labels(
        FEATURES, state_cr_input(head), MODELS / "head.pt", clip_path=IMAGE_EMB, tags_path=TAG_EMB, seed=p.seed,
        val_fraction=s.val_fraction, betas=s.betas, thresholds=s.thresholds, min_selected=s.min_selected,
    )
    write_parquet(PSEUDO, labels.table())
    cr = cr_card(cr_input)
    metrics = {**labels.metrics(), "cr_random_weights": bool(cr.get("cr_random_weights", False))}
    write_json(METRICS / "pseudo_search.json", metrics)
    write_json(PSEUDO.parent / "grid.json", labels.search["grid"])
    with stage_run(p.mlflow, "pseudo_search", config={"pseudo_search": as_dict(s), "seed": p.seed}, tags={"data": p.data.name, **weights_tags(card), **cr_tags(cr)}):
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_artifact(str(PSEUDO.parent / "grid.json"))


if __name__ == "__main__":
    main()
