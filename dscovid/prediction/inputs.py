"""Reading one scan of a prediction run and preprocessing it exactly as the training data was (:func:`load_case`).

Which scans a run reads, and their case names, is :func:`dscovid.io.scans.find_scans`. :func:`select_part` picks one
part of them for ``--num-parts K --part-id I``; :func:`load_case` reads one case, checks that it is a plausible chest
CT (:mod:`dscovid.io.plausibility`) and preprocesses it exactly as the training data was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dscovid.errors import DscovidError
from dscovid.io.image_io import Geometry, read_image
from dscovid.io.plausibility import Plausibility, check_plausibility, lung_volume_ml
from dscovid.io.scans import Scan
from dscovid.plans.configuration import Configuration
from dscovid.preprocessing.lung import segment_lungs
from dscovid.preprocessing.preprocessor import preprocess_image


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


def _refuse_implausible(case: Scan, found: Plausibility, accept: bool) -> None:
    if found.refusals and not accept:
        raise DscovidError(f"{case.path}: implausible chest CT: {'; '.join(found.refusals)} "
                           f"(--accept-implausible predicts it anyway, flagged)")


def load_case(case: Scan, preprocessing: Configuration, accept_implausible: bool = False) -> LoadedCase:
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
