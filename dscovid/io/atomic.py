"""Atomic writes: every file dscovid writes appears whole or not at all.

The content goes to a temporary name in the target's folder, which is renamed over the target only when the
writer finished; an interrupted run (kill -9 included) leaves at most a hidden temporary file, never a half
file under the real name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Mode of written files: what a plain ``open`` gives under the usual umask (mkstemp's 0600 would survive the rename).
FILE_MODE = 0o644


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error it is removed.

    ``suffix`` is the temporary name's ending, for writers that choose the format from it (``.png``, ``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(data: bytes, path: str | os.PathLike, sync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; ``sync`` flushes it to disk before the rename (checkpoints)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        stream.write(data)
        if sync:
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path)
