"""Stage `features`: K-means semantic clusters (TMCR sec. 3.3) on the tag-matching geometry.

The TM features themselves (eq. 5-7) are not stored: the readers compute them per batch
(``pipelines.semantics.TagMatcher``). The table keeps ids, split, labels and cluster.
"""

import numpy as np

from pipelines.data.manifest import read_manifest, vote_distribution
from pipelines.embed.encode import read_image_embeddings, read_text_embeddings
from pipelines.io import DataError, write_json
from pipelines.semantics import TagMatcher, cluster_means, kmeans_space, semantic_clusters
from pipelines.train.data import write_features_table
from stages.common import FEATURES, IMAGE_EMB, MANIFEST, TAG_EMB, cli, params, weights_card


@cli
def main() -> None:
    p = params()
    f = p.features
    card = weights_card()
    ids, emb = read_image_embeddings(IMAGE_EMB)
    manifest = read_manifest(MANIFEST).set_index("image_id")
    missing = [i for i in ids if i not in manifest.index]
    if missing:
        raise DataError(f"{IMAGE_EMB}: {len(missing)} embedded ids are not in {MANIFEST} (e.g. {missing[0]}); rerun `dvc repro embed`.")
    rows = manifest.loc[ids].reset_index()
    del manifest
    tags, kinds, tag_emb = read_text_embeddings(TAG_EMB)
    scale = card["logit_scale"] if f.logit_scale else 1.0
    matcher = TagMatcher(tag_emb, kinds, scale)  # [semantic | attribute] columns, as every reader computes them
    # K-means sees the semantic TM geometry exactly, in at most D dims (not M)
    space = kmeans_space(emb, tag_emb[np.asarray(kinds) == "semantic"], scale=scale)
    split = rows["split"].to_numpy()
    clusters = semantic_clusters(space, f.n_clusters, p.seed, fit_mask=split == "train", method=f.kmeans,
                                 fit_rows=f.kmeans_fit_rows, n_init=f.kmeans_n_init)
    del space
    # a cluster's mean semantic TM row is TM of its mean embedding (TM is linear): k rows, not N
    means = matcher.split(matcher.numpy(cluster_means(emb, clusters, f.n_clusters)))[0]
    emb_dim = emb.shape[1]
    del emb  # the embeddings themselves stay in IMAGE_EMB (joined on load)
    write_features_table(
        FEATURES,
        image_id=rows["image_id"].to_numpy(),
        split=split,
        score=rows["score"].to_numpy(dtype=np.float32, na_value=np.nan),
        dist=vote_distribution(rows),
        cluster=clusters,
        emb_dim=emb_dim,
        tm_scale=scale,
        n_semantic=matcher.n_sem,
        n_attribute=matcher.dim - matcher.n_sem,
    )
    sem_tags = np.asarray(tags)[np.asarray(kinds) == "semantic"]
    sizes = np.bincount(clusters, minlength=f.n_clusters)
    summary = {
        str(c): {"size": int(sizes[c]), "top_semantic_tags": sem_tags[np.argsort(-means[c])[:5]].tolist() if sizes[c] else []}
        for c in range(f.n_clusters)
    }
    write_json(FEATURES.parent / "clusters.json", {
        "n_images": len(ids), "tm_dim": matcher.dim,
        "kmeans": {"method": f.kmeans, "fit_rows": f.kmeans_fit_rows, "n_init": f.kmeans_n_init}, "clusters": summary})


if __name__ == "__main__":
    main()
