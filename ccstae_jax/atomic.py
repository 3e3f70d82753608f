"""Atomic file writes: a file appears under its final name complete, or not at all.

Every writer of the package (strain maps, exports, simulated scans, run files) writes to ``<name>.tmp-<pid>`` in the
same folder and renames it over ``<name>`` when done; a killed writer leaves only that temporary file, which
`remove_stale` deletes once its process is gone. The final file's mode follows the umask, like any new file.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

_SUFFIX = ".tmp-"


def temporary_name(path: str | os.PathLike) -> Path:
    """``<path>.tmp-<pid>``: where this process writes ``path`` before renaming it."""
    path = Path(path)
    return path.with_name(f"{path.name}{_SUFFIX}{os.getpid()}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replace_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; renamed over ``path`` when the block ends normally, deleted otherwise.

    Raises:
      OSError: the folder of ``path`` does not exist.
    """
    path = Path(path)
    directory = path.absolute().parent
    if not directory.is_dir():
        raise OSError(f"cannot write {path}: directory {directory} does not exist")
    tmp = temporary_name(path)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    with replace_atomically(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_stale(path: str | os.PathLike) -> None:
    """Deletes ``<path>.tmp-<pid>`` files left by killed writers whose process is gone (a live writer's is kept)."""
    path = Path(path)
    for tmp in path.absolute().parent.glob(path.name + _SUFFIX + "*"):
        pid = tmp.name.rsplit(_SUFFIX, 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # a live process (maybe another writer of the same name): leave it
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            tmp.unlink()
        except OSError:
            pass
