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


def test_params_read_as_yaml_1_2_like_dvc(tmp_path):
    """What `dvc exp run -S` writes (ruamel, YAML 1.2) reads back with the same types DVC sees:
    `off` stays a string (YAML 1.1: False), `1e-3` is a float (YAML 1.1: a string)."""
    from dvc.utils.serialize import parse_yaml

    text = "tags:\n  llm:\n    mode: off\nhead:\n  lr: 1e-3\n  tfa: false\nembed:\n  pretrained: none\n"
    path = tmp_path / "params.yaml"
    path.write_text(text)
    p = load_params(path)
    assert p.tags["llm"]["mode"] == "off"
    assert p.head.lr == 1e-3 and isinstance(p.head.lr, float)
    assert p.head.tfa is False and p.embed.pretrained == "none"
    dvc_view = parse_yaml(text, str(path))
    assert dvc_view["tags"]["llm"]["mode"] == p.tags["llm"]["mode"] and dvc_view["head"]["lr"] == p.head.lr


def test_dvc_set_param_round_trips(tmp_path):
    """DVC's own `-S` writer (Hydra overrides + ruamel) on the repo's params.yaml: every value
    still validates, and the changed ones come back as given."""
    import shutil

    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy("params.yaml", path)
    before = load_params(path)
    apply_overrides(str(path), ["tags.min_count=4", "head.lr=3e-3", "head.tfa=false"])
    assert "mode: off\n" in path.read_text()  # unquoted, as DVC writes it
    after = load_params(path)
    assert after.tags["llm"]["mode"] == "off" and after.tags["min_count"] == 4
    assert after.head.lr == 3e-3 and after.head.tfa is False
    assert after.pretrain == before.pretrain and after.embed == before.embed


def test_dump_yaml_quotes_what_would_change_type():
    from pipelines.config import dump_yaml, parse_yaml

    data = {"a": "off", "b": "1e-3", "c": 1e-3, "d": "null", "e": False, "f": [1, "2"]}
    assert parse_yaml(dump_yaml(data)) == data


def test_duplicate_key_is_an_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("head:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(DataError, match="not valid YAML"):
        load_params(path)
