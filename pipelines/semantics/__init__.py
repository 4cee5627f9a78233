from pipelines.semantics.match import (
    KMEANS_METHODS,
    assign_clusters,
    cluster_means,
    fit_kmeans,
    inertia,
    kmeans_space,
    load_matcher,
    semantic_clusters,
    TagMatcher,
)

__all__ = [
    "KMEANS_METHODS",
    "assign_clusters",
    "cluster_means",
    "fit_kmeans",
    "inertia",
    "kmeans_space",
    "load_matcher",
    "semantic_clusters",
    "TagMatcher",
]
