"""Staleness: whether an output still matches what it was made from.

One mechanism for every step that skips work already done (a converted case, a preprocessed case, a cached lung
mask, the fingerprint, the demo's stages): the output records the :func:`file_stamp` of each source file and the
:func:`digest` of the settings it was made with, and is made again when either differs; an output made from
another output of the same run is stale when older than it (:func:`is_older`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def file_stamp(path: str | os.PathLike) -> dict:
    """Name, size (bytes) and modification time (ns) of a file; a file that is replaced or edited changes it.

    For a folder (a DICOM series): the total size and the newest time of the files below it, and their number.
    A missing path gets ``{"name": ..., "missing": True}``.
    """
    path = Path(path)
    if path.is_dir():
        stats = [p.stat() for p in path.rglob("*") if p.is_file()]
        return {"name": path.name, "size": int(sum(s.st_size for s in stats)),
                "mtime_ns": int(max((s.st_mtime_ns for s in stats), default=0)), "files": len(stats)}
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {"name": path.name, "missing": True}
    return {"name": path.name, "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


def digest(payload: object) -> str:
    """A short hash (16 hex digits) of a JSON-able ``payload``, independent of its dictionaries' key order."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def is_older(path: str | os.PathLike, *sources: str | os.PathLike) -> bool:
    """True when ``path`` is missing or was written before any of ``sources`` (which must exist)."""
    path = Path(path)
    if not path.is_file():
        return True
    written = path.stat().st_mtime_ns
    return any(written < Path(source).stat().st_mtime_ns for source in sources)
