"""Helpers of the DICOM output tests: real series rewritten in tmp_path, the SR's content read back, dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dscovid.io.image_io import dicom_series_files

COVID_CT_MD = {"P002": "COVID-19 subjects/P002", "cap002": "Cap subjects/cap002",
               "normal001": "Normal subjects/normal001"}

#: dciodvfy warnings that may remain, by the start of their text, and why they are acceptable:
#: - dscovid's private coding scheme (PS3.16 §8 allows designators starting with 99; dciodvfy knows only the standard
#:   ones and flags each use as an unrecognised defined term);
#: - values the source series itself lacks (its anonymisation blanked study date, time and ID), which a derived object
#:   copies as the empty type 2 attributes they are; dciodvfy only notes that a DICOMDIR could not be indexed by them.
ACCEPTED_WARNINGS = (
    "Warning - Unrecognized defined term <99DSCOVID> for value 1 of attribute <Coding Scheme Designator>",
    "Warning - Missing attribute or value that would be needed to build DICOMDIR",
)


def copy_series(source: Path, target: Path, slices: slice) -> Path:
    """Part of a real series copied file by file, as it is (its identity included)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in dicom_series_files(source)[slices]:
        shutil.copy(path, target / path.name)
    return target


def series_folder(test_data: Path, name: str) -> Path:
    folder = test_data / "covid_ct_md" / COVID_CT_MD[name]
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    return folder


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3×3 rotation about world axis ``axis`` (0 x, 1 y, 2 z)."""
    angle = np.radians(degrees)
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


#: The same slices turned upside down (180° about the patient's left-right axis): the rows now run posterior to
#: anterior and the slice normal points to the feet, so the volume's z and y index axes are both reversed.
FLIPPED = rotation(0, 180.0)
#: An oblique series: 20° about the craniocaudal axis, then 12° about the left-right axis.
OBLIQUE = rotation(0, 12.0) @ rotation(2, 20.0)


def rewrite_series(source: Path, target: Path, turn: np.ndarray | None = None, slices: slice | None = None,
                   salt: str = "") -> Path:
    """A copy of a real series (pixel data untouched, still compressed) with a new identity and, optionally, turned.

    Every file gets valid UIDs (new SOP Instance, Series and Frame of Reference UIDs; the Study Instance UID is kept
    when it is a valid UID), so a series whose anonymisation blanked them can be referenced. ``turn`` rotates each
    slice's plane rigidly about the series' centre (orientation and positions); ``slices`` keeps part of the volume
    (in its slice order). Files are named in reverse slice order, so that the folder order is not the volume order.
    """
    with warnings.catch_warnings():  # pydicom warns when it parses the UUIDs some anonymisers put in UID fields
        warnings.simplefilter("ignore", UserWarning)
        _rewrite(source, target, turn, slices, salt)
    return target


def _rewrite(source: Path, target: Path, turn: np.ndarray | None, slices: slice | None, salt: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    files = dicom_series_files(source)[slices or slice(None)]
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    centre = np.mean([[float(v) for v in h.ImagePositionPatient] for h in headers], axis=0)
    study = str(headers[0].get("StudyInstanceUID", ""))
    study = study if study and pydicom.uid.UID(study).is_valid else generate_uid(entropy_srcs=[salt, str(source)])
    series = generate_uid(entropy_srcs=[salt, str(source), "series"])
    frame = generate_uid(entropy_srcs=[salt, str(source), "frame of reference"])
    for index, path in enumerate(files):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.FrameOfReferenceUID = study, series, frame
        dataset.SOPInstanceUID = generate_uid(entropy_srcs=[salt, str(path)])
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        if turn is not None:
            orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient]).reshape(2, 3)
            position = np.asarray([float(v) for v in dataset.ImagePositionPatient])
            dataset.ImageOrientationPatient = [f"{v:.10f}" for v in (turn @ orientation.T).T.ravel()]
            dataset.ImagePositionPatient = [f"{v:.6f}" for v in centre + turn @ (position - centre)]
            for keyword in ("SliceLocation", "ReferencedImageSequence", "SourceImageSequence"):
                if keyword in dataset:
                    delattr(dataset, keyword)  # would describe the old plane or point to instances not copied
        dataset.save_as(target / f"{len(files) - index:04d}.dcm", enforce_file_format=True)


# ----------------------------------------------------------------------------------------------- dciodvfy


def dciodvfy_findings(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's errors and its warnings that are not in :data:`ACCEPTED_WARNINGS` (skip without dciodvfy)."""
    program = shutil.which("dciodvfy")
    if program is None:
        pytest.skip("dciodvfy not found: install the Debian package dicom3tools (make test does, as root)")
    result = subprocess.run([program, str(path)], capture_output=True, text=True, timeout=300)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    unexpected = [line for line in lines if line.startswith("Warning") and not line.startswith(ACCEPTED_WARNINGS)]
    return errors, unexpected


# ----------------------------------------------------------------------------------------------- the SR read back


def _code(item) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodingSchemeDesignator), str(concept.CodeValue)


def _sites(item) -> tuple:
    """The finding site of a measurement as (location code, laterality code or None), or None."""
    for child in item.get("ContentSequence", []):
        if _code(child) == ("SCT", "363698007"):
            laterality = None
            for modifier in child.get("ContentSequence", []):
                if _code(modifier) == ("SCT", "272741003"):
                    laterality = str(modifier.ConceptCodeSequence[0].CodeValue)
            return str(child.ConceptCodeSequence[0].CodeValue), laterality
    return None


def measurement_groups(report: pydicom.Dataset) -> dict[int, dict]:
    """Per referenced SEG segment: its measurements ``{(scheme, code, site): (value, unit)}``, its qualitative
    evaluations ``{(scheme, code): value code}``, the referenced SEG instance, and its algorithm's texts."""
    groups = {}
    for container in report.ContentSequence:
        if _code(container) != ("DCM", "126010"):  # Imaging Measurements
            continue
        for group in container.ContentSequence:
            found = {"measurements": {}, "evaluations": {}, "algorithm": {}, "segment": None, "instance": None}
            for item in group.ContentSequence:
                if item.ValueType == "IMAGE" and _code(item) == ("DCM", "121191"):
                    reference = item.ReferencedSOPSequence[0]
                    found["segment"] = int(reference.ReferencedSegmentNumber)
                    found["instance"] = str(reference.ReferencedSOPInstanceUID)
                elif item.ValueType == "NUM":
                    value = float(item.MeasuredValueSequence[0].NumericValue)
                    unit = str(item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue)
                    found["measurements"][(*_code(item), _sites(item))] = (value, unit)
                elif item.ValueType == "CODE":
                    found["evaluations"][_code(item)] = str(item.ConceptCodeSequence[0].CodeValue)
                elif item.ValueType == "TEXT":
                    found["algorithm"].setdefault(_code(item), []).append(str(item.TextValue))
            groups[found["segment"]] = found
    return groups


def same_values(actual: Sequence[float], expected: Sequence[float]) -> bool:
    """Equal as DICOM decimal strings keep them (16 characters: about 1e-10 relative for these magnitudes)."""
    return bool(np.allclose(actual, expected, rtol=1e-9, atol=1e-9))
