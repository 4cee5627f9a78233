"""Adapters for the real data sets (AVA, AADB, TAD66K, PARA, KonIQ) on the real label files.

The shared folder (``$IAA_SHARED_DATA``, default ``../shared/data``) holds the real label files
but almost no images; tests that need it skip with the reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.adapters import ADAPTERS, get_adapter, hash_split, load_labels
from pipelines.data.adapters import build_manifest
from pipelines.data.manifest import scores_from_votes
from pipelines.io import DataError

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IAA_SHARED_DATA", ROOT.parent / "shared" / "data"))
LABELS = SHARED / "labels"
AVA_VOTES = LABELS / "ava" / "AVA_votes.csv"
AVA_MERGED = LABELS / "ava" / "ava_merged_labels.csv"
AVA_IMAGES = SHARED / "images" / "ava"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} (set IAA_SHARED_DATA to the shared data folder)")
    return path


def head_lines(path: Path, n: int) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [next(fh) for _ in range(n)]


@pytest.fixture(scope="module")
def ava_tanet():
    return get_adapter("ava")(need(AVA_VOTES))


def test_registry_has_every_adapter():
    assert {"votes_csv", "ava", "aadb", "tad66k", "para", "koniq"} <= set(ADAPTERS)


def test_ava_votes_csv_tanet_split(ava_tanet):
    rows = ava_tanet.rows
    assert len(rows) == 255_502 and ava_tanet.n_levels == 10
    assert ava_tanet.notes["splits"] == {"train": 229_951, "test": 12_776, "val": 12_775}
    assert ava_tanet.notes["layout"] == "ava_votes_csv"
    # the first data line of AVA_votes.csv: AVA/images/953417.jpg,6.1129...,0,0,0,5,32,50,23,10,3,1
    first = rows.iloc[0]
    assert first.image_id == "953417" and list(first.votes) == [0, 0, 0, 5, 32, 50, 23, 10, 3, 1]
    assert first.score == pytest.approx(6.112903, abs=1e-5)
    assert first.split == "val"  # ava_merged_labels.csv says split_tanet = val for 953417


def test_ava_scores_match_the_file(ava_tanet):
    import pandas as pd

    ref = pd.read_csv(AVA_VOTES, usecols=["score"])["score"].to_numpy()
    assert np.allclose(ava_tanet.rows["score"].to_numpy(), ref, atol=1e-4)


def test_ava_official_split_from_generic_test_list():
    lab = get_adapter("ava")(need(AVA_MERGED), split="official", val_fraction=0.05)
    jpgl = {x.strip() for x in open(LABELS / "ava/aesthetics_image_lists/generic_test.jpgl") if x.strip()}
    test = set(lab.rows.loc[lab.rows.split == "test", "image_id"])
    assert test <= jpgl and len(test) == 19_928  # 72 listed ids have no votes in AVA
    assert lab.notes["official_test_ids_without_labels"] == 72
    assert 0.04 < lab.notes["splits"]["val"] / 235_574 < 0.06
    # the merged layout carries tags and challenges (known for the 25,551 TANet test + val images)
    assert lab.rows["challenge_id"].notna().sum() == 25_551


def test_ava_txt_layout_matches_votes(tmp_path):
    """The original AVA.txt layout (index, id, 10 counts, 2 tags, challenge), built from real rows."""
    lines = head_lines(need(AVA_MERGED), 41)[1:]
    txt = tmp_path / "AVA.txt"
    ids, expect = [], []
    with open(txt, "w") as fh:
        for k, line in enumerate(lines, 1):
            c = line.rstrip("\n").split(",")
            tags = [str(int(float(x))) if x else "0" for x in c[12:15]]
            fh.write(" ".join([str(k), c[0], *c[1:11], *tags]) + "\n")
            ids.append(c[0])
            expect.append([int(x) for x in c[1:11]])
    merged = tmp_path / "ava_merged_labels.csv"
    merged.write_text(head_lines(AVA_MERGED, 1)[0] + "".join(lines))
    lab = get_adapter("ava")(txt)
    assert lab.notes["layout"] == "ava_txt"
    assert lab.rows["image_id"].tolist() == ids
    assert [list(v) for v in lab.rows["votes"]] == expect
    assert np.allclose(lab.rows["score"], scores_from_votes(np.array(expect)))
    splits = [line.rstrip("\n").split(",")[15] for line in lines]
    assert lab.rows["split"].tolist() == [{"train_inferred": "train"}.get(s, s) for s in splits]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("AVA/images/1.jpg,5.0,0,1,2,x,4,5,6,7,8,9,Authentic\n", "score 4='x'"),
        ("AVA/images/1.jpg,5.0,0,1,2,3,4,5,6,7,8,Authentic\n", "12 columns, expected 13"),
        ("AVA/images/1.jpg,5.0,0,0,0,0,0,0,0,0,0,0,Authentic\n", "all vote counts are 0"),
        ("AVA/images/1.jpg,5.0,0,1,2,-3,4,5,6,7,8,9,Authentic\n", "score 4='-3'"),
    ],
)
def test_ava_malformed_row_names_file_and_line(tmp_path, bad_line, message):
    src = head_lines(need(AVA_VOTES), 3)
    f = tmp_path / "AVA_votes.csv"
    f.write_text(src[0] + src[1] + "\n" + bad_line + src[2])  # a blank line: the bad row is line 4
    with pytest.raises(DataError, match=rf"AVA_votes\.csv:4: .*{message}"):
        get_adapter("ava")(f, split="none")


def test_ava_duplicate_id_is_an_error(tmp_path):
    src = head_lines(need(AVA_VOTES), 3)
    f = tmp_path / "AVA_votes.csv"
    f.write_text(src[0] + src[1] + src[2] + src[1])
    with pytest.raises(DataError, match=r"AVA_votes\.csv:4: duplicate image_id '953417' \(first on line 2\)"):
        get_adapter("ava")(f, split="none")


def test_ava_tanet_split_needs_its_file(tmp_path):
    src = head_lines(need(AVA_VOTES), 3)
    f = tmp_path / "AVA_votes.csv"
    f.write_text("".join(src))
    with pytest.raises(DataError, match="ava_merged_labels.csv"):
        get_adapter("ava")(f)
    with pytest.raises(DataError, match="split="):
        get_adapter("ava")(f, split="bogus")


def test_ava_manifest_on_the_six_real_images():
    """build_manifest on the full AVA file: the 6 real images are found, the rest reported missing."""
    need(AVA_IMAGES)
    table, report = build_manifest("ava", need(AVA_VOTES), AVA_IMAGES, split="none")
    assert table.num_rows == 6
    assert report["missing_images"] == 255_502 - 6
    import pandas as pd

    ref = pd.read_csv(AVA_IMAGES / "labels.csv")
    got = table.to_pandas().set_index("image_id")
    for _, r in ref.iterrows():
        row = got.loc[r["image"].removesuffix(".jpg")]
        assert list(row["votes"]) == [r[f"vote_{k}"] for k in range(1, 11)]
        assert row["score"] == pytest.approx(r["mean"], abs=1e-4)
        assert Path(row["path"]).is_file()


def test_label_only_loading_keeps_rows_without_images(tmp_path):
    f = need(LABELS / "koniq" / "koniq10k_distributions_sets.csv")
    rows, report = load_labels("koniq", f, tmp_path, keep_missing=True)
    assert len(rows) == 10_073 and report["missing_images"] == 10_073 and not rows["image_found"].any()
    assert rows["path"].iloc[0] == str(tmp_path / "10004473376.jpg")
    (tmp_path / "10004473376.jpg").write_bytes(b"")  # one present image file
    rows, report = load_labels("koniq", f, tmp_path)
    assert len(rows) == 1 and report["missing_images"] == 10_072 and rows["image_found"].all()


def test_aadb_real_file():
    lab = get_adapter("aadb")(need(LABELS / "aadb" / "AADB.csv"))
    assert len(lab.rows) == 9_958 - 127 and lab.notes["identical_duplicate_rows_dropped"] == 127
    assert lab.rows["image_id"].is_unique
    assert lab.rows["votes"].isna().all() and lab.rows["score"].between(0, 1).all()
    assert {"balacingelements", "vividcolor"} <= set(lab.rows.columns)
    assert "not AADB's official split" in lab.notes["split_rule"]
    assert set(lab.notes["splits"]) == {"train", "val", "test"}
    first = lab.rows.iloc[0]
    assert first.image_id == "farm1_286_20013434330_d99ab6b9a0_b" and first.score == pytest.approx(0.65)
    assert first.file == "farm1_286_20013434330_d99ab6b9a0_b.jpg"


def test_aadb_conflicting_duplicate_and_split_file(tmp_path):
    src = head_lines(need(LABELS / "aadb" / "AADB.csv"), 3)
    changed = src[1].replace(",0.65,", ",0.70,", 1)
    f = tmp_path / "AADB.csv"
    f.write_text(src[0] + src[1] + src[2] + changed)
    with pytest.raises(DataError, match=r"AADB\.csv:4: duplicate image_id .* different labels"):
        get_adapter("aadb")(f)
    f.write_text("".join(src))
    split = tmp_path / "split.csv"
    split.write_text("image,split\nfarm1_286_20013434330_d99ab6b9a0_b.jpg,test\nfarm1_273_19900479178_9c64cca006_b.jpg,train\n")
    assert get_adapter("aadb")(f, split_file=split).rows["split"].tolist() == ["test", "train"]
    split.write_text("image,split\nfarm1_286_20013434330_d99ab6b9a0_b.jpg,dev\n")
    with pytest.raises(DataError, match=r"split\.csv:2: unknown split 'dev'"):
        get_adapter("aadb")(f, split_file=split)


def test_tad66k_official_split():
    lab = get_adapter("tad66k")(need(LABELS / "tad66k" / "dataset"), val_fraction=0.1)
    n = lab.notes["splits"]
    assert n["test"] == 14_079 and n["train"] + n["val"] == 52_248 and 0.08 < n["val"] / 52_248 < 0.12
    assert lab.rows["score"].between(0, 10).all() and lab.n_levels == 10
    assert lab.rows["file"].iloc[0] == "lanphere54810922.jpg"


def test_tad66k_bad_score_names_the_test_file(tmp_path):
    d = tmp_path / "merge"
    d.mkdir()
    (d / "train.csv").write_text("image,score\na.jpg,5.0\n")
    (d / "test.csv").write_text("image,score\nb.jpg,4.1\nc.jpg,eleven\n")
    with pytest.raises(DataError, match=r"test\.csv:3: score='eleven'"):
        get_adapter("tad66k")(tmp_path)


def test_koniq_distributions():
    f = need(LABELS / "koniq" / "koniq10k_distributions_sets.csv")
    lab = get_adapter("koniq")(f)
    assert lab.notes["splits"] == {"train": 7_058, "test": 2_015, "val": 1_000} and lab.n_levels == 5
    import pandas as pd

    ref = pd.read_csv(f)
    votes = np.stack(lab.rows["votes"].to_numpy())
    assert np.abs(votes.sum(1) - ref["c_total"].to_numpy()).max() <= 1
    frac = ref[[f"c{k}" for k in range(1, 6)]].to_numpy()
    assert np.abs(votes / votes.sum(1, keepdims=True) - frac).max() < 0.02
    # MOS (0-100) is a monotone function of the vote mean
    assert np.corrcoef(lab.rows["score"], ref["MOS"])[0, 1] > 0.99


def test_koniq_fractions_must_sum_to_one(tmp_path):
    f = tmp_path / "k.csv"
    f.write_text("image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,set\n"
                 "a.jpg,0.1,0.2,0.3,0.2,0.2,100,50,1,training\n"
                 "b.jpg,0.5,0.2,0.3,0.2,0.2,100,50,1,training\n")
    with pytest.raises(DataError, match=r"k\.csv:3: c1\.\.c5 sum to 1\.4"):
        get_adapter("koniq")(f)


def test_para_documented_columns(tmp_path):
    """PARA is not in the shared folder: a two-file fixture in its documented GIAA layout."""
    head = "sessionId,imageName,aestheticScore_mean,aestheticScore_std,qualityScore_mean\n"
    (tmp_path / "PARA-GiaaTrain.csv").write_text(head + "s1,iaa_1.jpg,3.5,0.5,3.0\ns1,iaa_2.jpg,2.25,0.4,3.1\n")
    (tmp_path / "PARA-GiaaTest.csv").write_text(head + "s2,iaa_1.jpg,4.0,0.3,4.2\n")
    lab = get_adapter("para")(tmp_path)
    assert lab.rows["image_id"].tolist() == ["s2/iaa_1", "s1/iaa_1", "s1/iaa_2"]
    assert lab.rows["split"].tolist() == ["test", "train", "train"]
    assert lab.rows["file"].tolist() == ["s2/iaa_1.jpg", "s1/iaa_1.jpg", "s1/iaa_2.jpg"]
    (tmp_path / "PARA-GiaaTest.csv").write_text(head + "s2,iaa_1.jpg,6.0,0.3,4.2\n")
    with pytest.raises(DataError, match=r"PARA-GiaaTest\.csv:2: aestheticScore_mean='6\.0'"):
        get_adapter("para")(tmp_path)
    (tmp_path / "PARA-GiaaTest.csv").write_text("sessionId,imageName\ns2,a.jpg\n")
    with pytest.raises(DataError, match=r"PARA-GiaaTest\.csv:1: header lacks column\(s\) aestheticScore_mean"):
        get_adapter("para")(tmp_path)


def test_hash_split_is_stable_under_subsetting():
    ids = [str(i) for i in range(2000)]
    full = hash_split(ids, val_fraction=0.1, test_fraction=0.2, seed=3)
    sub = hash_split(ids[500:900], val_fraction=0.1, test_fraction=0.2, seed=3)
    assert (full[500:900] == sub).all()
    share = {s: float(np.mean(full == s)) for s in ("train", "val", "test")}
    assert abs(share["test"] - 0.2) < 0.04 and abs(share["val"] - 0.1) < 0.03
    with pytest.raises(DataError):
        hash_split(ids, val_fraction=0.6, test_fraction=0.5)


def test_votes_csv_still_works(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("image_id,split,v1,v2,v3\na,train,1,2,3\nb,unlabeled,,,\n")
    lab = get_adapter("votes_csv")(f)
    assert lab.rows["split"].tolist() == ["train", "unlabeled"] and lab.n_levels == 3
