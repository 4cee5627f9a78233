"""Data-set recipes and data deps from params: each recipe runs prepare -> index under `dvc repro`
on a small synthetic copy of its data set's label layout, without the demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_e2e import dvc, make_repo  # noqa: E402  (tests/ is on sys.path under pytest)

from pipelines.config import load_params
from pipelines.data.recipes import apply_recipe, list_recipes, load_recipe
from pipelines.io import DataError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("aadb", "ava", "koniq", "para", "tad66k")
N = 60
SUBJECTS = ("cat", "dog", "flower", "sunset", "beach", "mountain", "car", "bridge")
ATTRIBUTES = ("sharp focus", "blurry", "overexposed", "composition", "lighting", "contrast", "noise", "colors")


def test_every_recipe_is_valid_params_for_its_adapter(tmp_path):
    from pipelines.data.adapters import ADAPTERS

    assert sorted(list_recipes(ROOT / "config" / "recipes")) == sorted(RECIPES)
    for name in RECIPES:
        params = tmp_path / f"{name}.yaml"
        params.write_text((ROOT / "params.yaml").read_text())
        apply_recipe(name, params, folder=ROOT / "config" / "recipes")
        p = load_params(params)
        assert p.data.name == name and p.data.adapter in ADAPTERS
        assert not p.embed.allow_random_fallback  # a real data set never trains on random CLIP weights
        assert p.embed.model == "ViT-L-14"
    ava = load_params(tmp_path / "ava.yaml")
    assert (ava.features.n_clusters, ava.data.options, ava.tags["max_semantic"], ava.tags["max_attribute"]) == (
        15, {"split": "tanet"}, 2145, 1659)


def test_apply_keeps_comments_replaces_options_and_validates(tmp_path):
    folder = ROOT / "config" / "recipes"
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    apply_recipe("ava", params, folder=folder, overrides={"data.images": "/mnt/ava/images", "features.n_clusters": 12})
    apply_recipe("para", params, folder=folder)  # options of ava must not leak into para's adapter
    text = params.read_text()
    assert "# Every knob of the pipeline" in text and "# authors: 15 on AVA" in text  # comments kept
    p = load_params(params)
    assert p.data.options == {"val_fraction": 0.05} and p.data.adapter == "para"
    assert p.features.n_clusters == 15  # para's value replaces the override made with ava
    assert p.head == load_params(ROOT / "params.yaml").head  # blocks a recipe does not name are untouched
    assert p.tags["llm"]["mode"] == "off"  # still a string for a YAML 1.1 reader
    before = params.read_text()
    with pytest.raises(DataError, match="features.n_clusterz"):
        apply_recipe("ava", params, folder=folder, overrides={"features.n_clusterz": 3})
    with pytest.raises(DataError, match="no recipe 'flickr'; known recipes: aadb, ava"):
        apply_recipe("flickr", params, folder=folder)
    assert params.read_text() == before  # a rejected recipe writes nothing
    assert load_recipe("ava", folder)["data"]["comments_format"] == "dpc"


# ------------------------------------------------------------------ synthetic label layouts


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _votes(rng, n_levels: int) -> np.ndarray:
    centre = rng.uniform(1.5, n_levels - 0.5)
    p = np.exp(-0.5 * ((np.arange(1, n_levels + 1) - centre) / 1.2) ** 2)
    return rng.multinomial(50, p / p.sum())


def write_layout(name: str, repo: Path, params) -> dict:
    """Synthetic labels + (empty) image files at the recipe's paths; returns the expected split counts."""
    rng = np.random.default_rng(0)
    labels, images = repo / params.data.labels, repo / params.data.images
    split = np.array(["train"] * 40 + ["val"] * 8 + ["test"] * 12)
    if name == "ava":
        labels.parent.mkdir(parents=True, exist_ok=True)
        tanet = {"train": "train_inferred", "val": "val", "test": "test"}
        head = "image_id," + ",".join(f"vote_{k}" for k in range(1, 11)) + ",mean,tag1,tag2,challenge_id,split_tanet,official_generic_test\n"
        rows = []
        for i in range(N):
            v = _votes(rng, 10)
            rows.append(f"{1000 + i},{','.join(map(str, v))},{(v * np.arange(1, 11)).sum() / v.sum()},,,,{tanet[split[i]]},False\n")
            _touch(images / f"{1000 + i}.jpg")
        labels.write_text(head + "".join(rows))
        return {"train": 40, "val": 8, "test": 12}
    if name == "koniq":
        labels.parent.mkdir(parents=True, exist_ok=True)
        sets = {"train": "training", "val": "validation", "test": "test"}
        rows = []
        for i in range(N):
            v = _votes(rng, 5)
            rows.append(f"k{i}.jpg,{','.join(str(c / v.sum()) for c in v)},{v.sum()},50.0,1.0,{sets[split[i]]}\n")
            _touch(images / f"k{i}.jpg")
        labels.write_text("image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,set\n" + "".join(rows))
        return {"train": 40, "val": 8, "test": 12}
    if name == "aadb":
        labels.parent.mkdir(parents=True, exist_ok=True)
        from pipelines.data.adapters import AADB_ATTRIBUTES

        rows = []
        for i in range(N):
            attrs = ",".join(f"{a:.1f}" for a in rng.uniform(-1, 1, len(AADB_ATTRIBUTES)))
            rows.append(f"AADB/datasetImages_originalSize/farm{i}_b.jpg,image_natural,{rng.uniform(0, 1):.2f},{attrs}\n")
            _touch(images / f"farm{i}_b.jpg")
        labels.write_text(f"dis_img_path,dis_type,score,{','.join(AADB_ATTRIBUTES)}\n" + "".join(rows))
        return {}  # a hash split
    if name == "para":
        labels.mkdir(parents=True, exist_ok=True)
        head = "sessionId,imageName,aestheticScore_mean,aestheticScore_std,qualityScore_mean\n"
        for part, lo, hi in (("Train", 0, 48), ("Test", 48, N)):
            rows = []
            for i in range(lo, hi):
                rows.append(f"s{i % 4},iaa_{i}.jpg,{rng.uniform(1, 5):.2f},0.5,3.0\n")
                _touch(images / f"s{i % 4}" / f"iaa_{i}.jpg")
            (labels / f"PARA-Giaa{part}.csv").write_text(head + "".join(rows))
        return {"test": 12}
    if name == "tad66k":
        labels.mkdir(parents=True, exist_ok=True)
        for part, lo, hi in (("train", 0, 48), ("test", 48, N)):
            rows = []
            for i in range(lo, hi):
                rows.append(f"t{i}.jpg,{rng.uniform(1, 9):.2f}\n")
                _touch(images / f"t{i}.jpg")
            (labels / f"{part}.csv").write_text("image,score\n" + "".join(rows))
        return {"test": 12}
    raise AssertionError(name)


def write_corpus(path: Path) -> None:
    rng = np.random.default_rng(1)
    corpus = {f"c{i}.jpg": [f"a {SUBJECTS[rng.integers(len(SUBJECTS))]} with {ATTRIBUTES[rng.integers(len(ATTRIBUTES))]}"
                            f" and {ATTRIBUTES[rng.integers(len(ATTRIBUTES))]}"] for i in range(120)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(corpus))


def unit_table(ids: list[str], column: str, dim: int, seed: int) -> pa.Table:
    x = np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return pa.table({column: ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)})


BYO = {"embed.source": "byo", "embed.byo_items": "data/byo/items.parquet", "embed.byo_texts": "data/byo/texts.parquet"}


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_prepare_to_index_without_the_demo(tmp_path, name):
    repo, env = make_repo(tmp_path, {})
    sets = [f"--set={k}={v}" for k, v in BYO.items()]
    subprocess.run([sys.executable, "-m", "stages.recipe", name, *sets], cwd=repo, env=env, check=True,
                   capture_output=True)
    params = load_params(repo / "params.yaml")
    recipe = yaml.safe_load((ROOT / "config" / "recipes" / f"{name}.yaml").read_text())
    assert params.data.labels == recipe["data"]["labels"] and params.embed.source == "byo"
    expected = write_layout(name, repo, params)
    write_corpus(repo / params.data.comments)

    dag = dvc(repo, env, "dag", "--dot", "index").stdout
    assert '"prepare" -> "features"' in dag and "demo_data" not in dag  # the demo generator is no dependency here
    dvc(repo, env, "repro", "prepare", "tags")
    ids = pq.read_table(repo / "data/manifest.parquet", columns=["image_id"]).column("image_id").to_pylist()
    tags = [t for kind in ("semantic", "attribute") for t in (repo / f"data/tags/{kind}.txt").read_text().split("\n") if t]
    pq.write_table(unit_table(ids, "image_id", 16, 0), repo / "data/byo/items.parquet")
    pq.write_table(unit_table(tags, "phrase", 16, 1), repo / "data/byo/texts.parquet")
    dvc(repo, env, "repro", "index")

    assert not (repo / "data/demo").exists()
    report = json.loads((repo / "data/manifest_report.json").read_text())
    assert report["rows"] == N and report["missing_images"] == 0 and report["adapter"] == recipe["data"]["adapter"]
    for split, count in expected.items():
        assert report["splits"][split] == count
    clusters = json.loads((repo / "data/features/clusters.json").read_text())
    k = recipe["features"]["n_clusters"]
    assert len(clusters["clusters"]) == k and sum(c["size"] for c in clusters["clusters"].values()) == N
    index = json.loads((repo / "data/index/report.json").read_text())
    assert (index["low"], index["high"]) == (recipe["index"]["low"], recipe["index"]["high"])
    assert index["n_train"] == report["splits"]["train"] and index["n_active_clusters"] >= 1
    scores = pq.read_table(repo / "data/manifest.parquet", columns=["score"]).column("score").to_numpy()
    assert np.nanmax(scores) > recipe["index"]["low"] + 1  # the scores populate more than the first bin
    if name == "ava":  # and the pipeline is up to date afterwards
        assert "changed" not in dvc(repo, env, "status", "index").stdout


def test_demo_data_is_a_dependency_only_of_the_demo(tmp_path):
    repo, env = make_repo(tmp_path, {})
    for stage in ("prepare", "tags"):
        assert f'"demo_data" -> "{stage}"' in dvc(repo, env, "dag", "--dot", stage).stdout
    apply_recipe("koniq", repo / "params.yaml", folder=repo / "config" / "recipes")
    for stage in ("prepare", "tags"):
        dag = dvc(repo, env, "dag", "--dot", stage).stdout
        assert f'"{stage}"' in dag and "demo_data" not in dag
