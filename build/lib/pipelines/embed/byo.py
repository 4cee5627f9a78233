"""Bring your own embeddings: import precomputed item and tag-text embeddings instead of running CLIP.

Two input tables (Parquet):

- **items**: ``image_id`` (string or integer) + ``embedding`` (list or fixed-size list of
  floats, one D-vector per image);
- **texts**: ``phrase`` (the tag text) + ``embedding`` (same D). ``tag`` is accepted for
  ``phrase``.

Both are validated (one dimension D for all rows and both tables, finite values, no zero
vector, unique ids / phrases, L2 norm 1 within ``norm_tol`` unless ``normalise=True``, which
re-normalises and counts how many rows it changed). They are then written in the embed
stage's own formats, so the ``features`` stage reads them unchanged:

- ``<out>/images/part-*.parquet`` + ``meta.json`` (:func:`pipelines.embed.cache.read_image_embeddings`);
- ``<out>/tags.parquet`` (``tag, kind, embedding``; :func:`pipelines.embed.cache.read_text_embeddings`);
- ``<out>/card.json`` (what ``weights_card()`` reads; ``random_weights: false``,
  ``model: "byo"``, ``logit_scale`` as given: 1.0 means plain cosine similarities);
- ``<out>/report.json`` (counts: items kept / not in the manifest / manifest images without
  an embedding; tags kept / dropped per kind, with examples).

Tags of the library that the text table lacks are dropped and counted; manifest images the
item table lacks are left out of the features (counted); table rows whose id is not in the
manifest are dropped (counted).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.embed.cache import META, list_parts, write_chunk, write_meta, write_text_embeddings
from pipelines.io import DataError, write_json

NORM_TOL = 1e-3
"""Allowed | ||x|| - 1 | for an embedding to count as L2-normalised."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read(path: str | Path, id_columns: Sequence[str], what: str) -> tuple[list[str], np.ndarray, str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} table not found; point the BYO param at a Parquet file with columns "
                        f"{id_columns[0]} + embedding.")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: not a readable Parquet file ({exc}).") from exc
    id_col = next((c for c in id_columns if c in table.column_names), None)
    if id_col is None or "embedding" not in table.column_names:
        raise DataError(f"{path}: {what} table needs columns {id_columns[0]} and embedding; has {table.column_names}.")
    ids_arr = table.column(id_col)
    if ids_arr.null_count:
        raise DataError(f"{path}: {ids_arr.null_count} null {id_col} value(s).")
    if not (pa.types.is_string(ids_arr.type) or pa.types.is_large_string(ids_arr.type) or pa.types.is_integer(ids_arr.type)):
        raise DataError(f"{path}: column {id_col} is {ids_arr.type}; expected strings or integers.")
    ids = [str(x) for x in ids_arr.to_pylist()]
    if any(not i.strip() for i in ids):
        raise DataError(f"{path}: empty {id_col} value(s).")
    col = table.column("embedding").combine_chunks()
    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise DataError(f"{path}: column embedding is {t}; expected a list of floats per row.")
    if not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        raise DataError(f"{path}: embedding values are {t.value_type}; expected floats.")
    if col.null_count:
        row = int(np.flatnonzero(~col.is_valid().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: {col.null_count} null embedding(s) (first: {id_col} {ids[row]!r}).")
    if pa.types.is_fixed_size_list(t):
        dim = t.list_size
    else:
        lengths = np.asarray(col.value_lengths().to_numpy(zero_copy_only=False))
        if len(lengths) and (lengths != lengths[0]).any():
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise DataError(f"{path}: embeddings differ in length: {id_col} {ids[0]!r} has {lengths[0]}, "
                            f"{ids[row]!r} has {lengths[row]}; every row needs the same dimension.")
        dim = int(lengths[0]) if len(lengths) else 0
    flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    emb = flat.reshape(len(ids), dim) if len(ids) else flat.reshape(0, dim)
    if len(ids) == 0:
        raise DataError(f"{path}: {what} table has no rows.")
    if dim < 1:
        raise DataError(f"{path}: embeddings are empty (dimension 0).")
    seen: dict[str, int] = {}
    for k, i in enumerate(ids):
        if i in seen:
            raise DataError(f"{path}: duplicate {id_col} {i!r} (rows {seen[i]} and {k}).")
        seen[i] = k
    return ids, emb, id_col


CHECK_ROWS = 16384  # rows per float64 block in check_embeddings


def check_embeddings(emb: np.ndarray, ids: Sequence[str], where: str, *, normalise: bool = False,
                     norm_tol: float = NORM_TOL) -> tuple[np.ndarray, int]:
    """Finite, non-zero and L2-normalised (or re-normalised when ``normalise``): (embeddings, n changed).

    Row blocks of float64 (norms, re-normalisation), so a 255k x 768 table needs no N x D
    float64 copy; without ``normalise`` a float32 ``emb`` is returned as it is (no copy).
    """
    blocks = range(0, len(emb), CHECK_ROWS)
    norms = np.empty(len(emb), dtype=np.float64)
    for s in blocks:
        norms[s : s + CHECK_ROWS] = np.linalg.norm(emb[s : s + CHECK_ROWS].astype(np.float64), axis=1)
    bad = ~np.isfinite(norms)  # a NaN or inf anywhere in the row (float32 squares cannot overflow float64)
    if bad.any():
        raise DataError(f"{where}: {int(bad.sum())} embedding(s) hold NaN or inf (first: {ids[int(np.flatnonzero(bad)[0])]!r}).")
    zero = norms < 1e-12
    if zero.any():
        raise DataError(f"{where}: {int(zero.sum())} all-zero embedding(s) (first: {ids[int(np.flatnonzero(zero)[0])]!r}); "
                        "a zero vector has no direction to match tags against.")
    off = np.abs(norms - 1) > norm_tol
    if off.any() and not normalise:
        k = int(np.flatnonzero(off)[0])
        raise DataError(
            f"{where}: {int(off.sum())} of {len(norms)} embeddings are not L2-normalised (e.g. {ids[k]!r} has norm "
            f"{norms[k]:.4f}; tolerance {norm_tol}); tag matching needs unit vectors: normalise them, or set the "
            "BYO normalise option to re-normalise on import."
        )
    if not normalise:
        return emb.astype(np.float32, copy=False), int(off.sum())
    out = np.empty(emb.shape, dtype=np.float32)
    for s in blocks:
        out[s : s + CHECK_ROWS] = emb[s : s + CHECK_ROWS] / norms[s : s + CHECK_ROWS, None]
    return out, int(off.sum())


def import_item_embeddings(path: str | Path, manifest_ids: Sequence[str], out_dir: str | Path, *,
                           normalise: bool = False, norm_tol: float = NORM_TOL, chunk_rows: int = 8192,
                           expect_dim: int | None = None) -> dict[str, Any]:
    """Validate the item table and write it as the embed stage's image cache (``out_dir``).

    Rows are written in manifest order; returns the report (see the module doc).
    """
    path = Path(path)
    ids, emb, _ = _read(path, ("image_id",), "item-embedding")
    if expect_dim is not None and emb.shape[1] != expect_dim:
        raise DataError(f"{path}: item embeddings have {emb.shape[1]} dims, expected {expect_dim}.")
    emb, renormalised = check_embeddings(emb, ids, str(path), normalise=normalise, norm_tol=norm_tol)
    pos = {i: k for k, i in enumerate(ids)}
    manifest_ids = [str(i) for i in manifest_ids]
    in_table = [i for i in manifest_ids if i in pos]
    if not in_table:
        raise DataError(
            f"{path}: none of its {len(ids)} image_ids is in the manifest ({len(manifest_ids)} images, e.g. "
            f"{manifest_ids[:3]} vs {ids[:3]}); the ids must be the manifest's image_id values."
        )
    mset = set(manifest_ids)
    not_in_manifest = [i for i in ids if i not in mset]
    without = [i for i in manifest_ids if i not in pos]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list_parts(out_dir):
        old.unlink()
    rows = np.array([pos[i] for i in in_table], dtype=np.int64)
    for c, start in enumerate(range(0, len(rows), chunk_rows)):
        sel = rows[start : start + chunk_rows]
        write_chunk(out_dir, c, [ids[k] for k in sel], emb[sel])
    fingerprint = {"source": "byo", "path": str(path), "sha256": _sha256(path), "embed_dim": int(emb.shape[1]),
                   "normalise": normalise}
    write_meta(out_dir, {"fingerprint": fingerprint, "precision_used": "byo", "n_images": len(rows)})
    return {
        "items_path": str(path), "embed_dim": int(emb.shape[1]), "table_rows": len(ids), "kept": len(rows),
        "not_in_manifest_dropped": len(not_in_manifest), "not_in_manifest_examples": not_in_manifest[:10],
        "manifest_without_embedding": len(without), "manifest_without_embedding_examples": without[:10],
        "renormalised": renormalised if normalise else 0,
    }


def import_text_embeddings(path: str | Path, semantic: Sequence[str], attribute: Sequence[str], out_path: str | Path, *,
                           dim: int, normalise: bool = False, norm_tol: float = NORM_TOL) -> dict[str, Any]:
    """Look the tag library up in the phrase table; write ``tags.parquet``. Missing tags are dropped and counted."""
    path = Path(path)
    phrases, emb, _ = _read(path, ("phrase", "tag"), "text-embedding")
    if emb.shape[1] != dim:
        raise DataError(f"{path}: text embeddings have {emb.shape[1]} dims but the item embeddings have {dim}; "
                        "both must come from one model (one shared space) for tag matching.")
    emb, renormalised = check_embeddings(emb, phrases, str(path), normalise=normalise, norm_tol=norm_tol)
    pos = {p: k for k, p in enumerate(phrases)}
    tags, kinds, report = [], [], {"texts_path": str(path), "table_rows": len(phrases),
                                   "renormalised": renormalised if normalise else 0}
    for kind, lib in (("semantic", semantic), ("attribute", attribute)):
        kept = [t for t in lib if t in pos]
        missing = [t for t in lib if t not in pos]
        report[kind] = {"library": len(lib), "kept": len(kept), "missing_dropped": len(missing),
                        "missing_examples": missing[:20]}
        if not kept:
            raise DataError(
                f"{path}: none of the {len(lib)} {kind} tags is in the phrase table (e.g. {list(lib)[:3]}); the "
                f"{kind} tag-matching features would be empty. Embed the tag library (data/tags/{kind}.txt) too."
            )
        tags += kept
        kinds += [kind] * len(kept)
    write_text_embeddings(out_path, tags, kinds, emb[[pos[t] for t in tags]])
    return report


def import_byo(items: str | Path, texts: str | Path, manifest_ids: Sequence[str], semantic: Sequence[str],
               attribute: Sequence[str], out_dir: str | Path, *, normalise: bool = False, norm_tol: float = NORM_TOL,
               logit_scale: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Both imports + ``card.json`` + ``report.json`` under ``out_dir`` (the embed stage's layout)."""
    out_dir = Path(out_dir)
    item_report = import_item_embeddings(items, manifest_ids, out_dir / "images", normalise=normalise, norm_tol=norm_tol)
    dim = item_report["embed_dim"]
    text_report = import_text_embeddings(texts, semantic, attribute, out_dir / "tags.parquet", dim=dim,
                                         normalise=normalise, norm_tol=norm_tol)
    write_json(out_dir / "card.json", {
        "model": "byo", "pretrained": str(items), "weights": f"byo:{item_report['items_path']}",
        "random_weights": False, "init_seed": seed, "embed_dim": dim, "logit_scale": float(logit_scale),
        "n_semantic": text_report["semantic"]["kept"], "n_attribute": text_report["attribute"]["kept"],
        "texts": str(texts),
    })
    report = {"source": "byo", "items": item_report, "texts": text_report}
    write_json(out_dir / "report.json", report)
    return report


__all__ = ["META", "NORM_TOL", "check_embeddings", "import_byo", "import_item_embeddings", "import_text_embeddings"]
