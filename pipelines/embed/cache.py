"""Parquet storage of embeddings: the chunked, resumable image cache and the tag table.

Image cache layout (one directory)::

    meta.json            {"fingerprint": {...}, "precision_used": ..., ...}
    part-00000.parquet   image_id: string, embedding: fixed_size_list<float32>[D]
    part-00001.parquet   ...

Each part is written atomically (temporary file + rename), so any ``part-*.parquet`` present
is complete: after a kill, a rerun with the same fingerprint keeps those parts and embeds the
rest. A different fingerprint wipes the cache's own files first.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.io import DataError, write_json, write_parquet

log = logging.getLogger(__name__)

META = "meta.json"
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
TMP_RE = re.compile(r"^\.(part-\d{5,}\.parquet|meta\.json)\..*\.tmp$")
FIX = "delete the directory and rerun the embed stage (`dvc repro embed`)"


def part_path(out_dir: str | Path, index: int) -> Path:
    return Path(out_dir) / f"part-{index:05d}.parquet"


def list_parts(out_dir: str | Path) -> list[Path]:
    """The cache's complete chunk files, in index order."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    parts = [p for p in out_dir.iterdir() if PART_RE.match(p.name)]
    return sorted(parts, key=lambda p: int(PART_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def embedding_table(ids: Sequence[str], emb: np.ndarray, id_column: str = "image_id") -> pa.Table:
    """A table of ids + fixed-size float32 embedding lists."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise ValueError(f"expected {len(ids)} x D embeddings, got shape {emb.shape}")
    values = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    return pa.table({id_column: pa.array(list(ids), pa.string()), "embedding": values})


def write_chunk(out_dir: str | Path, index: int, ids: Sequence[str], emb: np.ndarray) -> Path:
    """Write one chunk atomically; returns its path."""
    path = part_path(out_dir, index)
    write_parquet(path, embedding_table(ids, emb))
    return path


def read_meta(out_dir: str | Path) -> dict[str, Any] | None:
    """meta.json of a cache, or None when missing or unreadable."""
    path = Path(out_dir) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def write_meta(out_dir: str | Path, meta: dict[str, Any]) -> None:
    write_json(Path(out_dir) / META, meta)


def normalise_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON (tuples -> lists, paths -> str, ...)."""
    from pipelines.io import _json_default

    return json.loads(json.dumps(fingerprint, sort_keys=True, default=_json_default))


@dataclass
class CacheState:
    """What a (re)opened cache already holds."""

    done: set[str] = field(default_factory=set)
    next_index: int = 0
    meta: dict[str, Any] | None = None  # meta.json of the kept cache; None after a wipe
    wiped: bool = False


def open_cache(out_dir: str | Path, fingerprint: dict[str, Any], wanted: set[str]) -> CacheState:
    """Prepare ``out_dir`` for writing: wipe it on a fingerprint change, else scan its chunks.

    Chunks that cannot be read are deleted (their ids get re-embedded); rows whose id is not
    in ``wanted`` or already seen in an earlier chunk are dropped by rewriting that chunk.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists but is not a directory; remove it or change the path.")
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in out_dir.iterdir():  # leftovers of a killed atomic write
        if TMP_RE.match(tmp.name):
            tmp.unlink(missing_ok=True)

    meta = read_meta(out_dir)
    parts = list_parts(out_dir)
    if meta is None or meta.get("fingerprint") != normalise_fingerprint(fingerprint):
        wiped = bool(parts) or meta is not None
        if wiped:
            log.info("%s: fingerprint changed, wiping %d chunk(s)", out_dir, len(parts))
        for part in parts:
            part.unlink()
        (out_dir / META).unlink(missing_ok=True)
        return CacheState(wiped=wiped)

    state = CacheState(meta=meta)
    for part in parts:
        index = int(PART_RE.match(part.name).group(1))  # type: ignore[union-attr]
        state.next_index = max(state.next_index, index + 1)
        try:
            ids = pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist()
        except Exception as exc:  # noqa: BLE001 - any unreadable chunk is simply redone
            log.warning("%s: unreadable chunk (%s); its images will be re-embedded", part, exc)
            part.unlink()
            continue
        keep = [i for i, x in enumerate(ids) if x in wanted and x not in state.done]
        if len(keep) < len(ids):
            _rewrite_rows(part, keep)
        state.done.update(ids[i] for i in keep)
    return state


def _rewrite_rows(part: Path, rows: list[int]) -> None:
    if not rows:
        part.unlink()
        return
    write_parquet(part, pq.read_table(part).take(pa.array(rows, pa.int64())))


def read_image_embeddings(out_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """All (image_id, embedding) rows of a cache: ids and an N x D float32 array.

    Reads chunk by chunk into one preallocated array.

    Raises:
        DataError: the cache is missing, incomplete or corrupt (message names the file).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: embedding cache not found; run `dvc repro embed`.")
    meta = read_meta(out_dir)
    if meta is None:
        raise DataError(f"{out_dir}: no readable {META}, so not a finished embedding cache; {FIX}.")
    parts = list_parts(out_dir)
    dim = meta.get("fingerprint", {}).get("embed_dim")
    files = []
    for part in parts:
        try:
            files.append(pq.ParquetFile(part))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{part}: not a valid Parquet chunk ({exc}); {FIX}.") from exc
    n = sum(f.metadata.num_rows for f in files)
    if dim is None and files:
        dim = _list_size(files[0].schema_arrow.field("embedding").type, parts[0])
    emb = np.empty((n, int(dim or 0)), dtype=np.float32)
    ids: list[str] = []
    for part, pfile in zip(parts, files):
        try:
            for batch in pfile.iter_batches(batch_size=8192, columns=["image_id", "embedding"]):
                start = len(ids)
                ids.extend(batch.column("image_id").to_pylist())
                emb[start : len(ids)] = _to_matrix(batch.column("embedding"), dim, part)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{part}: unreadable embedding chunk ({exc}); {FIX}.") from exc
    _check_unique(ids, out_dir)
    return ids, emb


def write_text_embeddings(
    path: str | Path, tags: Sequence[str], kinds: Sequence[str], emb: np.ndarray
) -> None:
    """Write the tag-embedding table (tag, kind, embedding) atomically."""
    if not (len(tags) == len(kinds) == len(emb)):
        raise ValueError(f"lengths differ: {len(tags)} tags, {len(kinds)} kinds, {len(emb)} rows")
    table = embedding_table(list(tags), np.asarray(emb), id_column="tag")
    table = table.add_column(1, "kind", pa.array(list(kinds), pa.string()))
    write_parquet(path, table)


def read_text_embeddings(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """Read the tag-embedding table: (tags, kinds, N x D float32)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tag embeddings not found; run `dvc repro embed`.")
    try:
        table = pq.read_table(path)
        tags = table.column("tag").to_pylist()
        kinds = table.column("kind").to_pylist()
        col = table.column("embedding").combine_chunks()
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: not a readable tag-embedding table ({exc}); {FIX}.") from exc
    dim = _list_size(col.type, path)
    return tags, kinds, _to_matrix(col, dim, path)


def _list_size(dtype: pa.DataType, where: Path) -> int:
    if not pa.types.is_fixed_size_list(dtype):
        raise DataError(f"{where}: column `embedding` is {dtype}, not fixed_size_list; {FIX}.")
    return dtype.list_size


def _to_matrix(col: pa.Array, dim: int | None, where: Path) -> np.ndarray:
    """fixed_size_list<float32>[D] column -> (n, D) float32 array, checking D and nulls."""
    size = _list_size(col.type, where)
    if dim is not None and size != dim:
        raise DataError(f"{where}: embeddings have {size} dims, the cache says {dim}; {FIX}.")
    if col.null_count:
        raise DataError(f"{where}: {col.null_count} null embedding(s); {FIX}.")
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(-1, size)


def _check_unique(ids: Iterable[str], where: Path) -> None:
    seen: set[str] = set()
    dup = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    if dup:
        raise DataError(f"{where}: duplicate image ids in the cache (e.g. {dup[:3]}); {FIX}.")
