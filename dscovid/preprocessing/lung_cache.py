"""Lung masks computed once per case and shared by the fingerprint and the preprocessor.

A lung mask comes from the dataset's ``lungsTr`` when present (read, never cached), otherwise from
:func:`dscovid.preprocessing.lung.segment_lungs`, whose result is kept on the original grid in
``<preprocessed dataset>/lung_masks/<case>.npz`` (bit-packed, with the image file's :func:`~dscovid.io.stamps.file_stamp`
so that a changed image is segmented again).
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dscovid.errors import DscovidError
from dscovid.io import atomic
from dscovid.io.atomic import atomic_path, check_size, incomplete_write
from dscovid.io.dataset import Case, case_file
from dscovid.io.image_io import Geometry, read_mask
from dscovid.io.stamps import file_stamp

log = logging.getLogger(__name__)

LUNG_CACHE_FOLDER = "lung_masks"


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> Path:
    """``np.savez`` (uncompressed) through a temporary file in the same folder, checked, flushed and renamed.

    Raises
    ------
    DscovidError
        One line naming ``path`` when the write fails (``disk full`` ...) or the archive written is not whole.
    """
    path = Path(path)
    names = tuple(arrays)

    def verify(temporary: Path) -> None:
        problem = npz_problem(temporary, names)
        if problem is not None:
            raise incomplete_write(path, temporary, problem)

    with atomic_path(path, verify=verify) as temporary:
        with atomic.open_for_writing(temporary) as stream:  # through the module: the fault tests replace it
            np.savez(stream, **arrays)
            written = stream.tell()
        check_size(temporary, written, path)
    return path


def npz_problem(path: Path, names: Iterable[str] = (), size: int | None = None) -> str | None:
    """Why an ``.npz`` file is not whole, or None: its size (when known), its zip directory and its members.

    A file cut short loses the zip directory at its end, so this reads only the directory, not the arrays.
    """
    try:
        actual = path.stat().st_size
        if size is not None and actual != size:
            return f"{actual} bytes instead of the {size} written (truncated or replaced)"
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
    except FileNotFoundError:
        return "missing"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as error:
        return f"not a whole .npz archive ({error})"
    missing = [name for name in names if f"{name}.npy" not in members]
    if missing:
        return f"array(s) {', '.join(missing)} missing"
    end = max((info.header_offset + info.compress_size for info in members.values()), default=0)
    if end > actual:
        return f"truncated ({actual} of at least {end} bytes)"
    return None


def _cache_path(cache_dir: Path, case: str) -> Path:
    return case_file(cache_dir, case, ".npz")


def _read_cached(path: Path, stamp: dict, shape_zyx: tuple[int, ...]) -> np.ndarray | None:
    try:
        with np.load(path) as data:
            if json.loads(str(data["source"])) != stamp or tuple(data["shape_zyx"]) != tuple(shape_zyx):
                return None
            packed = data["packed"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
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

            try:
                lung = np.asarray(segment_lungs(image_hu, geometry.spacing_zyx_mm, geometry.direction), dtype=np.uint8)
            except DscovidError as error:  # the segmenter's message names no file: this case's line must
                raise DscovidError(f"{case.name}: {error} ({case.image})") from None
            if path is not None:
                save_npz_atomic(path, packed=np.packbits(lung.reshape(-1) != 0),
                                shape_zyx=np.asarray(geometry.shape_zyx), source=np.asarray(json.dumps(stamp)))
    if not lung.any():
        raise DscovidError(f"{case.name}: no lung found in {case.image} (is this a chest CT?)")
    return lung
