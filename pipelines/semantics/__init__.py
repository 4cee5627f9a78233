from pipelines.semantics.match import semantic_clusters, tag_matching

__all__ = ["semantic_clusters", "tag_matching"]
