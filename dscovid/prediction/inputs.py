"""Which scans a prediction run reads (a folder of volumes, of DICOM series, or single files), and reading one.

A case is one 3D CT, named for the output files:

- ``case_0000.nii.gz`` (nnU-Net's channel suffix) → ``case``; other channels (``_0001``...) are not CT and are
  skipped with a warning;
- any other SimpleITK volume (``scan.mha``, ``scan.nrrd``, ...) → its name without the ending;
- a sub-folder holding DICOM files (one series; the longest if several) → the folder's name;
- a folder given directly that holds DICOM files and no volumes → one case named for that folder;
- a loose ``.dcm`` file next to volumes → its name without ``.dcm`` (a single DICOM slice is refused later as 2D).

:func:`select_part` picks one part of the cases for ``--num-parts K --part-id I``; :func:`load_case` reads one case,
checks that it is a plausible chest CT (:mod:`dscovid.io.plausibility`) and preprocesses it exactly as the training
data was.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dscovid.errors import DscovidError
from dscovid.io.dataset import CHANNEL_SUFFIX, is_safe_case_name
from dscovid.io.image_io import VOLUME_ENDINGS, Geometry, read_image, strip_ending
from dscovid.io.plausibility import Plausibility, check_plausibility, lung_volume_ml
from dscovid.plans.schema import Configuration
from dscovid.preprocessing.lung_mask import segment_lungs
from dscovid.preprocessing.preprocessor import preprocess_image

log = logging.getLogger(__name__)

_OTHER_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


@dataclass(frozen=True)
class CaseInput:
    """One scan to predict: ``name`` (the output file stem) and ``path`` (a volume file or a DICOM folder)."""

    name: str
    path: Path


def _is_volume(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_ENDINGS)


def _is_dicom_file(path: Path) -> bool:
    if not path.is_file() or path.name.startswith("."):
        return False
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    if path.suffix:  # named files of other kinds (.txt, .json, .csv) are not DICOM
        return False
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:132] == b"DICM"  # the DICOM preamble
    except OSError:
        return False


def _holds_dicom(folder: Path) -> bool:
    return any(_is_dicom_file(p) for p in folder.iterdir())


def _case_name_of_file(path: Path) -> str | None:
    """The case name of a volume file, or None for a non-CT channel (``_0001`` and up)."""
    stem = strip_ending(path)
    if stem.endswith(CHANNEL_SUFFIX):
        return stem[: -len(CHANNEL_SUFFIX)]
    match = _OTHER_CHANNEL.match(stem)
    if match and (path.parent / (match.group(1) + CHANNEL_SUFFIX + path.name[len(stem):])).exists():
        return None
    return stem


def discover_cases(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[CaseInput]:
    """The cases found in one input path (folder or file) or in a list of paths.

    Returns
    -------
    Cases sorted by name. Unsafe or duplicate names are not refused here but by the predictor, case by case
    (so that one bad name does not stop the others); an input that does not exist or holds nothing readable is an
    error.
    """
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    cases: list[CaseInput] = []
    for path in paths:
        cases.extend(_cases_of(path))
    if not cases:
        shown = ", ".join(str(p) for p in paths[:3])
        raise DscovidError(f"{shown}: no CT volume (.nii.gz, .nii, .mha, .nrrd, ...) or DICOM series found")
    return sorted(cases, key=lambda case: case.name)


def _cases_of(path: Path) -> Iterable[CaseInput]:
    if not path.exists():
        raise DscovidError(f"{path}: no such file or folder")
    if path.is_file():
        name = _case_name_of_file(path) if _is_volume(path) else strip_ending(path)
        return [CaseInput(name or strip_ending(path), path)]
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    volumes = [p for p in entries if _is_volume(p)]
    folders = [p for p in entries if p.is_dir() and _holds_dicom(p)]
    loose_dicom = [p for p in entries if _is_dicom_file(p) and not _is_volume(p)]
    if loose_dicom and not volumes and not folders:
        return [CaseInput(path.name, path)]  # the folder is itself one DICOM series
    cases = [CaseInput(folder.name, folder) for folder in folders]
    for file in volumes:
        name = _case_name_of_file(file)
        if name is None:
            log.warning("%s: skipped (not channel 0000: only the CT channel is used)", file)
            continue
        cases.append(CaseInput(name, file))
    cases.extend(CaseInput(strip_ending(file), file) for file in loose_dicom)
    return cases


def case_name_problems(cases: Sequence[CaseInput]) -> list[str | None]:
    """Per case (same order), why its name cannot be used for output files (unsafe, or taken by an earlier case)."""
    problems: list[str | None] = []
    seen: dict[str, Path] = {}
    for case in cases:
        if not is_safe_case_name(case.name):
            problems.append(f"{case.path}: case name {case.name!r} is not a safe file name")
        elif case.name in seen:
            problems.append(f"{case.path}: case name {case.name!r} is already used by {seen[case.name]}")
        else:
            problems.append(None)
            seen[case.name] = case.path
    return problems


def select_part(cases: Sequence, num_parts: int = 1, part_id: int = 0) -> list:
    """Part ``part_id`` of ``num_parts`` of ``cases`` (sorted by name): every ``num_parts``-th case from ``part_id`` on.

    As nnU-Net's ``-num_parts``/``-part_id``: K jobs given the same inputs and parts 0..K-1 predict every case once.
    """
    if num_parts < 1:
        raise DscovidError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise DscovidError(f"--part-id must be in 0..{num_parts - 1}, got {part_id}")
    return list(cases)[part_id::num_parts]


@dataclass
class LoadedCase:
    """A case read and preprocessed: the original scan and lung, and the arrays the networks need."""

    name: str
    path: Path
    image_hu: np.ndarray  # (Z, Y, X) original grid
    geometry: Geometry
    lung: np.ndarray  # (Z, Y, X) uint8, original grid
    image: np.ndarray  # (Z', Y', X') float32 preprocessed
    lung_preprocessed: np.ndarray  # (Z', Y', X') uint8
    region_preprocessed: np.ndarray  # (Z', Y', X') uint8, where the network looks: the lung plus its margin
    cls_image: np.ndarray  # (N, H, W) float32
    properties: dict
    timing_s: dict = field(default_factory=dict)
    plausibility: dict | None = None  # Plausibility.to_dict(), plus "accepted" when a refused scan was predicted


def _refuse_implausible(case: CaseInput, found: Plausibility, accept: bool) -> None:
    if found.refusals and not accept:
        raise DscovidError(f"{case.path}: implausible chest CT: {'; '.join(found.refusals)} "
                           f"(--accept-implausible predicts it anyway, flagged)")


def load_case(case: CaseInput, preprocessing: Configuration, accept_implausible: bool = False) -> LoadedCase:
    """Read one scan, check that it is a plausible chest CT and preprocess it as the training data was.

    Runs in a background worker. The geometry is checked before the lungs are segmented, the lung volume after;
    a scan the rule refuses fails here, unless ``accept_implausible`` (then it is predicted, its refusals kept in
    ``plausibility`` with ``accepted``).

    Raises
    ------
    DscovidError
        Unreadable file, 2D image, NaN, not Hounsfield units, implausible scan, no lung found.
    """
    start = time.perf_counter()
    image_hu, geometry = read_image(case.path)
    _refuse_implausible(case, check_plausibility(geometry), accept_implausible)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        lung = np.asarray(segment_lungs(image_hu, geometry.spacing_zyx_mm, geometry.direction), dtype=np.uint8)
    except DscovidError as error:  # the segmenter's message names no file
        raise DscovidError(f"{case.path}: {error}") from None
    if not lung.any():
        raise DscovidError(f"{case.path}: no lung found (is this a chest CT?)")
    found = check_plausibility(geometry, lung_volume_ml(lung, geometry))
    _refuse_implausible(case, found, accept_implausible)
    plausibility = found.to_dict()
    if found.refusals:
        plausibility["accepted"] = True
    arrays, properties = preprocess_image(image_hu, geometry, preprocessing, lung=lung, case_name=case.name)
    return LoadedCase(
        name=case.name,
        path=case.path,
        image_hu=image_hu,
        geometry=geometry,
        lung=lung,
        image=arrays["image"],
        lung_preprocessed=arrays["lung"],
        region_preprocessed=arrays["region"],
        cls_image=arrays["cls_image"],
        properties=properties,
        timing_s={"read": read_s, "preprocess": time.perf_counter() - start},
        plausibility=plausibility,
    )
