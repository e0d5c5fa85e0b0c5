"""The lesion measurements behind the paper's four findings (section III-B, Fig. 1 d-i), for one CT.

All functions take (z, y, x) arrays and an explicit voxel spacing in mm; masks are any array whose non-zero
voxels are the foreground. Conventions chosen here (the paper leaves them open):

- Lesions are the 26-connected components of the lesion mask. A lesion's centre is the centre of its bounding
  box (the paper: "the central point of the lesion bounding box"); its size is the extent of that box in mm
  (voxel count along the axis × spacing).
- The lesion volume ratio (LVR) is ``|L| / |U ∪ L|``: lung segmentations often carve dense consolidations out of
  the lung, so the lesion is counted as lung; this keeps LVR in [0, 1].
- The peripheral lesion ratio (PLR, equation 1) erodes each axial lung slice by a disk of radius ``σ`` mm in
  physical units (anisotropic in-plane spacing handled by a 2D Euclidean distance transform): a lung pixel lies in
  the peripheral rim when its distance to the nearest non-lung pixel (outside the image counts as non-lung, like
  ``binary_erosion``'s default border) is at most ``σ``. ``σ = 0`` gives an empty rim and PLR 0.
- Quantities that need a lesion (PLR, HU statistics, spread) are NaN when the mask has no lesion voxel (a
  non-pneumonia case), so that means over a group must skip them explicitly (``np.nanmean``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from dscovid.io.image_io import Geometry
from dscovid.measurements.components import label

#: 26-connectivity in 3D: voxels touching by a face, an edge or a corner belong to one lesion.
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)

#: The HU windows the paper quotes for finding 3: COVID-19 lesions mostly in the low-density window, CAP lesions
#: split between a low-density window and a consolidation (soft-tissue) window.
HU_WINDOWS: dict[str, tuple[float, float]] = {
    "ggo_-960_-600": (-960.0, -600.0),
    "low_-970_-580": (-970.0, -580.0),
    "consolidation_-70_140": (-70.0, 140.0),
}

#: Bin edges (HU) of the lesion intensity histogram kept per case so that distribution curves can be pooled.
HU_BIN_EDGES = np.arange(-1100.0, 410.0, 10.0)

#: Peripheral thicknesses (mm) of the paper's Fig. 1 (i).
DEFAULT_THICKNESSES_MM: tuple[float, ...] = tuple(float(t) for t in range(0, 36, 5))


@dataclass(frozen=True)
class LesionComponent:
    """One connected lesion.

    Attributes
    ----------
    voxels : number of voxels.
    volume_ml : volume in millilitres (voxels × voxel volume / 1000).
    bbox_size_zyx_mm : extent of the bounding box along z, y, x in mm.
    centre_zyx_mm : centre of the bounding box in mm from the centre of voxel (0, 0, 0), along z, y, x.
    """

    voxels: int
    volume_ml: float
    bbox_size_zyx_mm: tuple[float, float, float]
    centre_zyx_mm: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(self).items()}


def _spacing(spacing_zyx_mm: Sequence[float]) -> np.ndarray:
    spacing = np.asarray(spacing_zyx_mm, dtype=float)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing_zyx_mm must be three positive numbers, got {spacing_zyx_mm!r}")
    return spacing


def _bounding_slices(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """The smallest box (with ``margin`` voxels around, clipped) holding every non-zero voxel, or None if none."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(np.any(mask, axis=other))
        if present.size == 0:
            return None
        slices.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(slices)


def lesion_components(lesion: np.ndarray, spacing_zyx_mm: Sequence[float]) -> list[LesionComponent]:
    """The 26-connected lesions of a mask, largest first.

    Parameters
    ----------
    lesion : (Z, Y, X) lesion mask (non-zero = lesion).
    spacing_zyx_mm : voxel spacing in mm along z, y, x.

    Returns
    -------
    One :class:`LesionComponent` per lesion, sorted by decreasing volume; empty for an empty mask.
    """
    spacing = _spacing(spacing_zyx_mm)
    lesion = np.asarray(lesion) != 0
    box = _bounding_slices(lesion)
    if box is None:
        return []
    offset = np.array([s.start for s in box], dtype=float)
    labels, count = label(lesion[box], 26)
    voxels = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    components = []
    for index, found in enumerate(ndimage.find_objects(labels)):
        low = np.array([s.start for s in found], dtype=float)
        high = np.array([s.stop for s in found], dtype=float)
        size_mm = (high - low) * spacing
        centre_mm = (offset + (low + high - 1.0) / 2.0) * spacing
        components.append(
            LesionComponent(
                voxels=int(voxels[index]),
                volume_ml=float(voxels[index]) * voxel_ml,
                bbox_size_zyx_mm=tuple(float(v) for v in size_mm),
                centre_zyx_mm=tuple(float(v) for v in centre_mm),
            )
        )
    components.sort(key=lambda c: -c.voxels)
    return components


def lesion_count(lesion: np.ndarray) -> int:
    """Number of 26-connected lesions in a (Z, Y, X) mask (0 for an empty mask)."""
    lesion = np.asarray(lesion) != 0
    box = _bounding_slices(lesion)
    if box is None:
        return 0
    return label(lesion[box], 26)[1]


def lesion_volume_ratio(lesion: np.ndarray, lung: np.ndarray) -> float:
    """Lesion volume ratio ``|L| / |U ∪ L|`` (finding 2), in [0, 1]; NaN when both masks are empty.

    Parameters
    ----------
    lesion, lung : (Z, Y, X) masks on the same grid.
    """
    lesion = np.asarray(lesion) != 0
    lung = np.asarray(lung) != 0
    _check_same_shape(lesion, lung)
    whole = int(np.count_nonzero(lesion | lung))
    return float(np.count_nonzero(lesion)) / whole if whole else float("nan")


def _check_same_shape(*arrays: np.ndarray) -> None:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"arrays must have the same shape, got {sorted(shapes)}")


def peripheral_lesion_ratios(
    lesion: np.ndarray,
    lung: np.ndarray,
    spacing_zyx_mm: Sequence[float],
    thicknesses_mm: Sequence[float] = DEFAULT_THICKNESSES_MM,
) -> np.ndarray:
    """Peripheral lesion ratio (equation 1) for several peripheral thicknesses at once.

    For each axial slice ``s``, the peripheral rim is ``U_s − E(U_s, σ)``, the lung minus its erosion by a disk of
    radius ``σ`` mm; PLR is the share of all lesion voxels that fall in the rim. The in-plane distance transform is
    computed once per slice that holds lesion and thresholded at every thickness.

    Parameters
    ----------
    lesion, lung : (Z, Y, X) masks on the same grid.
    spacing_zyx_mm : voxel spacing in mm (only y and x are used: the erosion is per axial slice).
    thicknesses_mm : peripheral thicknesses σ in mm (≥ 0).

    Returns
    -------
    (T,) float array of PLR in [0, 1], one per thickness; all NaN when there is no lesion voxel.
    """
    spacing = _spacing(spacing_zyx_mm)
    thresholds = np.asarray(thicknesses_mm, dtype=float)
    if np.any(thresholds < 0):
        raise ValueError(f"peripheral thicknesses must be >= 0 mm, got {list(thicknesses_mm)}")
    lesion = np.asarray(lesion) != 0
    lung = np.asarray(lung) != 0
    _check_same_shape(lesion, lung)
    total = int(np.count_nonzero(lesion))
    if total == 0:
        return np.full(thresholds.shape, np.nan)
    inside = lesion & lung
    in_rim = np.zeros(thresholds.shape, dtype=np.int64)
    box = _bounding_slices(lung)
    if box is None:
        return in_rim.astype(float)
    # One pixel of non-lung around the lung's box makes the image border count as non-lung: clamping an outside
    # pixel onto that ring never increases its distance to a pixel inside.
    rows = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, lung.shape[1]))
    cols = slice(max(box[2].start - 1, 0), min(box[2].stop + 1, lung.shape[2]))
    # Only whether a lesion pixel lies within the largest σ of non-lung matters, so each slice's distances are taken
    # in the box of its lesion pixels grown by more than that σ: the non-lung ring the padding puts around a box
    # cut inside the lung is farther than σ from every lesion pixel, and changes no comparison.
    reach = np.ceil(thresholds.max(initial=0.0) / spacing[1:]).astype(int) + 1
    for z in np.flatnonzero(np.any(inside, axis=(1, 2))):
        lesion_slice = inside[z, rows, cols]
        ys, xs = np.flatnonzero(lesion_slice.any(axis=1)), np.flatnonzero(lesion_slice.any(axis=0))
        window = (slice(max(ys[0] - reach[0], 0), ys[-1] + 1 + reach[0]),
                  slice(max(xs[0] - reach[1], 0), xs[-1] + 1 + reach[1]))
        lung_slice = np.pad(lung[z, rows, cols][window], 1)
        distance = ndimage.distance_transform_edt(lung_slice, sampling=spacing[1:])[1:-1, 1:-1]
        lesion_distances = distance[lesion_slice[window]]
        # The erosion by a closed disk of radius σ keeps exactly the pixels farther than σ from every non-lung pixel.
        in_rim += np.count_nonzero(lesion_distances[None, :] <= thresholds[:, None], axis=1)
    return in_rim / float(total)


def peripheral_lesion_ratio(
    lesion: np.ndarray, lung: np.ndarray, spacing_zyx_mm: Sequence[float], thickness_mm: float
) -> float:
    """Peripheral lesion ratio (equation 1) at one peripheral thickness in mm; NaN when there is no lesion.

    See :func:`peripheral_lesion_ratios`.
    """
    return float(peripheral_lesion_ratios(lesion, lung, spacing_zyx_mm, [thickness_mm])[0])


def lesion_hu_statistics(
    image_hu: np.ndarray, lesion: np.ndarray, bin_edges: np.ndarray = HU_BIN_EDGES
) -> dict:
    """Intensity statistics of the lesion voxels (finding 3).

    Parameters
    ----------
    image_hu : (Z, Y, X) CT in Hounsfield units.
    lesion : (Z, Y, X) lesion mask.
    bin_edges : histogram bin edges in HU; values outside are clipped into the first/last bin.

    Returns
    -------
    dict with ``voxels``, ``mean``, ``std``, ``p5``, ``p25``, ``p50``, ``p75``, ``p95`` (HU), ``fraction_<window>``
    for each of :data:`HU_WINDOWS` (share of lesion voxels inside the closed window), and ``histogram`` (counts per
    bin, a list). Statistics are NaN and the histogram all zero when the mask is empty.
    """
    values = _lesion_values(image_hu, lesion)
    clipped = np.clip(values, bin_edges[0], bin_edges[-1])
    histogram = np.histogram(clipped, bins=bin_edges)[0]
    stats: dict = {"voxels": int(values.size)}
    if values.size == 0:
        nan = float("nan")
        stats.update({"mean": nan, "std": nan, "p5": nan, "p25": nan, "p50": nan, "p75": nan, "p95": nan})
        stats.update({f"fraction_{name}": nan for name in HU_WINDOWS})
    else:
        percentiles = np.percentile(values, [5, 25, 50, 75, 95])
        stats.update({"mean": float(values.mean()), "std": float(values.std())})
        stats.update({f"p{p}": float(v) for p, v in zip((5, 25, 50, 75, 95), percentiles)})
        for name, (low, high) in HU_WINDOWS.items():
            stats[f"fraction_{name}"] = float(np.count_nonzero((values >= low) & (values <= high))) / values.size
    stats["histogram"] = histogram.astype(int).tolist()
    return stats


def _lesion_values(image_hu: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    lesion = np.asarray(lesion) != 0
    image_hu = np.asarray(image_hu)
    _check_same_shape(image_hu, lesion)
    return image_hu[lesion].astype(np.float64)


def lesion_hu_mean_std(image_hu: np.ndarray, lesion: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation in HU of the lesion voxels: :func:`lesion_hu_statistics`'s ``mean``
    and ``std`` without the percentiles and the histogram (the per-case report needs only these); NaN without lesion.
    """
    values = _lesion_values(image_hu, lesion)
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std())


def lesion_spread_mm(lesion: np.ndarray, spacing_zyx_mm: Sequence[float]) -> float:
    """Spread of the lesion centres (finding 4): ``sqrt(mean ||c_i − c̄||²)`` over the lesions' bounding-box centres.

    This is the root of the total (population) variance of the centres in mm: 0 for a single lesion, NaN for none.
    """
    components = lesion_components(lesion, spacing_zyx_mm)
    return _spread(components)


def _spread(components: Sequence[LesionComponent]) -> float:
    if not components:
        return float("nan")
    centres = np.array([c.centre_zyx_mm for c in components], dtype=float)
    return float(np.sqrt(np.mean(np.sum((centres - centres.mean(axis=0)) ** 2, axis=1))))


def _left_right_axis(geometry: Geometry | None) -> tuple[int, float]:
    """The array axis (0=z, 1=y, 2=x) closest to the patient's left-right direction and the sign toward the left.

    Without a geometry the array is assumed to be in the standard orientation (index x grows toward the patient's
    left, as for an identity direction in LPS).
    """
    if geometry is None:
        return 2, 1.0
    # Row 0 of the direction matrix is the world-x (LPS: toward the patient's left) component of each index axis
    # in (x, y, z) order; reversed to (z, y, x) array axes.
    world_x = geometry.direction_matrix[0, ::-1]
    axis = int(np.argmax(np.abs(world_x)))
    return axis, float(np.sign(world_x[axis]))


def lung_involvement(lesion: np.ndarray, lung: np.ndarray, geometry: Geometry | None = None,
                     sides: tuple[int, np.ndarray] | None = None) -> dict:
    """Lesion volume ratio of the right and the left lung.

    The lung mask is split at a plane across the left-right axis (:func:`_left_right_axis`): midway between the
    centres of its two largest 6-connected components when the second holds at least 10 % of the largest (two
    separate lungs), else at the centre of mass of the whole mask (lungs joined at the anterior junction). Each voxel
    on the patient's left of the plane belongs to the left side. Per side the ratio is, as for
    :func:`lesion_volume_ratio`, ``|L_side| / |(U ∪ L)_side|``.

    Parameters
    ----------
    lesion, lung : (Z, Y, X) masks on the same grid.
    geometry : the grid's geometry, used only for its direction (which array axis and sense is patient-left).
    sides : :func:`lung_sides` of the same masks when already computed (the split is then not made again).

    Returns
    -------
    ``{"right": {...}, "left": {...}}``, each with ``lesion_voxels``, ``lung_voxels`` (of ``U ∪ L`` on that side)
    and ``ratio`` (NaN for a side with neither).
    """
    lesion = np.asarray(lesion) != 0
    lung = np.asarray(lung) != 0
    _check_same_shape(lesion, lung)
    axis, left = sides if sides is not None else lung_sides(lesion, lung, geometry)
    whole = lesion | lung
    other_axes = tuple(a for a in range(3) if a != axis)
    lesion_profile = np.count_nonzero(lesion, axis=other_axes)
    whole_profile = np.count_nonzero(whole, axis=other_axes)
    result = {}
    for side, selected in (("right", ~left), ("left", left)):
        lesion_voxels = int(lesion_profile[selected].sum())
        lung_voxels = int(whole_profile[selected].sum())
        result[side] = {
            "lesion_voxels": lesion_voxels,
            "lung_voxels": lung_voxels,
            "ratio": lesion_voxels / lung_voxels if lung_voxels else float("nan"),
        }
    return result


def lung_sides(lesion: np.ndarray, lung: np.ndarray, geometry: Geometry | None = None) -> tuple[int, np.ndarray]:
    """Which voxels belong to the patient's left lung, as :func:`lung_involvement` splits them.

    Parameters
    ----------
    lesion, lung : (Z, Y, X) masks on the same grid (the split is placed on the lung, or on lung ∪ lesion when the
        lung mask is empty).
    geometry : the grid's geometry, for its direction (see :func:`_left_right_axis`).

    Returns
    -------
    axis : the array axis (0 z, 1 y, 2 x) across the patient's left-right direction.
    left : (shape[axis],) bool, True at the positions along ``axis`` on the patient's left of the split plane.
    """
    lesion = np.asarray(lesion) != 0
    lung = np.asarray(lung) != 0
    axis, toward_left = _left_right_axis(geometry)
    split = _split_position(lung if lung.any() else lesion | lung, axis)
    beyond = np.arange(lung.shape[axis]) > split
    return axis, (beyond if toward_left > 0 else ~beyond)


def _split_position(mask: np.ndarray, axis: int) -> float:
    """Index along ``axis`` that separates the two lungs (see :func:`lung_involvement`)."""
    if not mask.any():
        return (mask.shape[axis] - 1) / 2.0
    box = _bounding_slices(mask)
    labels, count = label(mask[box], 6)
    offset = box[axis].start
    if count >= 2:
        sizes = np.bincount(labels.ravel())[1:]
        first, second = np.argsort(sizes)[::-1][:2]
        if sizes[second] >= 0.1 * sizes[first]:
            return offset + (_centre_along(labels == first + 1, axis) + _centre_along(labels == second + 1, axis)) / 2.0
    return offset + _centre_along(mask[box], axis)


def _centre_along(mask: np.ndarray, axis: int) -> float:
    """The centre of mass of a non-empty mask along one axis, from its profile (no index grids: fast on a full CT)."""
    profile = np.count_nonzero(mask, axis=tuple(a for a in range(mask.ndim) if a != axis))
    return float(np.dot(np.arange(profile.size), profile) / profile.sum())


def case_findings(
    image_hu: np.ndarray,
    lesion: np.ndarray,
    lung: np.ndarray,
    spacing_zyx_mm: Sequence[float],
    thicknesses_mm: Sequence[float] = DEFAULT_THICKNESSES_MM,
    geometry: Geometry | None = None,
) -> dict:
    """Every measurement of the four findings for one CT.

    Parameters
    ----------
    image_hu : (Z, Y, X) CT in HU.
    lesion, lung : (Z, Y, X) masks on the same grid.
    spacing_zyx_mm : voxel spacing in mm along z, y, x.
    thicknesses_mm : peripheral thicknesses σ for the PLR curve.
    geometry : optional geometry of the grid (left/right assignment in :func:`lung_involvement`).

    Returns
    -------
    dict with ``lesion_count``, ``lesion_volume_ml``, ``lung_volume_ml`` (of ``U ∪ L``), ``lesion_volume_ratio``,
    ``lesions`` (per-lesion dicts from :func:`lesion_components`), ``spread_mm``, ``hu`` (from
    :func:`lesion_hu_statistics`), ``plr`` (``{"thickness_mm": [...], "ratio": [...]}``) and ``involvement``.
    Values that need a lesion are NaN for an empty lesion mask.
    """
    spacing = _spacing(spacing_zyx_mm)
    lesion = np.asarray(lesion) != 0
    lung = np.asarray(lung) != 0
    _check_same_shape(np.asarray(image_hu), lesion, lung)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    components = lesion_components(lesion, spacing)
    plr = peripheral_lesion_ratios(lesion, lung, spacing, thicknesses_mm)
    return {
        "lesion_count": len(components),
        "lesion_volume_ml": float(np.count_nonzero(lesion)) * voxel_ml,
        "lung_volume_ml": float(np.count_nonzero(lesion | lung)) * voxel_ml,
        "lesion_volume_ratio": lesion_volume_ratio(lesion, lung),
        "lesions": [c.to_dict() for c in components],
        "spread_mm": _spread(components),
        "hu": lesion_hu_statistics(image_hu, lesion),
        "plr": {"thickness_mm": [float(t) for t in thicknesses_mm], "ratio": [float(v) for v in plr]},
        "involvement": lung_involvement(lesion, lung, geometry),
    }
