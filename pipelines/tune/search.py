"""Ray Tune hyper-parameter searches over the pipeline's training stages.

A search space is a YAML file whose keys are ``params.yaml`` dotted keys (``head.lr``), so
the best trial can be written back as ``dvc exp run -S head.lr=...`` arguments or a
params.yaml fragment. Each trial:

1. applies its sampled values to the raw params and re-validates them (``load_params``'s
   checks: a typo in the space is an error naming the space file and the key);
2. builds a chain of steps from those params (``build_steps``, given by the CLI): e.g.
   ``pretrain -> head``. Every training step runs the stage's own loop through a Ray Train
   ``TorchTrainer``, so a trial trains exactly as ``dvc repro`` does;
3. the last step's per-epoch metrics reach Tune through ``TuneReportCallback`` (the Train V2
   way to combine Train and Tune: a function trainable that fits a trainer; ``Tuner(trainer)``
   is deprecated), so ASHA can stop poor trials early;
4. logs into its own MLflow run, a child of the search's parent run.

CPU budget: the trial function itself (and Train's controller) hold 0 CPU (``TRIAL_RESOURCES``); each trial's
Train workers hold ``num_workers * cpus_per_worker``. At most ``cpus // that`` trials run at
once, so on a 2-CPU machine trials never wait on workers that cannot be placed (no deadlock),
and on a cluster the same code spreads trials over the nodes.

The concurrency limit goes to the search algorithm (``BasicVariantGenerator(max_concurrent=...)``):
Tune ignores ``TuneConfig.max_concurrent_trials`` once a search algorithm is given.

Trials are ranked by the value the stage itself would keep: with ``head.keep_best`` (the
head, pretrain and pseudo searches) the metric at the trial's best validation epoch
(``head.select_on``), else at its last epoch (``kept_result``), whether or not ASHA stopped the trial early.

Ray Train's local mode (``num_workers: 0``) cannot be used inside a Tune trial: Train V2
refuses ``ray.train.report`` in a Tune session. Trials therefore use >= 1 worker.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from pipelines.config import Params, TrainParams, dump_yaml, params_from_dict, read_yaml
from pipelines.io import DataError, load_torch, save_torch, write_json, write_text
from pipelines.train.core import SELECT_ON
from pipelines.train.runner import check_gpu, ensure_ray, ray_config

SAMPLERS = ("loguniform", "uniform", "quniform", "randint", "choice", "grid")
SCHEDULERS = ("asha", "fifo")
STATE_FILE = "state.pt"
PG_RECORD = "placement_groups.txt"
# The trial function only drives a Train run: it holds no CPU (Ray needs some resource in the
# bundle, so it asks for a little memory). The CPUs go to the Train workers.
TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 1024**2}


@dataclass
class Step:
    """One training step of a trial: a Ray Train loop with its config.

    ``save_to``: where the step's final state is saved (a later step's config may read it).
    The last step of a trial is the one whose metrics Tune sees.
    """

    name: str
    loop: Callable[[dict], None]
    config: Any  # the loop's typed config (or a dict)
    save_to: str | None = None
    ray_train: bool = True  # False: a plain function of the config, run in the trial process


@dataclass
class SearchSpace:
    source: str
    stage: str
    metric: str
    mode: str
    num_samples: int
    space: dict[str, dict[str, Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    trial_ray: TrainParams = field(default_factory=TrainParams)
    max_concurrent: int | None = None
    seed: int = 0


# ---- the space file ---------------------------------------------------------------------

_KNOWN = {"stage", "metric", "mode", "num_samples", "space", "fixed", "scheduler", "trial_ray", "max_concurrent", "seed"}


def load_space(path: str | Path, stage: str | None = None) -> SearchSpace:
    """Read and check a search-space YAML file (see config/tune_space.yaml)."""
    path = Path(path)
    src = str(path)
    raw = read_yaml(path, "the search-space file is missing; see config/tune_space.yaml.")
    if not isinstance(raw, dict):
        raise DataError(f"{src}: the top level must be a mapping with a 'space' key.")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise DataError(f"{src}: unknown key(s) {unknown}; known: {sorted(_KNOWN)}.")
    # a file may hold one block per stage: {head: {...}, pretrain: {...}}
    stage = stage or raw.get("stage")
    if stage is None:
        raise DataError(f"{src}: no stage; pass --stage or set 'stage:' in the file.")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise DataError(f"{src}: 'space' must be a non-empty mapping of params.yaml keys to samplers, e.g. "
                        "'head.lr: {loguniform: [1.0e-4, 1.0e-2]}'.")
    for key, spec in space.items():
        _check_sampler(src, key, spec)
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise DataError(f"{src}: mode = {mode!r}; use max or min.")
    sched = raw.get("scheduler", {"type": "asha"}) or {"type": "asha"}
    if not isinstance(sched, dict) or sched.get("type", "asha") not in SCHEDULERS:
        raise DataError(f"{src}: scheduler.type must be one of {SCHEDULERS}.")
    tr = raw.get("trial_ray", {}) or {}
    if not isinstance(tr, dict) or set(tr) - {"num_workers", "use_gpu", "cpus_per_worker"}:
        raise DataError(f"{src}: trial_ray takes num_workers, use_gpu, cpus_per_worker.")
    trial_ray = TrainParams(**{"num_workers": 1, **tr})
    if trial_ray.num_workers < 1:
        raise DataError(f"{src}: trial_ray.num_workers must be >= 1 (Ray Train local mode does not run inside a Tune trial).")
    n = raw.get("num_samples", 4)
    if not isinstance(n, int) or n < 1:
        raise DataError(f"{src}: num_samples must be a positive integer, got {n!r}.")
    fixed = raw.get("fixed", {}) or {}
    if not isinstance(fixed, dict):
        raise DataError(f"{src}: 'fixed' must map params.yaml keys to values.")
    return SearchSpace(
        source=src, stage=stage, metric=raw.get("metric", "val_srcc"), mode=mode, num_samples=n, space=space,
        fixed=fixed, scheduler=sched, trial_ray=trial_ray, max_concurrent=raw.get("max_concurrent"),
        seed=int(raw.get("seed", 0)),
    )


def _check_sampler(src: str, key: str, spec: Any) -> None:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
        raise DataError(f"{src}: space.{key} must be one sampler, one of {SAMPLERS}, e.g. {{uniform: [0.0, 0.5]}}; got {spec!r}.")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise DataError(f"{src}: space.{key}.{kind} needs a list of arguments, got {args!r}.")
    if kind in ("loguniform", "uniform", "randint") and len(args) != 2:
        raise DataError(f"{src}: space.{key}.{kind} takes [low, high], got {args!r}.")
    if kind == "quniform" and len(args) != 3:
        raise DataError(f"{src}: space.{key}.quniform takes [low, high, q], got {args!r}.")
    if kind == "loguniform" and not (0 < float(args[0]) < float(args[1])):
        raise DataError(f"{src}: space.{key}.loguniform needs 0 < low < high, got {args!r}.")


def tune_param_space(space: SearchSpace) -> dict[str, Any]:
    """The Tune search space: one flat entry per params.yaml dotted key."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.space.items():
        kind, args = next(iter(spec.items()))
        if kind == "loguniform":
            out[key] = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "uniform":
            out[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "quniform":
            out[key] = tune.quniform(float(args[0]), float(args[1]), float(args[2]))
        elif kind == "randint":
            out[key] = tune.randint(int(args[0]), int(args[1]))
        elif kind == "choice":
            out[key] = tune.choice(args)
        else:
            out[key] = tune.grid_search(args)
    return out


def apply_overrides(raw: dict, overrides: dict[str, Any], source: str) -> Params:
    """``raw`` params with dotted-key overrides applied, validated like params.yaml."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DataError(f"{source}: '{key}' does not name a params.yaml key.")
        node[parts[-1]] = value.item() if hasattr(value, "item") else value
    return params_from_dict(raw, f"{source} (applied to params.yaml)")


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def set_args(flat: dict[str, Any]) -> list[str]:
    """``-S`` arguments for ``dvc exp run`` (values as YAML scalars)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in sorted(flat.items())]


# ---- one trial --------------------------------------------------------------------------


def _fit(step: Step, config: dict, ray_params: TrainParams, storage: Path, report_to_tune: bool) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    callbacks = []
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    resources = {"CPU": ray_params.cpus_per_worker, **({"GPU": 1} if ray_params.use_gpu else {})}
    trainer = TorchTrainer(
        functools.partial(_recorded_loop, loop=step.loop, record=str(storage.parent / PG_RECORD)),
        # ASHA decides on per-epoch results: report (and checkpoint) every epoch
        train_loop_config={**config, "checkpoint_every": 1} if report_to_tune else config,
        scaling_config=ScalingConfig(num_workers=ray_params.num_workers, use_gpu=ray_params.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=step.name, storage_path=str(storage), callbacks=callbacks,
            failure_config=FailureConfig(max_failures=1), checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"trial step {step.name}: no checkpoint ({result.error})")
    with result.checkpoint.as_directory() as d:
        return load_torch(Path(d) / STATE_FILE)


def _recorded_loop(config: dict, *, loop: Callable[[dict], None], record: str) -> None:
    """Run ``loop`` after noting this worker's placement group (see ``ReleaseStoppedTrials``)."""
    import ray.util

    pg = ray.util.get_current_placement_group()
    if pg is not None:
        with open(record, "a", encoding="utf-8") as f:
            f.write(pg.id.hex() + "\n")
    loop(config)


class _ReleaseStoppedTrials:
    """Remove the Train workers' placement group of a trial that ASHA stopped.

    Tune stops a trial by killing its actor; Train's controller, a child of that actor,
    dies before it can remove its workers' placement group, and a placement group lives as
    long as the job. Left alone, the stopped trial's CPUs stay reserved and the next trial
    waits for them forever (on 2 CPUs: a deadlock after the first stop).
    """

    def __init__(self, work_dir: str):
        self.work_dir = Path(work_dir)

    def release(self, trial_id: str) -> None:
        import ray.util
        from ray.util.placement_group import PlacementGroup, remove_placement_group
        from ray._raylet import PlacementGroupID

        record = self.work_dir / trial_id / PG_RECORD
        if not record.exists():
            return
        table = ray.util.placement_group_table()
        for pg_hex in set(record.read_text(encoding="utf-8").split()):
            if table.get(pg_hex, {}).get("state") not in (None, "REMOVED"):
                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex))))


def _tune_callback(work_dir: str):
    from ray.tune import Callback

    class ReleaseStoppedTrials(Callback, _ReleaseStoppedTrials):
        def __init__(self, work_dir: str):
            _ReleaseStoppedTrials.__init__(self, work_dir)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.release(trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.release(trial.trial_id)

    return ReleaseStoppedTrials(work_dir)


def trial_fn(config: dict, setup: dict) -> None:
    """The Tune function trainable: apply the sampled params, run the steps, log to MLflow."""
    import ray.tune
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    ctx = ray.tune.get_context()
    trial_id = ctx.get_trial_id()
    sampled = dict(config)
    params = apply_overrides(setup["raw"], {**setup["fixed"], **sampled}, setup["source"])
    trial_dir = Path(setup["work_dir"]) / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    steps: list[Step] = setup["build_steps"](params, trial_dir)

    client = MlflowClient(setup["tracking_uri"])
    run = client.create_run(
        setup["experiment_id"],
        tags={MLFLOW_PARENT_RUN_ID: setup["parent_run_id"], MLFLOW_RUN_NAME: f"trial-{trial_id}", "trial_id": trial_id,
              "stage": f"tune-{setup['stage']}"},
    )
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in sorted({**setup["fixed"], **sampled}.items())])
    ray_params = TrainParams(**setup["trial_ray"])
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        step_config = {
            **ray_config(step.config), "seed": params.seed, "tracking_uri": setup["tracking_uri"], "run_id": run_id if last else None,
            "resume_path": str(trial_dir / step.name / "checkpoint" / STATE_FILE),
        }
        if not step.ray_train:
            if last:
                raise ValueError(f"step {step.name}: the last step of a trial must be a Ray Train loop")
            step.loop(step_config)
            continue
        state = _fit(step, step_config, ray_params, trial_dir / "ray", report_to_tune=last)
        if step.save_to:
            save_torch(state, step.save_to)
        if not last:
            client.log_metric(run_id, f"{step.name}_epochs", state["epoch"] + 1)
    client.set_terminated(run_id, "FINISHED")


# ---- the search ---------------------------------------------------------------------------


@dataclass
class SearchResult:
    best_params: dict[str, Any]  # flat dotted keys -> value (sampled + fixed)
    best_value: float
    best_trial: str
    trials: list[dict[str, Any]]
    parent_run_id: str


def kept_result(history: list[dict[str, Any]], metric: str, keep_best: bool,
                select_on: str = "val_srcc") -> tuple[float | None, int | None]:
    """``(value of metric, epoch)`` that a stage run with the trial's params would keep.

    ``history``: the trial's per-epoch reports, in order. With ``keep_best`` the stage keeps
    the epoch best on ``select_on`` (``head.select_on``: highest val SRCC or lowest val EMD_2;
    ``pipelines.train.core``), else the last one.
    """
    rows = [r for r in history if metric in r and r[metric] is not None and not _nan(r[metric])]
    if not rows:
        return None, None
    if keep_best:
        ranked = [r for r in history if not _nan(r.get(select_on, math.nan))]
        if ranked:
            sign = SELECT_ON[select_on]
            pick = max(ranked, key=lambda r: sign * r[select_on])  # the first of equal values, as the loop
            if metric in pick and not _nan(pick[metric]):
                return float(pick[metric]), _epoch(pick)
    return float(rows[-1][metric]), _epoch(rows[-1])


def _epoch(row: dict[str, Any]) -> int | None:
    if "epoch" in row and not _nan(row["epoch"]):
        return int(row["epoch"])
    return int(row["training_iteration"]) - 1 if "training_iteration" in row else None


def _history(result: Any) -> list[dict[str, Any]]:
    df = result.metrics_dataframe
    if df is None or df.empty:
        return [result.metrics] if result.metrics else []
    return df.to_dict("records")


def _keeps_best(space: SearchSpace, probe: Params, trial_params: dict[str, Any]) -> tuple[bool, str]:
    """Whether a trial's stage keeps its best epoch, and the metric it selects on."""
    values = {**space.fixed, **trial_params}
    select_on = values.get("head.select_on", probe.head.select_on)
    if space.stage == "family":  # the image-family loop keeps its last epoch
        return False, select_on
    return bool(values.get("head.keep_best", probe.head.keep_best)), select_on


def max_concurrent_trials(space: SearchSpace, cluster_cpus: float) -> int:
    """Trials that fit at once: each trial's workers hold all the CPUs it takes."""
    per_trial = space.trial_ray.num_workers * space.trial_ray.cpus_per_worker
    fit = max(1, int(cluster_cpus // per_trial))
    return min(fit, space.max_concurrent) if space.max_concurrent else fit


def run_search(
    space: SearchSpace,
    raw_params: dict,
    build_steps: Callable[[Params, Path], list[Step]],
    *,
    tracking_uri: str,
    experiment: str,
    work_dir: str | Path,
    name: str | None = None,
    num_cpus: int | None = None,
    max_epochs: int | None = None,
) -> SearchResult:
    """Run the search under an MLflow parent run; return the best trial's params."""
    import mlflow
    import ray
    from ray import tune

    from pipelines.tracking.runs import provenance_tags
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    probe = apply_overrides(raw_params, space.fixed, space.source)  # fail fast on a bad fixed key
    if max_epochs is None:
        block = {"pseudo": "selftrain", "family": "model"}.get(space.stage, "head")  # the block of the scored step
        max_epochs = getattr(probe, block).epochs
    ensure_ray(num_cpus)
    check_gpu(space.trial_ray, "trial_ray", source=space.source)
    work_dir = Path(work_dir).resolve()
    name = name or f"tune-{space.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise DataError(f"MLflow experiment {experiment!r} not found at {tracking_uri}; run any stage once, or create it.")
    concurrency = max_concurrent_trials(space, ray.cluster_resources().get("CPU", 1))
    with mlflow.start_run(run_name=name, experiment_id=exp.experiment_id) as parent:
        mlflow.set_tags({"stage": f"tune-{space.stage}", "tune_metric": space.metric, "tune_mode": space.mode, **provenance_tags()})
        mlflow.log_params({"space": json.dumps(space.space)[:500], "num_samples": space.num_samples,
                           "max_concurrent_trials": concurrency, **{f"fixed.{k}": v for k, v in space.fixed.items()}})
        setup = {
            "raw": raw_params, "fixed": space.fixed, "source": space.source, "build_steps": build_steps,
            "work_dir": str(work_dir / name), "tracking_uri": tracking_uri, "experiment_id": exp.experiment_id,
            "parent_run_id": parent.info.run_id, "stage": space.stage, "trial_ray": vars(space.trial_ray),
        }
        if space.scheduler.get("type", "asha") == "asha":
            scheduler = ASHAScheduler(
                time_attr="training_iteration", max_t=max_epochs,
                grace_period=int(space.scheduler.get("grace_period", 1)),
                reduction_factor=float(space.scheduler.get("reduction_factor", 2)),
            )
        else:
            scheduler = FIFOScheduler()
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trial_fn, setup=setup), TRIAL_RESOURCES),
            param_space=tune_param_space(space),
            tune_config=tune.TuneConfig(
                metric=space.metric, mode=space.mode, num_samples=space.num_samples, scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=space.seed, max_concurrent=concurrency),
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=str(work_dir / "ray"), verbose=0, callbacks=[_tune_callback(setup["work_dir"])],
            ),
        )
        grid = tuner.fit()
        trials = []
        for r in grid:
            m = r.metrics or {}
            params = dict(r.config or {})
            value, epoch = kept_result(_history(r), space.metric, *_keeps_best(space, probe, params))
            trials.append({
                "trial_id": m.get("trial_id"), "params": params,
                "epochs": m.get("training_iteration", 0), space.metric: value, "selected_epoch": epoch,
                f"last_{space.metric}": m.get(space.metric),
                "error": None if r.error is None else str(r.error)[:300],
            })
        done = [t for t in trials if t[space.metric] is not None]
        if not done:
            errors = "; ".join(t["error"] or "no metric" for t in trials)
            raise RuntimeError(f"no trial reported {space.metric!r}: {errors}")
        sign = 1 if space.mode == "max" else -1
        trials.sort(key=lambda t: (t[space.metric] is None, -sign * (t[space.metric] or 0.0)))
        best = trials[0]
        _close_children(tracking_uri, exp.experiment_id, parent.info.run_id, trials, space.metric, max_epochs)
        mlflow.log_metric(f"best_{space.metric}", best[space.metric])
        mlflow.set_tags({"best_trial": best["trial_id"]})
        return SearchResult(
            best_params={**space.fixed, **best["params"]}, best_value=float(best[space.metric]), best_trial=best["trial_id"],
            trials=trials, parent_run_id=parent.info.run_id,
        )


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _close_children(uri: str, experiment_id: str, parent_id: str, trials: list[dict], metric: str, max_epochs: int) -> None:
    """ASHA stops a trial by killing its actor: mark such child runs and log their last metric."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10000)
    by_trial = {t["trial_id"]: t for t in trials}
    for run in children:
        t = by_trial.get(run.data.tags.get("trial_id"))
        if t is None:
            continue
        stopped = t["epochs"] < max_epochs
        client.set_tag(run.info.run_id, "early_stopped", str(stopped).lower())
        client.set_tag(run.info.run_id, "epochs_run", str(t["epochs"]))
        if run.info.status == "RUNNING":
            # Tune kills a trial as soon as the scheduler says stop, which at max_t is right
            # after its last report: the run is then complete although it never closed itself.
            failed = t["error"] is not None
            client.set_terminated(run.info.run_id, "FAILED" if failed else "KILLED" if stopped else "FINISHED")


def write_best(result: SearchResult, out_dir: str | Path, *, metric: str) -> dict[str, Path]:
    """``best_params.yaml`` (a params.yaml fragment) and ``best.json`` (with the ``-S`` args)."""
    out_dir = Path(out_dir)
    frag = out_dir / "best_params.yaml"
    summary = out_dir / "best.json"
    clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in result.best_params.items()}
    write_text(frag, f"# best trial {result.best_trial}: {metric} = {result.best_value:.6g}\n" + dump_yaml(nest(dict(sorted(clean.items())))))
    args = set_args(clean)
    write_json(summary, {
        "metric": metric, "value": result.best_value, "trial_id": result.best_trial, "params": clean,
        "set_args": args, "dvc_command": "dvc exp run " + " ".join(f"-S '{a}'" for a in args),
        "mlflow_parent_run_id": result.parent_run_id, "trials": result.trials,
    })
    return {"yaml": frag, "json": summary}


def trial_table(result: SearchResult, metric: str) -> str:
    """The trials, best first: their sampled params, the kept metric and its epoch."""
    keys = sorted({k for t in result.trials for k in t["params"]})
    head = ["trial", *keys, metric, "epoch", "epochs run", "note"]
    rows = []
    for t in result.trials:
        value = t[metric]
        note = "error" if t["error"] else ("best" if t["trial_id"] == result.best_trial else "")
        rows.append([
            str(t["trial_id"]), *(_fmt(t["params"].get(k)) for k in keys),
            "-" if value is None else f"{value:.4f}", "-" if t["selected_epoch"] is None else str(t["selected_epoch"]),
            str(t["epochs"]), note,
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
