"""Check a raw dataset completely before any work starts, listing every problem (not only the first)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dscovid.errors import DscovidError
from dscovid.io.dataset import CHANNEL_SUFFIX, RawDataset, is_safe_case_name, load_raw_dataset
from dscovid.io.image_io import Geometry, check_hounsfield, read_image, read_sitk
from dscovid.parallel import map_cases

log = logging.getLogger(__name__)

_REQUIRED_KEYS = ("channel_names", "labels", "file_ending", "numTraining", "classes", "cases")


def _check_meta(dataset: RawDataset) -> list[str]:
    meta = dataset.meta
    where = dataset.root / "dataset.json"
    problems = [f"{where}: missing key {key!r}" for key in _REQUIRED_KEYS if key not in meta]
    if problems:
        return problems
    if meta["channel_names"] != {"0": "CT"}:
        problems.append(f"{where}: channel_names must be {{\"0\": \"CT\"}} (one CT channel), found {meta['channel_names']}")
    if meta["labels"] != {"background": 0, "lesion": 1}:
        problems.append(f"{where}: labels must be {{\"background\": 0, \"lesion\": 1}}, found {meta['labels']}")
    classes = meta["classes"]
    if not isinstance(classes, dict) or sorted(classes.values()) != list(range(len(classes))) or len(classes) < 2:
        problems.append(f"{where}: classes must map names to consecutive indices 0..K-1, found {classes}")
    if meta.get("intensity_unit", "HU") not in ("HU", "not_HU"):
        problems.append(f"{where}: intensity_unit must be \"HU\" or \"not_HU\", found {meta['intensity_unit']!r}")
    cases = meta["cases"]
    if not isinstance(cases, dict):
        return problems + [f"{where}: cases must be an object mapping case names to entries"]
    if meta["numTraining"] != len(cases):
        problems.append(f"{where}: numTraining is {meta['numTraining']} but {len(cases)} cases are listed")
    for name, entry in cases.items():
        if not is_safe_case_name(name):
            problems.append(f"{name}: case name is not a safe file name (letters, digits, '_', '-', '.' only)")
            continue
        if not isinstance(entry, dict) or "class" not in entry:
            problems.append(f"{name}: dataset.json entry must be an object with a 'class'")
            continue
        if isinstance(classes, dict) and entry["class"] not in classes:
            problems.append(f"{name}: unknown class {entry['class']!r} (known: {', '.join(classes)})")
        if not isinstance(entry.get("lesion_annotated", True), bool):
            problems.append(f"{name}: lesion_annotated must be true or false")
    return problems


def _check_files_listed(dataset: RawDataset) -> list[str]:
    """Images and labels on disk that dataset.json does not list, and listed cases whose files are missing."""
    problems = []
    ending = dataset.file_ending
    listed = set(dataset.meta.get("cases", {}))
    images = dataset.root / "imagesTr"
    if not images.is_dir():
        return [f"{images}: folder missing"]
    suffix = CHANNEL_SUFFIX + ending
    on_disk = {p.name[: -len(suffix)] for p in images.iterdir() if p.name.endswith(suffix)}
    for name in sorted(on_disk - listed):
        problems.append(f"{name}: image {images / (name + suffix)} is not listed in dataset.json")
    for name in sorted(listed - on_disk):
        if is_safe_case_name(name):
            problems.append(f"{name}: image missing ({images / (name + suffix)})")
    others = [p.name for p in images.iterdir() if not p.name.startswith(".") and not p.name.endswith(suffix)]
    for other in sorted(others):
        problems.append(f"{other}: file in imagesTr does not end in {suffix} (one CT channel, nnU-Net naming)")
    return problems


def _check_case(args: tuple[str, str, bool, bool, str, str | None, str | None, float]) -> list[str]:
    """Read one case's files and compare their geometry (runs in a worker process)."""
    name, class_name, annotated, is_hu, image_path, label_path, lung_path, tolerance = args
    problems = []
    try:
        image, geometry = read_image(image_path, check_hu=False)
    except DscovidError as error:
        return [f"{name}: {error}"]
    if is_hu:
        try:
            check_hounsfield(image, image_path)
        except DscovidError as error:
            problems.append(f"{name}: {error}")
    for kind, path in (("label", label_path), ("lung mask", lung_path)):
        if path is None:
            continue
        try:
            mask_image = read_sitk(path)
        except DscovidError as error:
            problems.append(f"{name}: {error}")
            continue
        mask_geometry = Geometry.of(mask_image)
        if mask_image.GetDimension() != 3:
            problems.append(f"{name}: {kind} {path} is not a 3D image")
            continue
        if not geometry.matches(mask_geometry, tolerance_mm=tolerance):
            problems.append(f"{name}: {kind} geometry does not match the image ({geometry.describe_difference(mask_geometry)})")
            continue
        values = np.unique(sitk.GetArrayViewFromImage(mask_image))
        if not np.isin(values, (0, 1)).all():
            problems.append(f"{name}: {kind} values must be 0 or 1, found {', '.join(f'{v:g}' for v in values[:6])}")
        elif kind == "label" and class_name == "non_pneumonia" and values.max() > 0:
            problems.append(f"{name}: a non_pneumonia case has lesion voxels in its label")
    return problems


def verify_dataset(folder: str | os.PathLike, num_processes: int = 1, tolerance_mm: float = 1e-3,
                   progress: bool = False) -> list[str]:
    """Check a raw dataset and return every problem found, one line each starting with the case name.

    Checks: dataset.json keys and values, case names safe as file names, classes known, every listed
    case has its image (and nothing unlisted lies in imagesTr), images readable, 3D, finite and in HU
    (unless the dataset says ``intensity_unit: not_HU``), labels and lung masks on the image's grid
    (within ``tolerance_mm``) with values in {0, 1}, annotated cases have a label.

    Returns an empty list for a clean dataset.
    """
    try:
        dataset = load_raw_dataset(folder)
    except DscovidError as error:
        return [str(error)]
    problems = _check_meta(dataset)
    if any("missing key" in p for p in problems):
        return problems
    problems += _check_files_listed(dataset)
    classes = dataset.meta["classes"]
    jobs = []
    for name, entry in sorted(dataset.meta["cases"].items()):
        if not is_safe_case_name(name) or not isinstance(entry, dict) or entry.get("class") not in classes:
            continue
        image = dataset.image_path(name)
        if not image.exists():
            continue
        label, lung = dataset.label_path(name), dataset.lung_path(name)
        annotated = bool(entry.get("lesion_annotated", True))
        if annotated and not label.exists():
            problems.append(f"{name}: lesion_annotated is true but the label {label} is missing")
        jobs.append((name, entry["class"], annotated, dataset.is_hu, str(image),
                     str(label) if label.exists() else None, str(lung) if lung.exists() else None, tolerance_mm))
    for found in map_cases(_check_case, jobs, num_processes, desc="verifying", progress=progress):
        problems += found
    return problems


def require_valid_dataset(folder: str | os.PathLike, num_processes: int = 1) -> None:
    """Raise a :class:`DscovidError` summarising the problems of an invalid dataset (each is logged)."""
    problems = verify_dataset(folder, num_processes=num_processes)
    if problems:
        for problem in problems:
            log.error(problem)
        raise DscovidError(f"{Path(folder)}: dataset has {len(problems)} problem(s); run dscovid_verify_dataset to list them")
