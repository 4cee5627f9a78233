"""Shared driver for the training stages: MLflow run + Ray Train fit + stamped metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


from pipelines.config import TrainParams
from pipelines.io import save_torch, write_json
from pipelines.ranking.backbone import cr_tags
from pipelines.tracking.runs import stage_run, tracking_uri, weights_tags
from pipelines.train.runner import ray_config, run_training
from stages.common import METRICS, params, portable, weights_card


def train_stage(
    stage: str,
    loop: Callable[[dict], None],
    config: Any,
    ray_params: TrainParams,
    *,
    inputs: list[Path],
    model_out: Path,
    extra: dict[str, Any] | None = None,
    cr: Callable[[dict], dict] | None = None,
) -> dict[str, Any]:
    """Fit ``loop`` under an MLflow run, save its final state to ``model_out``, write metrics.
    ``config``: the loop's typed config (built from params by the stage's builder, which Tune calls too).

    ``cr(state)``: the E_CR card of the trained state (``pipelines.ranking.backbone.cr_card``),
    stamped on the metrics and the run's tags (random backbone weights loudly)."""
    p = params()
    card = weights_card()
    config = ray_config(config)
    config = {
        **config,
        "seed": p.seed,
        **{k: str(Path(v).resolve()) for k, v in config.items() if k.endswith("_path") and v},
    }
    with stage_run(p.mlflow, stage, config=config, tags={"data": p.data.name, **weights_tags(card)}) as run:
        import mlflow

        state = run_training(
            loop,
            {**config, "tracking_uri": tracking_uri(p.mlflow), "run_id": run.info.run_id},
            ray_params,
            stage=stage,
            inputs=[str(i) for i in inputs],
        )
        state = {**state, **(extra or {}), "config": portable(config), "card": card}
        for key in ("optimizer", "scheduler", "best", "rng", "metrics"):  # resume-only parts
            state.pop(key, None)
        save_torch(state, model_out)
        history = mlflow.tracking.MlflowClient().get_run(run.info.run_id).data.metrics  # last epoch's values
        # a few numbers for `dvc exp show`: the kept epoch's validation SRCC (else the last loss);
        # every per-epoch metric is in the MLflow run
        metrics = {"epochs": state["epoch"] + 1}
        if "val_srcc" in history:
            metrics["val_srcc"] = state.get("selected_val_srcc", history["val_srcc"])
        elif "loss" in history:
            metrics["loss"] = history["loss"]
        if cr is not None:  # which E_CR: a boolean here, the names in the run's tags
            cr_card = cr(state)
            metrics["cr_random_weights"] = bool(cr_card.get("cr_random_weights", False))
            mlflow.set_tags(cr_tags(cr_card))
        if "selected_epoch" in state:
            metrics["selected_epoch"] = state["selected_epoch"]
        write_json(METRICS / f"{stage}.json", metrics)
        mlflow.log_artifact(str(model_out))
    return state
