"""Is this a plausible chest CT? A rule on the scan's geometry and lung volume, applied before a diagnosis is given.

A network answers with confidence whatever it is shown: a slab of two DICOM slices, a scan of 50 mm slices whose
lung mask leaks into the whole body, a crop around the heart. :func:`check_plausibility` measures what a chest CT
must have and sorts what is wrong into

- **refusals**: the scan cannot hold a chest CT that dscovid can read (the prediction fails for that case, with the
  reason in one line, unless the user accepts implausible scans);
- **flags**: the scan is unusual for a chest CT; the prediction is made, and the flags are written beside it in
  ``predictions.json`` and on the console, so that nobody reads the class without them.

The measurements (docs/reliability.md lists the rule and its reasons):

============================  =========================================  =============  ==============
measurement                   how                                        flagged        refused
============================  =========================================  =============  ==============
slices                        voxels along the body (head-feet) axis     --             fewer than 8
slice thickness               spacing along the body axis, mm            above 5 mm     above 20 mm
body-axis coverage            slices × thickness, mm                     below 150 mm   below 50 mm
field of view                 in-plane extent of each axis, mm           outside        below 100 mm
                                                                         200-600 mm
lung volume                   lung mask voxels × voxel volume, ml        outside        outside
                                                                         1-9 l          0.1-15 l
============================  =========================================  =============  ==============

The body axis is the index axis whose direction has the largest head-feet (world z) component, so oblique and
reoriented scans are measured along the patient. Adult lungs hold about 4-8 l at full inspiration (a child's less,
an expiration scan about half); the refusal limits lie far outside what a chest can hold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from dscovid.io.image_io import Geometry


@dataclass(frozen=True)
class PlausibilityRule:
    """The limits of :func:`check_plausibility` (defaults: the table of the module docstring)."""

    refuse_slices_below: int = 8
    flag_thickness_above_mm: float = 5.0
    refuse_thickness_above_mm: float = 20.0
    flag_coverage_below_mm: float = 150.0
    refuse_coverage_below_mm: float = 50.0
    flag_fov_mm: tuple[float, float] = (200.0, 600.0)
    refuse_fov_below_mm: float = 100.0
    flag_lung_ml: tuple[float, float] = (1000.0, 9000.0)
    refuse_lung_ml: tuple[float, float] = (100.0, 15000.0)


DEFAULT_RULE = PlausibilityRule()


@dataclass
class Plausibility:
    """What :func:`check_plausibility` measured and found.

    Attributes
    ----------
    measured : slices, slice_thickness_mm, coverage_mm, fov_mm (the two in-plane extents), lung_volume_ml (None
        when no lung mask was given).
    refusals : reasons the scan is not a chest CT dscovid can read, one short sentence each.
    flags : reasons to read the prediction with caution.
    """

    measured: dict
    refusals: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``"refused"``, ``"flagged"`` or ``"plausible"``."""
        return "refused" if self.refusals else "flagged" if self.flags else "plausible"

    def to_dict(self) -> dict:
        """The JSON form written into ``predictions.json`` (``verdict``, ``flags``, ``refusals``, ``measured``)."""
        return {"verdict": self.verdict, **asdict(self)}


def body_axis(geometry: Geometry) -> int:
    """The (z, y, x) index axis that runs head-feet: the one whose world direction has the largest z component."""
    matrix = geometry.direction_matrix  # column k: world direction of index axis k in (x, y, z) order
    axis_xyz = int(np.argmax(np.abs(matrix[2, :])))
    return 2 - axis_xyz


def lung_volume_ml(lung: np.ndarray, geometry: Geometry) -> float:
    """Volume of a (Z, Y, X) 0/1 lung mask on ``geometry``'s grid, in ml."""
    return float(np.count_nonzero(lung)) * float(np.prod(geometry.spacing_zyx_mm)) / 1000.0


def check_plausibility(geometry: Geometry, lung_ml: float | None = None,
                       rule: PlausibilityRule = DEFAULT_RULE) -> Plausibility:
    """Measure a scan against ``rule``: slice count, slice thickness, body-axis coverage, field of view, lung volume.

    Parameters
    ----------
    geometry : the scan's voxel grid as read (before any reorientation).
    lung_ml : its lung volume in ml (:func:`lung_volume_ml` of the lung mask), or None to check the geometry only
        (before the lungs are segmented).
    rule : the limits.

    Returns
    -------
    A :class:`Plausibility`; its ``refusals`` and ``flags`` are sentences with the measured value and the limit.
    """
    axis = body_axis(geometry)
    slices = int(geometry.shape_zyx[axis])
    thickness = float(geometry.spacing_zyx_mm[axis])
    coverage = slices * thickness
    in_plane = [a for a in range(3) if a != axis]
    fov = [float(geometry.shape_zyx[a] * geometry.spacing_zyx_mm[a]) for a in in_plane]
    result = Plausibility({"slices": slices, "slice_thickness_mm": round(thickness, 3), "coverage_mm": round(coverage, 1),
                           "fov_mm": [round(v, 1) for v in fov],
                           "lung_volume_ml": None if lung_ml is None else round(float(lung_ml), 1)})
    refuse, flag = result.refusals.append, result.flags.append
    if slices < rule.refuse_slices_below:
        refuse(f"{slices} slices along the body axis (a chest CT has at least {rule.refuse_slices_below})")
    if thickness > rule.refuse_thickness_above_mm:
        refuse(f"slices {thickness:.3g} mm apart (at most {rule.refuse_thickness_above_mm:g} mm can be read)")
    elif thickness > rule.flag_thickness_above_mm:
        flag(f"thick slices: {thickness:.3g} mm apart (above {rule.flag_thickness_above_mm:g} mm, small lesions "
             f"may be missed)")
    if coverage < rule.refuse_coverage_below_mm:
        refuse(f"the scan covers {coverage:.0f} mm along the body axis (a chest needs at least "
               f"{rule.refuse_coverage_below_mm:g} mm)")
    elif coverage < rule.flag_coverage_below_mm:
        flag(f"the scan covers only {coverage:.0f} mm along the body axis (lungs are about 200-300 mm: part of "
             f"the lungs may be outside)")
    low, high = rule.flag_fov_mm
    if min(fov) < rule.refuse_fov_below_mm:
        refuse(f"field of view {fov[0]:.0f} × {fov[1]:.0f} mm (a chest needs at least {rule.refuse_fov_below_mm:g} mm)")
    elif min(fov) < low or max(fov) > high:
        flag(f"unusual field of view {fov[0]:.0f} × {fov[1]:.0f} mm (a chest CT is usually {low:g}-{high:g} mm)")
    if lung_ml is not None:
        low, high = rule.refuse_lung_ml
        if not low <= lung_ml <= high:
            refuse(f"lung volume {lung_ml / 1000:.3g} l (outside {low / 1000:g}-{high / 1000:g} l: the lung mask "
                   f"cannot be right)")
        else:
            low, high = rule.flag_lung_ml
            if not low <= lung_ml <= high:
                flag(f"unusual lung volume {lung_ml / 1000:.3g} l (adult lungs are about {low / 1000:g}-"
                     f"{high / 1000:g} l)")
    return result
