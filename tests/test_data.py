"""Tests for pipelines.data: the demo generator, the votes_csv adapter and the manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data import demo
from pipelines.data.adapters import ADAPTERS, Labels, register_adapter
from pipelines.data.demo import generate_demo
from pipelines.data.adapters import build_manifest
from pipelines.data.manifest import SPLITS, read_manifest, vote_distribution, write_manifest
from pipelines.io import DataError

TINY = dict(n_images=40, image_size=64, seed=0, progress=False)
HEADER = "image_id,split," + ",".join(f"v{k}" for k in range(1, 11))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_a")
    return out, generate_demo(out, **TINY)


@pytest.fixture(scope="module")
def full_scores(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Mean scores of the labelled rows of a default-sized demo (small images for speed)."""
    out = tmp_path_factory.mktemp("demo_full")
    generate_demo(out, image_size=32, progress=False)
    df = read_labels(out / "labels.csv")
    votes = df[df.split != "unlabeled"][[f"v{k}" for k in range(1, 11)]].to_numpy(float)
    return votes @ np.arange(1, 11) / votes.sum(1)


def read_labels(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"image_id": str, "split": str})


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def fake_images(folder: Path, ids: list[str], ext: str = ".jpg") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (8, 8), (i.__hash__() % 255, 0, 0)).save(folder / f"{i}{ext}")
    return folder


def laplacian_var(pixels: np.ndarray) -> float:
    g = pixels.astype(np.float64).mean(axis=2)
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var())


# ------------------------------------------------------------------------------------ demo


def test_demo_is_byte_identical_for_the_same_seed(tiny, tmp_path):
    out, _ = tiny
    generate_demo(tmp_path / "b", **TINY)
    first, second = tree_hashes(out), tree_hashes(tmp_path / "b")
    assert len(first) == 40 + 4 and first == second
    generate_demo(tmp_path / "c", **{**TINY, "seed": 1})
    assert tree_hashes(tmp_path / "c")["labels.csv"] != first["labels.csv"]


def test_demo_files_and_split_coverage(tiny):
    out, summary = tiny
    df = read_labels(out / "labels.csv")
    assert list(df.columns) == ["image_id", "split", *[f"v{k}" for k in range(1, 11)]]
    assert set(df.split) == set(SPLITS) and summary["splits"] == df.split.value_counts().to_dict()
    assert sorted(p.stem for p in (out / "images").glob("*.jpg")) == sorted(df.image_id)
    with Image.open(out / "images" / f"{df.image_id[0]}.jpg") as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    labelled = df[df.split != "unlabeled"]
    votes = labelled[[f"v{k}" for k in range(1, 11)]].to_numpy()
    assert (votes.sum(1) == 100).all() and (votes >= 0).all()
    assert df[df.split == "unlabeled"].iloc[:, 2:].isna().all().all()
    levels = np.rint(votes @ np.arange(1, 11) / 100)
    assert len(set(levels)) >= 4, "tiny demo must still populate several score levels"
    assert sum(summary["score"]["histogram"].values()) == len(labelled)


def test_demo_scores_are_long_tailed_like_ava(full_scores):
    s = full_scores
    assert len(s) == round(360 * 0.85)
    mid, low, high = np.mean((s >= 4) & (s <= 6.5)), np.mean(s < 4), np.mean(s > 7)
    assert mid > 0.65, "most images should be mid-range"
    assert 0 < low < 0.2 and 0 < high < 0.15, "tails should exist but be a minority"
    hist = np.bincount(np.rint(s).astype(int), minlength=11)
    assert hist.argmax() in (5, 6) and hist[3] > 0 and hist[8] > 0
    assert 4.8 < s.mean() < 5.9


def test_meta_records_faults_and_votes_consistently(tiny):
    out, summary = tiny
    meta = pd.read_csv(out / "meta.csv", dtype=str, keep_default_na=False)
    labels = read_labels(out / "labels.csv").set_index("image_id")
    assert len(meta) == 40 and set(meta.subject) <= {s.name for s in demo.SUBJECTS}
    for row in meta.itertuples():
        votes = np.array(row.votes.split(), dtype=int)
        assert votes.sum() == 100
        if row.split != "unlabeled":
            assert (labels.loc[row.image_id].iloc[1:].to_numpy(int) == votes).all()
        faults = dict(f.split(":") for f in row.faults.split(";") if f)
        assert set(faults) <= set(demo.FAULTS)
        assert (row.tier in ("pristine", "clean")) == (not faults)
    clean = meta[meta.faults == ""].latent.astype(float).mean()
    faulty = meta[meta.faults.str.count(":") >= 2].latent.astype(float).mean()
    assert clean > faulty + 1.0
    assert summary["clean_images"] == (meta.faults == "").sum()


def test_votes_center_on_the_latent_score():
    rng = np.random.default_rng(0)
    for latent in (2.5, 5.0, 7.5):
        votes = demo.draw_votes(latent, 1.4, 2000, rng)
        assert votes.sum() == 2000
        assert abs(votes @ np.arange(1, 11) / 2000 - latent) < 0.35


def test_faults_really_change_pixels():
    base = demo.ImageSpec("x", demo.SUBJECTS[0], "clean", crop=(0.0, 0.0, 0.8), flip=False)
    clean = demo.render(base, 96)

    def with_fault(name: str, sev: float = 0.7) -> np.ndarray:
        return demo.render(dataclasses.replace(base, faults={name: sev}), 96)

    for name in set(demo.FAULTS) - {"bad_crop"}:  # bad_crop acts through the crop: see below
        assert np.abs(with_fault(name).astype(int) - clean).mean() > 2, name
    assert laplacian_var(with_fault("blur")) < 0.5 * laplacian_var(clean)
    assert laplacian_var(with_fault("blur", 0.9)) < laplacian_var(with_fault("blur", 0.2))
    assert laplacian_var(with_fault("noise")) > 2 * laplacian_var(clean)
    assert with_fault("underexposure").mean() < clean.mean() - 20
    assert with_fault("overexposure").mean() > clean.mean() + 20
    cast = with_fault("colour_cast").astype(float).mean((0, 1))  # default tone is warm
    ref = clean.astype(float).mean((0, 1))
    assert cast[0] / cast[2] > 1.2 * ref[0] / ref[2]
    np.testing.assert_array_equal(with_fault("noise"), with_fault("noise"))  # seeded


def test_bad_crops_cut_the_centred_subject():
    specs, _ = demo.plan_images(200, seed=3, splits={"train": 1.0})
    for spec in specs:
        h, w = demo.load_photo(spec.subject.key).shape[:2]
        x0, y0, x1, y1 = demo.crop_box(spec.crop, h, w)
        offset = np.hypot((x0 + x1) / 2 - w / 2, (y0 + y1) / 2 - h / 2) / min(h, w)
        if "bad_crop" in spec.faults:
            assert (x1 - x0) < 0.7 * min(h, w) and offset > 0.1, spec
        else:
            assert offset < 0.08, spec


def test_comments_name_the_subject_and_only_real_faults(tiny):
    out, _ = tiny
    meta = pd.read_csv(out / "meta.csv", dtype=str, keep_default_na=False).set_index("image_id")
    lines = (out / "comments.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 80 and all(set(r) == {"image_id", "comment"} for r in records)
    assert len({r["comment"] for r in records}) > 50, "phrasing should vary"
    vocab = {
        f: [w for band in demo._FAULT_WORDS[f] for w in band if "{" not in w] + [demo._FAULT_NOUNS[f]]
        for f in demo.FAULTS
    }
    for r in records:
        row, text = meta.loc[r["image_id"]], r["comment"].lower()
        assert row.subject in text
        present = {f.split(":")[0] for f in row.faults.split(";") if f}
        for fault, words in vocab.items():
            if fault not in present:
                assert not any(w in text for w in words), (fault, text)
        if present:
            assert any(w in text for f in present for w in vocab[f]) or "colour" in text or any(
                t in text for t in demo._TONE_WORDS.values()
            )


def test_failed_generation_leaves_no_partial_files(tmp_path):
    def boom(i: int) -> None:
        if i == 5:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        generate_demo(tmp_path, **TINY, on_image=boom)
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*"))
    assert not (tmp_path / "labels.csv").exists() and not (tmp_path / "summary.json").exists()
    images = sorted((tmp_path / "images").glob("*.jpg"))
    assert len(images) == 6
    for p in images:
        with Image.open(p) as im:
            im.load()  # every image that exists is complete


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="splits"):
        generate_demo(tmp_path, **{**TINY, "splits": {"train": 0.5, "holdout": 0.5}})
    with pytest.raises(ValueError, match="too small"):
        generate_demo(tmp_path, **{**TINY, "n_images": 3})


# ------------------------------------------------------------------------- manifest / adapter


def test_manifest_from_demo_round_trips(tiny, tmp_path):
    out, _ = tiny
    table, report = build_manifest("votes_csv", out / "labels.csv", out / "images")
    assert table.schema.field("votes").type == pa.list_(pa.int32())
    assert table.schema.field("score").type == pa.float32()
    assert table.schema.field("n_levels").type == pa.int16()
    assert report["rows"] == 40 and report["missing_images"] == 0 and report["n_levels"] == 10
    write_manifest(tmp_path / "manifest.parquet", table)
    df = read_manifest(tmp_path / "manifest.parquet")
    assert list(df.columns) == ["image_id", "path", "split", "votes", "score", "n_levels"]
    assert all(Path(p).is_file() for p in df.path)
    unl = df.split == "unlabeled"
    assert df.score[unl].isna().all() and df.votes[unl].isna().all()
    lab = df[~unl]
    dist = vote_distribution(lab)
    assert dist.dtype == np.float32 and dist.shape == (len(lab), 10)
    np.testing.assert_allclose(dist.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(dist @ np.arange(1, 11), lab.score, atol=1e-4)
    with pytest.raises(DataError, match="rows have no votes"):
        vote_distribution(df, missing="raise")
    mixed = vote_distribution(df)  # unlabeled rows become NaN rows, the rest are unchanged
    assert np.isnan(mixed[unl.to_numpy()]).all()
    np.testing.assert_array_equal(mixed[~unl.to_numpy()], dist)
    write_manifest(tmp_path / "again.parquet", df)  # a DataFrame round-trips too
    again = read_manifest(tmp_path / "again.parquet")
    assert again.drop(columns="votes").equals(df.drop(columns="votes"))
    assert all((a is None and b is None) or (a == b).all() for a, b in zip(again.votes, df.votes))


def test_votes_csv_accepts_png_jpeg_and_blank_lines(tmp_path):
    images = fake_images(tmp_path / "img", ["a"], ".png")
    fake_images(images, ["b"], ".JPEG")
    labels = write(tmp_path / "l.csv", "image_id,split,v1,v2,v3\na,train,1,0,3\n\nb,unlabeled,,,\n")
    table, report = build_manifest("votes_csv", labels, images)
    assert table["path"].to_pylist() == [str(images / "a.png"), str(images / "b.JPEG")]
    assert table["score"].to_pylist() == [pytest.approx(2.5), None]
    assert table["n_levels"].to_pylist() == [3, 3]


@pytest.mark.parametrize(
    "row, problem",
    [
        ("c,train,1,2,3", "5 columns, expected 12"),
        ("c,train,1,2,3,4,5,6,7,8,9,x", "v10='x' is not an integer"),
        ("c,train,1,2,3,4,5,6,7,8,9,1.5", "not an integer"),
        ("c,val,1,2,3,4,5,6,7,8,9,-1", "v10=-1 is negative"),
        ("c,holdout,1,2,3,4,5,6,7,8,9,1", "unknown split 'holdout'"),
        ("c,test,0,0,0,0,0,0,0,0,0,0", "all votes are 0"),
        ("c,train,,,,,,,,,,", "not an integer"),
        ("a,train,1,2,3,4,5,6,7,8,9,1", "duplicate image_id 'a' (first on line 2)"),
    ],
)
def test_malformed_row_names_file_line_and_problem(tmp_path, row, problem):
    images = fake_images(tmp_path / "img", ["a", "b", "c"])
    labels = write(
        tmp_path / "labels.csv",
        f"{HEADER}\na,train,1,2,3,4,5,6,7,8,9,10\nb,unlabeled,,,,,,,,,,\n{row}\n",
    )
    with pytest.raises(DataError) as err:
        build_manifest("votes_csv", labels, images)
    assert f"{labels}:4:" in str(err.value) and problem in str(err.value)


def test_bad_header_is_reported(tmp_path):
    images = fake_images(tmp_path / "img", ["a"])
    labels = write(tmp_path / "labels.csv", "id,split,v1,v2\na,train,1,2\n")
    with pytest.raises(DataError, match=r"labels\.csv:1: header"):
        build_manifest("votes_csv", labels, images)


def test_missing_label_file_and_image_dir(tmp_path):
    images = fake_images(tmp_path / "img", ["a"])
    with pytest.raises(DataError, match=r"nope\.csv: label file not found"):
        build_manifest("votes_csv", tmp_path / "nope.csv", images)
    labels = write(tmp_path / "l.csv", "image_id,split,v1,v2\na,train,1,2\n")
    with pytest.raises(DataError, match=r"gone: image folder not found; set `data.images`"):
        build_manifest("votes_csv", labels, tmp_path / "gone")


def test_missing_images_are_dropped_and_reported(tmp_path, caplog):
    images = fake_images(tmp_path / "img", ["a", "c"])
    labels = write(tmp_path / "l.csv", "image_id,split,v1,v2\na,train,1,2\nb,val,2,2\nc,test,0,1\n")
    table, report = build_manifest("votes_csv", labels, images)
    assert table["image_id"].to_pylist() == ["a", "c"]
    assert report["missing_images"] == 1 and report["missing_examples"] == ["b"]
    assert report["rows_in_labels"] == 3 and report["rows"] == 2
    assert "missing and were dropped" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="none of the 3 images"):
        build_manifest("votes_csv", labels, empty)


def test_unknown_adapter_lists_known_ones(tmp_path):
    with pytest.raises(DataError, match="unknown data adapter 'ava2'.*votes_csv"):
        build_manifest("ava2", tmp_path / "l.csv", tmp_path)


def test_registering_an_adapter_is_enough_to_use_it(tmp_path):
    images = fake_images(tmp_path / "img", ["p"], ".png")
    labels = write(tmp_path / "scores.txt", "p 0.8\n")

    @register_adapter("_test_scores")
    def scores(path: Path) -> Labels:
        rows = [line.split() for line in path.read_text().splitlines()]
        return Labels(
            rows=pd.DataFrame({
                "image_id": [r[0] for r in rows], "split": "train", "votes": [None] * len(rows),
                "score": [float(r[1]) for r in rows], "file": [f"{r[0]}.png" for r in rows],
            }),
            n_levels=5,
        )

    try:
        table, _ = build_manifest("_test_scores", labels, images)
        assert table["votes"].to_pylist() == [None]
        assert table["score"].to_pylist() == [pytest.approx(0.8)]
        write_manifest(tmp_path / "m.parquet", table)
        assert read_manifest(tmp_path / "m.parquet").score.tolist() == [pytest.approx(0.8)]
    finally:
        ADAPTERS.pop("_test_scores")


def test_read_manifest_errors_name_the_file(tmp_path, tiny):
    with pytest.raises(DataError, match=r"absent\.parquet: manifest not found"):
        read_manifest(tmp_path / "absent.parquet")
    bad = write(tmp_path / "bad.parquet", "not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet"):
        read_manifest(bad)
    out, _ = tiny
    table, _ = build_manifest("votes_csv", out / "labels.csv", out / "images")
    pq.write_table(table.drop_columns(["score"]), tmp_path / "noscore.parquet")
    with pytest.raises(DataError, match=r"noscore\.parquet: not a manifest: missing col.*'score'"):
        read_manifest(tmp_path / "noscore.parquet")
    split = pa.array(["holdout"] + table["split"].to_pylist()[1:])
    pq.write_table(table.set_column(2, "split", split), tmp_path / "split.parquet")
    with pytest.raises(DataError, match=r"split\.parquet: invalid manifest: unknown split.*holdout"):
        read_manifest(tmp_path / "split.parquet")
    score = pa.array([9.9] + table["score"].to_pylist()[1:], pa.float32())
    pq.write_table(table.set_column(4, "score", score), tmp_path / "score.parquet")
    with pytest.raises(DataError, match="score differs from the mean of the votes"):
        read_manifest(tmp_path / "score.parquet")


def test_write_manifest_failure_leaves_nothing(tmp_path, tiny, monkeypatch):
    out, _ = tiny
    table, _ = build_manifest("votes_csv", out / "labels.csv", out / "images")
    target = tmp_path / "manifest.parquet"
    dup = pa.array(["same"] * table.num_rows)
    with pytest.raises(DataError, match="duplicate image_id 'same'"):
        write_manifest(target, table.set_column(0, "image_id", dup))
    assert list(tmp_path.iterdir()) == []

    def half_write(tbl: pa.Table, where: Path, **_: object) -> None:
        Path(where).write_bytes(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(target, table)
    assert list(tmp_path.iterdir()) == []
