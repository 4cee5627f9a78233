"""Tag libraries for tag matching (TMCR 3.2): corpus readers, lexical and LLM candidates, filter.

Entry point: :func:`build_tag_library`; config defaults: :data:`DEFAULT_CONFIG`.
"""

from pipelines.tags.corpus import FORMATS, detect_format, read_corpus
from pipelines.tags.lexical import classify, extract_lexical, normalize_tag, tokenize
from pipelines.tags.library import DEFAULT_CONFIG, build_tag_library, read_filter, resolve_config
from pipelines.tags.llm import LLMConfig, LLMError, extract_llm, request_key

__all__ = [
    "DEFAULT_CONFIG",
    "FORMATS",
    "LLMConfig",
    "LLMError",
    "build_tag_library",
    "classify",
    "detect_format",
    "extract_lexical",
    "extract_llm",
    "normalize_tag",
    "read_corpus",
    "read_filter",
    "request_key",
    "resolve_config",
    "tokenize",
]
