"""Stage `evaluate`: test metrics of the head and the self-trained model, plots, model registry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipelines.config import as_dict
from pipelines.io import DataError, atomic_path, load_torch, write_json
from pipelines.metrics import balanced_set_indices, dist_to_score, evaluate, lmh_mae, read_balanced_set, region_edges, srcc
from pipelines.tracking.runs import stage_run, weights_tags
from pipelines.tracking import registry
from pipelines.tracking.scoring import log_scoring_model, make_bundle, requirements
from pipelines.embed.cache import read_meta
from pipelines.embed.encode import read_text_embeddings
from pipelines.train.data import load_features
from pipelines.semantics import load_matcher
from pipelines.heads.build import load_head, predict_logits
from pipelines.ranking.backbone import cr_card, cr_tags, stamp_cr
from pipelines.ranking.cr_features import bundle_cr_encoder
from stages.common import FEATURES, IMAGE_EMB, MODELS, PLOTS, TAG_EMB, cli, params, random_warning, stamp, weights_card, write_metrics
from stages.cr_features import CR_ENCODER, head_cr_input

MODEL_FILES = {"head": MODELS / "head.pt", "selftrain": MODELS / "selftrain.pt"}
REQUIREMENTS = ("torch", "torchvision", "open_clip_torch", "numpy", "pandas", "pillow", "mlflow")


def predict_probs(model, matcher, fs) -> np.ndarray:
    return torch.softmax(torch.from_numpy(predict_logits(model, matcher, fs.clip, fs.emb)), 1).numpy()


def plot_scatter(path, true, preds: dict[str, np.ndarray], warning: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, pred in preds.items():
        ax.scatter(true, pred, s=10, alpha=0.6, label=f"{name} (SRCC {srcc(pred, true):.3f})")
    lo, hi = float(np.min(true)), float(np.max(true))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="true mean score", ylabel="predicted mean score", title="test set")
    ax.legend(fontsize=8)
    if warning:
        fig.suptitle(warning, fontsize=6, color="red")
    _save(fig, path)


def plot_regions(path, rows: list[dict], warning: str | None) -> None:
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows).pivot(index="region", columns="model", values="mae").loc[["L", "M", "H"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    df.plot.bar(ax=ax, rot=0)
    ax.set(ylabel="MAE", title="error by score region (ELTA: bottom 20% / middle 60% / top 20%)")
    if warning:
        fig.suptitle(warning, fontsize=6, color="red")
    _save(fig, path)


def plot_tsne(path, spaces: dict[str, np.ndarray], score: np.ndarray, seed: int, warning: str | None) -> None:
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(spaces), figsize=(4 * len(spaces), 4))
    for ax, (name, x) in zip(np.atleast_1d(axes), spaces.items()):
        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        # exact: deterministic, and on <= a few hundred points far faster here than Barnes-Hut
        xy = TSNE(2, perplexity=perplexity, random_state=seed, init="pca", method="exact").fit_transform(x)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=score, s=8, cmap="viridis")
        ax.set_title(f"{name} space")
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(sc, ax=axes, label="mean score")
    if warning:
        fig.suptitle(warning, fontsize=6, color="red")
    _save(fig, path)


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def longtail_options(ev, test_ids) -> dict:
    """``evaluate()``'s long-tail keywords from ``params.yaml evaluate``: a balanced-set file
    (``lt_balanced_set``, the TMCR authors' CSV layout) or explicit edges (``lt_edges``), else
    the default rule on the training scores."""
    if ev.lt_balanced_set:
        try:
            indices, missing = balanced_set_indices(test_ids, read_balanced_set(ev.lt_balanced_set))
        except (OSError, ValueError) as exc:
            raise DataError(f"params.yaml evaluate.lt_balanced_set: {exc}") from exc
        if missing:
            print(f"evaluate: {missing} images of {ev.lt_balanced_set} are not in the test split; the long-tail MSE uses the rest")
        return {"lt_indices": indices}
    if ev.lt_edges is not None:
        try:
            region_edges(ev.lt_edges)
        except ValueError as exc:
            raise DataError(f"params.yaml evaluate.lt_edges: {exc}") from exc
        return {"lt_edges": ev.lt_edges}
    return {}


@cli
def main() -> None:
    p = params()
    card = weights_card()
    warning = random_warning(card)
    train = load_features(FEATURES, None, splits=("train",))  # training scores only (the L/M/H edges)
    # val + test with E_CR's input (the CLIP or the CR-feature cache) and the CLIP embedding TM reads
    feats = load_features(FEATURES, head_cr_input(MODEL_FILES["head"]), clip_path=IMAGE_EMB, splits=("val", "test"))
    val, test = feats.split_of("val"), feats.split_of("test")
    matcher = load_matcher(FEATURES, TAG_EMB)
    if len(test) < 3:
        raise DataError(f"{FEATURES}: only {len(test)} test images; evaluation needs at least 3.")
    models = {name: load_head(path) for name, path in MODEL_FILES.items()}
    lt = longtail_options(p.evaluate, test.image_id)
    results, preds, region_rows, val_srcc = {}, {}, [], {}
    for name, model in models.items():
        probs = predict_probs(model, matcher, test)
        results[name] = evaluate(probs, test.dist, train.score, threshold=p.data.threshold, seed=p.seed, **lt)
        preds[name] = dist_to_score(probs)
        # `bar`: one row per (region, model) in `dvc plots` (sorted L, M, H), so the models' bars never overlap
        region_rows += [{"model": name, "region": k, "mae": v, "bar": f"{i} {k}: {name}"}
                        for i, (k, v) in enumerate(lmh_mae(preds[name], test.score).items(), 1)]
        val_srcc[name] = float(srcc(dist_to_score(predict_probs(model, matcher, val)), val.score)) if len(val) >= 3 else float("nan")
    best = max(val_srcc, key=lambda k: -np.inf if np.isnan(val_srcc[k]) else val_srcc[k])
    head_state = load_torch(MODEL_FILES[best])
    cr = cr_card(head_state["arch"].get("cr_input"))  # which E_CR: stamped beside the CLIP weights
    write_metrics("eval", stamp_cr(stamp({**results, "registered_model": best, "val_srcc": val_srcc}, card), cr), list(results),
                  random_weights=card["random_weights"], registered_model=best, cr_random_weights=bool(cr.get("cr_random_weights", False)))

    PLOTS.mkdir(exist_ok=True)
    pred_table = pd.DataFrame({"image_id": test.image_id, "true_score": test.score, **{f"pred_{k}": v for k, v in preds.items()}})
    with atomic_path(PLOTS / "pred_vs_true.csv") as tmp:
        pred_table.to_csv(tmp, index=False)
    with atomic_path(PLOTS / "region_mae.csv") as tmp:
        pd.DataFrame(region_rows).to_csv(tmp, index=False)
    plot_scatter(PLOTS / "pred_vs_true.png", test.score, preds, warning)
    plot_regions(PLOTS / "region_mae.png", region_rows, warning)
    n = min(len(test), p.evaluate.tsne_max_points)
    sub = test.take(np.random.default_rng(p.seed).choice(len(test), n, replace=False))
    level = models[best].cr(torch.from_numpy(sub.emb)).detach().numpy() if models[best].use_cr else sub.emb
    sem, attr = matcher.split(matcher.numpy(sub.clip))
    plot_tsne(PLOTS / "tsne.png", {"Sem": sem, "Attr": attr, "Level": level}, sub.score, p.seed, warning)

    tags, kinds, tag_emb = read_text_embeddings(TAG_EMB)
    scale = matcher.scale  # the features table's TM scale (features.logit_scale)
    bundle = MODELS / "bundle.pt"
    precision = (read_meta(IMAGE_EMB) or {}).get("precision_used") or "fp32"  # the path the embeddings were made with
    make_bundle(bundle, head_state=head_state, card=card, tags=tags, kinds=kinds, tag_emb=tag_emb, logit_scale=scale,
                precision=precision, batch_size=p.embed.batch_size,
                cr_encoder=head_state.get("cr_backbone") or (bundle_cr_encoder(load_torch(CR_ENCODER)) if cr["cr_encoder"] == "image" else None))
    model_card = stamp_cr({
        "model": best, "data": p.data.name, "clip": card, "test_metrics": results[best], "val_srcc": val_srcc[best],
        "params": {"head": as_dict(p.head), "selftrain": as_dict(p.selftrain)},
    }, cr)
    with stage_run(p.mlflow, "evaluate", config={"evaluate": as_dict(p.evaluate), "seed": p.seed},
                   tags={"data": p.data.name, **weights_tags(card), **cr_tags(cr)}):
        import mlflow

        for name, res in results.items():
            mlflow.log_metrics({f"{name}.{k}": float(v) for k, v in res.items() if v is not None})
        for f in ("pred_vs_true.png", "region_mae.png", "tsne.png", "pred_vs_true.csv"):
            mlflow.log_artifact(str(PLOTS / f), "plots")
        if p.evaluate.register:  # a new version only when the scoring model changed (registry.register_unless_known)
            reqs = requirements(REQUIREMENTS + (("timm",) if cr["cr_encoder"] == "image" else ()))
            version, alias = registry.register_unless_known(
                p.mlflow.model_name, registry.scoring_digest(bundle, card, reqs),
                lambda: log_scoring_model(bundle, card, registered_name=p.mlflow.model_name, pip_requirements=reqs),
                metrics={**results[best], "val_srcc": val_srcc[best]}, dataset=p.data.name,
                card=card, extra={"data": p.data.name, **weights_tags(card), **cr_tags(cr)},
            )
            model_card.update({"registered": f"models:/{p.mlflow.model_name}/{version}", "alias": alias})
    if warning:
        model_card["WARNING"] = warning
    write_json(MODELS / "model_card.json", model_card)


if __name__ == "__main__":
    main()
