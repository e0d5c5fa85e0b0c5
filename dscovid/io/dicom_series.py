"""The DICOM identity of a source series: what a DICOM-SEG and a structured report must reference.

:func:`read_source_series` reads the headers (no pixel data) of the series :func:`dscovid.io.image_io.read_image`
reads from a folder, in the order of the volume's slices (file ``k`` is array index ``[k]``), and checks that the
series can be referenced at all: every file has its own SOP Instance UID, the series shares one Study Instance UID,
Series Instance UID and Frame of Reference UID, all valid DICOM UIDs, and each file's position and orientation are
where the volume puts slice ``k``. Anonymisation tools that blank UIDs (or replace them by UUID strings, which are
not DICOM UIDs) leave series that no DICOM object can point to; they are refused here, in one line, rather than
referenced by UIDs that do not exist.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from dscovid.errors import DscovidError
from dscovid.io.image_io import Geometry, dicom_series_files

log = logging.getLogger(__name__)

#: Type 2 attributes of the Patient and General Study modules: a derived object must carry them, empty if unknown.
#: Anonymised series often drop them; the in-memory headers get them back empty so the SEG and SR stay valid.
_TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclass(frozen=True)
class SourceSeries:
    """The headers of one DICOM series, in the volume's slice order.

    Attributes
    ----------
    folder : the folder it was read from.
    files : the files, file ``k`` holding slice ``k`` (array index ``[k]`` of the (z, y, x) volume).
    headers : their datasets without pixel data (same order), type 2 patient/study attributes completed.
    """

    folder: Path
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...]

    @property
    def sop_instance_uids(self) -> list[str]:
        """The SOP Instance UID of each slice, in volume order."""
        return [str(header.SOPInstanceUID) for header in self.headers]

    @property
    def study_instance_uid(self) -> str:
        return str(self.headers[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.headers[0].FrameOfReferenceUID)


def _is_uid(value: object) -> bool:
    return bool(value) and UID(str(value)).is_valid


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as error:
        raise DscovidError(f"{path}: cannot read the DICOM header ({error})") from None


def identity_problems(headers: Sequence[Dataset], files: Sequence[Path]) -> list[str]:
    """Why a series cannot be referenced by UIDs: empty, invalid, repeated or inconsistent identifiers."""
    problems = []
    sop = [str(h.get("SOPInstanceUID", "") or "") for h in headers]
    missing = [f for f, uid in zip(files, sop) if not uid]
    invalid = [f for f, uid in zip(files, sop) if uid and not _is_uid(uid)]
    if missing:
        problems.append(f"SOP Instance UID empty in {len(missing)} of {len(files)} files (first {missing[0].name})")
    if invalid:
        problems.append(f"SOP Instance UID is not a DICOM UID in {len(invalid)} files (first {invalid[0].name})")
    if not missing and len(set(sop)) != len(sop):
        problems.append(f"{len(sop) - len(set(sop))} files repeat another file's SOP Instance UID")
    for keyword, name in (("StudyInstanceUID", "Study Instance UID"), ("SeriesInstanceUID", "Series Instance UID"),
                          ("FrameOfReferenceUID", "Frame of Reference UID")):
        values = {str(h.get(keyword, "") or "") for h in headers}
        if len(values) > 1:
            problems.append(f"{name} differs between files")
        elif not (value := values.pop()):
            problems.append(f"{name} empty")
        elif not _is_uid(value):
            problems.append(f"{name} {value!r} is not a DICOM UID")
    return problems


def _geometry_problem(headers: Sequence[Dataset], files: Sequence[Path], geometry: Geometry) -> str | None:
    """Why slice ``k`` of ``geometry`` is not file ``k``'s plane (None when every file sits where the volume says)."""
    if len(headers) != geometry.shape_zyx[0]:
        return f"{len(headers)} files for a volume of {geometry.shape_zyx[0]} slices"
    matrix = geometry.index_to_world_matrix()
    columns = geometry.direction_matrix  # columns: world directions of the x, y, z index axes
    spacing_z, spacing_y, spacing_x = geometry.spacing_zyx_mm
    for k, (header, path) in enumerate(zip(headers, files)):
        try:
            rows, cols = int(header.Rows), int(header.Columns)
            orientation = np.asarray([float(v) for v in header.ImageOrientationPatient])
            position = np.asarray([float(v) for v in header.ImagePositionPatient])
        except (AttributeError, TypeError, ValueError):
            return f"{path.name} lacks Rows, Columns, Image Orientation or Image Position (Patient)"
        if (rows, cols) != tuple(geometry.shape_zyx[1:]):
            return f"{path.name} is {rows}x{cols} pixels, the volume {geometry.shape_zyx[1]}x{geometry.shape_zyx[2]}"
        if not np.allclose(orientation, np.concatenate([columns[:, 0], columns[:, 1]]), atol=1e-3):
            return f"{path.name} has another orientation than the volume"
        offset = position - (matrix @ np.array([k, 0.0, 0.0, 1.0]))[:3]
        # Half a voxel along each axis: a file that far off is another slice (or a gantry tilt ITK straightened).
        along = np.abs(columns.T @ offset)
        if (along > 0.5 * np.array([spacing_x, spacing_y, spacing_z])).any():
            return (f"{path.name} lies {float(np.linalg.norm(offset)):.2f} mm from slice {k} of the volume "
                    f"(uneven slices or a gantry tilt)")
    return None


def read_source_series(folder: str | os.PathLike, geometry: Geometry | None = None) -> SourceSeries:
    """Read the headers of the DICOM series in ``folder`` in volume order and check they can be referenced.

    Parameters
    ----------
    folder : the series folder (as given to :func:`dscovid.io.image_io.read_image`).
    geometry : the volume read from it; when given, each file's plane must be slice ``k`` of it (same size,
        orientation within 1e-3, position within half a voxel).

    Raises
    ------
    DscovidError
        One line naming the folder: unreadable headers, identifiers that cannot be referenced (empty, not DICOM
        UIDs, repeated, differing between files), or files that do not match the volume's slices.
    """
    folder = Path(folder)
    files = dicom_series_files(folder)
    with warnings.catch_warnings():  # pydicom warns about invalid UIDs as it parses them: reported below, in one line
        warnings.simplefilter("ignore", UserWarning)
        headers = [_read_header(path) for path in files]
        problems = identity_problems(headers, files)
    if problems:
        raise DscovidError(f"{folder}: the DICOM series cannot be referenced by a DICOM object: {'; '.join(problems)}")
    if geometry is not None and (problem := _geometry_problem(headers, files, geometry)):
        raise DscovidError(f"{folder}: {problem}")
    for header in headers:  # the headers in memory only: the user's files are never written
        for keyword in _TYPE2_PATIENT_STUDY:
            if keyword not in header:
                setattr(header, keyword, "")
    return SourceSeries(folder=folder, files=tuple(files), headers=tuple(headers))
