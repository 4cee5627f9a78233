"""Stage `tags`: semantic and attribute tag libraries from the comment corpus.

Only comments on images of the ``tags.splits`` splits of the manifest are mined (default: train
and unlabeled), so no validation or test image's comments shape the libraries.
"""

from pipelines.data.manifest import read_manifest
from pipelines.tags.library import build_tag_library
from stages.common import MANIFEST, TAGS, cli, params


@cli
def main() -> None:
    p = params()
    manifest = read_manifest(MANIFEST)
    build_tag_library(
        p.data.comments,
        TAGS,
        cfg=p.tags,
        filter_path="config/tag_filter.txt",
        replay_path="config/llm_replay.jsonl",
        corpus_format=p.data.comments_format,
        image_splits=dict(zip(manifest["image_id"].astype(str), manifest["split"].astype(str))),
    )


if __name__ == "__main__":
    main()
