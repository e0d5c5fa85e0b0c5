"""Reading one scan of a prediction run and preprocessing it exactly as the training data was (:func:`load_case`).

Which scans a run reads, and their case names, is :func:`dscovid.io.scans.find_scans`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dscovid.io.image_io import Geometry, read_image
from dscovid.io.scans import Scan
from dscovid.plans.configuration import Configuration
from dscovid.preprocessing.lung import segment_lungs
from dscovid.preprocessing.preprocessor import preprocess_image


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


def load_case(case: Scan, preprocessing: Configuration) -> LoadedCase:
    """Read one scan and preprocess it exactly as the training data was (runs in a background worker).

    Raises
    ------
    DscovidError
        Unreadable file, 2D image, NaN, not Hounsfield units, no lung found.
    """
    start = time.perf_counter()
    image_hu, geometry = read_image(case.path)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    lung = np.asarray(segment_lungs(image_hu, geometry.spacing_zyx_mm, geometry.direction), dtype=np.uint8)
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
    )
