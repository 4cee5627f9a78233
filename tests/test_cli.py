"""The `iaa` command line and every stage's `--help`: one clear line and exit 2 on bad input,
nothing written; scores equal to `stages.score`'s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipelines import cli
from tests.test_registry import write_images
from tests.test_serve import register_served_model

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem not in ("__init__", "common", "training"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A registered tiny scoring model (`served@champion`, version 1) and a folder of images."""
    tmp = tmp_path_factory.mktemp("cli")
    uri = register_served_model(tmp)
    files = write_images(tmp / "imgs")
    return uri, tmp, files


# ---------------------------------------------------------------------------- help, without a store

@pytest.mark.parametrize("command", [[], ["score"], ["serve"], ["export"], ["models"], ["runs"]])
def test_every_subcommand_answers_help(capsys, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run_cli(capsys, *command, "--help")
    assert rc == 0 and out.startswith("usage: iaa")
    assert not list(tmp_path.iterdir())  # nothing written (no mlflow.db, no logs/)


def test_every_stage_answers_help_without_touching_outputs(tmp_path):
    """`python -m stages.X --help` prints the stage's help and exits 0 before it reads params.yaml or
    writes anything (it used to run the stage); an unknown argument is exit 2."""
    (tmp_path / "dvc.yaml").write_bytes((ROOT / "dvc.yaml").read_bytes())
    before = snapshot(tmp_path)
    script = (
        "import runpy, sys, json, pathlib\n"
        "codes = {}\n"
        "for arg in ('--help', '--no-such-flag'):\n"
        "  if arg != '--help': print('AFTER_HELP=' + json.dumps(sorted(map(str, pathlib.Path().rglob('*')))))\n"
        f"  for name in {STAGES!r}:\n"
        "        sys.argv = [f'stages/{name}.py', arg]\n"
        "        try:\n"
        "            runpy.run_module(f'stages.{name}', run_name='__main__', alter_sys=True)\n"
        "            codes[f'{name} {arg}'] = 'returned'\n"
        "        except SystemExit as e:\n"
        "            codes[f'{name} {arg}'] = e.code\n"
        "        except Exception as e:\n"
        "            codes[f'{name} {arg}'] = repr(e)\n"
        "print('CODES=' + json.dumps(codes))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("CODES="))
    codes = json.loads(line[len("CODES="):])
    assert {k: v for k, v in codes.items() if k.endswith("--help") and v != 0} == {}, proc.stderr[-3000:]
    assert {k: v for k, v in codes.items() if k.endswith("--no-such-flag") and v != 2} == {}, proc.stderr[-3000:]
    assert f"dvc repro head" in proc.stdout and "params.yaml keys: seed, head" in proc.stdout  # from dvc.yaml
    after_help = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("AFTER_HELP="))[len("AFTER_HELP="):])
    assert after_help == ["dvc.yaml"]  # --help wrote nothing: no outputs, no logs/, no mlruns/
    assert snapshot(tmp_path)["dvc.yaml"] == before["dvc.yaml"]


# ---------------------------------------------------------------------------- bad input: one line, exit 2

def test_bad_inputs_exit_2_with_one_line_and_write_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    existing = tmp_path / "scores.csv"
    existing.write_text("keep me\n")
    cases = {
        ("score", "models:/m@champion", "missing.jpg", "--out", "o.csv"): "INPUT missing.jpg: no such file",
        ("score", "models:/m@champion", "nomatch/*.jpg", "--out", "o.csv"): "matches no image file",
        ("score", "models:/m@champion", str(img), "--out", "scores.csv"): "--out scores.csv: exists; pass --overwrite",
        ("score", "models:/m@champion", str(img), "--out", "o.xlsx"): "unknown output type '.xlsx'",
        ("score", "not-a-uri", str(img), "--out", "o.csv"): "is not a registry URI",
        ("score", "models:/m@champion", str(img), "--out", "o.csv"): "--tracking-uri: not given",
        ("score", "models:/m@champion", str(img), "--out", "o.csv", "--device", "cuda"): "--device cuda",
        ("score", "models:/m@champion", str(img), "--out", "o.csv", "--tracking-uri", "sqlite:///nope/mlflow.db"): "no MLflow store at",
        ("models", "--tracking-uri", "sqlite:///nope.db"): "no MLflow store at",
        ("export", "models:/m@champion", "m.onnx"): "iaa export",
    }
    for argv, expected in cases.items():
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2, (argv, err)
        assert expected in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert existing.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "scores.csv"]  # no o.csv, no mlflow.db


def test_unreadable_input_is_named(capsys, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    img = tmp_path / "locked.png"
    img.write_bytes(b"x")
    img.chmod(0)
    rc, _, err = run_cli(capsys, "score", "models:/m@champion", str(img), "--out", str(tmp_path / "o.csv"))
    assert rc == 2 and "locked.png: not readable" in err


# ---------------------------------------------------------------------------- with a registered model

def test_score_file_folder_glob_csv(capsys, store, tmp_path):
    from stages import score

    uri, tmp, files = store
    ok = [files["ok0"], files["ok1"], files["ok2"]]
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": [os.path.relpath(ok[2], tmp_path)]}).to_csv(listing, index=False)  # relative to the CSV
    out = tmp_path / "s.parquet"
    rc, _, err = run_cli(capsys, "score", "models:/served@champion", str(ok[0]), str(tmp / "imgs" / "sub"),
                         str(tmp / "imgs" / "ok1.*"), str(listing), "--out", str(out), "--tracking-uri", uri,
                         "--batch-size", "2", "--no-progress")
    assert rc == 0, err
    assert "scored 3/4 images" in err  # the truncated PNG in sub/ gets an error row
    table = pd.read_parquet(out)
    assert [Path(p).name for p in table["path"]] == ["ok0.png", "truncated.png", "ok1.png", "ok2.png"]
    assert table["error"].notna().tolist() == [False, True, False, False]
    assert all(len(d) == 10 for d in table["distribution"][table["error"].isna()])
    # the same numbers as `python -m stages.score` on the folder
    ref = score.run(["--model", "models:/served/1", "--images", str(tmp / "imgs"), "--out", str(tmp_path / "ref.csv"),
                     "--tracking-uri", uri, "--no-progress"]).set_index("path")
    for path, s in zip(table["path"], table["score"]):
        name = Path(path).resolve()
        match = [v for p, v in ref["score"].items() if Path(p).resolve() == name]
        assert match and (s is None or match[0] is None or abs(s - match[0]) < 1e-5)
    # an existing output is refused, then replaced with --overwrite (JSON here)
    out_json = tmp_path / "one.json"
    out_json.write_text("[]")
    rc, _, err = run_cli(capsys, "score", "models:/served@champion", str(ok[0]), "--out", str(out_json), "--tracking-uri", uri)
    assert rc == 2 and "--overwrite" in err and out_json.read_text() == "[]"
    rc, _, err = run_cli(capsys, "score", "models:/served@champion", str(ok[0]), "--out", str(out_json), "--tracking-uri", uri,
                         "--overwrite", "--no-progress")
    rows = json.loads(out_json.read_text())
    assert rc == 0 and len(rows) == 1 and 1 <= rows[0]["score"] <= 10 and rows[0]["error"] is None


def test_score_refuses_unknown_model_and_unscorable_image(capsys, store, tmp_path):
    uri, tmp, files = store
    rc, _, err = run_cli(capsys, "score", "models:/served@nosuch", str(files["ok0"]), "--out", str(tmp_path / "o.csv"),
                         "--tracking-uri", uri)
    assert rc == 2 and "models:/served@nosuch: not found" in err and "champion" in err
    rc, _, err = run_cli(capsys, "score", "models:/served@champion", str(files["text"]), "--out", str(tmp_path / "o.csv"),
                         "--tracking-uri", uri, "--no-progress")
    assert rc == 2 and "broken.jpg: cannot be scored" in err and "Nothing written" in err
    assert not (tmp_path / "o.csv").exists()


def test_serve_dry_run_names_the_store_and_safety_variables(capsys, store, tmp_path):
    uri, tmp, _ = store
    rc, out, err = run_cli(capsys, "serve", "models:/served@champion", "--tracking-uri", uri, "--path-root", str(tmp / "imgs"),
                           "--max-rows", "10", "--port", "5123", "--dry-run")
    assert rc == 0, err
    assert f"MLFLOW_TRACKING_URI={uri}" in out and "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false" in out
    assert f"IAA_SERVE_PATH_ROOT={tmp / 'imgs'}" in out and "IAA_SERVE_MAX_ROWS=10" in out
    assert "models serve -m models:/served@champion --env-manager local -h 127.0.0.1 -p 5123" in out
    rc, _, err = run_cli(capsys, "serve", "models:/served@challenger", "--tracking-uri", uri, "--dry-run")
    assert rc == 2 and "not found" in err


def test_models_and_runs_list_the_registry(capsys, store):
    uri, _, _ = store
    rc, out, err = run_cli(capsys, "models", "--tracking-uri", uri, "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert rows[0]["model"] == "models:/served/1" and rows[0]["aliases"] == "champion" and rows[0]["val_srcc"] == "0.2"
    rc, out, _ = run_cli(capsys, "models", "served", "--tracking-uri", uri)
    assert rc == 0 and "models:/served/1" in out.splitlines()[1]
    rc, _, err = run_cli(capsys, "models", "other", "--tracking-uri", uri)
    assert rc == 2 and "NAME other" in err
    rc, out, _ = run_cli(capsys, "runs", "--tracking-uri", uri, "--json")
    assert rc == 0 and len(json.loads(out)) == 1 and json.loads(out)[0]["status"] == "FINISHED"


def test_console_script_is_declared():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["iaa"] == "pipelines.cli:main"
