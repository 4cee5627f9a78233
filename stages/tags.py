"""Stage `tags`: semantic and attribute tag libraries from the comment corpus."""

from pipelines.tags.library import build_tag_library
from stages.common import TAGS, cli, params


@cli
def main() -> None:
    p = params()
    build_tag_library(
        p.data.comments,
        TAGS,
        cfg=p.tags,
        filter_path="config/tag_filter.txt",
        replay_path="config/llm_replay.jsonl",
        corpus_format=p.data.comments_format,
    )


if __name__ == "__main__":
    main()
