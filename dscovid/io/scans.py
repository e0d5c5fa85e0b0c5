"""Which CT scans an input path holds: the one discovery behind ``dscovid_predict -i`` and ``dscovid_lung_mask -i``.

A scan is one 3D CT, with a case name for the output files:

- ``case_0000.nii.gz`` (nnU-Net's channel suffix) → ``case``; other channels (``case_0001``... beside a
  ``case_0000``) are not CT and are skipped with a warning;
- any other SimpleITK volume (``scan.mha``, ``scan.nrrd``, ...) → its name without the ending;
- a folder holding DICOM files (one series; the longest if several), at any depth below the input folder and
  through symbolic links (an archive laid out as links to its series) → the folder's name;
- a folder given directly that holds DICOM files and no volumes → one case named for that folder;
- a loose DICOM file next to volumes → its name without ``.dcm`` (a single DICOM slice is refused later as 2D).

Volumes are taken from the input folder itself, not from its sub-folders. Hidden files and folders are ignored.
Two scans with the same case name are both listed; :func:`case_name_problems` says which one cannot be written,
so that the caller fails that case alone.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dscovid.errors import DscovidError
from dscovid.io.dataset import CHANNEL_SUFFIX, is_safe_case_name
from dscovid.io.image_io import is_volume_file, strip_ending

log = logging.getLogger(__name__)

#: File endings that are DICOM without looking inside; any other file is DICOM when it carries the preamble.
DICOM_ENDINGS = (".dcm", ".dicom", ".ima")

_OTHER_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


@dataclass(frozen=True)
class Scan:
    """One scan: ``name`` (the case, the output file stem) and ``path`` (a volume file or a DICOM series folder)."""

    name: str
    path: Path


def is_dicom_file(path: Path) -> bool:
    """True for a visible file ending in ``.dcm``/``.dicom``/``.ima``, or holding the DICOM preamble (``DICM``)."""
    if path.name.startswith(".") or not path.is_file() or is_volume_file(path):
        return False
    if path.suffix.lower() in DICOM_ENDINGS:
        return True
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:132] == b"DICM"  # scanners often name slices by UID, with no ending
    except OSError:
        return False


def holds_dicom(folder: Path) -> bool:
    """True when ``folder`` itself (not a sub-folder) holds a DICOM file."""
    return any(is_dicom_file(entry) for entry in _visible(folder))


def find_scans(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Scan]:
    """The scans of one input path (a file or a folder) or of a list of paths, sorted by case name.

    Raises
    ------
    DscovidError
        When an input does not exist, or when none holds a volume or a DICOM series.
    """
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    scans = [scan for path in paths for scan in _scans_of(path)]
    if not scans:
        shown = ", ".join(str(p) for p in paths[:3])
        raise DscovidError(f"{shown}: no CT volume (.nii.gz, .nii, .mha, .nrrd, ...) or DICOM series found")
    return sorted(scans, key=lambda scan: scan.name)


def case_name_problems(scans: Sequence[Scan]) -> list[str | None]:
    """Per scan (same order), why its case name cannot be used for output files: unsafe, or taken by an earlier one."""
    problems: list[str | None] = []
    seen: dict[str, Path] = {}
    for scan in scans:
        if not is_safe_case_name(scan.name):
            problems.append(f"{scan.path}: case name {scan.name!r} is not a safe file name")
        elif scan.name in seen:
            problems.append(f"{scan.path}: case name {scan.name!r} is already used by {seen[scan.name]}")
        else:
            problems.append(None)
            seen[scan.name] = scan.path
    return problems


def _visible(folder: Path) -> list[Path]:
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))


def _scans_of(path: Path) -> list[Scan]:
    if not path.exists():
        raise DscovidError(f"{path}: no such file or folder")
    if path.is_file():
        return [Scan(_volume_case_name(path) or strip_ending(path), path)]
    entries = _visible(path)
    volumes = [entry for entry in entries if is_volume_file(entry)]
    loose_dicom = [entry for entry in entries if is_dicom_file(entry)]
    series = list(_series_below(path))
    if loose_dicom and not volumes and not series:
        return [Scan(path.name, path)]  # the folder is itself one DICOM series
    scans = [Scan(folder.name, folder) for folder in series]
    for file in volumes:
        name = _volume_case_name(file)
        if name is None:
            log.warning("%s: skipped (not channel 0000: only the CT channel is used)", file)
            continue
        scans.append(Scan(name, file))
    scans.extend(Scan(strip_ending(file), file) for file in loose_dicom)
    return scans


def _series_below(root: Path) -> Iterable[Path]:
    """The folders under ``root`` (not ``root`` itself) that hold DICOM files, following symbolic links; a folder
    reached twice (two links, or a link back up the tree) is visited once."""
    seen = {root.resolve()}
    pending = [entry for entry in _visible(root) if entry.is_dir()]
    while pending:
        folder = pending.pop(0)
        real = folder.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = _visible(folder)
        except OSError as error:
            log.warning("%s: not searched for DICOM series (%s)", folder, error.strerror or error)
            continue
        if any(is_dicom_file(entry) for entry in entries):
            yield folder
        pending.extend(entry for entry in entries if entry.is_dir())


def _volume_case_name(path: Path) -> str | None:
    """The case name of a volume file, or None for a non-CT channel (``_0001`` and up beside a ``_0000``)."""
    if not is_volume_file(path):
        return None
    stem = strip_ending(path)
    if stem.endswith(CHANNEL_SUFFIX):
        return stem[: -len(CHANNEL_SUFFIX)]
    match = _OTHER_CHANNEL.match(stem)
    if match and (path.parent / (match.group(1) + CHANNEL_SUFFIX + path.name[len(stem):])).exists():
        return None
    return stem
