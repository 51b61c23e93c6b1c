"""Atomic file writes: the one place mlpot writes a file that a kill must never leave half written."""

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Union

PathLike = Union[str, os.PathLike]
TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = TMP_SUFFIX) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temporary name starts with ``path``'s name and ends with ``suffix`` (``.tmp`` unless a writer
    insists on an ending of its own, e.g. ``.tmp.pt2`` for AOTInductor), so leftovers of a killed
    run are easy to find and clean.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a written result gets the usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def target_of(path: PathLike) -> str:
    """The file a temporary path of :func:`atomic_path` (``name.XXXXXXXX.tmp[.ext]``) is renamed onto; other paths
    unchanged (for error messages, which should name the user's file)."""
    return _TEMPORARY_NAME.sub("", str(path))


_TEMPORARY_NAME = re.compile(r"\.[A-Za-z0-9_]{8}\.tmp(\.\w+)?$")  # mkstemp's 8 random characters


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[Path], None], suffix: str = TMP_SUFFIX) -> Path:
    """Call ``write(tmp_path)``, then rename the result onto ``path``; returns ``path``."""
    with atomic_path(path, suffix) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: PathLike, data, indent: int = 2) -> Path:
    """Write ``data`` as JSON (UTF-8, trailing newline) to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def torch_save(obj, path: PathLike) -> Path:
    """``torch.save`` to ``path`` atomically.

    Serialised in memory first: torch's C++ file writer aborts the process (``terminate``) when a write
    fails, e.g. on a full disk, where a Python write raises ``OSError`` that mlpot reports in one line.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getvalue())
