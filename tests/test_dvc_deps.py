"""dvc.yaml's code deps against the stages' imports (tools/dvc_deps.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import pytest

from pipelines.io import DataError
from tools.dvc_deps import FIX, analyse, closure, format_report, main

ROOT = Path(__file__).resolve().parents[1]


def test_repo_dvc_yaml_declares_every_imported_file():
    """Each stage's code deps are exactly the files its module imports: a file left out
    would let `dvc repro` skip a stage whose code changed (stale committed metrics)."""
    _, reports = analyse(ROOT)
    assert {r.stage for r in reports} >= {"prepare", "embed", "pretrain", "head", "evaluate"}
    bad = [r for r in reports if not r.ok]
    assert not bad, f"dvc.yaml's code deps differ from the stages' imports:\n{format_report(reports)}\nfix: {FIX}"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(text))


DVC_YAML = """\
# a comment that must survive
stages:
  run:
    cmd: python -m stages.run
    # inputs
    deps: [stages/run.py, pipelines/a.py, data/in.csv, "${data.images}", scripts/helper.py, pipelines/old.py]
    params: [seed]
    outs: [out.txt]
  other:
    cmd: echo not python
    deps: [data/in.csv]
"""


@pytest.fixture
def tree(tmp_path):
    _write(tmp_path, {
        "stages/__init__.py": "",
        # the first-party import is inside a function, behind a third-party one
        "stages/run.py": """\
            import json

            def main():
                from pipelines import a
                return a.f()
            """,
        "pipelines/__init__.py": "",
        "pipelines/a.py": """\
            def f():
                try:
                    import pipelines.sub.b as b
                except ImportError:
                    return None
                return b.g()
            """,
        "pipelines/sub/__init__.py": "",
        "pipelines/sub/b.py": "from .c import h\nfrom .. import a\n",
        "pipelines/sub/c.py": "import numpy\nh = 1\n",
        "pipelines/old.py": "",  # declared, never imported
        "pipelines/unused.py": "import pipelines.a\n",  # imports the closure, is not in it
        "dvc.yaml": DVC_YAML,
    })
    return tmp_path


def test_closure_follows_function_level_and_relative_imports(tree):
    assert closure(tree, "stages.run") == [
        "pipelines/__init__.py", "pipelines/a.py", "pipelines/sub/__init__.py", "pipelines/sub/b.py",
        "pipelines/sub/c.py", "stages/__init__.py", "stages/run.py",
    ]


def test_check_reports_missing_and_extra(tree, capsys):
    _, reports = analyse(tree)
    assert [r.stage for r in reports] == ["run"]  # `echo` runs no module of ours: left alone
    (run,) = reports
    assert run.missing == ["stages/__init__.py", "pipelines/__init__.py", "pipelines/sub/__init__.py",
                           "pipelines/sub/b.py", "pipelines/sub/c.py"]
    assert run.extra == ["pipelines/old.py"]
    assert main(["--check", "--root", str(tree)]) == 1
    out = capsys.readouterr().out
    assert "missing: pipelines/sub/b.py" in out and "extra:   pipelines/old.py" in out and FIX in out


def test_write_fixes_keeps_the_rest_and_is_idempotent(tree):
    assert main(["--write", "--root", str(tree)]) == 0
    text = (tree / "dvc.yaml").read_text()
    assert main(["--check", "--root", str(tree)]) == 0
    # other deps (data, templated, a script outside the packages) keep their order, after the
    # code deps; comments and other stages stay
    deps = ["stages/run.py", "stages/__init__.py", "pipelines/__init__.py", "pipelines/a.py", "pipelines/sub/__init__.py",
            "pipelines/sub/b.py", "pipelines/sub/c.py", "data/in.csv", '"${data.images}"', "scripts/helper.py"]
    assert "    deps:\n" + "".join(f"      - {d}\n" for d in deps) + "    params: [seed]\n" in text
    assert "# a comment that must survive" in text and "    # inputs\n" in text
    assert "  other:\n    cmd: echo not python\n    deps: [data/in.csv]\n" in text
    assert main(["--write", "--root", str(tree)]) == 0
    assert (tree / "dvc.yaml").read_text() == text  # a second run changes nothing

    # a new function-level import makes the check fail again, and --write adds it
    (tree / "pipelines/sub/c.py").write_text("def k():\n    from pipelines import unused\n")
    assert main(["--check", "--root", str(tree)]) == 1
    main(["--write", "--root", str(tree)])
    assert "pipelines/unused.py" in (tree / "dvc.yaml").read_text()


def test_written_dvc_yaml_is_read_by_dvc(tree):
    main(["--write", "--root", str(tree)])
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tree, check=True)
    (tree / "params.yaml").write_text("seed: 0\ndata:\n  images: data/images\n")
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list"], cwd=tree, capture_output=True, text=True)
    assert listed.returncode == 0 and "run" in listed.stdout and "other" in listed.stdout, listed.stderr


def test_bad_input_names_the_stage(tree):
    (tree / "dvc.yaml").write_text(DVC_YAML.replace("stages.run", "stages.gone"))
    with pytest.raises(DataError, match=r"stage 'run'.*stages\.gone.*stages/gone\.py"):
        analyse(tree)
    (tree / "pipelines/sub/c.py").write_text("def broken(:\n")
    (tree / "dvc.yaml").write_text(DVC_YAML)
    with pytest.raises(DataError, match=r"pipelines/sub/c\.py: cannot parse"):
        analyse(tree)
