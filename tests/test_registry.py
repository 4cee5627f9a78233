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
    from pipelines.heads.build import head_from_arch

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
    mlflow.set_registry_uri(None)  # later modules' stages must not write into this store


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
    model = registry.load(f"models:/{name}@champion", path_root=tmp / "imgs")
    same = registry.load(f"models:/{name}/1", path_root=tmp / "imgs")
    paths = [str(files["ok0"]), str(files["text"]), "ok1.png", str(tmp / "imgs" / "missing.png"), "../mlflow.db", "/etc/hostname"]
    out = model.predict(pd.DataFrame({"path": paths}), params={"top_k": 2})  # "ok1.png": relative to the root
    assert out["score"].dtype == object and list(out["error"].isna()) == [True, False, True, False, False, False]
    assert "not a readable JPEG, PNG" in out["error"][1] and "12 bytes, starting 6e 6f 74" in out["error"][1]
    assert "no image file" in out["error"][3]
    assert out["error"][4] == out["error"][5] == "'path' must name a file under the serving path root."
    assert all(out["score"][i] is None and out["distribution"][i] is None for i in (1, 3, 4, 5))  # null, never NaN
    ok = out[out["error"].isna()]
    assert all(1 <= s <= 10 for s in ok["score"])
    for d, sem, attr in zip(ok["distribution"], ok["top_semantic"], ok["top_attribute"]):
        assert len(d) == 10 and sum(d) == pytest.approx(1, abs=1e-5)
        assert len(sem) == 2 and set(sem) <= set(SEM) and len(attr) == 2 and set(attr) <= set(ATTR)
    # the same weights behind the alias and the version; different images score differently
    out2 = same.predict(pd.DataFrame({"path": [paths[0], paths[2]]}))
    assert np.allclose(out2["score"].astype(float), ok["score"].astype(float))
    assert not np.isclose(ok["score"].iloc[0], ok["score"].iloc[1])
    # bytes input (and base64 text, as JSON clients send it) gives the same score as the path
    import base64

    raw = files["ok0"].read_bytes()
    by = registry.load(f"models:/{name}/1").predict(pd.DataFrame({"image": [raw, base64.b64encode(raw).decode(), b"junk", raw[:100]],
                                                                  "path": [None, None, None, str(files["ok0"])]}))
    assert by["score"][0] == pytest.approx(ok["score"].iloc[0], abs=1e-5)
    assert by["score"][1] == pytest.approx(ok["score"].iloc[0], abs=1e-5)
    assert by["score"][2] is None and "4 bytes" in by["error"][2]
    assert by["error"][3] == "cannot decode the PNG image (OSError: image file is truncated)."  # 'image' wins over 'path'
    # without a path root (the default when serving) paths are refused, naming the rule and the fix
    refused = registry.load(f"models:/{name}/1").predict(pd.DataFrame({"path": [paths[0]]}))
    assert refused["score"][0] is None and "'path' inputs are off" in refused["error"][0] and "IAA_SERVE_PATH_ROOT" in refused["error"][0]


def test_pickled_model_files_are_refused(store, tmp_path):
    """A model file (bundle, family state, checkpoint) holding a pickled object is not loaded, and
    neither is a registered pyfunc model that is a pickled Python object (not logged from code)."""
    from pipelines.io import load_torch
    from pipelines.tracking.scoring import ScoringModel

    uri, _, tmp = store
    build_bundle(tmp_path / "bundle.pt")
    bundle = load_torch(tmp_path / "bundle.pt")  # what make_bundle writes is plain data
    assert isinstance(bundle["tag_emb"], torch.Tensor) and bundle["precision"] == "fp32"
    torch.save({**bundle, "tag_emb": bundle["tag_emb"].numpy()}, tmp_path / "old.pt")  # a numpy array: pickled
    with pytest.raises(DataError, match=rf"{tmp_path / 'old.pt'}: holds a pickled Python object \(numpy"):
        load_torch(tmp_path / "old.pt")
    context = mlflow.pyfunc.PythonModelContext(artifacts={"bundle": str(tmp_path / "old.pt")}, model_config=None)
    with pytest.raises(DataError, match="old.pt: holds a pickled Python object"):
        ScoringModel().load_context(context)

    class Payload:  # what a hostile file would carry: unpickling it calls os.system
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"arch": {}, "model": Payload()}, tmp_path / "family.pt")
    with pytest.raises(DataError, match=r"family.pt: holds a pickled Python object \((posix|os)\.system\)"):
        ScoringModel().load_context(mlflow.pyfunc.PythonModelContext(artifacts={"family": str(tmp_path / "family.pt")}, model_config=None))
    assert not (tmp_path / "pwned").exists()

    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("reg").experiment_id):
        info = mlflow.pyfunc.log_model(name="pickled", python_model=ScoringModel(), artifacts={"bundle": str(tmp_path / "bundle.pt")})
    mlflow.register_model(info.model_uri, "pickled")
    with pytest.raises(DataError, match="models:/pickled/1: its pyfunc model is a pickled Python object"):
        registry.load("models:/pickled/1")


def test_registered_model_scores_with_the_pipeline_numerics(tmp_path):
    """The scorer embeds on the embed stage's precision path (int8 here) in its batches, so it
    gives the scores evaluate computes from the embedding cache; one image per request (other
    int8 activation scales) stays within the bound the README states."""
    from pipelines.embed.cache import read_image_embeddings, read_meta
    from pipelines.embed.clip import load_clip
    from pipelines.embed.encode import embed_images, read_text_embeddings, write_text_embeddings
    from pipelines.embed.encode import embed_texts
    from pipelines.metrics import dist_to_score
    from pipelines.semantics import TagMatcher
    from pipelines.tracking.scoring import ScoringModel
    from pipelines.heads.build import head_from_arch, predict_logits

    rng = np.random.default_rng(3)
    paths = []
    for i in range(24):  # smooth-ish random images of several sizes, PNG and JPEG
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((48 + 4 * (i % 5), 64 + 8 * (i % 3)), Image.BICUBIC)
        paths.append(tmp_path / f"im{i}.{'png' if i % 2 else 'jpg'}")
        im.save(paths[-1])
    clip = load_clip(TINY_CLIP, "none", seed=CARD["init_seed"])
    embed_images(clip, [(p.stem, str(p)) for p in paths], tmp_path / "cache", batch_size=64, num_workers=0,
                 precision="int8", progress=False)
    ids, emb = read_image_embeddings(tmp_path / "cache")
    precision = read_meta(tmp_path / "cache")["precision_used"]
    assert precision == "int8" and ids == [p.stem for p in paths]
    write_text_embeddings(tmp_path / "tags.parquet", SEM + ATTR, ["semantic"] * 4 + ["attribute"] * 3, embed_texts(clip, SEM + ATTR))
    tags, kinds, tag_emb = read_text_embeddings(tmp_path / "tags.parquet")
    arch = {"tm_in": len(tags), "n_levels": 10, "cr_spec": {"in_dim": clip.embed_dim, "hidden": 16, "dim": 8, "dropout": 0.0}, "head": HEAD}
    torch.manual_seed(1)
    head = head_from_arch(arch).eval()
    # what the evaluate stage computes from the cache (TM on the fly, the served model's TagMatcher)
    expected = dist_to_score(torch.softmax(torch.from_numpy(predict_logits(head, TagMatcher(tag_emb, kinds, 100.0), emb, emb)), 1).numpy())

    def scorer(precision: str) -> ScoringModel:
        make_bundle(tmp_path / f"{precision}.pt", head_state={"arch": arch, "model": head.state_dict()}, card=CARD, tags=tags,
                    kinds=kinds, tag_emb=tag_emb, logit_scale=100.0, precision=precision, batch_size=64)
        model = ScoringModel()
        model.load_context(mlflow.pyfunc.PythonModelContext(
            artifacts={"bundle": str(tmp_path / f"{precision}.pt"), "clip_config": TINY_CLIP}, model_config={"path_root": str(tmp_path)}))
        return model

    request = pd.DataFrame({"path": [p.name for p in paths]})
    int8 = scorer("int8")
    batched = int8.predict(None, request)["score"].to_numpy(float)
    np.testing.assert_allclose(batched, expected, rtol=0, atol=1e-6)  # the same batch: the same numbers
    single = np.array([int8.predict(None, request.iloc[[i]])["score"][0] for i in range(len(paths))])
    fp32 = scorer("fp32").predict(None, request)["score"].to_numpy(float)
    diff_single, diff_fp32 = np.abs(single - expected).max(), np.abs(fp32 - expected).max()
    print(f"max |score - pipeline|: int8 batched {np.abs(batched - expected).max():.2g}, int8 one per request "
          f"{diff_single:.2g}, fp32 {diff_fp32:.2g}")
    assert diff_single <= 0.01 and diff_fp32 <= 0.05


def test_score_cli_csv_and_json(store, capsys):
    from stages import score

    uri, model_uri, tmp = store
    registry.register(model_uri, "cli", metrics={"val_srcc": 0.3}, dataset="demo", card=CARD, metric="val_srcc")
    files = write_images(tmp / "cli_imgs")
    (tmp / "cli_imgs" / "notes.txt").write_text("skip me")
    table = score.run(["--model", "models:/cli@champion", "--images", str(tmp / "cli_imgs"), "--out", str(tmp / "s.csv"),
                       "--tracking-uri", uri, "--batch-size", "2", "--top-k", "2"])
    assert "scored 3/5 images" in capsys.readouterr().out
    assert table.set_index("path").loc[str(files["text"]), "score"] is None  # missing: None, never NaN
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
