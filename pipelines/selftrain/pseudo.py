"""APDS pseudo labels for the unlabelled pool (ELTA sec. 3.4), from a trained head.

1. a labelled VALIDATION subset (``val_fraction`` of the 'val' rows, drawn with ``seed``) scores
   the (beta, t) grid (``apds.grid_search``); the chosen pair must keep at least
   ``min_selected`` (a fraction, rounded up, at least 1) of that subset;
2. the head's predictions on the 'unlabeled' rows are sharpened with beta* (``apds_sharpen``)
   and kept where their largest probability reaches t* (``select_pseudo_labels``).

The mean score of ELTA eq. 8 is the mean ground-truth score of the 'train' rows. Test labels
are never read (the ELTA authors' code scored the grid on the evaluated set, a leak).

One implementation for the ``pseudo_search`` stage and the Tune ``pseudo`` trials
(``stages/tune.py``), so a tuned trial labels exactly as ``dvc repro`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.io import DataError
from pipelines.metrics import dist_to_score
from pipelines.selftrain.apds import apds_sharpen, grid_search, select_pseudo_labels
from pipelines.train.data import FeatureSet, load_features
from pipelines.semantics import load_matcher
from pipelines.heads.build import load_head, predict_logits

PARAMS_SOURCE = "params.yaml pseudo_search"


@dataclass
class PseudoLabels:
    """The search's choice and the labelled unlabelled pool."""

    image_id: np.ndarray  # the 'unlabeled' rows, in table order
    probs: np.ndarray  # (N, C) APDS-sharpened distributions with the chosen beta
    selected: np.ndarray  # (N,) bool: max prob >= the chosen t
    search: dict  # apds.grid_search's result (beta, t, mae, n_selected, ..., grid)
    val_n: int  # size of the validation subset that scored the grid
    mean_score: float  # mean 'train' score (ELTA eq. 8's s_bar)

    def table(self) -> pa.Table:
        """The pseudo-label table (``data/pseudo/pseudo_labels.parquet``'s columns)."""
        probs = self.probs.astype(np.float32)
        return pa.table({
            "image_id": pa.array(self.image_id.tolist(), pa.string()),
            "pseudo_dist": pa.array([row.tolist() for row in probs], pa.list_(pa.float32())),
            "pred_score": pa.array(dist_to_score(self.probs).astype(np.float32)),
            "max_prob": pa.array(self.probs.max(1).astype(np.float32) if len(probs) else np.zeros(0, np.float32)),
            "selected": pa.array(self.selected.astype(bool)),
        })

    def metrics(self) -> dict:
        """The stage's metrics (``metrics/pseudo_search.json`` before the weights stamp)."""
        s = self.search
        return {
            "beta": s["beta"], "t": s["t"], "val_mae": s["mae"], "val_n": self.val_n, "val_n_selected": s["n_selected"],
            "unlabeled_n": len(self.image_id), "unlabeled_selected": int(self.selected.sum()), "mean_score": self.mean_score,
        }


def label_pool(
    feats: FeatureSet,
    predict: Callable[[FeatureSet], np.ndarray],
    *,
    seed: int,
    val_fraction: float,
    betas: Sequence[float],
    thresholds: Sequence[float],
    min_selected: float,
    features_name: str = "features table",
    source: str = PARAMS_SOURCE,
    mean_score: float | None = None,
) -> PseudoLabels:
    """Search (beta, t) on a validation subset of ``feats``, then pseudo-label its 'unlabeled' rows.

    ``predict`` maps a FeatureSet to (N, C) logits. ``features_name`` and ``source`` (where the
    search values came from) name what to fix in the ``DataError`` raised when there is no
    'val' row or no (beta, t) keeps ``min_selected`` of the subset. ``mean_score`` (s-bar, the
    mean training score) defaults to that of ``feats``' train rows.
    """
    val, unl = feats.split_of("val"), feats.split_of("unlabeled")
    if len(val) == 0:
        raise DataError(f"{features_name}: no 'val' rows; the (beta, t) search needs labelled validation images.")
    rng = np.random.default_rng(seed)
    n_sub = max(1, int(round(val_fraction * len(val))))
    val = val.take(np.sort(rng.choice(len(val), n_sub, replace=False)))
    if mean_score is None:
        mean_score = float(np.mean(feats.split_of("train").score))
    try:
        search = grid_search(
            predict(val), val.score, mean_score, betas, thresholds,
            min_selected=max(1, int(np.ceil(min_selected * len(val)))),
        )
    except ValueError as exc:
        raise DataError(
            f"{source}: {exc}. Add lower values to pseudo_search.thresholds, larger ones to "
            "pseudo_search.betas, or lower pseudo_search.min_selected."
        ) from exc
    probs = apds_sharpen(predict(unl), mean_score, search["beta"])
    return PseudoLabels(unl.image_id, probs, select_pseudo_labels(probs, search["t"]), search, len(val), mean_score)


def pseudo_labels(
    features_path: str | Path, embeddings_path: str | Path, head_path: str | Path, *, clip_path: str | Path | None = None,
    tags_path: str | Path | None = None, **search
) -> PseudoLabels:
    """``label_pool`` on a features table with a trained head's logits (``search``: its keywords).

    Reads the training scores (for s-bar) and, with their embeddings, only the 'val' and
    'unlabeled' rows. ``embeddings_path``: E_CR's input cache; ``clip_path`` / ``tags_path``: the
    CLIP cache and tag table TM is computed from (defaults as ``pipelines.heads.build.input_paths``).
    """
    from pipelines.heads.build import input_paths

    emb, clip, tags = input_paths(embeddings_path, clip_path, tags_path)
    mean_score = float(np.mean(load_features(features_path, None, splits=("train",)).score))
    feats = load_features(features_path, emb, clip_path=clip, splits=("val", "unlabeled"))
    matcher = load_matcher(features_path, tags)
    if not Path(head_path).exists():
        raise DataError(f"{head_path}: trained head not found; run `dvc repro head`.")
    model = load_head(head_path)
    return label_pool(feats, lambda fs: predict_logits(model, matcher, fs.clip, fs.emb), features_name=str(features_path),
                      mean_score=mean_score, **search)
