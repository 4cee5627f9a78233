"""dvc.yaml's code deps, computed from the imports.

Each stage's command runs one module (``python -m stages.head``). The code that can change
what the stage writes is that module and every first-party module it imports, directly or
through others, at module level or inside a function: its *import closure*. This tool reads
the closure from the source with ``ast`` (nothing is imported or run), maps it to files (an
imported module's package ``__init__.py`` files run too, so they are in it), and compares it
with the code deps that dvc.yaml declares:

    python tools/dvc_deps.py --check   # print what each stage misses / has extra; exit 1 if any
    python tools/dvc_deps.py --write   # rewrite every stage's code deps to its closure
    python tools/dvc_deps.py --show    # print each stage's closure

Code deps are the ``.py`` files and folders under the first-party packages (``pipelines/``,
``stages/``); every other dep (data, config files, ``${...}``
templated paths) is left where it is, in its order. ``--write`` lists code deps one file
each: a folder dep would also rerun the stage when a module of that package that the stage
never imports changes, and a new import is caught by ``--check`` anyway. It is idempotent: a
stage whose code deps already equal its closure is not touched; a rewritten stage gets its
code deps first, one a line (its own module, then ``stages/``, then ``pipelines/``, sorted),
then its other deps as they were. dvc.yaml is edited with ruamel's round-trip mode, which keeps its
comments and layout, and written atomically.

Not seen: imports built at run time (``importlib.import_module(name)`` with a computed
name) and files a module reads that are not Python (none under ``pipelines/`` or ``stages/``
today). The tool is a developer check; the library never imports it.
"""

from __future__ import annotations

import argparse
import ast
import io
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

if __package__ in (None, ""):  # run as a script: the repository root holds pipelines/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.io import DataError, write_text  # noqa: E402

PACKAGES = ("pipelines", "stages")
FIX = "python tools/dvc_deps.py --write"


# ---------------------------------------------------------------- import closure


def module_file(root: Path, module: str) -> Path | None:
    """The file that defines ``module`` under ``root`` (a package: its ``__init__.py``)."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(root: Path, path: Path) -> str:
    """The dotted package that ``path`` belongs to (for relative imports)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    parts.pop()  # a package's "__init__", or a module's own name: its folder is the package
    return ".".join(parts)


def imported_modules(root: Path, path: Path) -> set[str]:
    """Every module name an ``import`` in ``path`` may load, at any depth of the tree
    (module level, functions, classes, ``try`` blocks), relative imports resolved.
    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a submodule);
    names that are not modules are dropped later, when no file matches them."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise DataError(f"{path}: cannot parse ({exc.msg}, line {exc.lineno}); fix the syntax error first") from exc
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(root, path).split(".") if _package_of(root, path) else []
                up = node.level - 1
                if up > len(package):
                    raise DataError(f"{path}:{node.lineno}: relative import goes above the top-level package")
                base_parts = package[: len(package) - up] if up else package
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base:
                found.add(base)
            found.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names if alias.name != "*")
    return found


def _with_parents(root: Path, module: str) -> list[Path]:
    """The files that importing ``module`` runs: each parent package's ``__init__.py``, then
    the module's own file (those that exist)."""
    parts = module.split(".")
    files = []
    for i in range(1, len(parts) + 1):
        f = module_file(root, ".".join(parts[:i]))
        if f is not None:
            files.append(f)
    return files


def closure(root: Path, module: str, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """The first-party files (repo-relative, sorted) that running ``python -m module`` imports."""
    root = root.resolve()
    start = module_file(root, module)
    if start is None:
        raise DataError(f"module {module!r} has no file under {root} (expected {module.replace('.', '/')}.py): "
                        "fix the stage's cmd or add the module")
    seen: set[Path] = set()
    todo = list(_with_parents(root, module))
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(root, path):
            if name.split(".")[0] not in packages:
                continue
            todo.extend(f for f in _with_parents(root, name) if f not in seen)
    return sorted(p.relative_to(root).as_posix() for p in seen)


# ---------------------------------------------------------------- dvc.yaml


def _yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # never wrap a line that was not wrapped
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def stage_module(cmd, stage: str) -> str | None:
    """The module a stage's command runs: ``python -m pkg.mod`` or ``python pkg/mod.py``;
    None for a command that runs no first-party Python module."""
    commands = cmd if isinstance(cmd, list) else [cmd]
    for command in commands:
        try:
            words = shlex.split(str(command))
        except ValueError as exc:
            raise DataError(f"dvc.yaml: stage {stage!r}: cannot split its cmd ({exc})") from exc
        for i, word in enumerate(words):
            if Path(word).name.startswith("python"):
                rest = words[i + 1:]
                if len(rest) >= 2 and rest[0] == "-m":
                    return rest[1]
                if rest and rest[0].endswith(".py"):
                    return rest[0][:-3].replace("/", ".")
    return None


def is_code_dep(dep: str, packages: tuple[str, ...] = PACKAGES) -> bool:
    """A dep this tool manages: a ``.py`` file or a folder under one of the packages. Any
    other dep (data, config, a script outside the packages, ``${...}``) is left alone."""
    if "${" in dep:
        return False
    dep = dep.rstrip("/")
    name = Path(dep).name
    return dep.split("/")[0] in packages and (name.endswith(".py") or "." not in name)


@dataclass
class StageReport:
    stage: str
    module: str | None
    declared: list[str]  # the code deps dvc.yaml lists
    wanted: list[str] = field(default_factory=list)  # the closure, in --write order
    missing: list[str] = field(default_factory=list)  # closure files no declared dep covers
    extra: list[str] = field(default_factory=list)  # declared code deps that are not closure files

    @property
    def ok(self) -> bool:
        return not self.missing and not self.extra


def _ordered(files: list[str], module: str) -> list[str]:
    own = module.replace(".", "/") + ".py"
    return sorted(files, key=lambda f: (f != own, f.split("/")[0] != "stages", f))


def analyse(root: Path, dvc_yaml: Path | None = None, packages: tuple[str, ...] = PACKAGES):
    """(the round-trip document, one StageReport per stage that runs a first-party module)."""
    root = Path(root)
    dvc_yaml = dvc_yaml or root / "dvc.yaml"
    try:
        doc = _yaml().load(dvc_yaml.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{dvc_yaml}: no such file; run from the repository root or pass --root") from exc
    stages = (doc or {}).get("stages") or {}
    reports = []
    for name, stage in stages.items():
        if not isinstance(stage, dict) or "cmd" not in stage:
            continue  # foreach/matrix stages: not handled (none in this project)
        module = stage_module(stage["cmd"], name)
        if module is None or module.split(".")[0] not in packages:
            continue
        deps = [str(d) for d in (stage.get("deps") or [])]
        declared = [d.rstrip("/") for d in deps if is_code_dep(d, packages)]
        try:
            files = closure(root, module, packages)
        except DataError as exc:
            raise DataError(f"dvc.yaml: stage {name!r}: {exc}") from exc
        report = StageReport(name, module, declared, wanted=_ordered(files, module))
        covered = set()
        for dep in declared:
            inside = [f for f in files if f == dep or f.startswith(dep + "/")]
            covered.update(inside)
            if dep not in files:  # a folder (imprecise: per-file deps) or a file the stage does not import
                report.extra.append(dep)
        report.missing = [f for f in report.wanted if f not in covered]
        reports.append(report)
    return doc, reports


def rewrite(doc, reports: list[StageReport], packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Set each stage's code deps to its closure in ``doc``; the names of the stages changed.
    A stage is left as it is when its code deps are already exactly its closure."""
    changed = []
    for report in reports:
        if set(report.declared) == set(report.wanted) and len(report.declared) == len(set(report.declared)):
            continue
        stage = doc["stages"][report.stage]
        deps = stage.get("deps")
        others = [d for d in (deps or []) if not is_code_dep(str(d), packages)]
        new = list(report.wanted) + others
        if deps is None:
            deps = CommentedSeq()
            stage["deps"] = deps
        del deps[:]
        deps.extend(new)
        deps.fa.set_block_style()  # one dep a line: lists of 10-50 files, and line-wise merges
        changed.append(report.stage)
    return changed


def dump(doc) -> str:
    buf = io.StringIO()
    _yaml().dump(doc, buf)
    return buf.getvalue()


def format_report(reports: list[StageReport]) -> str:
    lines = []
    for r in reports:
        if r.ok:
            continue
        lines.append(f"stage {r.stage!r} ({r.module}):")
        lines += [f"  missing: {f}" for f in r.missing]
        lines += [f"  extra:   {f}" + ("  (a folder: deps list files)" if not f.endswith(".py") else "  (not imported)")
                  for f in r.extra]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="report missing / extra code deps; exit 1 if any")
    mode.add_argument("--write", action="store_true", help="rewrite the code deps of every stage in dvc.yaml")
    mode.add_argument("--show", action="store_true", help="print each stage's import closure")
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    args = parser.parse_args(argv)
    dvc_yaml = args.root / "dvc.yaml"
    try:
        doc, reports = analyse(args.root, dvc_yaml)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.show:
        for r in reports:
            print(f"{r.stage} ({r.module}): {len(r.wanted)} files")
            print("".join(f"  {f}\n" for f in r.wanted), end="")
        return 0
    if args.check:
        bad = [r for r in reports if not r.ok]
        if bad:
            print(format_report(reports))
            print(f"\n{len(bad)} of {len(reports)} stages' code deps differ from their imports; fix: {FIX}")
            return 1
        print(f"dvc.yaml: the code deps of all {len(reports)} stages match their imports")
        return 0
    changed = rewrite(doc, reports)
    if changed:
        write_text(dvc_yaml, dump(doc))
        print(f"dvc.yaml: rewrote the code deps of {len(changed)} stages: {', '.join(changed)}")
    else:
        print("dvc.yaml: nothing to change")
    return 0


if __name__ == "__main__":
    sys.exit(main())
