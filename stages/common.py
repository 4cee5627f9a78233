"""What every stage CLI shares: params, the CLIP weights card, error reporting."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Callable

from pipelines.config import Params, load_params
from pipelines.io import DataError, read_json
from pipelines.tracking.runs import RANDOM_WEIGHTS_WARNING

# Where the stages put things (dvc.yaml names the same paths).
DATA = Path("data")
MANIFEST = DATA / "manifest.parquet"
TAGS = DATA / "tags"
EMBED = DATA / "embeddings"
BYO = DATA / "byo"  # bring-your-own embedding tables (a dep of embed)
IMAGE_EMB = EMBED / "images"
TAG_EMB = EMBED / "tags.parquet"
CARD = EMBED / "card.json"
FEATURES = DATA / "features" / "features.parquet"
INDEX = DATA / "index" / "index.parquet"
PSEUDO = DATA / "pseudo" / "pseudo_labels.parquet"
MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")


def params() -> Params:
    return load_params("params.yaml")


def weights_card() -> dict:
    """Which CLIP weights produced the features (written by the embed stage)."""
    return read_json(CARD)


def stamp(metrics: dict, card: dict) -> dict:
    """Mark a metrics dict with the CLIP weights, loudly when they were random."""
    out = {**metrics, "clip_weights": card["weights"], "random_weights": bool(card["random_weights"])}
    if card["random_weights"]:
        out["WARNING"] = RANDOM_WEIGHTS_WARNING
    return out


def cli(fn: Callable[[], None]) -> Callable[[], None]:
    """Run a stage: bad input exits 2 with one clear line instead of a traceback."""

    @functools.wraps(fn)
    def main() -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            fn()
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return main
