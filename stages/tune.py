"""Ray Tune search over one stage's hyper-parameters (a CLI, not a DVC stage).

    python -m stages.tune --space config/tune_space.yaml --stage head
    python -m stages.tune --space config/tune_space.yaml --stage pretrain --num-samples 8
    python -m stages.tune --space config/tune_space.yaml --stage pseudo

Stages (each trial trains through the stage's own loop with Ray Train):
- ``head``: the head on the current features and CR encoder (``models/cr_encoder.pt``);
- ``pretrain``: E_CR pretraining, then a head on top; scored by the head's validation metric
  (the contrastive loss alone does not compare across temperatures);
- ``pseudo``: APDS pseudo-labels from ``models/head.pt`` with the trial's
  ``pseudo_search.*`` values, then self-training; scored by the self-trained head;
- ``family``: the image family of ``model.family`` (M+MNet / AE fusion) on the manifest's
  images with the trial's ``model.*`` values; scored by its validation metric.

Writes ``<out>/best_params.yaml`` (a params.yaml fragment) and ``<out>/best.json`` (with the
``dvc exp run -S ...`` arguments). Needs the upstream DVC outputs (``dvc repro head``
first). On a cluster: ``RAY_ADDRESS`` set, ``IAA_RUNS_DIR`` on shared storage, and
``MLFLOW_TRACKING_URI`` a server every node reaches.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

from pipelines.config import Params, read_yaml
from pipelines.io import DataError, load_torch, write_parquet
from pipelines.heads.train import supervised_loop
from pipelines.ranking.pretrain import pretrain_loop
from pipelines.train.runner import ray_config, runs_dir
from pipelines.tune.search import Step, load_space, run_search, trial_table, write_best
from stages.common import FEATURES, IMAGE_EMB, INDEX, MANIFEST, MODELS, TAG_EMB, cli
from stages.head import head_config, selftrain_config
from stages.pretrain import pretrain_config

STAGES = ("head", "pretrain", "pseudo", "family")


def _abs(root: Path, path) -> str:
    return str((root / path).resolve())


def _head_step(p: Params, root: Path, cr_path: str | None, desc: str, cr_spec: dict | None = None) -> Step:
    """The head stage's own config (``stages.head.head_config``) on the repo's data, reading the
    E_CR of ``cr_path`` (the head loop itself fails clearly if it is missing)."""
    if cr_spec is None:
        cr_spec = load_torch(cr_path)["spec"] if cr_path and Path(cr_path).exists() else {}
    c = head_config(p, cr_spec, root=root)
    return Step("head", supervised_loop, dataclasses.replace(c, cr_path=cr_path if p.head.use_cr else None, desc=desc))


def head_steps(p: Params, trial_dir: Path, *, root: str) -> list[Step]:
    root = Path(root).resolve()
    return [_head_step(p, root, _abs(root, MODELS / "cr_encoder.pt"), "tune-head")]


def pretrain_steps(p: Params, trial_dir: Path, *, root: str) -> list[Step]:
    root = Path(root).resolve()
    cr = str(trial_dir / "cr_encoder.pt")
    config, _ = pretrain_config(p, root)  # the stage's own config: one builder for the stage and Tune
    pre = Step("pretrain", pretrain_loop, config, save_to=cr)
    # the trial trains the embedding E_CR (an MLP spec has no "kind"); its file exists only once the step ran
    return [pre, _head_step(p, root, cr, "tune-pretrain-head", cr_spec={})]


def pseudo_label_step(config: dict) -> None:
    """APDS pseudo labels for a trial: the pseudo_search stage's computation, without its MLflow run."""
    from pipelines.selftrain.pseudo import pseudo_labels

    labels = pseudo_labels(
        config["features_path"], config["embeddings_path"], config["head_path"], tags_path=config.get("tags_path"),
        seed=config["seed"],
        val_fraction=config["val_fraction"], betas=config["betas"], thresholds=config["thresholds"],
        min_selected=config["min_selected"],
        source="tune trial's pseudo_search (params.yaml + the search space)",
    )
    write_parquet(config["out_path"], labels.table())


def pseudo_steps(p: Params, trial_dir: Path, *, root: str) -> list[Step]:
    """APDS with the trial's ``pseudo_search.*`` values, then the selftrain stage's own config
    (``stages.head.selftrain_config``) on those labels."""
    root = Path(root).resolve()
    s = p.pseudo_search
    pseudo = str(trial_dir / "pseudo_labels.parquet")
    st = selftrain_config(p, load_torch(root / MODELS / "head.pt"), root=root)
    label = Step("pseudo_labels", pseudo_label_step, {
        "features_path": _abs(root, FEATURES), "embeddings_path": str(st.embeddings_path),  # the head's CR input
        "tags_path": _abs(root, TAG_EMB), "head_path": _abs(root, MODELS / "head.pt"), "out_path": pseudo,
        "val_fraction": s.val_fraction, "betas": list(s.betas), "thresholds": list(s.thresholds), "min_selected": s.min_selected,
    }, ray_train=False)
    return [label, Step("selftrain", supervised_loop, dataclasses.replace(st, pseudo_path=pseudo, desc="tune-selftrain"))]


def family_steps(p: Params, trial_dir: Path, *, root: str) -> list[Step]:
    """One step: the family stage's training loop with the trial's ``model.*`` values."""
    from pipelines.models.image_loop import image_family_loop
    from stages.family import family_config

    root = Path(root).resolve()
    return [Step("family", image_family_loop, family_config(p.model, _abs(root, MANIFEST), root))]


BUILDERS = {"head": head_steps, "pretrain": pretrain_steps, "pseudo": pseudo_steps, "family": family_steps}
NEEDS = {
    "head": [FEATURES, IMAGE_EMB, TAG_EMB, MODELS / "cr_encoder.pt"], "pretrain": [FEATURES, IMAGE_EMB, INDEX],
    "pseudo": [FEATURES, IMAGE_EMB, TAG_EMB, MODELS / "head.pt", MODELS / "cr_encoder.pt"], "family": [MANIFEST],
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stages.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", required=True, help="search-space YAML (see config/tune_space.yaml)")
    ap.add_argument("--stage", choices=STAGES, help="which stage to tune (default: the file's 'stage' key)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--num-samples", type=int, help="override the file's num_samples")
    ap.add_argument("--out", default=None, help="where best_params.yaml / best.json go (default tune/<stage>)")
    ap.add_argument("--name", default=None, help="experiment name (Ray Tune dir and MLflow parent run)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (ignored with RAY_ADDRESS)")
    return ap.parse_args(argv)


def check_tunable(p: Params, stage: str, source) -> None:
    """The searches train E_CR's MLP over the CLIP cache and heads over cached features; the
    pixel-trained steps are not part of them: a clear error naming the param and the fix."""
    if stage == "pretrain" and p.pretrain.encoder != "embedding":
        raise DataError(f"{source}: tune --stage pretrain tunes the embedding E_CR only, but pretrain.encoder = "
                        f"{p.pretrain.encoder!r}. Search with pretrain.encoder: embedding, or tune the head over the image "
                        "E_CR's cached features with --stage head (after `dvc repro cr_features`).")
    if stage in ("head", "pseudo") and p.head.protocol == "fine_tune" and p.head.use_cr and p.pretrain.encoder == "image":
        raise DataError(f"{source}: tune --stage {stage} trains heads over cached features, but head.protocol = 'fine_tune' "
                        "with pretrain.encoder = 'image' trains the backbone on pixels. Search with head.protocol: "
                        "linear_probe, or run the fine-tune as a `dvc exp run` per setting.")


@cli
def main(argv=None) -> None:
    from pipelines.config import load_params
    from pipelines.tracking.runs import setup

    args = parse_args(argv)
    space = load_space(args.space, args.stage)
    if space.stage not in STAGES:
        raise DataError(f"{args.space}: stage = {space.stage!r}; use one of {STAGES}.")
    if args.num_samples:
        space.num_samples = args.num_samples
    p = load_params(args.params)
    if space.stage == "family":
        from stages.family import load_family_params

        load_family_params(args.params)  # the model choices, checked before any trial starts
    check_tunable(p, space.stage, args.params)
    raw = read_yaml(args.params, "run from the repository root.")  # YAML 1.2, as DVC reads it
    root = Path.cwd()
    missing = [str(x) for x in NEEDS[space.stage] if not (root / x).exists() and not (x == MODELS / "cr_encoder.pt" and not p.head.use_cr)]
    if missing:
        raise DataError(f"tune --stage {space.stage} needs {', '.join(missing)}; run `dvc repro` up to that stage first.")
    uri = setup(p.mlflow)
    result = run_search(
        space, raw, functools.partial(BUILDERS[space.stage], root=str(root)), tracking_uri=uri,
        experiment=p.mlflow.experiment, work_dir=runs_dir() / "tune", name=args.name, num_cpus=args.num_cpus,
    )
    out = Path(args.out or Path("tune") / space.stage)
    paths = write_best(result, out, metric=space.metric)
    kept = (f"at each trial's best {p.head.select_on} epoch" if p.head.keep_best and space.stage != "family"
            else "at each trial's last epoch")
    print(f"\n{len(result.trials)} trials, best first ({space.metric} {kept}):\n{trial_table(result, space.metric)}\n")
    print(f"best {space.metric} = {result.best_value:.4f} (trial {result.best_trial})")
    print(f"params fragment: {paths['yaml']}\nsummary: {paths['json']}")
    import json

    print(json.loads(paths["json"].read_text())["dvc_command"])


if __name__ == "__main__":
    main()
