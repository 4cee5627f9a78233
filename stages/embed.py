"""Stage `embed`: open_clip embeddings of every manifest image and every tag.

The image cache is chunked, checksummed and incremental: a killed run continues where it
stopped, and a changed manifest embeds only the images that are new or whose file changed
(rows are keyed by image id and file SHA-256, the cache by the model's fingerprint).
`card.json` records which weights were used so later stages can stamp their results, and
the numeric path of the image embeddings (precision, device type, decode): DVC tracks it, so
a run on another path changes dvc.lock and reruns the stages downstream.
"""

import sys
from pathlib import Path

from pipelines.data.manifest import read_manifest
from pipelines.embed.clip import load_clip
from pipelines.embed.encode import (
    decode_workers,
    embed_images,
    embed_texts,
    resolve_device,
    resolve_precision,
    write_text_embeddings,
)
from pipelines.io import DataError, write_json
from stages.common import BYO, CARD, EMBED, IMAGE_EMB, MANIFEST, TAG_EMB, TAGS, cli, params


def read_tags(kind: str) -> list[str]:
    path = TAGS / f"{kind}.txt"
    if not path.exists():
        raise DataError(f"{path}: tag library not found; run `dvc repro tags`.")
    return [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]


TIMING_KEYS = ("seconds", "img_per_s", "setup_s")  # of the engines' reports


@cli
def main() -> None:
    p = params()
    e = p.embed
    if e.source not in ("clip", "byo"):
        raise DataError(f"params.yaml: embed.source = {e.source!r}; use clip or byo.")
    if e.source == "byo":  # bring your own embeddings: validate and write the same files
        from pipelines.embed.byo import import_byo

        if not (e.byo_items and e.byo_texts):
            raise DataError("params.yaml: embed.source = byo needs embed.byo_items and embed.byo_texts (Parquet paths).")
        for table in (e.byo_items, e.byo_texts):
            if not Path(table).resolve().is_relative_to(BYO.resolve()):
                print(f"warning: {table} is outside {BYO}/, the folder dvc.yaml declares as a dependency of embed: "
                      "DVC will not rerun embed when it changes.", file=sys.stderr)
        import_byo(
            e.byo_items, e.byo_texts, read_manifest(MANIFEST)["image_id"].tolist(),
            read_tags("semantic"), read_tags("attribute"), EMBED,
            normalise=e.byo_normalise, logit_scale=e.byo_logit_scale, seed=p.seed,
        )
        return
    if e.engine not in ("local", "ray"):
        raise DataError(f"params.yaml: embed.engine = {e.engine!r}; use local (one process) or ray (Ray Data actor pool).")
    if e.engine == "ray":
        from pipelines.embed.ray_engine import check_ray_params

        check_ray_params(e.ray)  # before the model loads
    if e.engine == "local":  # the path (device, precision, decode) is settled before the model loads
        device = resolve_device(e.device)
        resolve_precision(e.precision, device)
    else:
        device = "cpu"  # the driver's copy; the actors move it to their own device
    # random-init weights (pretrained: none / fallback) are reproducible from the seed
    bundle = load_clip(e.model, e.pretrained, allow_random_fallback=e.allow_random_fallback, device=device, seed=p.seed)
    manifest = read_manifest(MANIFEST)
    # the model's identity only: which images are cached is decided row by row
    fingerprint = {"model": bundle.name, "weights": bundle.weights, "init_seed": p.seed}
    items = list(zip(manifest["image_id"], manifest["path"]))
    common = {"chunk_rows": e.chunk_rows, "precision": e.precision, "decode": e.decode, "fingerprint": fingerprint}
    if e.engine == "ray":  # Ray Data: decode tasks + an actor pool of encoders; the same cache
        from pipelines.embed.ray_engine import embed_images_ray

        workers = decode_workers(e.num_workers, "cpu")  # threads hashing files in this process
        report = embed_images_ray(bundle, items, IMAGE_EMB, e.ray, num_workers=workers, **common)
    else:
        report = embed_images(bundle, items, IMAGE_EMB, batch_size=e.batch_size, num_workers=e.num_workers, **common)
    semantic, attribute = read_tags("semantic"), read_tags("attribute")
    tags = semantic + attribute
    kinds = ["semantic"] * len(semantic) + ["attribute"] * len(attribute)
    write_text_embeddings(TAG_EMB, tags, kinds, embed_texts(bundle, tags))
    # timings go to the terminal and the log, not into the report: an output is a function of the inputs
    timing = {k: report.pop(k) for k in TIMING_KEYS if k in report}
    if timing:
        print("embed: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in timing.items()), file=sys.stderr)
    write_json(EMBED / "report.json", report)
    write_json(
        CARD,
        {
            "model": e.model,
            "pretrained": e.pretrained,
            "weights": bundle.weights,
            "random_weights": bundle.random_weights,
            "init_seed": p.seed,
            "embed_dim": bundle.embed_dim,
            "logit_scale": float(bundle.model.logit_scale.exp()),
            # the numeric path of the image embeddings: a different path is a different result
            "embed_path": {"precision": report["precision"], "device": report["device"], "decode": report["decode"]},
            "n_semantic": len(semantic),
            "n_attribute": len(attribute),
        },
    )


if __name__ == "__main__":
    main()
