"""Stage `features`: tag-matching features (TMCR eq. 5-7) and K-means semantic clusters."""

import numpy as np

from pipelines.data.manifest import read_manifest, vote_distribution
from pipelines.embed.encode import read_image_embeddings, read_text_embeddings
from pipelines.io import DataError, write_json
from pipelines.semantics import semantic_clusters, tag_matching
from pipelines.train.data import write_features_table
from stages.common import FEATURES, IMAGE_EMB, MANIFEST, TAG_EMB, cli, params, weights_card


@cli
def main() -> None:
    p = params()
    card = weights_card()
    ids, emb = read_image_embeddings(IMAGE_EMB)
    manifest = read_manifest(MANIFEST).set_index("image_id")
    missing = [i for i in ids if i not in manifest.index]
    if missing:
        raise DataError(f"{IMAGE_EMB}: {len(missing)} embedded ids are not in {MANIFEST} (e.g. {missing[0]}); rerun `dvc repro embed`.")
    rows = manifest.loc[ids].reset_index()
    tags, kinds, tag_emb = read_text_embeddings(TAG_EMB)
    scale = card["logit_scale"] if p.features.logit_scale else 1.0
    sim_sem, sim_attr = tag_matching(emb, tag_emb, kinds, scale=scale)
    split = rows["split"].to_numpy()
    clusters = semantic_clusters(sim_sem, p.features.n_clusters, p.seed, fit_mask=split == "train")
    dist = vote_distribution(rows)
    write_features_table(
        FEATURES,
        image_id=rows["image_id"].to_numpy(),
        split=split,
        score=rows["score"].to_numpy(dtype=np.float32, na_value=np.nan),
        dist=dist,
        cluster=clusters,
        tm=np.concatenate([sim_sem, sim_attr], axis=1),
        emb_dim=emb.shape[1],  # the embeddings themselves stay in IMAGE_EMB (joined on load)
    )
    sem_tags = np.asarray(tags)[np.asarray(kinds) == "semantic"]
    summary = {}
    for c in range(p.features.n_clusters):
        members = clusters == c
        top = np.argsort(-sim_sem[members].mean(0))[:5] if members.any() else []
        summary[str(c)] = {"size": int(members.sum()), "top_semantic_tags": sem_tags[top].tolist()}
    write_json(FEATURES.parent / "clusters.json", {"n_images": len(ids), "tm_dim": int(sim_sem.shape[1] + sim_attr.shape[1]), "clusters": summary})


if __name__ == "__main__":
    main()
