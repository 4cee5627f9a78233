"""Label-file adapters: one function per data-set format, all producing the same rows.

An adapter reads a label file and returns :class:`Labels`: a frame with columns
``image_id``, ``split``, ``votes`` (list of ints or None), ``score`` (float or NaN) and,
optionally, ``file`` (the image's file name relative to the image folder when it is not
``<image_id>.jpg``), plus the level count. :func:`pipelines.data.manifest.build_manifest`
checks the paths, attaches the image files and validates the result, so a new adapter only
parses. To add one::

    @register_adapter("ava")
    def ava(labels: Path, **options) -> Labels:
        ...
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from pipelines.io import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
"""Extensions tried, in this order, for ``<image_id><ext>`` (case-insensitive)."""

ROW_COLUMNS = ("image_id", "split", "votes", "score")


@dataclass
class Labels:
    """What an adapter returns: parsed label rows, the level count, and report notes."""

    rows: pd.DataFrame
    n_levels: int
    notes: dict[str, Any] = field(default_factory=dict)


Adapter = Callable[..., Labels]
ADAPTERS: dict[str, Adapter] = {}
"""Registry: adapter name -> function ``(labels: Path, **options) -> Labels``."""


def register_adapter(name: str) -> Callable[[Adapter], Adapter]:
    """Decorator that adds a function to :data:`ADAPTERS` under ``name``."""

    def add(fn: Adapter) -> Adapter:
        if name in ADAPTERS:
            raise ValueError(f"adapter {name!r} is already registered")
        ADAPTERS[name] = fn
        return fn

    return add


def get_adapter(name: str) -> Adapter:
    """The adapter called ``name``; a :class:`DataError` listing the known ones otherwise."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise DataError(
            f"unknown data adapter {name!r}; set `data.adapter` in params.yaml to one of: "
            f"{', '.join(sorted(ADAPTERS))}."
        ) from None


def attach_paths(
    rows: pd.DataFrame, images: Path, labels: Path
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add a ``path`` column; drop (and report) rows whose image file is not on disk.

    The file is ``rows.file`` when the adapter gave one, else ``<image_id>`` with the first of
    :data:`IMAGE_EXTENSIONS` found. Raises :class:`DataError` when no image is found at all.
    """
    on_disk: dict[str, str] = {}  # lower-case stem+ext -> real name
    for entry in images.iterdir():
        on_disk.setdefault(entry.name.lower(), entry.name)

    def locate(image_id: str, file: Any) -> str | None:
        if isinstance(file, str) and file:
            return str(images / file) if (images / file).is_file() else None
        for ext in IMAGE_EXTENSIONS:
            name = on_disk.get(f"{image_id}{ext}".lower())
            if name is not None:
                return str(images / name)
        return None

    files = rows["file"] if "file" in rows else [None] * len(rows)
    paths = [locate(i, f) for i, f in zip(rows["image_id"], files)]
    found = np.array([p is not None for p in paths], dtype=bool)
    missing = rows["image_id"][~found].tolist()
    if not found.any():
        raise DataError(
            f"{images}: none of the {len(rows)} images listed in {labels} is there (looked for "
            f"<image_id>{{{','.join(IMAGE_EXTENSIONS)}}}); set `data.images` to the right folder."
        )
    if missing:
        log.warning(
            "%s: %d of %d images listed in %s are missing and were dropped (e.g. %s)",
            images, len(missing), len(rows), labels, ", ".join(missing[:5]),
        )
    out = rows.loc[found, list(ROW_COLUMNS)].reset_index(drop=True)
    out["path"] = [p for p in paths if p is not None]
    return out, {"missing_images": len(missing), "missing_examples": missing[:20]}


_VOTE_COLUMN = re.compile(r"v(\d+)")


@register_adapter("votes_csv")
def votes_csv(labels: Path) -> Labels:
    """CSV ``image_id,split,v1,...,vL`` (vote counts per level; L from the header).

    ``unlabeled`` rows may leave the vote cells empty; votes given there are checked, then
    dropped (the row stays unlabeled). Every other split needs integer counts >= 0, not all 0.
    """
    from pipelines.data.manifest import SPLITS, scores_from_votes

    def fail(line: int, what: str) -> DataError:
        return DataError(f"{labels}:{line}: {what}; fix or delete that line.")

    with open(labels, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [c.strip() for c in next(reader, [])]
        n_levels = len(header) - 2
        expected = ["image_id", "split"] + [f"v{k}" for k in range(1, n_levels + 1)]
        if n_levels < 2 or header != expected:
            raise DataError(
                f"{labels}:1: header must be image_id,split,v1,...,vL (L >= 2), got "
                f"{','.join(header) or '(empty file)'}; fix the header line."
            )
        ids: list[str] = []
        splits: list[str] = []
        votes: list[list[int] | None] = []
        seen: dict[str, int] = {}
        ignored = 0
        for cells in reader:
            line = reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue  # blank line
            if len(cells) != len(header):
                raise fail(line, f"{len(cells)} columns, expected {len(header)} ({','.join(header)})")
            cells = [c.strip() for c in cells]
            image_id, split, raw = cells[0], cells[1], cells[2:]
            if not image_id:
                raise fail(line, "empty image_id")
            if image_id in seen:
                raise fail(line, f"duplicate image_id {image_id!r} (first on line {seen[image_id]})")
            if split not in SPLITS:
                raise fail(line, f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")
            row_votes: list[int] | None = None
            if split == "unlabeled" and not any(raw):
                pass
            else:
                row_votes = []
                for name, cell in zip(header[2:], raw):
                    if not re.fullmatch(r"[+-]?\d+", cell):
                        raise fail(line, f"vote {name}={cell!r} is not an integer")
                    if int(cell) < 0:
                        raise fail(line, f"vote {name}={cell} is negative")
                    row_votes.append(int(cell))
                if split == "unlabeled":
                    ignored += 1
                    row_votes = None
                elif sum(row_votes) == 0:
                    raise fail(line, f"all votes are 0 on a {split!r} row (labelled rows need votes)")
            seen[image_id] = line
            ids.append(image_id)
            splits.append(split)
            votes.append(row_votes)
    if not ids:
        raise DataError(f"{labels}: no data rows after the header; add one line per image.")
    has = [v is not None for v in votes]
    score = np.full(len(ids), np.nan, dtype=np.float32)
    if any(has):
        score[np.array(has)] = scores_from_votes(np.array([v for v in votes if v is not None]))
    rows = pd.DataFrame({"image_id": ids, "split": splits, "votes": votes, "score": score})
    notes = {"unlabeled_votes_ignored": ignored} if ignored else {}
    return Labels(rows=rows, n_levels=n_levels, notes=notes)
