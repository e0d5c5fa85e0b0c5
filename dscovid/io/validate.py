"""Check a raw dataset completely before any work starts, listing every problem (not only the first)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dscovid.errors import DscovidError
from dscovid.io.dataset import CHANNEL_SUFFIX, RawDataset, case_entry_problem, is_safe_case_name, load_raw_dataset
from dscovid.io.image_io import VOLUME_ENDINGS, Geometry, check_hounsfield, read_image, read_sitk
from dscovid.parallel import map_cases

log = logging.getLogger(__name__)

_REQUIRED_KEYS = ("channel_names", "labels", "file_ending", "numTraining", "classes", "cases")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_meta(dataset: RawDataset) -> list[str]:
    """Every value of dataset.json, type first (a list where a name belongs must not crash a later stage)."""
    meta = dataset.meta
    where = dataset.root / "dataset.json"
    problems = [f"{where}: missing key {key!r}" for key in _REQUIRED_KEYS if key not in meta]
    if problems:
        return problems
    for key in ("name", "description", "licence", "reference", "release"):
        if key in meta and not isinstance(meta[key], str):
            problems.append(f"{where}: {key} must be a string, found {type(meta[key]).__name__}")
    channels = meta["channel_names"]
    if not (isinstance(channels, dict) and channels == {"0": "CT"} and all(isinstance(v, str) for v in channels.values())):
        problems.append(f"{where}: channel_names must be {{\"0\": \"CT\"}} (one CT channel), found {channels!r}")
    labels = meta["labels"]
    if not (isinstance(labels, dict) and labels == {"background": 0, "lesion": 1} and all(map(_is_int, labels.values()))):
        problems.append(f"{where}: labels must be {{\"background\": 0, \"lesion\": 1}}, found {labels!r}")
    ending = meta["file_ending"]
    if not isinstance(ending, str) or ending.lower() not in VOLUME_ENDINGS:
        problems.append(f"{where}: file_ending must be one of {', '.join(VOLUME_ENDINGS)}, found {ending!r}")
    classes = meta["classes"]
    if not (isinstance(classes, dict) and len(classes) >= 2 and all(map(_is_int, classes.values()))
            and sorted(classes.values()) == list(range(len(classes))) and all(key.strip() for key in classes)):
        problems.append(f"{where}: classes must map at least two names to consecutive indices 0..K-1, found {classes!r}")
        classes = {}
    unit = meta.get("intensity_unit", "HU")
    if not isinstance(unit, str) or unit not in ("HU", "not_HU"):
        problems.append(f"{where}: intensity_unit must be \"HU\" or \"not_HU\", found {unit!r}")
    cases = meta["cases"]
    if not isinstance(cases, dict):
        return problems + [f"{where}: cases must be an object mapping case names to entries, found {type(cases).__name__}"]
    if not _is_int(meta["numTraining"]):
        problems.append(f"{where}: numTraining must be a whole number, found {meta['numTraining']!r}")
    elif meta["numTraining"] != len(cases):
        problems.append(f"{where}: numTraining is {meta['numTraining']} but {len(cases)} cases are listed")
    for name, entry in cases.items():
        problem = case_entry_problem(name, entry, classes) if classes else None
        if problem is not None:
            problems.append(problem)
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
    if any("missing key" in p or "file_ending must" in p or "cases must" in p or "classes must" in p for p in problems):
        return problems  # the files cannot be looked for
    problems += _check_files_listed(dataset)
    classes = dataset.meta["classes"]
    jobs = []
    for name, entry in sorted(dataset.meta["cases"].items()):
        if case_entry_problem(name, entry, classes) is not None:
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
