"""Parquet storage of embeddings: the chunked, resumable image cache and the tag table.

Image cache layout (one directory)::

    meta.json                            {"fingerprint": {...}, "precision_used": ..., ...}
    part-00000-<sha256[:16]>.parquet     image_id: string, embedding: fixed_size_list<float32>[D],
    part-00001-<sha256[:16]>.parquet       file_sha256: string (the image file's bytes)
    ...

Each part is written atomically (temporary file + rename), and its name carries the SHA-256
of its bytes: a part that is truncated or corrupted on disk no longer matches its name, so the
embed stage deletes and recomputes it (:func:`open_cache`), and readers refuse it
(:func:`read_image_embeddings`) instead of reading wrong numbers.

The fingerprint in ``meta.json`` is the model's (architecture, weights, precision); a
different one wipes the cache's own files. Within one fingerprint the cache is incremental:
a row is kept while the manifest still has its image id and the image file still has the
SHA-256 stored with the row, so adding, removing or replacing images re-embeds only those.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.io import DataError, atomic_path, write_json, write_parquet

log = logging.getLogger(__name__)

META = "meta.json"
DIGEST_CHARS = 16  # of the chunk's SHA-256, in its file name
# part-<index>[-<digest>].parquet; a part without a digest (an older cache) is never trusted
PART_RE = re.compile(r"^part-(\d{5,})(?:-([0-9a-f]{%d}))?\.parquet$" % DIGEST_CHARS)
TMP_RE = re.compile(r"^\.(part-[0-9a-f-]+\.parquet|meta\.json)\..*\.tmp$")
FIX = "rerun the embed stage (`dvc repro embed`), which recomputes bad chunks"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def part_index(part: Path) -> int:
    return int(PART_RE.match(part.name).group(1))  # type: ignore[union-attr]


def list_parts(out_dir: str | Path) -> list[Path]:
    """The cache's chunk files, in index order (not yet verified: see :func:`chunk_error`)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    parts = [p for p in out_dir.iterdir() if PART_RE.match(p.name)]
    return sorted(parts, key=lambda p: (part_index(p), p.name))


def chunk_error(part: Path) -> str | None:
    """Why a chunk cannot be trusted (no checksum in its name, or its bytes do not match it), or None."""
    digest = PART_RE.match(part.name).group(2)  # type: ignore[union-attr]
    if digest is None:
        return "no checksum in its name (written by an older version)"
    try:
        actual = file_sha256(part)[:DIGEST_CHARS]
    except OSError as exc:
        return f"unreadable ({exc})"
    if actual != digest:
        return f"checksum mismatch (the file's SHA-256 starts {actual}, its name says {digest}): truncated or corrupted"
    return None


def embedding_table(ids: Sequence[str], emb: np.ndarray, id_column: str = "image_id") -> pa.Table:
    """A table of ids + fixed-size float32 embedding lists."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise ValueError(f"expected {len(ids)} x D embeddings, got shape {emb.shape}")
    values = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    return pa.table({id_column: pa.array(list(ids), pa.string()), "embedding": values})


def write_chunk(
    out_dir: str | Path, index: int, ids: Sequence[str], emb: np.ndarray, file_hashes: Sequence[str] | None = None
) -> Path:
    """Write one chunk atomically, named by its index and checksum; returns its path.

    ``file_hashes`` (the SHA-256 of each row's image file) lets a later run keep the row
    while the file is unchanged; rows without one are re-embedded by the next run.
    """
    table = embedding_table(ids, emb)
    if file_hashes is not None:
        table = table.append_column("file_sha256", pa.array(list(file_hashes), pa.string()))
    return _write_part(Path(out_dir), index, table)


def _write_part(out_dir: Path, index: int, table: pa.Table) -> Path:
    """Serialise in memory, name the part by the bytes' checksum, write it atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    path = out_dir / f"part-{index:05d}-{hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]}.parquet"
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
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
    """What a (re)opened cache already holds, and what opening it threw away."""

    done: set[str] = field(default_factory=set)
    next_index: int = 0
    meta: dict[str, Any] | None = None  # meta.json of the kept cache; None after a wipe
    wiped: bool = False
    bad_chunks: list[dict[str, str]] = field(default_factory=list)  # part, error: deleted, recomputed
    n_changed: int = 0  # rows whose image file changed (re-embedded)
    n_removed: int = 0  # rows whose image id left the manifest


def open_cache(out_dir: str | Path, fingerprint: dict[str, Any], wanted: Mapping[str, str | None]) -> CacheState:
    """Prepare ``out_dir`` for writing: wipe it on a fingerprint change, else scan its chunks.

    ``wanted`` maps each image id to the SHA-256 of its file now (None: unreadable). A row is
    kept when its id is wanted with the same file hash and no earlier chunk has the id;
    chunks with dropped rows are rewritten. Chunks whose bytes do not match their checksum,
    or that cannot be read, are deleted: their images get re-embedded.
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
            log.info("%s: model fingerprint changed, wiping %d chunk(s)", out_dir, len(parts))
        for part in parts:
            part.unlink()
        (out_dir / META).unlink(missing_ok=True)
        return CacheState(wiped=wiped)

    state = CacheState(meta=meta)
    for part in parts:
        index = part_index(part)
        state.next_index = max(state.next_index, index + 1)
        error = chunk_error(part)
        try:
            table = None if error else pq.read_table(part)
        except Exception as exc:  # noqa: BLE001 - any unreadable chunk is simply redone
            error = f"unreadable ({exc})"
        if error or table is None:
            log.warning("%s: %s; its images will be re-embedded", part, error)
            state.bad_chunks.append({"part": part.name, "error": str(error)})
            part.unlink()
            continue
        ids = table.column("image_id").to_pylist()
        names = table.column_names
        hashes = table.column("file_sha256").to_pylist() if "file_sha256" in names else [None] * len(ids)
        keep = []
        for row, (image_id, digest) in enumerate(zip(ids, hashes, strict=True)):
            if image_id not in wanted:
                state.n_removed += 1
            elif digest is None or wanted[image_id] != digest:
                state.n_changed += 1
            elif image_id not in state.done:
                keep.append(row)
                state.done.add(image_id)
        if len(keep) < len(ids):
            part.unlink()
            if keep:
                _write_part(out_dir, index, table.take(pa.array(keep, pa.int64())))
    return state


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
    for part in parts:  # each chunk is checked against its checksum before it is parsed
        digest = PART_RE.match(part.name).group(2)  # type: ignore[union-attr]
        data = part.read_bytes()
        actual = hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]
        if digest != actual:
            why = "has no checksum in its name" if digest is None else f"does not match its checksum ({actual} != {digest})"
            raise DataError(f"{part}: embedding chunk {why}: truncated, corrupted or from an older version; {FIX}.")
        try:
            files.append(pq.ParquetFile(pa.BufferReader(data)))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{part}: not a valid Parquet chunk ({exc}); {FIX}.") from exc
    n = sum(f.metadata.num_rows for f in files)
    if dim is None and files:
        dim = _list_size(files[0].schema_arrow.field("embedding").type, parts[0])
    emb = np.empty((n, int(dim or 0)), dtype=np.float32)
    ids: list[str] = []
    for part, pfile in zip(parts, files, strict=True):
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
