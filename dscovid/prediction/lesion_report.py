"""The per-case lesion report of ``predictions.json`` / ``predictions.csv`` (docs/formats.md §5).

The report is measured on the ORIGINAL grid (the written mask, the input's spacing), in physical units, with the
functions of :mod:`dscovid.measurements.findings`; a measurement that needs a lesion is NaN when there is none.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dscovid.io.image_io import Geometry
from dscovid.measurements.findings import (
    lesion_count,
    lesion_hu_mean_std,
    lesion_volume_ratio,
    lung_involvement,
    lung_sides,
    peripheral_lesion_ratio,
)
from dscovid.measurements.severity import ZONES, severity_score

#: Peripheral thickness σ (mm) of the reported peripheral lesion ratio (equation 1); the paper plots 0-35 mm.
DEFAULT_PERIPHERAL_THICKNESS_MM = 10.0

#: The report columns, in the order of the CSV (after case, predicted_class and the probabilities).
REPORT_KEYS = (
    "lesion_count",
    "lesion_volume_ml",
    "lung_volume_ml",
    "lesion_volume_ratio",
    "peripheral_lesion_ratio",
    "lesion_hu_mean",
    "lesion_hu_std",
    "left_lung_involvement",
    "right_lung_involvement",
    "severity_score",
    "mosmed_category",
    *(f"{zone}_zone_score" for zone in ZONES),
)


def lesion_report(
    image_hu: np.ndarray,
    lesion: np.ndarray,
    lung: np.ndarray,
    geometry: Geometry,
    peripheral_thickness_mm: float = DEFAULT_PERIPHERAL_THICKNESS_MM,
    box: tuple[slice, slice, slice] | None = None,
) -> dict:
    """The lesion measurements of one case on its original grid.

    Parameters
    ----------
    image_hu : (Z, Y, X) CT in HU.
    lesion, lung : (Z, Y, X) 0/1 masks on the same grid.
    geometry : the grid (spacing for volumes and the peripheral erosion, direction for left and right).
    peripheral_thickness_mm : σ of the peripheral lesion ratio.
    box : a box of the grid outside which both masks are empty (the prediction's crop box): every measurement runs
        on it alone, with the same result as on the whole grid. Default: the masks' own bounding box.

    Returns
    -------
    dict with the :data:`REPORT_KEYS` but the zone scores: volumes in ml (lung volume of lung ∪ lesion), ratios in
    [0, 1], HU mean and standard deviation of the lesion voxels; NaN where a measurement needs a lesion and there is
    none; the six-zone ``severity_score`` (0-24), the ``mosmed_category`` (``CT-0`` ... ``CT-4``) and the zones in
    ``severity_zones`` (:func:`dscovid.measurements.severity.severity_score`).
    """
    if box is None:
        box = _bounding_box(lesion, lung)
    image_hu, lesion, lung = image_hu[box], np.asarray(lesion[box]) != 0, np.asarray(lung[box]) != 0
    voxel_ml = float(np.prod(geometry.spacing_zyx_mm)) / 1000.0
    # The peripheral ratio is per-slice distance transforms, which release the GIL: it runs beside the rest.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dscovid-report") as pool:
        peripheral = pool.submit(peripheral_lesion_ratio, lesion, lung, geometry.spacing_zyx_mm,
                                 peripheral_thickness_mm)
        hu_mean, hu_std = lesion_hu_mean_std(image_hu, lesion)
        sides = lung_sides(lesion, lung, geometry)  # the left-right split, shared by the involvement and the zones
        involvement = lung_involvement(lesion, lung, geometry, sides=sides)
        rest = {
            "lesion_count": lesion_count(lesion),
            "lesion_volume_ml": float(np.count_nonzero(lesion)) * voxel_ml,
            "lung_volume_ml": float(np.count_nonzero(lesion | lung)) * voxel_ml,
            "lesion_volume_ratio": lesion_volume_ratio(lesion, lung),
        }
        zones = severity_score(lesion, lung, geometry, start_zyx=[b.start for b in box], sides=sides)
        return {
            **rest,
            "peripheral_lesion_ratio": peripheral.result(),
            "lesion_hu_mean": hu_mean,
            "lesion_hu_std": hu_std,
            "left_lung_involvement": involvement["left"]["ratio"],
            "right_lung_involvement": involvement["right"]["ratio"],
            **zones,
        }


def _bounding_box(lesion: np.ndarray, lung: np.ndarray) -> tuple[slice, slice, slice]:
    """The smallest box holding every non-zero voxel of either mask (the whole grid when both are empty)."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(np.any(lesion, axis=other) | np.any(lung, axis=other))
        box.append(slice(int(present[0]), int(present[-1]) + 1) if present.size else slice(0, lesion.shape[axis]))
    return tuple(box)
