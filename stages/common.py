"""What every stage CLI shares: params, the CLIP weights card, error reporting."""

from __future__ import annotations

import argparse
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


def portable(config: dict) -> dict:
    """``config`` as a model file records it: paths (``*_path``, ``root``) under the repository
    relative to it, so the same inputs give the same file in any checkout."""
    here = Path.cwd().resolve()

    def rel(v):
        p = Path(v)
        return str(p.resolve().relative_to(here)) if p.is_absolute() and p.resolve().is_relative_to(here) else v

    return {k: rel(v) if v and (k.endswith("_path") or k == "root") and isinstance(v, (str, Path)) else v
            for k, v in config.items()}


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


def stage_parser(name: str, doc: str | None, dvc_yaml: str | Path = "dvc.yaml") -> argparse.ArgumentParser:
    """The ``--help`` of a stage that takes no arguments: its docstring, and what ``dvc.yaml``
    says it reads (params keys, deps) and writes (outs, metrics) when the file is here."""
    epilog = [f"A DVC stage: run it with `dvc repro {name}` (it takes no arguments; its settings are in params.yaml)."]
    spec = _dvc_stage(name, dvc_yaml)
    if spec:
        for key, label in (("params", "params.yaml keys"), ("deps", "reads"), ("outs", "writes"), ("metrics", "metrics")):
            items = [next(iter(i)) if isinstance(i, dict) else str(i) for i in spec.get(key) or []]
            if items:
                epilog.append(f"{label}: {', '.join(map(str, items))}")
    return argparse.ArgumentParser(
        prog=f"python -m stages.{name}", description=(doc or f"Stage `{name}`.").strip(),
        epilog="\n".join(epilog), formatter_class=argparse.RawDescriptionHelpFormatter)


def _dvc_stage(name: str, dvc_yaml: str | Path) -> dict | None:
    try:
        from ruamel.yaml import YAML

        stages = YAML(typ="safe").load(Path(dvc_yaml).read_text(encoding="utf-8")).get("stages") or {}
        return stages.get(name)
    except Exception:  # no dvc.yaml here (or unreadable): the docstring alone
        return None


def cli(fn: Callable[..., None]) -> Callable[..., None]:
    """Run a stage: bad input exits 2 with one clear line instead of a traceback.

    Run as a program (``python -m stages.X``), a stage that parses no arguments of its own
    answers ``--help`` (and exits 0 before it reads or writes anything) and refuses any other
    argument (exit 2); stages with an ``argparse`` parser (score, tune, recipe) parse their own.
    Third-party log lines go to ``logs/<stage>.log`` (``pipelines.logs``; ``IAA_VERBOSE=1``
    shows them too); the terminal gets progress bars and the pipeline's own messages.
    """

    @functools.wraps(fn)
    def main(*args, **kwargs) -> None:
        as_program = fn.__module__ == "__main__"
        if as_program and "argparse" not in fn.__globals__:
            name = Path(sys.argv[0]).stem
            stage_parser(name, fn.__globals__.get("__doc__")).parse_args(sys.argv[1:])  # --help: exit 0
        # only as a program (`python -m stages.X`): a test calling main() keeps its own streams;
        # --help (answered by the stage's own parser) opens no log file
        asks_help = bool({"-h", "--help"} & set(sys.argv[1:]))
        log_file = setup_logging(Path(sys.argv[0]).stem) if as_program and not asks_help else None
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
