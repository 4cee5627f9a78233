"""Data sets -> one manifest: label-file adapters, the manifest contract, the demo generator."""

from pipelines.data.adapters import ADAPTERS, Labels, get_adapter, register_adapter
from pipelines.data.demo import generate_demo
from pipelines.data.manifest import (
    SCHEMA,
    SPLITS,
    build_manifest,
    read_manifest,
    scores_from_votes,
    vote_distribution,
    write_manifest,
)

__all__ = [
    "ADAPTERS", "Labels", "SCHEMA", "SPLITS", "build_manifest", "generate_demo", "get_adapter",
    "read_manifest", "register_adapter", "scores_from_votes", "vote_distribution", "write_manifest",
]
