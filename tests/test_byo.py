"""Bring-your-own embeddings: validation, and the embed stage's formats on the way out.

Uses the real precomputed embeddings of ``$IAA_SHARED_DATA/bench/dpc_minilm`` (384-d MiniLM item
and phrase embeddings); skips when that folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.embed.byo import import_byo, import_item_embeddings, import_text_embeddings
from pipelines.embed.cache import read_image_embeddings, read_text_embeddings
from pipelines.io import DataError, read_json
from pipelines.semantics import TagMatcher
from pipelines.train.data import list_column

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(os.environ.get("IAA_SHARED_DATA", ROOT.parent / "shared" / "data")) / "bench" / "dpc_minilm"


@pytest.fixture(scope="module")
def real():
    if not (BENCH / "items.parquet").is_file():
        pytest.skip(f"real data not available: {BENCH} (set IAA_SHARED_DATA to the shared data folder)")
    items = pq.read_table(BENCH / "items.parquet", columns=["image_id", "embedding"]).slice(0, 300)
    vocab = pq.read_table(BENCH / "vocab.parquet", columns=["phrase", "embedding"])
    return items, vocab


def write(tmp_path: Path, name: str, table: pa.Table) -> Path:
    path = tmp_path / name
    pq.write_table(table, path)
    return path


def table_of(ids, emb, id_col="image_id", fixed=True) -> pa.Table:
    emb = np.asarray(emb, np.float32)
    col = (pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]) if fixed
           else pa.array([r.tolist() for r in emb], pa.list_(pa.float32())))
    return pa.table({id_col: pa.array(list(ids)), "embedding": col})


def test_real_tables_round_trip_into_the_embed_formats(tmp_path, real):
    items, vocab = real
    items_p, vocab_p = write(tmp_path, "items.parquet", items), write(tmp_path, "vocab.parquet", vocab)
    ids = [str(i) for i in items.column("image_id").to_pylist()]
    manifest = ids[:250] + ["not-embedded-1", "not-embedded-2"]  # 50 table rows are not in the manifest
    semantic = ["cat", "flower", "sky", "zzz not a phrase"]
    attribute = ["composition", "lighting", "sharp focus", "nice composition", "qqq missing"]
    report = import_byo(items_p, vocab_p, manifest, semantic, attribute, tmp_path / "emb")

    assert report["items"]["kept"] == 250 and report["items"]["not_in_manifest_dropped"] == 50
    assert report["items"]["manifest_without_embedding"] == 2
    assert report["texts"]["semantic"]["missing_dropped"] == 1
    assert report["texts"]["semantic"]["missing_examples"] == ["zzz not a phrase"]
    assert report["texts"]["attribute"]["missing_dropped"] == 1

    got_ids, got = read_image_embeddings(tmp_path / "emb" / "images")  # what the features stage reads
    assert got_ids == ids[:250]
    np.testing.assert_array_equal(got, list_column(items, "embedding")[:250])
    tags, kinds, temb = read_text_embeddings(tmp_path / "emb" / "tags.parquet")
    assert tags == ["cat", "flower", "sky", "composition", "lighting", "sharp focus", "nice composition"]
    assert kinds == ["semantic"] * 3 + ["attribute"] * 4
    vpos = {p: k for k, p in enumerate(vocab.column("phrase").to_pylist())}
    np.testing.assert_array_equal(temb, list_column(vocab, "embedding")[[vpos[t] for t in tags]])
    card = read_json(tmp_path / "emb" / "card.json")
    assert card["embed_dim"] == 384 and card["random_weights"] is False and card["n_attribute"] == 4

    matcher = TagMatcher(temb, kinds)
    sem, attr = matcher.split(matcher.numpy(got))
    assert sem.shape == (250, 3) and attr.shape == (250, 4)
    assert np.all(np.abs(sem) <= 1 + 1e-5)  # unit vectors: cosines


def test_dimension_mismatch_between_tables(tmp_path, real):
    items, vocab = real
    items_p = write(tmp_path, "items.parquet", items)
    emb = list_column(vocab, "embedding")[:10, :128].copy()
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    texts = write(tmp_path, "texts.parquet", table_of(vocab.column("phrase").to_pylist()[:10], emb, "phrase"))
    ids = [str(i) for i in items.column("image_id").to_pylist()]
    with pytest.raises(DataError, match="128 dims but the item embeddings have 384"):
        import_byo(items_p, texts, ids, ["x"], ["y"], tmp_path / "emb")


def test_unnormalised_rejected_or_renormalised(tmp_path, real):
    items, _ = real
    ids = [str(i) for i in items.column("image_id").to_pylist()][:20]
    emb = list_column(items, "embedding")[:20].copy() * 3.0
    p = write(tmp_path, "items.parquet", table_of(ids, emb, fixed=False))
    with pytest.raises(DataError, match=r"20 of 20 embeddings are not L2-normalised .*norm 3\.0000"):
        import_item_embeddings(p, ids, tmp_path / "c")
    report = import_item_embeddings(p, ids, tmp_path / "c", normalise=True)
    assert report["renormalised"] == 20
    _, got = read_image_embeddings(tmp_path / "c")
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("problem, message", [
    ("nan", "hold NaN or inf"),
    ("zero", "all-zero embedding"),
    ("dup", "duplicate image_id 'a'"),
    ("ragged", "embeddings differ in length"),
    ("nomatch", "none of its 3 image_ids is in the manifest"),
])
def test_item_table_errors(tmp_path, problem, message):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = ["a", "b", "c"]
    manifest = ids
    if problem == "nan":
        emb[1, 2] = np.nan
    if problem == "zero":
        emb[2] = 0
    if problem == "dup":
        ids = ["a", "b", "a"]
    if problem == "nomatch":
        manifest = ["x", "y"]
    if problem == "ragged":
        table = pa.table({"image_id": ids, "embedding": pa.array([[1.0, 0.0], [0.0, 1.0], [1.0]], pa.list_(pa.float32()))})
    else:
        table = table_of(ids, emb)
    p = write(tmp_path, "items.parquet", table)
    with pytest.raises(DataError, match=message):
        import_item_embeddings(p, manifest, tmp_path / "c")


def test_missing_columns_and_all_tags_missing(tmp_path):
    p = write(tmp_path, "bad.parquet", pa.table({"id": ["a"], "vec": [[1.0]]}))
    with pytest.raises(DataError, match="needs columns image_id and embedding"):
        import_item_embeddings(p, ["a"], tmp_path / "c")
    t = write(tmp_path, "t.parquet", table_of(["cat"], np.array([[1.0, 0.0]]), "phrase"))
    with pytest.raises(DataError, match="none of the 1 attribute tags is in the phrase table"):
        import_text_embeddings(t, ["cat"], ["blurry"], tmp_path / "tags.parquet", dim=2)
    with pytest.raises(DataError, match="not found"):
        import_item_embeddings(tmp_path / "nope.parquet", ["a"], tmp_path / "c")
