"""Committed results reproduce: a fresh `dvc repro` of the test suite's tiny DAG gives the
metrics in tests/assets/dag_metrics.json, to the tolerance of tools/repro_check.py (the full
demo against metrics/*.json: `python tools/repro_check.py demo`, minutes, not in the suite)."""

from __future__ import annotations

import copy
import json

import pytest

from tools.repro_check import ATOL, DAG_REFERENCE, RTOL, UPDATE_DAG, WIDER, compare, max_rel_diff

REFERENCE = {
    "metrics/eval.json": {"head": {"srcc": 0.4583, "acc": 0.69}, "random_weights": True, "registered_model": "selftrain"},
    "metrics/head.json": {"epochs": 30, "selected_epoch": 29, "val_srcc": 0.2095},
    "metrics/details/family.json": {"registered": "models:/x/2", "alias": "challenger", "aesaf": {"mse": 1.08}},
}


def _changed(path: str, value) -> dict:
    """REFERENCE with one value replaced: ``path`` is ``file:key.key``."""
    out = copy.deepcopy(REFERENCE)
    file, dotted = path.split(":")
    *keys, last = dotted.split(".")
    node = out[file]
    for k in keys:
        node = node[k]
    node[last] = value
    return out


def test_compare_accepts_the_tolerance_and_rejects_beyond_it():
    assert compare(REFERENCE, copy.deepcopy(REFERENCE)) == []
    within = 0.4583 * (1 + RTOL / 2)
    assert compare(REFERENCE, _changed("metrics/eval.json:head.srcc", within)) == []
    beyond = 0.4583 * (1 + 3 * RTOL) + ATOL
    (problem,) = compare(REFERENCE, _changed("metrics/eval.json:head.srcc", beyond))
    assert problem.startswith("metrics/eval.json:head.srcc:") and "reference 0.4583" in problem
    assert max_rel_diff(REFERENCE, _changed("metrics/eval.json:head.srcc", beyond)) == pytest.approx(3 * RTOL, rel=0.01)


def test_family_files_have_the_wider_tolerance():
    rtol, atol = WIDER["metrics/details/family.json"]
    assert compare(REFERENCE, _changed("metrics/details/family.json:aesaf.mse", 1.08 + atol / 2)) == []
    assert len(compare(REFERENCE, _changed("metrics/details/family.json:aesaf.mse", 1.08 * (1 + rtol) + 2 * atol))) == 1
    # the TMCR files keep the tight one
    assert len(compare(REFERENCE, _changed("metrics/eval.json:head.acc", 0.69 + atol / 2))) == 1


@pytest.mark.parametrize("path,value", [
    ("metrics/head.json:selected_epoch", 28),  # integers are exact
    ("metrics/eval.json:random_weights", False),
    ("metrics/eval.json:registered_model", "head"),
    ("metrics/head.json:epochs", 30.0),  # a type change is a change
])
def test_compare_exact_values(path, value):
    assert len(compare(REFERENCE, _changed(path, value))) == 1


def test_compare_missing_new_and_ignored_keys():
    fewer = copy.deepcopy(REFERENCE)
    del fewer["metrics/head.json"]["val_srcc"]
    assert compare(REFERENCE, fewer) == ["metrics/head.json:val_srcc: missing (reference 0.2095)"]
    assert compare(fewer, REFERENCE) == ["metrics/head.json:val_srcc: not in the reference (got 0.2095)"]
    # the registry version and alias depend on the store's history, not on the run
    other_store = _changed("metrics/details/family.json:registered", "models:/x/7")
    assert compare(REFERENCE, other_store) == []


@pytest.mark.slow
def test_tiny_dag_reproduces_committed_metrics(dag_repo):
    assert DAG_REFERENCE.is_file(), f"{DAG_REFERENCE} is missing; create it: {UPDATE_DAG}"
    reference = json.loads(DAG_REFERENCE.read_text())
    assert "metrics/eval.json" in reference and "metrics/head.json" in reference
    problems = compare(reference, dag_repo.metrics)
    assert not problems, (
        f"the tiny DAG's metrics differ from {DAG_REFERENCE.name} (rtol {RTOL:g}, atol {ATOL:g}):\n  "
        + "\n  ".join(problems)
        + f"\nif the change is meant to move the numbers, regenerate the reference: {UPDATE_DAG}"
    )
