"""Registry tags, champion / challenger promotion, registry URIs, and the scoring CLI.

Real MLflow (sqlite store in tmp_path), a real pyfunc model: the tiny random open_clip
model + an untrained TMCR head, logged with ``log_scoring_model`` as ``evaluate`` does.
"""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from pipelines.io import DataError
from pipelines.tracking import registry
from pipelines.tracking.scoring import log_scoring_model, make_bundle
from pipelines.tracking.scoring import promote as scoring_promote

ROOT = Path(__file__).parents[1]
TINY_CLIP = str(ROOT / "tests" / "assets" / "iaa-tiny-clip.json")
SEM = ["cat", "dog", "tree", "sky"]
ATTR = ["blurry", "sharp", "dark"]
HEAD = {
    "protocol": "linear_probe", "lr_decay": 0.95, "weight_decay": 1e-4, "batch_size": 32, "tm_dim": 8,
    "cr_dim": 8, "hidden": 16, "dropout": 0.0, "emd_r": 2, "use_tm": True, "use_cr": True, "tfa": False,
    "tfa_tau1": 0.5, "tfa_tau2": 2.0, "tfa_n_mix": 1, "flsa": False, "flsa_weight": 0.1, "keep_best": True, "loss": "emd", "cr_features": "output",
}
CARD = {"model": TINY_CLIP, "weights": "random", "random_weights": True, "pretrained": "none", "init_seed": 0}


def build_bundle(path: Path) -> None:
    """A scoring bundle: tiny CLIP (embed dim 64) tag embeddings + an untrained head."""
    from pipelines.embed.clip import load_clip
    from pipelines.embed.encode import embed_texts
    from pipelines.train.loops import head_from_arch

    torch.manual_seed(CARD["init_seed"])
    clip = load_clip(TINY_CLIP, "none")
    tag_emb = embed_texts(clip, SEM + ATTR)
    arch = {"tm_in": len(SEM) + len(ATTR), "n_levels": 10,
            "cr_spec": {"in_dim": clip.embed_dim, "hidden": 16, "dim": 8, "dropout": 0.0}, "head": HEAD}
    torch.manual_seed(1)
    head = head_from_arch(arch)
    make_bundle(path, head_state={"arch": arch, "model": head.state_dict()}, card=CARD, tags=SEM + ATTR,
                kinds=["semantic"] * len(SEM) + ["attribute"] * len(ATTR), tag_emb=tag_emb, logit_scale=100.0)


def write_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for i in range(3):
        files[f"ok{i}"] = folder / f"ok{i}.png"
        Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)).save(files[f"ok{i}"])
    files["text"] = folder / "broken.jpg"
    files["text"].write_text("not an image")
    files["truncated"] = folder / "sub" / "truncated.png"
    files["truncated"].parent.mkdir()
    files["truncated"].write_bytes(files["ok0"].read_bytes()[:60])
    return files


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with one logged scoring model; yields (uri, model runs:/ URI, tmp dir)."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.create_experiment("reg", artifact_location=(tmp / "art").as_uri())
    build_bundle(tmp / "bundle.pt")
    with mlflow.start_run(experiment_id=exp):
        info = log_scoring_model(tmp / "bundle.pt", CARD, registered_name=None, pip_requirements=["mlflow"])
    yield uri, info.model_uri, tmp
    mlflow.set_tracking_uri(None)


def aliases(client, name):
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def test_promotion_rule_champion_challenger(store):
    uri, model_uri, _ = store
    client = MlflowClient(uri)
    name = "promo"

    def reg(srcc):
        return registry.register(model_uri, name, metrics={"val_srcc": srcc, "test_srcc": srcc - 0.1}, dataset="demo",
                                 card=CARD, metric="val_srcc")

    assert reg(0.5) == ("1", "champion")  # first version: nothing to beat
    assert reg(0.4) == ("2", "challenger")
    assert aliases(client, name) == {"champion": "1", "challenger": "2"}
    assert reg(0.6) == ("3", "champion")
    assert aliases(client, name) == {"champion": "3", "challenger": "2"}
    assert client.get_model_version(name, "1").tags["replaced_by"] == "3"
    assert reg(0.6) == ("4", "challenger")  # a tie keeps the champion
    assert aliases(client, name) == {"champion": "3", "challenger": "4"}
    # tags: metrics, data set and embedding model
    tags = client.get_model_version(name, "4").tags
    assert tags["dataset"] == "demo" and tags["embedding_model"] == TINY_CLIP and tags["random_weights"] == "true"
    assert float(tags["metric.test_srcc"]) == pytest.approx(0.5) and float(tags["val_srcc"]) == 0.6
    # the challenger is promoted only when it beats the champion
    assert registry.promote_challenger(name, "val_srcc") == "challenger"
    client.set_model_version_tag(name, "4", "val_srcc", "0.65")
    assert registry.promote_challenger(name, "val_srcc") == "champion"
    assert aliases(client, name) == {"champion": "4"}
    # lower-is-better metrics and the evaluate-stage entry point (scoring.promote) use the same rule
    v5 = mlflow.register_model(model_uri, name).version
    assert scoring_promote(name, v5, "val_srcc", 0.9) == "champion"
    v6 = mlflow.register_model(model_uri, name).version
    assert registry.promote(name, v6, "val_mae", 0.3, higher_is_better=False) == "champion"  # v5 has no val_mae
    v7 = mlflow.register_model(model_uri, name).version
    assert registry.promote(name, v7, "val_mae", 0.4, higher_is_better=False) == "challenger"
    with pytest.raises(ValueError, match="finite"):
        registry.promote(name, v7, "val_srcc", float("nan"))


def test_uris_load_and_score_rows(store):
    uri, model_uri, tmp = store
    name = "load"
    registry.register(model_uri, name, metrics={"val_srcc": 0.3}, dataset="demo", card=CARD, metric="val_srcc")
    registry.register(model_uri, name, metrics={"val_srcc": 0.1}, dataset="demo", card=CARD, metric="val_srcc")
    assert str(registry.resolve(f"models:/{name}@champion").version) == "1"
    assert str(registry.resolve(f"models:/{name}@challenger").version) == "2"
    assert str(registry.resolve(f"models:/{name}/2").version) == "2"
    with pytest.raises(DataError, match=r"aliases: \['challenger', 'champion'\]; versions: \[1, 2\]"):
        registry.resolve(f"models:/{name}@best")
    with pytest.raises(DataError, match="no registered model"):
        registry.resolve("models:/nope/1")
    with pytest.raises(DataError, match="not a registry URI"):
        registry.parse_uri("runs:/abc/model")

    files = write_images(tmp / "imgs")
    model = registry.load(f"models:/{name}@champion")
    same = registry.load(f"models:/{name}/1")
    df = pd.DataFrame({"path": [str(files["ok0"]), str(files["text"]), str(files["ok1"]), str(tmp / "missing.png")]})
    out = model.predict(df, params={"top_k": 2})
    assert list(out["error"].isna()) == [True, False, True, False]
    assert "UnidentifiedImageError" in out["error"][1] and "No such file" in out["error"][3]
    ok = out[out["error"].isna()]
    assert ok["score"].between(1, 10).all()
    for d, sem, attr in zip(ok["distribution"], ok["top_semantic"], ok["top_attribute"]):
        assert len(d) == 10 and sum(d) == pytest.approx(1, abs=1e-5)
        assert len(sem) == 2 and set(sem) <= set(SEM) and len(attr) == 2 and set(attr) <= set(ATTR)
    # the same weights behind the alias and the version; different images score differently
    out2 = same.predict(df.iloc[[0, 2]])
    assert np.allclose(out2["score"], ok["score"])
    assert not np.isclose(ok["score"].iloc[0], ok["score"].iloc[1])
    # bytes input (and base64 text, as JSON clients send it) gives the same score as the path
    import base64

    raw = files["ok0"].read_bytes()
    by = model.predict(pd.DataFrame({"image": [raw, base64.b64encode(raw).decode(), b"junk"]}))
    assert by["score"][0] == pytest.approx(ok["score"].iloc[0], abs=1e-5)
    assert by["score"][1] == pytest.approx(ok["score"].iloc[0], abs=1e-5)
    assert by["error"][2] is not None and np.isnan(by["score"][2])


def test_score_cli_csv_and_json(store, capsys):
    from stages import score

    uri, model_uri, tmp = store
    registry.register(model_uri, "cli", metrics={"val_srcc": 0.3}, dataset="demo", card=CARD, metric="val_srcc")
    files = write_images(tmp / "cli_imgs")
    (tmp / "cli_imgs" / "notes.txt").write_text("skip me")
    table = score.run(["--model", "models:/cli@champion", "--images", str(tmp / "cli_imgs"), "--out", str(tmp / "s.csv"),
                       "--tracking-uri", uri, "--batch-size", "2", "--top-k", "2"])
    assert "scored 3/5 images" in capsys.readouterr().out
    csv = pd.read_csv(tmp / "s.csv")
    assert list(csv.columns) == score.COLUMNS and len(csv) == 5  # notes.txt is not an image suffix
    bad = csv.set_index("path").loc[[str(files["text"]), str(files["truncated"])]]
    assert bad["error"].notna().all() and bad["score"].isna().all()
    good = csv[csv["error"].isna()]
    assert all(len(json.loads(d)) == 10 for d in good["distribution"])
    assert all(len(t.split("|")) == 2 for t in good["top_semantic"])

    score.run(["--model", "models:/cli/1", "--images", str(tmp / "cli_imgs"), "--out", str(tmp / "s.json"),
               "--tracking-uri", uri, "--all-files", "--no-progress"])
    rows = json.loads((tmp / "s.json").read_text())
    assert len(rows) == 6
    by_path = {r["path"]: r for r in rows}
    assert by_path[str(tmp / "cli_imgs" / "notes.txt")]["error"] and by_path[str(tmp / "cli_imgs" / "notes.txt")]["score"] is None
    assert by_path[str(files["ok1"])]["score"] == pytest.approx(float(csv.set_index("path").loc[str(files["ok1"]), "score"]), abs=1e-5)
    with pytest.raises(DataError, match="use .csv or .json"):
        score.run(["--model", "models:/cli/1", "--images", str(tmp / "cli_imgs"), "--out", str(tmp / "s.xlsx"), "--tracking-uri", uri])
