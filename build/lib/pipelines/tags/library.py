"""Build the semantic and attribute tag libraries (TMCR section 3.2, Figure 3).

Steps, in order (each one is counted in ``report.json``):

1. **Candidates**: the lexical extractor (:mod:`pipelines.tags.lexical`, always on) and the LLM
   (:mod:`pipelines.tags.llm`, when ``llm.mode`` is not ``off``).
2. **Normalisation** of LLM tags with :func:`~pipelines.tags.lexical.normalize_tag` (lower
   case, whitespace, simple singular, leading article dropped; British and American spellings
   are left alone); LLM tags made only of stopwords, or longer than :data:`MAX_TAG_WORDS`
   words, are dropped. Lexical candidates are born normalised.
3. **Manual filter** (:func:`read_filter`): the committed list ``config/tag_filter.txt``.
4. **Dedupe**: each library is a set; a tag in both goes to *attribute* only. Reason: the
   attribute lexicon and the LLM's attribute answers are the narrower, aesthetic reading of a
   word ("light", "reflection", "portrait"), and a tag kept in both would give the tag-matching
   feature the same CLIP similarity twice. A filter rule ``attribute:TAG`` removes the tag from
   the attribute side before this step, which is how to keep such a tag semantic instead.
5. **Caps**: ``max_semantic`` / ``max_attribute`` keep the most supported tags, ties broken
   alphabetically, so the output is deterministic.

*Support* of a tag is the number of comments that contain it (its document frequency, computed
on the same tokens as the lexical extractor); an LLM tag that never appears verbatim (a
paraphrase) gets the number of batches that proposed it instead, i.e. ``max(df, batches)``.
``min_count`` applies to lexical candidates only: the LLM is trusted to propose real tags.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pipelines.io import DataError, write_json, write_text
from pipelines.tags.corpus import detect_format, read_corpus
from pipelines.tags.lexical import (
    STOPWORDS,
    comment_tokens,
    document_frequency,
    extract_lexical,
    normalize_tag,
)
from pipelines.tags.llm import DEFAULT_PROMPT, MODES, PLACEHOLDER, LLMConfig, extract_llm

KINDS = ("semantic", "attribute")
MAX_TAG_WORDS = 5
"""LLM tags longer than this many words are dropped (and counted)."""

DEFAULT_CONFIG: dict[str, Any] = {
    "splits": ["train", "unlabeled"],
    "min_count": 5,
    "max_ngram": 3,
    "max_semantic": 2145,
    "max_attribute": 1659,
    "llm": {
        "mode": "off",
        "model": "gpt-4o-2024-08-06",
        "prompt": DEFAULT_PROMPT,
        "batch_size": 20,
        "base_url": None,
        "api_key_env": "OPENAI_API_KEY",
        "temperature": 0.0,
        "timeout_s": 60.0,
    },
}
"""Defaults of the ``tags:`` block of params.yaml (caps: the paper's 2,145 / 1,659). ``splits``:
the manifest splits whose images' comments are mined; comments of the other splits' images
(validation, test) are never read, and comments of images outside the manifest (other corpora)
are."""


@dataclass(frozen=True)
class TagConfig:
    """A checked ``tags:`` config block."""

    splits: tuple[str, ...]
    min_count: int
    max_ngram: int
    max_semantic: int
    max_attribute: int
    llm: LLMConfig


def resolve_config(cfg: Mapping[str, Any] | None) -> TagConfig:
    """Merge ``cfg`` over :data:`DEFAULT_CONFIG` and check it; unknown keys raise DataError."""
    cfg = dict(cfg or {})
    _check_keys(cfg, DEFAULT_CONFIG, "tags")
    llm_cfg = cfg.pop("llm", None) or {}
    if not isinstance(llm_cfg, Mapping):
        raise DataError("params.yaml tags.llm: must be a mapping of LLM settings.")
    _check_keys(llm_cfg, DEFAULT_CONFIG["llm"], "tags.llm")
    top = {**{k: v for k, v in DEFAULT_CONFIG.items() if k != "llm"}, **cfg}
    llm = {**DEFAULT_CONFIG["llm"], **llm_cfg}

    ints = {"min_count": 1, "max_ngram": 1, "max_semantic": 1, "max_attribute": 1}
    for key, low in ints.items():
        top[key] = _int(top[key], f"tags.{key}", low)
    llm["batch_size"] = _int(llm["batch_size"], "tags.llm.batch_size", 1)
    for key, low in (("temperature", 0.0), ("timeout_s", 1e-9)):
        value = llm[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            raise DataError(f"params.yaml tags.llm.{key}: expected a number >= {low:g}, got {value!r}.")
        llm[key] = float(value)
    if llm["mode"] not in MODES:
        raise DataError(f"params.yaml tags.llm.mode: {llm['mode']!r} is not one of {', '.join(MODES)}.")
    for key in ("model", "prompt", "api_key_env"):
        if not isinstance(llm[key], str) or not llm[key].strip():
            raise DataError(f"params.yaml tags.llm.{key}: expected a non-empty string, got {llm[key]!r}.")
    if PLACEHOLDER not in llm["prompt"]:
        raise DataError(f"params.yaml tags.llm.prompt: the template must contain {PLACEHOLDER} where the comments go.")
    if llm["base_url"] is not None and not isinstance(llm["base_url"], str):
        raise DataError(f"params.yaml tags.llm.base_url: expected a URL string or null, got {llm['base_url']!r}.")
    llm["base_url"] = llm["base_url"] or None
    splits = top["splits"]
    if not isinstance(splits, list) or not splits or not all(isinstance(x, str) and x for x in splits):
        raise DataError(f"params.yaml tags.splits: expected a non-empty list of split names, got {splits!r}.")
    top["splits"] = tuple(splits)
    return TagConfig(**top, llm=LLMConfig(**llm))


def _check_keys(cfg: Mapping[str, Any], known: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise DataError(
            f"params.yaml {where}: unknown key(s) {', '.join(map(str, unknown))}; "
            f"the known keys are {', '.join(known)}."
        )


def _int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"params.yaml {name}: expected an integer >= {low}, got {value!r}.")
    return value


@dataclass(frozen=True)
class FilterRule:
    """One line of the manual filter list."""

    text: str
    """The rule as written (comment stripped)."""
    line: int
    scope: str
    """``both``, ``semantic`` or ``attribute``."""
    pattern: str
    """The normalised tag, or a lower-cased glob when the rule contains ``*``."""

    def matches(self, tag: str, kind: str) -> bool:
        if self.scope not in ("both", kind):
            return False
        if "*" in self.pattern:
            return fnmatch.fnmatchcase(tag, self.pattern)
        return tag == self.pattern


def read_filter(path: str | os.PathLike) -> list[FilterRule]:
    """Parse the manual filter list (format: see ``config/tag_filter.txt``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: filter list not found; create it (it may be empty) or fix the path.")
    rules = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        scope, body = "both", text
        head, sep, rest = text.partition(":")
        if sep:
            if head.strip().lower() not in KINDS:
                raise DataError(
                    f"{path}:{lineno}: unknown prefix {head.strip()!r}; use 'semantic:', "
                    f"'attribute:' or no prefix (both libraries)."
                )
            scope, body = head.strip().lower(), rest
        if "*" in body:
            pattern = " ".join(body.lower().split())
        else:
            pattern = normalize_tag(body)
        if not pattern:
            raise DataError(f"{path}:{lineno}: {text!r} normalises to an empty tag; delete the line.")
        rules.append(FilterRule(text=text, line=lineno, scope=scope, pattern=pattern))
    return rules


def build_tag_library(
    corpus_path: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    cfg: Mapping[str, Any] | None,
    filter_path: str | os.PathLike | None,
    replay_path: str | os.PathLike,
    corpus_format: str = "auto",
    environ: Mapping[str, str] | None = None,
    image_splits: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Build the tag libraries and write ``semantic.txt``, ``attribute.txt`` and ``report.json``.

    ``corpus_path`` is one corpus (file or folder) or a list of them, all read with
    ``corpus_format``. ``filter_path`` ``None`` means no manual filter. ``environ`` (default
    ``os.environ``) is where the LLM key variable is looked up. ``image_splits`` maps the data
    set's image ids to their split (the manifest): a comment on an image whose split is not in
    ``tags.splits`` is skipped (``None``: every comment is read). Returns the report.
    """
    conf = resolve_config(cfg)
    rules = read_filter(filter_path) if filter_path is not None else []
    paths = [corpus_path] if isinstance(corpus_path, (str, os.PathLike)) else list(corpus_path)
    keep = set(conf.splits)
    splits = image_splits or {}
    records = [rec for path in paths for rec in read_corpus(path, corpus_format)]
    texts = [text for image_id, text in records if image_id not in splits or splits[image_id] in keep]
    held_out = len(records) - len(texts)
    corpus_names = ", ".join(str(p) for p in paths)
    if not texts:
        raise DataError(
            f"{corpus_names}: no comments found{f' on images of splits {sorted(keep)} ({held_out} on other splits skipped)' if held_out else ''}; "
            "check the corpus path and its format, or tags.splits."
        )
    token_lists = [comment_tokens(text) for text in texts]

    lexical = extract_lexical(token_lists, min_count=conf.min_count, max_ngram=conf.max_ngram)
    llm = extract_llm(texts, conf.llm, replay_path, environ=environ)
    llm_batches, llm_norm = _normalise_llm(llm.responses)

    known = {**lexical.semantic, **lexical.attribute}
    llm_only = {tag for kind in KINDS for tag in llm_batches[kind] if tag not in known}
    df = {**known, **document_frequency(token_lists, llm_only)}
    candidates: dict[str, dict[str, int]] = {}
    for kind in KINDS:
        tags = dict(getattr(lexical, kind))
        for tag, batches in llm_batches[kind].items():
            tags[tag] = max(df.get(tag, 0), batches)
        candidates[kind] = tags

    filtered, filter_report = _apply_filter(candidates, rules)
    both = sorted(set(filtered["semantic"]) & set(filtered["attribute"]))
    for tag in both:
        del filtered["semantic"][tag]

    final: dict[str, list[str]] = {}
    caps = {"semantic": conf.max_semantic, "attribute": conf.max_attribute}
    capped: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        ranked = sorted(filtered[kind].items(), key=lambda item: (-item[1], item[0]))
        final[kind] = [tag for tag, _ in ranked[: caps[kind]]]
        capped[kind] = {
            "cap": caps[kind],
            "dropped": max(0, len(ranked) - caps[kind]),
            "min_support_kept": ranked[min(len(ranked), caps[kind]) - 1][1] if ranked else None,
        }
    for kind in KINDS:
        if not final[kind]:
            raise DataError(
                f"{corpus_names}: the {kind} tag library is empty ({len(candidates[kind])} candidates "
                f"before the filter, {len(filtered[kind])} after filter and dedupe); lower "
                f"tags.min_count (now {conf.min_count}), check that the corpus holds enough comments, "
                f"or loosen the filter list {filter_path}."
            )

    report = {
        "corpus": {
            "paths": [str(p) for p in paths],
            "formats": [detect_format(p) if corpus_format == "auto" else corpus_format for p in paths],
            "comments": len(texts),
            "splits": list(conf.splits),
            "skipped_other_splits": held_out,
        },
        "config": _config_summary(conf),
        "extractors": {
            "lexical": {
                "semantic": len(lexical.semantic),
                "attribute": len(lexical.attribute),
                "below_min_count": lexical.below_min_count,
                "not_semantic": lexical.not_semantic,
            },
            "llm": {
                "mode": conf.llm.mode,
                "model": conf.llm.model,
                "semantic": len(llm_batches["semantic"]),
                "attribute": len(llm_batches["attribute"]),
                "not_found_by_lexical": len(llm_only),
                "comments": llm.n_comments,
                "batches": {
                    "total": llm.n_batches,
                    "replayed": llm.replayed,
                    "live": llm.live,
                    "skipped": llm.skipped,
                },
                "skipped_batches": llm.skipped_batches,
                "normalisation": llm_norm,
            },
        },
        "candidates": {kind: len(candidates[kind]) for kind in KINDS},
        "filtered": filter_report,
        "dedupe": {"moved_to_attribute": both},
        "capped": capped,
        "final": {kind: len(final[kind]) for kind in KINDS},
        "examples": {kind: final[kind][:20] for kind in KINDS},
    }
    out_dir = Path(out_dir)
    for kind in KINDS:
        write_text(out_dir / f"{kind}.txt", "".join(tag + "\n" for tag in final[kind]))
    write_json(out_dir / "report.json", report)
    return report


def _normalise_llm(responses: Iterable[Mapping[str, list[str]]]) -> tuple[dict[str, Counter[str]], dict[str, int]]:
    """Normalised LLM tags with the number of batches proposing each, and what normalising did."""
    batches: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    raw_seen: dict[str, set[str]] = {kind: set() for kind in KINDS}
    stats = {"dropped_empty": 0, "dropped_stopwords": 0, "dropped_too_long": 0}
    for response in responses:
        for kind in KINDS:
            tags = set()
            for raw in response[kind]:
                tag = normalize_tag(raw)
                if not tag:
                    stats["dropped_empty"] += 1
                elif all(word in STOPWORDS for word in tag.split()):
                    stats["dropped_stopwords"] += 1
                elif len(tag.split()) > MAX_TAG_WORDS:
                    stats["dropped_too_long"] += 1
                else:
                    tags.add(tag)
                    raw_seen[kind].add(" ".join(raw.split()))
            batches[kind].update(tags)
    stats["variants_merged"] = sum(len(raw_seen[k]) - len(batches[k]) for k in KINDS)
    return batches, stats


def _apply_filter(
    candidates: Mapping[str, Mapping[str, int]], rules: Sequence[FilterRule]
) -> tuple[dict[str, dict[str, int]], dict[str, Any]]:
    """Drop tags matched by a rule; the first matching rule (file order) gets the credit.

    The report lists, per rule that removed anything, the tags it removed from each library,
    and the rules that matched nothing (``unused_rules``).
    """
    removed: list[dict[str, list[str]]] = [{kind: [] for kind in KINDS} for _ in rules]
    exact: dict[str, list[int]] = {}
    globs: list[int] = []
    for i, rule in enumerate(rules):
        if "*" in rule.pattern:
            globs.append(i)
        else:
            exact.setdefault(rule.pattern, []).append(i)
    kept: dict[str, dict[str, int]] = {}
    for kind in KINDS:
        kept[kind] = {}
        for tag, support in sorted(candidates[kind].items()):
            hits = [i for i in exact.get(tag, []) + globs if rules[i].matches(tag, kind)]
            hit = min(hits) if hits else None
            if hit is None:
                kept[kind][tag] = support
            else:
                removed[hit][kind].append(tag)
    report = {
        "removed": {kind: sum(len(r[kind]) for r in removed) for kind in KINDS},
        "rules": [
            {"line": rule.line, "rule": rule.text, "removed": removed[i]}
            for i, rule in enumerate(rules)
            if any(removed[i].values())
        ],
        "unused_rules": [
            f"line {rule.line}: {rule.text}" for i, rule in enumerate(rules) if not any(removed[i].values())
        ],
    }
    return kept, report


def _config_summary(conf: TagConfig) -> dict[str, Any]:
    llm = dict(conf.llm.__dict__)
    prompt = llm.pop("prompt")
    llm["prompt_sha256"] = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    return {
        "splits": list(conf.splits),
        "min_count": conf.min_count,
        "max_ngram": conf.max_ngram,
        "max_semantic": conf.max_semantic,
        "max_attribute": conf.max_attribute,
        "llm": llm,
    }
