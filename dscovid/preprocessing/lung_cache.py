"""Lung masks computed once per case and shared by the fingerprint and the preprocessor.

A lung mask comes from the dataset's ``lungsTr`` when present (read, never cached), otherwise from
:func:`dscovid.preprocessing.lung.segment_lungs`, whose result is kept on the original grid in
``<preprocessed dataset>/lung_masks/<case>.npz`` (bit-packed, with the image file's :func:`~dscovid.io.stamps.file_stamp`
so that a changed image is segmented again).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from dscovid.errors import DscovidError
from dscovid.io.atomic import atomic_path
from dscovid.io.dataset import Case
from dscovid.io.image_io import Geometry, read_mask
from dscovid.io.stamps import file_stamp

log = logging.getLogger(__name__)

LUNG_CACHE_FOLDER = "lung_masks"


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> Path:
    """``np.savez`` (uncompressed) through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        np.savez(stream, **arrays)
    return path


def _cache_path(cache_dir: Path, case: str) -> Path:
    return Path(cache_dir) / f"{case}.npz"


def _read_cached(path: Path, stamp: dict, shape_zyx: tuple[int, ...]) -> np.ndarray | None:
    try:
        with np.load(path) as data:
            if json.loads(str(data["source"])) != stamp or tuple(data["shape_zyx"]) != tuple(shape_zyx):
                return None
            packed = data["packed"]
    except (OSError, ValueError, KeyError, EOFError):
        return None  # a damaged cache entry is recomputed, never trusted
    count = int(np.prod(shape_zyx))
    return np.unpackbits(packed, count=count).reshape(shape_zyx)


def segment_and_cache(case: Case, image_hu: np.ndarray, geometry: Geometry, cache_dir: Path | None) -> np.ndarray:
    """The lung mask of ``case`` on its original grid: lungsTr, else the cache, else segment (and cache).

    Returns
    -------
    uint8 (z, y, x) 0/1 mask on ``geometry``'s grid.

    Raises
    ------
    DscovidError
        When no lung is found (for example a CT of the pelvis), naming the case.
    """
    if case.lung is not None:
        lung, _ = read_mask(case.lung, reference=geometry)
    else:
        stamp = file_stamp(case.image)
        path = _cache_path(cache_dir, case.name) if cache_dir is not None else None
        lung = _read_cached(path, stamp, geometry.shape_zyx) if path is not None and path.exists() else None
        if lung is None:
            from dscovid.preprocessing.lung import segment_lungs  # imported late: heavy, optional for lungsTr

            lung = np.asarray(segment_lungs(image_hu, geometry.spacing_zyx_mm, geometry.direction), dtype=np.uint8)
            if path is not None:
                save_npz_atomic(path, packed=np.packbits(lung.reshape(-1) != 0),
                                shape_zyx=np.asarray(geometry.shape_zyx), source=np.asarray(json.dumps(stamp)))
    if not lung.any():
        raise DscovidError(f"{case.name}: no lung found in {case.image} (is this a chest CT?)")
    return lung
