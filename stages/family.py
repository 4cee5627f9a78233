"""Stage `family`: train the image model family named by ``model.family`` (M+MNet or the
auto-encoder fusion model) on the manifest's images with Ray Train, evaluate it on the test
split, and write ``metrics/family.json`` in the shape of ``metrics/eval.json``.

Until ``pipelines/config.py`` grows a ``model`` block, the block is read here with local
dataclasses and the same unknown-key / type validation (``pipelines.config._build``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.config import Params, TrainParams, _build, as_dict, params_from_dict, read_yaml
from pipelines.io import DataError, atomic_path, write_json
from stages.common import MANIFEST, METRICS, MODELS, cli

MODEL_OUT = MODELS / "family.pt"
RANDOM_BACKBONE_WARNING = "RANDOM BACKBONE WEIGHTS (no local checkpoint given): not a real result"


@dataclass(frozen=True)
class AmpParams:
    enabled: bool = True
    l1: float = 1.0
    l2: float = 0.2
    window: int = 5
    dtype: str = "auto"  # auto (fp16 on CUDA; bf16 on CPU only where faster than fp32, else fp32) | fp16 | bf16 | fp32
    init_tau: int = 16
    growth_interval: int = 200


@dataclass(frozen=True)
class MnetParams:
    branch_blocks: int = 19
    attn_reduction: int = 8
    pool_size: int = 1
    fuse_channels: int = 128
    dropout: float = 0.2
    loss: str = "re_emd"  # re_emd | emd
    alpha: float = 10.0
    beta: float = 0.1
    weights: str = ""  # local MobileNetV2 / M+MNet state_dict; empty = random init


@dataclass(frozen=True)
class AesafParams:
    backbone: str = "small"  # small | vgg16
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    group_maps: int = 16
    hidden: int = 32
    split: bool = True
    rec_weight: float = 1.0
    act_weight: float = 0.1
    weights: str = ""


@dataclass(frozen=True)
class ModelParams:
    family: str = "mnet"
    epochs: int = 3
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 16
    image_size: int = 224
    hflip: bool = True
    aspect: str = "square"  # square | keep (short side = image_size, aspect ratio kept)
    corner_grid: str = "with_mixed"  # off | always | with_mixed
    corner_grid_r: float = 0.1
    schedule: str = "single"  # single | three_stage
    stage2_size: list[int] = field(default_factory=lambda: [248, 312])  # [h, w]
    stage2_from: int = 1  # three_stage without AMP: first stage-2 epoch
    stage3_epochs: int = 1  # three_stage: last epochs back at image_size
    amp: AmpParams = field(default_factory=AmpParams)
    mnet: MnetParams = field(default_factory=MnetParams)
    aesaf: AesafParams = field(default_factory=AesafParams)
    ray: TrainParams = field(default_factory=TrainParams)


def load_family_params(path: str | Path = "params.yaml") -> tuple[Params, ModelParams]:
    path = Path(path)
    raw = read_yaml(path, "run from the repository root.")
    model_raw = raw.pop("model", None)
    if model_raw is None:
        raise DataError(f"{path}: no 'model' block; add `model: {{family: mnet}}` (see README, model families).")
    model = _build(ModelParams, model_raw, str(path), "model.")
    from pipelines.models import FAMILIES

    if model.family not in FAMILIES:
        raise DataError(f"{path}: model.family = {model.family!r}; known families: {', '.join(sorted(FAMILIES))}.")
    from pipelines.models.image_loop import ASPECTS, CORNER_GRID_MODES, SCHEDULES

    choices = {
        "corner_grid": (model.corner_grid, CORNER_GRID_MODES), "schedule": (model.schedule, SCHEDULES),
        "aspect": (model.aspect, ASPECTS), "amp.dtype": (model.amp.dtype, ("auto", "fp16", "bf16", "fp32")),
        "mnet.loss": (model.mnet.loss, ("re_emd", "emd")), "aesaf.backbone": (model.aesaf.backbone, ("small", "vgg16")),
    }
    for key, (value, allowed) in choices.items():  # fail here, not inside a Ray worker
        if value not in allowed:
            raise DataError(f"{path}: model.{key} = {value!r}; use one of {', '.join(allowed)}.")
    if len(model.stage2_size) != 2 or min(model.stage2_size) < 1:
        raise DataError(f"{path}: model.stage2_size = {model.stage2_size!r}; give [height, width].")
    return params_from_dict(raw, str(path)), model


def family_config(m: ModelParams, seed: int) -> dict[str, Any]:
    d = as_dict(m)
    d.pop("ray")
    options = d.pop("mnet") if m.family == "mnet" else d.pop("aesaf")
    d.pop("mnet", None), d.pop("aesaf", None)
    if not options.get("weights"):
        options.pop("weights", None)
    return {**d, "options": options, "seed": seed}


def run(params_path: str | Path = "params.yaml") -> dict:
    import numpy as np

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
    from pipelines.train.runner import run_training

    p, m = load_family_params(params_path)
    config = {**family_config(m, p.seed), "manifest_path": str(MANIFEST.resolve()), "root": os.getcwd()}
    random_backbone = not config["options"].get("weights")
    with stage_run(p.mlflow, "family", config=config, tags={"data": p.data.name, "family": m.family}) as mrun:
        import mlflow

        inputs = [str(MANIFEST)] + ([config["options"]["weights"]] if not random_backbone else [])
        state = run_training(
            image_family_loop, {**config, "tracking_uri": tracking_uri(p.mlflow), "run_id": mrun.info.run_id},
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
        save = {k: v for k, v in state.items() if k not in ("optimizer",)}
        save["config"] = config
        with atomic_path(MODEL_OUT) as tmp:
            torch.save(save, tmp)
        write_json(METRICS / "family.json", metrics)
        mlflow.log_metrics({f"{m.family}.{k}": float(v) for k, v in result.items() if v is not None and np.isfinite(v)})
        mlflow.log_metrics({"n_params": float(metrics["n_params"])})
        mlflow.set_tags({"switch_epoch": str(state.get("switch_epoch")), "random_weights": str(random_backbone)})
        mlflow.log_artifact(str(MODEL_OUT))
    return metrics


@cli
def main() -> None:
    run()


if __name__ == "__main__":
    main()
