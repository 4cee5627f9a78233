"""Stage `family`: train the image model family named by ``model.family`` (M+MNet or the
auto-encoder fusion model) on the manifest's images with Ray Train, evaluate it on the test
split, and write ``metrics/family.json`` in the shape of ``metrics/eval.json``.

Like ``stages/evaluate.py`` for TMCR, the MLflow run gets the test predictions
(``predictions/test.csv``) and, when ``evaluate.register`` is true, a pyfunc model (``FamilyScorer``,
logged from code by ``pipelines.tracking.scoring``) registered as ``<mlflow.model_name>-<family>`` (e.g.
``tmcr-demo-aesaf``), its version tagged (metrics with ``val_srcc``, ``dataset``,
``random_weights``) and promoted to ``champion`` / ``challenger`` on ``val_srcc``
(``pipelines.tracking.registry``). ``metrics/family.json`` then names it: ``registered``
(``models:/NAME/VERSION``) and ``alias`` (None when ``val_srcc`` is not finite: too few
validation images to rank the version, so it gets no alias).

The ``model`` block of ``params.yaml`` is ``pipelines.config.ModelParams``; the choices that
only the model code knows (families, Corner Grid modes, ...) are checked here, before Ray starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.models.image_loop import FamilyConfig


from pipelines.config import ModelParams, Params, load_params
from pipelines.io import DataError, save_torch
from stages.common import MANIFEST, MODELS, cli, portable, write_metrics

MODEL_OUT = MODELS / "family.pt"
RANDOM_BACKBONE_WARNING = "RANDOM BACKBONE WEIGHTS (no local checkpoint given): not a real result"
log = logging.getLogger(__name__)


def registered_name(p: Params, family: str) -> str:
    """The registry name of a family's models: ``<mlflow.model_name>-<family>``."""
    return f"{p.mlflow.model_name}-{family}"


def register_family(p: Params, family: str, test_metrics: dict, val_srcc: float, random_backbone: bool,
                    weights: str | None) -> dict[str, Any]:
    """Log ``MODEL_OUT`` as a pyfunc family model in the active run, register, tag and promote it (as
    ``stages/evaluate.py`` does for TMCR). Returns ``{"registered": "models:/NAME/VERSION", "alias": ...}``."""
    from pipelines.tracking import registry
    from pipelines.tracking.scoring import log_family_model

    name = registered_name(p, family)
    info = log_family_model(MODEL_OUT.resolve(), registered_name=name)  # its own exact requirements
    version = str(info.registered_model_version)
    extra = {"data": p.data.name, "family": family, "random_weights": str(bool(random_backbone)).lower(),
             "backbone_weights": weights or "random"}
    if random_backbone:
        extra["WARNING"] = RANDOM_BACKBONE_WARNING
    alias = registry.tag_and_promote(name, version, metrics={**test_metrics, "val_srcc": val_srcc}, dataset=p.data.name,
                                     extra=extra)
    if alias is None:
        log.warning("models:/%s/%s: val_srcc is not finite (too few validation images); registered without an alias.", name, version)
    return {"registered": f"models:/{name}/{version}", "alias": alias}


def load_family_params(path: str | Path = "params.yaml") -> tuple[Params, ModelParams]:
    p = load_params(path)
    model = p.model
    from pipelines.models import CROPS, FAMILIES, OPTIMIZERS

    if model.family not in FAMILIES:
        raise DataError(f"{path}: model.family = {model.family!r}; known families: {', '.join(sorted(FAMILIES))}.")
    from pipelines.models.image_loop import ASPECTS, CORNER_GRID_MODES, SCHEDULES

    precisions = ("auto", "fp16", "bf16", "fp32")
    choices = {
        "corner_grid": (model.corner_grid, ("auto", *CORNER_GRID_MODES)), "schedule": (model.schedule, SCHEDULES),
        "crop": (model.crop, ("auto", *CROPS)), "optimizer": (model.optimizer, ("auto", *OPTIMIZERS)),
        "aspect": (model.aspect, ASPECTS), "amp.dtype": (model.amp.dtype, precisions), "amp.monitor": (model.amp.monitor, precisions),
        "mnet.loss": (model.mnet.loss, ("re_emd", "emd")), "aesaf.backbone": (model.aesaf.backbone, ("small", "vgg16")),
    }
    for key, (value, allowed) in choices.items():  # fail here, not inside a Ray worker
        if value not in allowed:
            raise DataError(f"{path}: model.{key} = {value!r}; use one of {', '.join(allowed)}.")
    if len(model.stage2_size) != 2 or min(model.stage2_size) < 1:
        raise DataError(f"{path}: model.stage2_size = {model.stage2_size!r}; give [height, width].")
    return p, model


def family_config(m: ModelParams, manifest_path: str | Path, root: str | Path) -> FamilyConfig:
    """The loop's config, for the stage and Tune: ``model.*`` with the ``auto`` training choices
    resolved to the family's defaults, on the manifest's images under ``root``."""
    from pipelines.models import resolve
    from pipelines.models.image_loop import FamilyConfig

    m = dataclasses.replace(m, **{key: resolve(m.family, key, getattr(m, key)) for key in ("optimizer", "crop", "corner_grid")})
    return FamilyConfig(model=m, manifest_path=manifest_path, root=str(root))


def check_family_device(config, use_gpu: bool) -> None:
    """Refuse, before Ray starts, an ``model.amp.dtype`` / ``model.amp.monitor`` or speed option that the
    training device cannot honour (checked where this machine has that device; workers check again)."""
    import torch

    from pipelines.models.amp import low_dtype, monitor_dtype
    from pipelines.train.precision import check_speed, speed_of

    if use_gpu and not torch.cuda.is_available():
        return
    device = torch.device("cuda" if use_gpu else "cpu")
    monitor_dtype(config.model.amp.monitor, low_dtype(config.model.amp.dtype, device))
    check_speed(speed_of(config.model), device, key="model")


def run(params_path: str | Path = "params.yaml") -> dict:
    import numpy as np
    import pandas as pd

    from pipelines.data.manifest import read_manifest, vote_distribution
    from pipelines.metrics import dist_to_score, evaluate, srcc
    from pipelines.models import n_params
    from pipelines.models.aesaf import sd_correlations
    from pipelines.models.image_loop import (
        _paths,
        image_family_loop,
        labelled,
        model_from_state,
        predict,
    )
    from pipelines.tracking.runs import stage_run, tracking_uri
    from pipelines.train.runner import ray_config, run_training

    p, m = load_family_params(params_path)
    config = family_config(m, MANIFEST.resolve(), os.getcwd())
    check_family_device(config, m.ray.use_gpu)
    weights = config.options.get("weights")
    random_backbone = not weights
    logged = {**ray_config(config), "seed": p.seed}
    with stage_run(p.mlflow, "family", config=logged, tags={"data": p.data.name, "family": m.family}) as mrun:
        import mlflow

        inputs = [str(MANIFEST)] + ([weights] if not random_backbone else [])
        state = run_training(
            image_family_loop, {**logged, "tracking_uri": tracking_uri(p.mlflow), "run_id": mrun.info.run_id},
            m.ray, stage=f"family-{m.family}", inputs=inputs,
        )
        model = model_from_state(state)
        df = read_manifest(MANIFEST)
        train, val, test = labelled(df, "train"), labelled(df, "val"), labelled(df, "test")
        if len(test) < 5:
            raise DataError(f"{MANIFEST}: only {len(test)} labelled test images; evaluation needs at least 5.")
        probs = predict(model, _paths(test, os.getcwd()), m.image_size, aspect=m.aspect)
        true = vote_distribution(test, missing="raise")
        result = evaluate(probs, true, dist_to_score(vote_distribution(train, missing="raise")), threshold=p.data.threshold, seed=p.seed)
        result.update(sd_correlations(probs, true))
        vprobs = predict(model, _paths(val, os.getcwd()), m.image_size, aspect=m.aspect) if len(val) >= 3 else None
        val_srcc = float(srcc(dist_to_score(vprobs), dist_to_score(vote_distribution(val, missing="raise")))) if vprobs is not None else float("nan")
        metrics = {
            m.family: result, "registered_model": m.family, "val_srcc": {m.family: val_srcc},
            "n_params": n_params(model), "epochs": state["epoch"] + 1,
            "switch_epoch": state.get("switch_epoch"), "random_weights": random_backbone,
        }
        if random_backbone:
            metrics["WARNING"] = RANDOM_BACKBONE_WARNING
        # resume-only parts (and the epoch timings in `metrics`) stay out: the file is a function of the inputs
        save = {k: v for k, v in state.items() if k not in ("optimizer", "rng", "metrics", "best")}
        save["config"] = portable(logged)
        save_torch(save, MODEL_OUT)
        mlflow.log_metrics({f"{m.family}.{k}": float(v) for k, v in result.items() if v is not None and np.isfinite(v)})
        mlflow.log_metrics({"n_params": float(metrics["n_params"])})
        mlflow.set_tags({"switch_epoch": str(state.get("switch_epoch")), "random_weights": str(random_backbone)})
        mlflow.log_artifact(str(MODEL_OUT))
        preds = pd.DataFrame({"image_id": test["image_id"], "path": test["path"], "true_score": dist_to_score(true),
                              "pred_score": dist_to_score(probs)})
        mlflow.log_text(preds.to_csv(index=False), "predictions/test.csv")
        if p.evaluate.register:
            metrics.update(register_family(p, m.family, result, val_srcc, random_backbone, weights))
        write_metrics("family", metrics, [m.family], random_weights=random_backbone, registered_model=m.family)
    return metrics


@cli
def main() -> None:
    run()


if __name__ == "__main__":
    main()
