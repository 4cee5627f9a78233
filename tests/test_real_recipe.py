"""The real-feature training recipe and its search space: they load, validate and apply."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from pipelines.config import load_params
from pipelines.data.recipes import apply_recipe, load_recipe
from pipelines.tune.search import load_space

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_training_recipe_sets_only_head_keys_and_validates(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = load_params(params)
    recipe = load_recipe("training/real_features", ROOT / "config" / "recipes")
    assert set(recipe) == {"head"}
    apply_recipe("training/real_features", params, folder=ROOT / "config" / "recipes")
    p = load_params(params)
    assert (p.head.lr, p.head.lr_decay, p.head.tfa, p.head.flsa, p.head.cr_features, p.head.tm_dim) == (0.00072, 1.0, False, False, "input", 8)
    assert p.data == before.data and p.selftrain == before.selftrain  # nothing else moves
    assert before.head.tfa and before.head.lr == 0.0001  # params.yaml keeps the papers' settings


def test_real_space_is_a_valid_tune_space_and_bench_samples_it():
    from benchmarks.bench_real import sample_space

    path = ROOT / "config" / "tune_space_real.yaml"
    sp = load_space(path, "head")
    draws = sample_space(path)
    assert len(draws) == sp.num_samples and draws == sample_space(path)  # seeded: the same draws
    lo, hi = sp.space["head.lr"]["loguniform"]
    assert all(lo <= d["head.lr"] <= hi and d["head.epochs"] == sp.fixed["head.epochs"] for d in draws)
    assert {d["head.lr_decay"] for d in draws} <= set(sp.space["head.lr_decay"]["choice"])
    assert yaml.safe_load(path.read_text())["stage"] == "head"
