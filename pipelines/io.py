"""Atomic file output and the error type for bad user input.

Every stage writes through these helpers so that a crash never leaves a half-written
file where DVC (or the next stage) would read it: data goes to a temporary file in the
same directory, and is renamed over the target only once it is complete.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """Bad input from the user: the message names the file and says how to fix it."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched. A process
    killed outright (SIGKILL, OOM) cannot clean up: the next write of the same path removes
    the temporary files that dead processes of this host left for it. The file gets the
    permissions the umask gives any new file (0644 under umask 022), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_OWNER}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:  # mkstemp makes the file owner-only (0600): give it the mode a plain open() would
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only for an instant)
    os.umask(mask)
    return mask


_OWNER = "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"


def _remove_orphans(path: Path) -> None:
    """Delete ``.<name>.<host>-<pid>.*.tmp`` files next to ``path`` whose process is gone."""
    prefix = f".{path.name}.{_OWNER}-"
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_parquet(path: str | os.PathLike, table: Any) -> None:
    """Write a ``pyarrow.Table`` (or a pandas DataFrame) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; run the stage that writes it (`dvc repro`).")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); delete it and rerun the stage.") from exc


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path``, atomically and byte-for-byte reproducible: saved through a
    file object, so the archive inside is not named after the (random) temporary file, and the
    same object gives the same bytes (DVC then sees an unchanged output as unchanged)."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_torch(path: str | os.PathLike) -> Any:
    """A ``torch.save`` file read with ``weights_only=True`` (onto the CPU): tensors, dicts,
    lists, tuples, strings, numbers and None only. A file that holds any other pickled object
    (a numpy array, a dataclass, a class instance) is refused with a DataError naming the file,
    since unpickling it could run code."""
    import pickle
    import re

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))
        what = f" ({found[1]})" if found else ""
        raise DataError(
            f"{path}: holds a pickled Python object{what}, not plain data (tensors, dicts, lists, strings, "
            "numbers), so it is not loaded: unpickling it could run code. Re-create the file with this "
            "pipeline (`dvc repro`), or use a file from a source you trust converted to plain data."
        ) from exc


def _json_default(obj: Any) -> Any:
    import dataclasses

    import numpy as np

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
