"""Readers for aesthetic comment corpora: every reader yields ``(image_id, text)`` records.

Supported formats (``fmt``):

- ``demo``: JSON Lines, one object per line: ``{"image_id": str, "comment": str}``
  (extra keys are ignored; blank lines are skipped).
- ``dpc``: DPC-Captions ``impression_and_subject.json``, an object mapping
  ``"<image>.jpg"`` to a list of comment strings.
- ``pccd``: PCCD (GuruShots) ``guru_*.json``, a list of critiques; every non-empty
  per-attribute field (``general_impression``, ``composition``, ...) is one record.
  The photographer's own ``description`` is not a critique and is not read.
- ``food_iac``: Food-IAC, Karpathy-style ``{"images": [{"filename": ..., "sentences": [...]}]}``
  where a sentence is a string (``data/aspects``) or ``{"raw": str, ...}`` (``data/final``).

Image ids are the file name without its extension (``"11170.jpg"`` -> ``"11170"``, the AVA /
DPChallenge id) except for PCCD, whose critiques are identified by their ``title``.
Blank comments are skipped silently; anything structurally wrong raises
:class:`~pipelines.io.DataError` naming the file and the line or record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from pipelines.io import DataError

Record = tuple[str, str]
"""One comment: ``(image_id, text)``."""

FORMATS = ("demo", "dpc", "pccd", "food_iac")

PCCD_FIELDS = (
    "general_impression",
    "composition",
    "color_lighting",
    "depth_of_field",
    "focus",
    "use_of_camera",
    "subject_of_photo",
)
"""PCCD critique fields, one per aesthetic attribute, in a fixed order."""

DPC_FILE = "impression_and_subject.json"
# Food-IAC: data/aspects holds the same sentences as data/final plus general_impression,
# so it is preferred when a directory is given.
FOOD_IAC_DIRS = ("", "aspects", "data/aspects", "final", "data/final")


def read_corpus(path: str | os.PathLike, fmt: str = "auto") -> Iterator[Record]:
    """Return an iterator of ``(image_id, text)`` records from a corpus file or directory.

    ``fmt`` is one of :data:`FORMATS` or ``"auto"`` (see :func:`detect_format`). The path and
    the format are checked now; the records are read lazily, and a malformed record raises
    :class:`DataError` when the iteration reaches it.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: corpus not found; check the corpus path in params.yaml (tags).")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in READERS:
        raise DataError(
            f"{path}: unknown corpus format {fmt!r}; use one of {', '.join(FORMATS)} or 'auto'."
        )
    return READERS[fmt](path)


def detect_format(path: str | os.PathLike) -> str:
    """Guess a corpus format from the path (and, for a ``.json`` file, its top-level shape)."""
    path = Path(path)
    if path.is_dir():
        if (path / DPC_FILE).is_file():
            return "dpc"
        if sorted(path.glob("guru_*.json")):
            return "pccd"
        if _food_iac_files(path):
            return "food_iac"
        if sorted(path.glob("*.jsonl")):
            return "demo"
        raise DataError(
            f"{path}: cannot tell the corpus format of this directory; point at the corpus "
            f"file itself or set the format to one of {', '.join(FORMATS)}."
        )
    if path.suffix == ".jsonl":
        return "demo"
    if path.suffix == ".json":
        data = _load_json(path)
        if isinstance(data, dict) and "images" in data:
            return "food_iac"
        if isinstance(data, list):
            return "pccd"
        if isinstance(data, dict):
            return "dpc"
    raise DataError(
        f"{path}: cannot tell the corpus format from the file; use a .jsonl demo corpus or "
        f"set the format to one of {', '.join(FORMATS)}."
    )


def read_demo(path: Path) -> Iterator[Record]:
    """Demo corpus: JSONL files (one file, or every ``*.jsonl`` in a directory)."""
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    for file in files:
        with file.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{file}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{where}: not valid JSON ({exc.msg}); each line must be "
                        '{"image_id": "...", "comment": "..."}.'
                    ) from exc
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: expected a JSON object with image_id and comment.")
                image_id, comment = obj.get("image_id"), obj.get("comment")
                if not isinstance(image_id, str) or not image_id:
                    raise DataError(f"{where}: 'image_id' must be a non-empty string.")
                if not isinstance(comment, str):
                    raise DataError(f"{where}: 'comment' must be a string.")
                if comment.strip():
                    yield image_id, comment


def read_dpc(path: Path) -> Iterator[Record]:
    """DPC-Captions: ``{"<id>.jpg": [comment, ...]}``."""
    file = path / DPC_FILE if path.is_dir() else path
    data = _load_json(file)
    if not isinstance(data, dict):
        raise DataError(f"{file}: expected a JSON object mapping image file names to comment lists.")
    for key, comments in data.items():
        if not isinstance(comments, list) or not all(isinstance(c, str) for c in comments):
            raise DataError(f"{file}: record {key!r}: expected a list of comment strings.")
        image_id = Path(key).stem
        for comment in comments:
            if comment.strip():
                yield image_id, comment


def read_pccd(path: Path) -> Iterator[Record]:
    """PCCD: ``guru_*.json`` lists of critiques; one record per non-empty attribute field."""
    files = sorted(path.glob("guru_*.json")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no guru_*.json files; point at the PCCD folder or a guru_*.json file.")
    for file in files:
        data = _load_json(file)
        if not isinstance(data, list):
            raise DataError(f"{file}: expected a JSON list of critiques.")
        for index, item in enumerate(data):
            where = f"{file}: record {index}"
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected a JSON object.")
            title = item.get("title")
            if not isinstance(title, str) or not title:
                raise DataError(f"{where}: missing the 'title' that identifies the photo.")
            for field in PCCD_FIELDS:
                text = item.get(field)
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise DataError(f"{where} ({title!r}): field {field!r} must be a string.")
                if text.strip():
                    yield title, text


def read_food_iac(path: Path) -> Iterator[Record]:
    """Food-IAC: Karpathy-style JSON files (one file, or a folder as in :data:`FOOD_IAC_DIRS`)."""
    files = _food_iac_files(path) if path.is_dir() else [path]
    if not files:
        raise DataError(
            f"{path}: no Food-IAC JSON files found (looked in {', '.join(d or '.' for d in FOOD_IAC_DIRS)})."
        )
    for file in files:
        data = _load_json(file)
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise DataError(f"{file}: expected a JSON object with an 'images' list (Karpathy format).")
        for index, item in enumerate(images):
            where = f"{file}: images[{index}]"
            if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
                raise DataError(f"{where}: expected an object with a 'filename' string.")
            sentences = item.get("sentences")
            if not isinstance(sentences, list):
                raise DataError(f"{where}: 'sentences' must be a list.")
            image_id = Path(item["filename"]).stem
            for sentence in sentences:
                text = sentence.get("raw") if isinstance(sentence, dict) else sentence
                if not isinstance(text, str):
                    raise DataError(f"{where}: a sentence must be a string or an object with 'raw'.")
                if text.strip():
                    yield image_id, text


READERS: dict[str, Callable[[Path], Iterator[Record]]] = {
    "demo": read_demo,
    "dpc": read_dpc,
    "pccd": read_pccd,
    "food_iac": read_food_iac,
}


def _food_iac_files(path: Path) -> list[Path]:
    """The Karpathy-format JSON files of the first Food-IAC folder found under ``path``."""
    for sub in FOOD_IAC_DIRS:
        folder = path / sub if sub else path
        files = [f for f in sorted(folder.glob("*.json")) if _looks_karpathy(f)] if folder.is_dir() else []
        if files:
            return files
    return []


def _looks_karpathy(file: Path) -> bool:
    """Cheap check of a file's start for the ``{"images": ...`` key."""
    with file.open(encoding="utf-8") as fh:
        head = fh.read(256)
    return head.lstrip().startswith("{") and '"images"' in head


def _load_json(file: Path) -> Any:
    try:
        with file.open(encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{file}: not valid JSON (line {exc.lineno}: {exc.msg}); re-download or fix the file."
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc.reason}); convert it to UTF-8.") from exc
