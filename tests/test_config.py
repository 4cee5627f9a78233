import pytest
import yaml

from pipelines.config import load_params
from pipelines.io import DataError


def write(tmp_path, data):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_load():
    p = load_params("params.yaml")
    assert p.index.low < p.index.high
    assert p.head.protocol in ("linear_probe", "fine_tune")


def test_unknown_key_names_file_key_and_known_keys(tmp_path):
    path = write(tmp_path, {"head": {"lrr": 0.1}})
    with pytest.raises(DataError) as err:
        load_params(path)
    msg = str(err.value)
    assert str(path) in msg and "'head.lrr'" in msg and "lr_decay" in msg


def test_nested_unknown_key(tmp_path):
    with pytest.raises(DataError, match=r"'pretrain\.ray\.workers'"):
        load_params(write(tmp_path, {"pretrain": {"ray": {"workers": 2}}}))


@pytest.mark.parametrize(
    "block, match",
    [
        ({"head": {"epochs": "ten"}}, "head.epochs"),
        ({"head": {"tfa": 1}}, "true or false"),
        ({"embed": {"batch_size": True}}, "must be a number"),
        ({"pseudo_search": {"betas": 0.5}}, "must be a list"),
    ],
)
def test_wrong_types(tmp_path, block, match):
    with pytest.raises(DataError, match=match):
        load_params(write(tmp_path, block))


def test_ints_accepted_for_floats_and_union(tmp_path):
    p = load_params(write(tmp_path, {"head": {"lr": 1}, "index": {"n_per_bin": 9}}))
    assert p.head.lr == 1.0 and isinstance(p.head.lr, float)
    assert p.index.n_per_bin == 9


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_params(tmp_path / "nope.yaml")
