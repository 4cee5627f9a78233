"""What every stage CLI shares: params, the CLIP weights card, error reporting."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

from pipelines.config import Params, load_params
from pipelines.io import DataError, read_json, write_json
from pipelines.logs import setup_logging
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


# The few test metrics per model that metrics/<stage>.json holds (what `dvc exp show` compares);
# metrics/details/<stage>.json has them all.
HEADLINE = ("srcc", "plcc", "acc", "emd2", "mae_L", "mae_M", "mae_H")


def random_warning(card: dict) -> str | None:
    """The stamp for plots, the model card and MLflow when the CLIP weights were random."""
    return RANDOM_WEIGHTS_WARNING if card["random_weights"] else None


def stamp(metrics: dict, card: dict) -> dict:
    """A details dict marked with the CLIP weights, loudly when they were random."""
    out = {**metrics, "clip_weights": card["weights"], "random_weights": bool(card["random_weights"])}
    if card["random_weights"]:
        out["WARNING"] = RANDOM_WEIGHTS_WARNING
    return out


def write_metrics(name: str, detail: dict, models: list[str], *, random_weights: bool, **extra) -> dict:
    """``metrics/<name>.json``: the HEADLINE metrics of each model, ``random_weights`` (one
    boolean) and ``extra``; ``metrics/details/<name>.json``: ``detail``, everything. Returns the headline."""
    headline = {m: {k: detail[m].get(k) for k in HEADLINE} for m in models}
    headline = {**headline, **extra, "random_weights": bool(random_weights)}
    write_json(METRICS / "details" / f"{name}.json", detail)
    write_json(METRICS / f"{name}.json", headline)
    return headline


def cli(fn: Callable[..., None]) -> Callable[..., None]:
    """Run a stage: bad input exits 2 with one clear line instead of a traceback.

    Third-party log lines go to ``logs/<stage>.log`` (``pipelines.logs``; ``IAA_VERBOSE=1``
    shows them too); the terminal gets progress bars and the pipeline's own messages.
    """

    @functools.wraps(fn)
    def main(*args, **kwargs) -> None:
        # only as a program (`python -m stages.X`): a test calling main() keeps its own streams
        log_file = setup_logging(Path(sys.argv[0]).stem) if fn.__module__ == "__main__" else None
        try:
            fn(*args, **kwargs)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception:
            if log_file is not None:
                print(f"(the full log is {log_file}; IAA_VERBOSE=1 shows it on the terminal)", file=sys.stderr)
            raise

    return main
