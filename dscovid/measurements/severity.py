"""A severity score a radiologist recognises: six lung zones scored 0-4 by involved share, and MosMed's CT-0..CT-4.

dscovid has no lobe segmentation, so the score is the six-zone scheme of chest CT severity scoring: each lung is
cut into an upper, a middle and a lower zone, and each zone scores 0-4 by the share of its volume the lesion mask
covers; the total runs 0-24.

**The zones are thirds of each lung's craniocaudal extent**, not the split at the carina and the inferior pulmonary
veins. The landmarks would need an airway and a vessel segmentation that dscovid does not have, and a misplaced
landmark would shift all six zones without anyone noticing; thirds need only the lung mask, are reproducible on any
scan that holds both lungs, and follow each lung's own height (the right base usually sits higher, over the liver).
Per lung, its voxels (lung ∪ lesion) run from the highest to the lowest voxel centre along the patient's
craniocaudal axis (world z in LPS, whatever the scan's orientation); the upper zone is the top third of that span,
the lower zone the bottom third. Left and right are split exactly as :func:`dscovid.measurements.findings.lung_sides`
splits them, so the zones of one lung add up to the lung's reported involvement.

**Thresholds** (:func:`involvement_score`), on the involved share ``s = |L| / |U ∪ L|`` of a zone (L lesion, U lung):

===========  =====================
score        share
===========  =====================
0            s = 0 (no lesion voxel)
1            0 < s < 25 %
2            25 % ≤ s < 50 %
3            50 % ≤ s < 75 %
4            s ≥ 75 %
===========  =====================

**MosMedData category** (:func:`mosmed_category`): the same intervals on the whole-lung share (the lesion volume
ratio), written ``CT-0`` ... ``CT-4`` as in MosMedData's registry (CT-0: no lesion; CT-1 < 25 %; CT-2 25-50 %;
CT-3 50-75 %; CT-4 ≥ 75 %), so that a converted MosMed dataset can be checked against its labels. A zone without any
lung voxel (a lung missing from the field of view) has no share (NaN) and scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dscovid.io.image_io import Geometry
from dscovid.measurements.findings import lung_sides

#: The six zones, in reading order (right lung first, as a radiologist reads a chest film).
ZONES: tuple[str, ...] = ("right_upper", "right_middle", "right_lower", "left_upper", "left_middle", "left_lower")

#: Lower bounds of the involved share for scores 2, 3 and 4 (score 1 is any share above 0).
SCORE_THRESHOLDS: tuple[float, ...] = (0.25, 0.50, 0.75)

#: Largest total of the six zone scores.
MAX_TOTAL = 4 * len(ZONES)


def involvement_score(share: float) -> int:
    """The 0-4 score of an involved share in [0, 1] (module docstring); NaN (nothing to involve) scores 0."""
    if not share > 0.0:  # also NaN
        return 0
    return 1 + sum(share >= threshold for threshold in SCORE_THRESHOLDS)


def mosmed_category(whole_lung_share: float) -> str:
    """MosMedData's category ``CT-0`` ... ``CT-4`` of a whole-lung involved share in [0, 1]."""
    return f"CT-{involvement_score(whole_lung_share)}"


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _craniocaudal_values(
    lesion: np.ndarray, whole: np.ndarray, geometry: Geometry, side_axis: int, left: np.ndarray,
    start_zyx: Sequence[int] = (0, 0, 0),
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per side, the craniocaudal positions (mm, world z) of the lung ∪ lesion voxels, how many voxels lie at each
    and how many of those are lesion: ``(position, voxels, lesion_voxels)``.

    Walks the bounding box slice by slice so that memory stays at one slice of coordinates, whatever the scan size.
    Where the slices are axial (world z does not change within a slice, as in nearly every CT), a slice is one
    position with its counts; otherwise every voxel is its own position. ``start_zyx``: the grid voxel of the masks'
    first voxel (masks cut from the grid).
    """
    box = _bounding_box(whole)
    collected: dict[str, tuple[list, list, list]] = {"right": ([], [], []), "left": ([], [], [])}
    if box is None:
        empty = (np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return {side: empty for side in collected}
    matrix = geometry.index_to_world_matrix()
    superior = matrix[2, :3]  # mm of world z (LPS: toward the head) per voxel step along z, y, x
    ys = np.arange(box[1].start, box[1].stop) + start_zyx[1]
    xs = np.arange(box[2].start, box[2].stop) + start_zyx[2]
    plane = superior[1] * ys[:, None] + superior[2] * xs[None, :] + matrix[2, 3]
    axial = superior[1] == 0 and superior[2] == 0
    for z in range(box[0].start, box[0].stop):
        voxels = whole[z, box[1], box[2]]
        if not voxels.any():
            continue
        position = (plane + superior[0] * (z + start_zyx[0])).astype(np.float32)
        if side_axis == 0:
            on_left = np.full(voxels.shape, bool(left[z]))
        elif side_axis == 1:
            on_left = np.broadcast_to(left[box[1]][:, None], voxels.shape)
        else:
            on_left = np.broadcast_to(left[box[2]][None, :], voxels.shape)
        lesion_slice = lesion[z, box[1], box[2]]
        for side, selected in (("left", voxels & on_left), ("right", voxels & ~on_left)):
            if not selected.any():
                continue
            positions, counts, lesion_counts = collected[side]
            if axial:  # one position for the whole slice
                positions.append(position[:1, 0])
                counts.append(np.array([np.count_nonzero(selected)]))
                lesion_counts.append(np.array([np.count_nonzero(lesion_slice & selected)]))
            else:
                positions.append(position[selected])
                counts.append(np.ones(positions[-1].size, np.int64))
                lesion_counts.append(lesion_slice[selected].astype(np.int64))
    return {
        side: tuple(np.concatenate(parts) if parts else np.zeros(0, dtype)
                    for parts, dtype in zip(lists, (np.float32, np.int64, np.int64)))
        for side, lists in collected.items()
    }


def severity_score(lesion: np.ndarray, lung: np.ndarray, geometry: Geometry, *,
                   start_zyx: Sequence[int] | None = None, sides: tuple[int, np.ndarray] | None = None) -> dict:
    """The six-zone severity score and the MosMedData category of one case.

    Parameters
    ----------
    lesion, lung : (Z, Y, X) masks on the grid of ``geometry`` (non-zero = inside); the lung counted is lung ∪ lesion,
        as for the lesion volume ratio.
    geometry : the grid: its spacing gives volumes, its direction and origin the craniocaudal axis and left/right.
    start_zyx : when the masks are a box cut from the grid (both empty outside it), the grid voxel of the box's first
        voxel; the result is that of the whole grid's masks.
    sides : :func:`~dscovid.measurements.findings.lung_sides` of the same masks when already computed.

    Returns
    -------
    dict with
        ``severity_score`` : int, the sum of the six zone scores, 0-24;
        ``mosmed_category`` : ``"CT-0"`` ... ``"CT-4"`` from the whole-lung share;
        ``severity_zones`` : per zone of :data:`ZONES`, ``{"score": 0-4, "involvement": share in [0, 1] or NaN,
        "lesion_ml": float, "lung_ml": float (of lung ∪ lesion)}``.
    """
    lesion = np.asarray(lesion) != 0
    lung = np.asarray(lung) != 0
    start = tuple(int(v) for v in (start_zyx if start_zyx is not None else (0, 0, 0)))
    fits = all(0 <= s and s + n <= g for s, n, g in zip(start, lesion.shape, geometry.shape_zyx))
    if lesion.shape != lung.shape or not fits or (start_zyx is None and lesion.shape != tuple(geometry.shape_zyx)):
        raise ValueError(f"masks {lesion.shape} / {lung.shape} at {start} do not match the grid {geometry.shape_zyx}")
    whole = lesion | lung
    voxel_ml = float(np.prod(geometry.spacing_zyx_mm)) / 1000.0
    side_axis, left = sides if sides is not None else lung_sides(lesion, lung, geometry)
    values = _craniocaudal_values(lesion, whole, geometry, side_axis, left, start)
    zones: dict[str, dict] = {}
    for side in ("right", "left"):
        position, voxels, lesion_voxels_at = values[side]
        lung_counts = np.zeros(3, dtype=np.int64)
        lesion_counts = np.zeros(3, dtype=np.int64)
        if position.size:
            top, bottom = float(position.max()), float(position.min())
            third = (top - bottom) / 3.0
            # 0 lower, 1 middle, 2 upper; a voxel on a cut belongs to the zone above it
            level = np.digitize(position, [bottom + third, top - third])
            lung_counts = np.bincount(level, weights=voxels, minlength=3).astype(np.int64)
            lesion_counts = np.bincount(level, weights=lesion_voxels_at, minlength=3).astype(np.int64)
        for level, part in ((2, "upper"), (1, "middle"), (0, "lower")):
            lung_voxels, lesion_voxels = int(lung_counts[level]), int(lesion_counts[level])
            share = lesion_voxels / lung_voxels if lung_voxels else math.nan
            zones[f"{side}_{part}"] = {
                "score": involvement_score(share),
                "involvement": share,
                "lesion_ml": lesion_voxels * voxel_ml,
                "lung_ml": lung_voxels * voxel_ml,
            }
    whole_voxels = int(np.count_nonzero(whole))
    whole_share = np.count_nonzero(lesion) / whole_voxels if whole_voxels else math.nan
    return {
        "severity_score": int(sum(zones[name]["score"] for name in ZONES)),
        "mosmed_category": mosmed_category(whole_share),
        "severity_zones": {name: zones[name] for name in ZONES},
    }

