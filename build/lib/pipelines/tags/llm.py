"""LLM tag-candidate extraction (the paper's GPT-4 step) with a replay cache.

Comments go to a chat-completions endpoint in batches; the model must answer with JSON that
obeys :data:`TAG_SCHEMA` (``{"semantic": [str], "attribute": [str]}``), requested through
structured outputs (``response_format={"type": "json_schema", ...}``).

Every accepted response is stored in a replay cache (JSON Lines, one object per line), keyed by
:func:`request_key`: the SHA-256 of the model name, the rendered messages and the schema. With
the cache committed, ``dvc repro`` needs neither a key nor the network. Modes:

- ``off``: no LLM at all.
- ``replay``: cache only; a miss raises :class:`~pipelines.io.DataError` naming the batch.
- ``live``: cache hits are replayed, misses call the API and are recorded.
- ``auto``: like ``live`` when the API-key variable is set; without it, misses are skipped
  and counted (the library is then built from the other candidates).

The cache stores only the key, the model, the batch size and the parsed tags, never the
comments themselves (corpus licences) and never the API key, and is rewritten whole through a temporary file and a
rename, so an interrupted run never leaves a torn file. A response that is not valid JSON or
does not match the schema is not recorded and raises :class:`LLMError` naming the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines.io import DataError, write_text

MODES = ("off", "replay", "live", "auto")

SCHEMA_NAME = "tag_candidates"
TAG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "semantic": {"type": "array", "items": {"type": "string"}},
        "attribute": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["semantic", "attribute"],
    "additionalProperties": False,
}
"""The structured-output schema; strict mode needs every property required and no extras."""

DEFAULT_PROMPT = """\
You are building two tag libraries for image aesthetics assessment from photo critiques.
From the numbered comments below, extract short tags (1 to 3 words, lower case):
- "semantic": what the photographs depict: subjects, objects, animals, people, scenes and
  settings (for example "cat", "astronaut", "street", "coffee cup");
- "attribute": aesthetic or technical qualities of the photographs: composition, lighting,
  colour, focus, exposure, noise, mood (for example "sharp", "blurry", "overexposed",
  "colour cast", "tilted horizon", "depth of field").
Leave out generic praise ("nice", "great shot"), words about the contest or the critique, and
names of people. List each tag once.

Comments:
{comments}
"""
PLACEHOLDER = "{comments}"
MAX_RETRIES = 2
"""Retries of the openai client on connection errors, 429 and 5xx (with its own back-off)."""
FLUSH_EVERY = 10
"""New responses between cache rewrites (the cache is also written when extraction stops)."""


class LLMError(DataError):
    """The LLM call failed or answered something unusable; the message names the batch."""


@dataclass(frozen=True)
class LLMConfig:
    """The ``tags.llm`` block of params.yaml (see :mod:`pipelines.tags.library` for checks)."""

    mode: str = "off"
    model: str = "gpt-4o-2024-08-06"
    prompt: str = DEFAULT_PROMPT
    batch_size: int = 20
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not ENV_NAME.match(self.api_key_env):  # never echo it: it may be the key itself
            raise DataError(
                "params.yaml tags.llm.api_key_env: must be the NAME of an environment variable "
                "(e.g. OPENAI_API_KEY), not the key; remove the key from params.yaml and export it instead."
            )


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
REDACTED = "[REDACTED]"


MIN_SECRET = 8  # shorter values are no real API key, and replacing them would garble the text


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced (error messages may quote a key)."""
    return text.replace(secret, REDACTED) if secret and len(secret) >= MIN_SECRET else text


@dataclass
class LLMResult:
    """The LLM's answers, one ``{"semantic": [...], "attribute": [...]}`` per answered batch."""

    responses: list[dict[str, list[str]]] = field(default_factory=list)
    n_comments: int = 0
    n_batches: int = 0
    replayed: int = 0
    live: int = 0
    skipped: int = 0
    skipped_batches: list[int] = field(default_factory=list)
    """1-based indices of the batches skipped in ``auto`` mode for want of a key."""


def render_messages(prompt: str, comments: Sequence[str]) -> list[dict[str, str]]:
    """The chat messages for one batch: the prompt with ``{comments}`` replaced by a numbered list."""
    numbered = "\n".join(f"{i}. {' '.join(text.split())}" for i, text in enumerate(comments, 1))
    return [{"role": "user", "content": prompt.replace(PLACEHOLDER, numbered)}]


def response_format() -> dict[str, Any]:
    """The ``response_format`` argument requesting :data:`TAG_SCHEMA` in strict mode."""
    return {
        "type": "json_schema",
        "json_schema": {"name": SCHEMA_NAME, "schema": TAG_SCHEMA, "strict": True},
    }


def request_key(model: str, messages: Sequence[Mapping[str, str]], schema: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of model, messages and schema: the cache key."""
    blob = json.dumps(
        {"model": model, "messages": list(messages), "schema": schema},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def parse_tags(content: Any, where: str) -> dict[str, list[str]]:
    """Parse and check a response against :data:`TAG_SCHEMA`; raise :class:`LLMError` otherwise."""
    if isinstance(content, str):
        try:
            content = json.loads(content)
        except json.JSONDecodeError as exc:
            raise LLMError(f"{where}: the response is not valid JSON ({exc.msg}): {content[:200]!r}") from exc
    if not isinstance(content, dict) or set(content) != {"semantic", "attribute"}:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise LLMError(
            f"{where}: the response does not match the schema: expected exactly the keys "
            f"'semantic' and 'attribute', got {keys}."
        )
    for kind in ("semantic", "attribute"):
        value = content[kind]
        if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
            raise LLMError(f"{where}: the response does not match the schema: {kind!r} must be a list of strings.")
    return {"semantic": list(content["semantic"]), "attribute": list(content["attribute"])}


class ReplayCache:
    """The JSON Lines replay cache: read once, added to in memory, rewritten atomically."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lines: list[str] = []
        self._entries: dict[str, dict[str, Any]] = {}
        self._pending = 0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        with self.path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                fix = "delete the line and record it again (tags.llm.mode live)"
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg}); {fix}.") from exc
                if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                    raise DataError(f"{where}: a cache entry must be an object with a 'key'; {fix}.")
                try:
                    parse_tags(entry.get("response"), f"{where}: cached response")
                except LLMError as exc:
                    raise DataError(f"{exc}; {fix}.") from exc
                self._lines.append(line.rstrip("\n"))
                self._entries[entry["key"]] = entry

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def add(self, entry: dict[str, Any]) -> None:
        """Remember a new entry; written out by :meth:`flush` (every :data:`FLUSH_EVERY` adds)."""
        self._entries[entry["key"]] = entry
        self._lines.append(json.dumps(entry, sort_keys=True, ensure_ascii=False))
        self._pending += 1
        if self._pending >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Rewrite the whole file through a temporary file and a rename, if anything is new."""
        if self._pending:
            write_text(self.path, "".join(line + "\n" for line in self._lines))
            self._pending = 0


def batched(texts: Sequence[str], batch_size: int) -> list[list[str]]:
    """Consecutive batches of ``batch_size`` texts (the last one may be shorter)."""
    return [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]


def unique_texts(texts: Sequence[str]) -> list[str]:
    """Texts with whitespace collapsed, exact duplicates and blanks dropped, first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        text = " ".join(text.split())
        if text:
            seen.setdefault(text, None)
    return list(seen)


def extract_llm(
    texts: Sequence[str],
    cfg: LLMConfig,
    replay_path: str | os.PathLike,
    *,
    environ: Mapping[str, str] | None = None,
) -> LLMResult:
    """Ask the LLM (or the replay cache) for tag candidates, ``cfg.batch_size`` comments at a time.

    ``texts`` are deduplicated (:func:`unique_texts`) before batching, so batches, and with
    them the cache keys, depend only on the distinct comments and their order.
    """
    result = LLMResult()
    if cfg.mode == "off":
        return result
    if cfg.mode not in MODES:
        raise DataError(f"tags.llm.mode: unknown mode {cfg.mode!r}; use one of {', '.join(MODES)}.")
    environ = os.environ if environ is None else environ
    api_key = environ.get(cfg.api_key_env) or None
    comments = unique_texts(texts)
    batches = batched(comments, cfg.batch_size)
    result.n_comments, result.n_batches = len(comments), len(batches)
    cache = ReplayCache(replay_path)
    client = None
    try:
        for index, batch in enumerate(batches, 1):
            messages = render_messages(cfg.prompt, batch)
            key = request_key(cfg.model, messages, response_format())
            start = (index - 1) * cfg.batch_size
            span = f"{start + 1}-{start + len(batch)}"
            where = (
                f"LLM batch {index}/{len(batches)} (distinct comments {span}, "
                f"model {cfg.model!r}, key {key[:12]})"
            )
            entry = cache.get(key)
            if entry is not None:
                tags = parse_tags(entry["response"], f"{cache.path}: {where}")
                result.replayed += 1
            elif cfg.mode == "replay" or (cfg.mode == "live" and api_key is None):
                raise DataError(
                    f"{where}: no recorded response in {cache.path}; to record it, set the API "
                    f"key in ${cfg.api_key_env} and run with tags.llm.mode=live (or auto)."
                )
            elif api_key is None:  # auto without a key
                result.skipped += 1
                result.skipped_batches.append(index)
                continue
            else:
                if client is None:
                    client = make_client(cfg, api_key)
                try:
                    tags = parse_tags(call_llm(client, cfg, messages, where), where)
                except LLMError as exc:  # a server may quote the key back; it goes nowhere from here
                    raise LLMError(redact(str(exc), api_key)) from None
                cache.add({"key": key, "model": cfg.model, "n_comments": len(batch), "response": tags})
                result.live += 1
            result.responses.append(tags)
    finally:
        cache.flush()
    return result


def make_client(cfg: LLMConfig, api_key: str) -> Any:
    """An ``openai.OpenAI`` client for ``cfg`` (imported lazily: replay needs no openai)."""
    from openai import OpenAI

    return OpenAI(
        api_key=api_key,
        base_url=cfg.base_url or None,
        timeout=cfg.timeout_s,
        max_retries=MAX_RETRIES,
    )


def call_llm(client: Any, cfg: LLMConfig, messages: list[dict[str, str]], where: str) -> str:
    """One chat-completions call with structured output; returns the message content."""
    import openai

    try:
        completion = client.chat.completions.create(
            model=cfg.model,
            messages=messages,
            response_format=response_format(),
            temperature=cfg.temperature,
        )
    except openai.OpenAIError as exc:
        raise LLMError(
            f"{where}: the API call failed ({type(exc).__name__}: {exc}); check tags.llm.base_url, "
            f"tags.llm.model and the key in ${cfg.api_key_env}."
        ) from exc
    choices = getattr(completion, "choices", None)
    if not choices:
        raise LLMError(f"{where}: the response has no choices: {str(completion)[:200]!r}.")
    choice = choices[0]
    message = choice.message
    if getattr(message, "refusal", None):
        raise LLMError(f"{where}: the model refused: {message.refusal!r}.")
    if choice.finish_reason == "length":
        raise LLMError(f"{where}: the response was cut off (finish_reason=length); lower tags.llm.batch_size.")
    if not isinstance(message.content, str):
        raise LLMError(f"{where}: the response has no text content.")
    return message.content
