"""Classical lung segmentation of chest CT that keeps dense lesions inside the mask (DESIGN.md §5 "Lung mask").

No trained weights: thresholds, connected components and morphology, most of it on a coarse working grid
(about 2 mm) and refined at full resolution. The steps, each in its own function below:

1. Reorient the array so that its axes run (inferior→superior, anterior→posterior, right→left), from the
   direction matrix; everything after this works in that order, and the result is turned back at the end.
2. Block-average to the working grid (padding such as -2048 / -3024 outside the field of view is clipped to
   -1024 first, so it counts as air, not as something colder).
3. Body: above -500 HU, the largest 3D component, holes filled per axial slice (so the lungs become holes
   filled in, while the air around the body and the padding stay outside).
4. Air inside the body: below -400 HU. Airway removal: per axial slice, small air pieces near the body's
   mid-line that form a tube reaching the top of the air region (trachea and main bronchi).
5. Lungs: the largest air component, plus the second largest when it is big enough and not below the first
   (a stomach bubble is neither); one component spanning both sides of the body is split into right and left.
6. Lesion-aware filling, each lung on its own so nothing between the lungs is swallowed: a 3D closing with a
   ball of ``closing_radius_mm`` (pulls in consolidation against the pleura, vessels and the hilum), then
   holes filled per axial slice (lesions inside the lung). Fat (-180..-60 HU, at least a few mm thick) is never
   added: consolidation is denser and ground glass lighter, while mediastinal and pericardial fat is what
   borders the lungs where the closing reaches past them. Then, per axial slice, the shallow dents of each
   lung's outline that open onto the chest wall (inside its convex hull, not facing the mediastinum) are
   filled: the costal surface is convex, so the closing alone leaves the outer part of a wide pleural lesion
   out; deeper dents too when their opening lies wholly on the chest wall above the lung's base (a lesion
   filling a whole region of the lung). Dense lesions are therefore inside the mask without ever being
   thresholded. Last, per lung, the blobs of tissue inside its axial convex hulls that the lung wraps in 3D
   (their face at least 65 % lung and at most 15 % other tissue, after an opening that cuts thin bridges) are
   filled, and the dents of the slices they change are filled again: a round consolidation against the
   mediastinum or filling the back of a lung, which the closing and the dent rules miss, while the heart, the
   hilum and the liver dome continue beyond the hulls and stay out. Optionally (``chest_wall_gaps``, off by
   default) the tissue between each lung and its ribs, along rays from the lung's centre toward the back and the
   side, where it is clearly wider than the usual gap (pleura and intercostal muscle): a consolidation filling
   the back of a lung against the chest wall.
7. Back to full resolution: the coarse mask is repeated onto the full grid and its boundary band is
   re-decided voxel by voxel from the full-resolution HU (air: in; dense and not lesion filling: out).

Measured quality, speed and limits: ``docs/lung_mask.md``.

The result is a uint8 0/1 mask (:func:`segment_lungs`) or right/left labels 1/2 (:func:`segment_lung_sides`,
lungmask's R231 convention: 1 = right lung, 2 = left lung). :func:`find_scans` and :func:`write_lung_masks` serve
the command ``dscovid_lung_mask``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.contrib.logging import logging_redirect_tqdm

from dscovid.errors import DscovidError
from dscovid.io.dataset import CHANNEL_SUFFIX
from dscovid.io.image_io import is_volume_file, read_image, strip_ending, write_image
from dscovid.parallel import progress_bar

log = logging.getLogger(__name__)

#: Label values of :func:`segment_lung_sides` (lungmask R231 convention).
RIGHT_LUNG = 1
LEFT_LUNG = 2

_AIR_HU = -1024.0
# Connectivity within one axial slice only: fills holes slice by slice in a single call.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class LungMaskSettings:
    """The knobs of the classical lung segmentation (defaults tuned on real and synthetic chest CT).

    Attributes
    ----------
    working_spacing_mm : target voxel size of the coarse working grid (integer block averaging, so the real
        working spacing is the nearest integer multiple of the input spacing).
    body_threshold_hu : tissue of the body is above this.
    air_threshold_hu : aerated lung (ground glass included) is below this.
    airway_max_area_mm2 : an axial air piece this small or smaller can be trachea or main bronchus.
    airway_max_offset_mm : ... when its centre is at most this far (left-right) from the body's mid-line.
    airway_seed_depth_mm : the airway tube must reach this close to the top of the air region.
    closing_radius_mm : radius of the ball of the per-lung 3D closing that brings pleural lesions in.
    dent_max_depth_mm, dent_mediastinal_fraction : a dent of an axial lung outline (inside its convex hull) is
        filled when at most this deep and when at most this fraction of its opening faces the mediastinum.
    deep_dent_max_depth_mm, deep_dent_min_mouth_mm, deep_dent_min_height_fraction : a deeper dent (up to this
        depth) is filled too when its opening touches no mediastinum at all, is at least this long, and the slice
        lies above this fraction of the lung's height (the diaphragm dome makes deep dents at the base).
    enclosed_min_lung_fraction, enclosed_max_tissue_fraction, enclosed_opening : a blob of non-fat tissue inside
        a lung's axial convex hulls (after an in-plane opening of this many steps, which cuts thin bridges) is
        filled when at least the first fraction of its 3D face is that lung and at most the second is other
        tissue (a consolidation wrapped by the lung, not the heart or the liver dome, which continue outside).
    chest_wall_gaps : also fill the gaps between each lung and its ribs (:func:`_fill_chest_wall_gaps`). Off by
        default: it keeps more of a consolidation filling the back of a lung (demo test set 92.8 -> 94.1 % of the
        lesion voxels inside), but networks trained on such masks segmented 0.6-2.4 points of Dice worse in three
        paired trainings (docs/lung_mask.md, Limits); ``dscovid_lung_mask --chest-wall-gaps`` turns it on.
    wall_bone_hu, wall_bone_slab_mm, wall_max_gap_mm, wall_ray_step_deg, wall_max_anterior_deg, wall_smoothing_rays,
    wall_min_excess_mm, wall_gap_percentile, wall_max_height_fraction : the chest wall gaps
        (:func:`_fill_chest_wall_gaps`): bone is above ``wall_bone_hu`` (its maximum over this many mm up and down
        closes the rib shell); rays every ``wall_ray_step_deg`` degrees from straight back to the side and this many
        degrees in front of it; bone at most ``wall_max_gap_mm`` beyond the lung, and no further out than the median
        of this many rays on each side; filled when the gap exceeds the usual one (the larger of the lung's median
        and this percentile of the slice) by ``wall_min_excess_mm``; only up to this fraction of the lung's height.
    fat_hu : on the working grid, fat lies in this range; lesion filling never adds fat (consolidation is
        denser, ground glass lighter).
    min_lung_ml : the lungs' air must be at least this large, or there is no lung.
    min_lung_fraction : ... and fill at least this fraction of the body's cross-section on some axial slice
        (mid-chest: 25-40 %; bowel gas in a pelvis CT: under 10 %).
    second_lung_min_fraction : the second air component counts as a lung when its volume is at least this
        fraction of the largest one.
    """

    working_spacing_mm: float = 2.0
    body_threshold_hu: float = -500.0
    air_threshold_hu: float = -400.0
    airway_max_area_mm2: float = 700.0
    airway_max_offset_mm: float = 30.0
    airway_seed_depth_mm: float = 10.0
    closing_radius_mm: float = 20.0
    dent_max_depth_mm: float = 30.0
    dent_mediastinal_fraction: float = 0.2
    deep_dent_max_depth_mm: float = 60.0
    deep_dent_min_mouth_mm: float = 20.0
    deep_dent_min_height_fraction: float = 0.25
    enclosed_min_lung_fraction: float = 0.65
    enclosed_max_tissue_fraction: float = 0.15
    enclosed_opening: int = 2
    fat_hu: tuple[float, float] = (-180.0, -60.0)
    chest_wall_gaps: bool = False
    wall_bone_hu: float = 200.0
    wall_bone_slab_mm: float = 15.0
    wall_max_gap_mm: float = 80.0
    wall_ray_step_deg: float = 1.0
    wall_max_anterior_deg: float = 30.0
    wall_smoothing_rays: int = 10
    wall_min_excess_mm: float = 3.0
    wall_gap_percentile: float = 25.0
    wall_max_height_fraction: float = 0.75
    min_lung_ml: float = 10.0
    min_lung_fraction: float = 0.15
    second_lung_min_fraction: float = 0.05


# ---------------------------------------------------------------------------------------------- public API


def segment_lungs(
    image_hu: np.ndarray,
    spacing_zyx_mm: Sequence[float],
    direction: Sequence[float] | None = None,
    settings: LungMaskSettings | None = None,
) -> np.ndarray:
    """Segment both lungs of a chest CT, dense lesions included.

    Parameters
    ----------
    image_hu : ``(Z, Y, X)`` CT in Hounsfield units (any integer or float type).
    spacing_zyx_mm : voxel spacing in mm along z, y, x.
    direction : the 9 numbers of the image's direction matrix (SimpleITK's ``GetDirection``, e.g.
        ``Geometry.direction``); ``None`` means identity (x to the patient's left, y posterior, z superior).
        It tells which end is the top (for the airway) and which side is left.
    settings : thresholds and sizes; the defaults otherwise.

    Returns
    -------
    ``(Z, Y, X)`` uint8 mask, 1 inside either lung.

    Raises
    ------
    DscovidError
        When no lung is found (for example a pelvis CT): one line giving the air volume inside the body.
    """
    return (segment_lung_sides(image_hu, spacing_zyx_mm, direction, settings) > 0).astype(np.uint8)


def segment_lung_sides(
    image_hu: np.ndarray,
    spacing_zyx_mm: Sequence[float],
    direction: Sequence[float] | None = None,
    settings: LungMaskSettings | None = None,
) -> np.ndarray:
    """Like :func:`segment_lungs` but with the lungs told apart: ``(Z, Y, X)`` uint8, 1 = right, 2 = left, 0 = none.

    A scan showing only one lung has only that label.
    """
    settings = settings or LungMaskSettings()
    image_hu = np.asarray(image_hu)
    if image_hu.ndim != 3:
        raise DscovidError(f"lung segmentation needs a 3D volume, got an array of shape {image_hu.shape}")
    spacing = np.asarray(spacing_zyx_mm, dtype=float)
    axes, flips = _canonical_axes(direction)
    canonical = _to_canonical(image_hu, axes, flips)
    canonical_spacing = spacing[list(axes)]

    factors = tuple(max(1, int(round(settings.working_spacing_mm / s))) for s in canonical_spacing)
    if canonical.shape[0] // factors[0] < 16:  # a thin slab: keep every slice, 3D steps need some depth
        factors = (1,) + factors[1:]
    coarse = _block_mean(canonical, factors)
    coarse_spacing = canonical_spacing * np.asarray(factors)
    log.debug("working grid %s at %s mm (factors %s)", coarse.shape, np.round(coarse_spacing, 2), factors)

    body = _body_mask(coarse, settings.body_threshold_hu)
    air = body & (coarse < settings.air_threshold_hu)
    air &= ~_airway(air, body, coarse_spacing, settings)
    sides = _pick_lungs(air, body, coarse_spacing, settings)
    # Lesions are denser than fat; mediastinal and pericardial fat next to the lungs is what filling must not take.
    # The opening drops the one-voxel rim where lesion and aerated lung average to fat-like values.
    fat = ndimage.binary_opening((coarse > settings.fat_hu[0]) & (coarse < settings.fat_hu[1]), _IN_PLANE)
    filled = _fill_lesions(sides, body & ~fat, coarse_spacing, settings)
    filled, hulls = _fill_costal_dents(filled, body & ~fat, coarse_spacing, settings)
    blobs = _fill_enclosed_blobs(filled, hulls, body & ~fat, settings)
    changed = np.flatnonzero((blobs != filled).any(axis=(1, 2)))
    filled = _fill_costal_dents(blobs, body & ~fat, coarse_spacing, settings, changed)[0] if changed.size else blobs
    if settings.chest_wall_gaps:
        filled = _fill_chest_wall_gaps(filled, coarse, body & ~fat, coarse_spacing, settings)
    labels = _refine(canonical, sides, filled, factors, settings.air_threshold_hu)
    return _from_canonical(labels, axes, flips)


def lung_volumes_ml(labels: np.ndarray, spacing_zyx_mm: Sequence[float]) -> dict[str, float]:
    """Volumes in ml of the right (label 1) and left (label 2) lung of a :func:`segment_lung_sides` result."""
    voxel_ml = float(np.prod(spacing_zyx_mm)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=3)
    return {"right": float(counts[RIGHT_LUNG]) * voxel_ml, "left": float(counts[LEFT_LUNG]) * voxel_ml}


# ----------------------------------------------------------------------------------------- orientation


def _canonical_axes(direction: Sequence[float] | None) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Which array axis becomes each canonical axis (S, P, L in LPS world terms), and which of them to flip.

    The direction matrix's column c is the world direction of index axis c in (x, y, z) order; array axis k
    (in z, y, x order) is index axis 2 - k. Canonical axis 0 follows world z (superior), 1 world y
    (posterior), 2 world x (patient left).
    """
    if direction is None:
        return (0, 1, 2), (False, False, False)
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    axes = [0, 0, 0]
    flips = [False, False, False]
    for array_axis in range(3):
        column = matrix[:, 2 - array_axis]
        world = int(np.argmax(np.abs(column)))
        axes[2 - world] = array_axis
        flips[2 - world] = bool(column[world] < 0)
    if sorted(axes) != [0, 1, 2]:
        log.warning("oblique direction matrix %s; assuming the array is axial (z, y, x)", tuple(direction))
        return (0, 1, 2), (False, False, False)
    return tuple(axes), tuple(flips)


def _to_canonical(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    view = np.transpose(array, axes)
    return view[tuple(slice(None, None, -1) if flip else slice(None) for flip in flips)]


def _from_canonical(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    unflipped = array[tuple(slice(None, None, -1) if flip else slice(None) for flip in flips)]
    return np.ascontiguousarray(np.transpose(unflipped, np.argsort(axes)))


# ------------------------------------------------------------------------------------------ working grid


def _block_mean(image: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Mean over blocks of ``factors`` voxels (a trailing partial block is dropped), HU clipped to [-1024, 3071].

    Done in slabs of slices with integer sums, so a 512×512×600 scan never needs a full float copy.
    """
    fz, fy, fx = factors
    nz, ny, nx = (n // f for n, f in zip(image.shape, factors))
    if min(nz, ny, nx) == 0:
        raise DscovidError(f"the volume {image.shape} is too small for lung segmentation")
    out = np.empty((nz, ny, nx), dtype=np.float32)
    integral = np.issubdtype(image.dtype, np.integer)
    slab = max(1, 32 // fz)
    for start in range(0, nz, slab):
        stop = min(nz, start + slab)
        block = np.clip(image[start * fz : stop * fz, : ny * fy, : nx * fx], _AIR_HU, 3071.0)
        if integral:
            block = block.astype(np.int16, copy=False)
        blocks = block.reshape(stop - start, fz, ny, fy, nx, fx)
        total = blocks.sum(axis=(1, 3, 5), dtype=np.int32 if integral else np.float64)
        out[start:stop] = total / float(fz * fy * fx)
    return out


def _upsample(coarse: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Repeat each coarse voxel over its block of the full grid (the dropped partial blocks take the last one)."""
    out = coarse
    for axis, (n, f, c) in enumerate(zip(shape, factors, coarse.shape)):
        if f == 1 and n == c:
            continue
        repeats = np.full(c, f)
        repeats[-1] += n - c * f
        out = np.repeat(out, repeats, axis=axis)
    return out


def _components(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Connected component labels and the voxel count of each label (index 0 = background)."""
    labels, count = ndimage.label(mask, structure=structure)
    return labels, np.bincount(labels.ravel(), minlength=count + 1)


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(mask, structure=_IN_PLANE)


# ---------------------------------------------------------------------------------------------- the steps


def _body_mask(coarse: np.ndarray, threshold_hu: float) -> np.ndarray:
    """The patient's body: tissue above ``threshold_hu``, its largest 3D component, holes filled per slice."""
    labels, sizes = _components(coarse > threshold_hu)
    if len(sizes) < 2:
        raise DscovidError(f"no lung found: no body (nothing above {threshold_hu:g} HU) in the image")
    sizes[0] = 0
    return _fill_holes_per_slice(labels == int(np.argmax(sizes)))


def _airway(air: np.ndarray, body: np.ndarray, spacing: np.ndarray, settings: LungMaskSettings) -> np.ndarray:
    """Trachea and main bronchi: small axial air pieces near the mid-line forming a tube down from the top.

    A lung apex is small too but lies lateral to the mid-line; a piece merged with a lung is large. The tube
    must reach the top of the air region (within ``airway_seed_depth_mm``), which a bowel loop does not.
    """
    pixel_mm2 = spacing[1] * spacing[2]
    max_pixels = settings.airway_max_area_mm2 / pixel_mm2
    max_offset = settings.airway_max_offset_mm / spacing[2]
    candidates = np.zeros_like(air)
    slices_with_air = np.flatnonzero(air.any(axis=(1, 2)))
    if slices_with_air.size == 0:
        return candidates
    for z in slices_with_air:
        body_columns = np.flatnonzero(body[z].any(axis=0))
        mid_x = 0.5 * (body_columns[0] + body_columns[-1])
        labels, sizes = _components(air[z])
        small = np.flatnonzero((sizes <= max_pixels) & (sizes > 0))
        small = small[small > 0]
        if small.size == 0:
            continue
        centres_x = np.asarray(ndimage.center_of_mass(air[z], labels, small))[:, 1]
        near = small[np.abs(centres_x - mid_x) <= max_offset]
        candidates[z] = np.isin(labels, near)

    # The top of the air region is its largest component's top (canonical axis 0 runs upward).
    air_labels, sizes = _components(air)
    sizes[0] = 0
    top = int(np.flatnonzero((air_labels == int(np.argmax(sizes))).any(axis=(1, 2)))[-1])
    seed_depth = max(1, int(round(settings.airway_seed_depth_mm / spacing[0])))
    tube_labels, _ = _components(candidates, np.ones((3, 3, 3), dtype=bool))
    reaching = np.unique(tube_labels[max(0, top - seed_depth + 1) : top + 1])
    reaching = reaching[reaching > 0]
    airway = np.isin(tube_labels, reaching)
    log.debug("airway: %d voxels on the working grid", int(airway.sum()))
    return airway


def _pick_lungs(air: np.ndarray, body: np.ndarray, spacing: np.ndarray, settings: LungMaskSettings) -> np.ndarray:
    """Label the right (1) and left (2) lung among the air components inside the body.

    Raises DscovidError when the lungs' air is smaller than ``min_lung_ml`` or never fills ``min_lung_fraction``
    of an axial slice of the body (bowel gas in an abdomen or pelvis CT).
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    labels, sizes = _components(air)
    sizes[0] = 0
    if len(sizes) < 2:
        raise DscovidError("no lung found: the air inside the body is only 0 ml")
    order = np.argsort(sizes)[::-1]
    largest = int(order[0])
    lungs = [labels == largest]
    if len(order) > 2 and sizes[order[1]] >= settings.second_lung_min_fraction * sizes[largest]:
        second = labels == int(order[1])
        # A stomach or bowel bubble lies below the lung base; a second lung sits at the height of the first.
        first_z = np.flatnonzero(lungs[0].any(axis=(1, 2)))
        centre_z = float(np.mean(np.nonzero(second)[0]))
        if centre_z >= first_z[0] + 0.25 * (first_z[-1] - first_z[0]):
            lungs.append(second)
    found = np.logical_or.reduce(lungs)
    volume_ml = float(found.sum()) * voxel_ml
    fraction = float(np.max(found.sum(axis=(1, 2)) / np.maximum(1, body.sum(axis=(1, 2)))))
    if volume_ml < settings.min_lung_ml or fraction < settings.min_lung_fraction:
        raise DscovidError(
            f"no lung found: the air inside the body is only {float(air.sum()) * voxel_ml:.0f} ml and fills at "
            f"most {100 * fraction:.0f}% of an axial slice of the body (a chest CT: over "
            f"{100 * settings.min_lung_fraction:.0f}%)"
        )

    mid_x = _mid_line(body, lungs)
    if len(lungs) == 1:
        lungs = _split_if_both_sides(lungs[0], mid_x, spacing)
    sides = np.zeros(air.shape, dtype=np.uint8)
    for lung in lungs:
        # Canonical x runs toward the patient's left.
        centre_x = float(np.mean(np.nonzero(lung)[2]))
        side = LEFT_LUNG if centre_x > mid_x else RIGHT_LUNG
        if (sides == side).any():  # two pieces on one side: the smaller one is a continuation of the other
            side = RIGHT_LUNG if side == LEFT_LUNG else LEFT_LUNG
        sides[lung] = side
    return sides


def _mid_line(body: np.ndarray, lungs: list[np.ndarray]) -> float:
    """The left-right mid-line: the middle of the body's x extent at the height of the lungs.

    Taken from the body, not the lungs, so that a single lung (the other collapsed or removed) gets its side.
    """
    slices = np.flatnonzero(np.logical_or.reduce(lungs).any(axis=(1, 2)))
    columns = np.flatnonzero(body[slices[0] : slices[-1] + 1].any(axis=(0, 1)))
    return 0.5 * (columns[0] + columns[-1])


def _split_if_both_sides(lung: np.ndarray, mid_x: float, spacing: np.ndarray) -> list[np.ndarray]:
    """Split one air component into two lungs when it has substantial volume on both sides of the mid-line.

    The lungs touch only in thin places (the anterior and posterior junction lines, a bronchus): erode in
    plane until two large cores on opposite sides appear, then grow them back inside the lung, each voxel going
    to the core that reaches it first. If erosion never separates them, cut along the mid-line.
    """
    x = np.nonzero(lung)[2]
    left_fraction = float(np.mean(x > mid_x))
    if min(left_fraction, 1.0 - left_fraction) < 0.15:
        return [lung]
    box = _bounding_box(lung, np.zeros(3, dtype=int))
    inside = lung[box]
    core = inside
    for erosions in range(1, 9):
        core = ndimage.binary_erosion(core, _IN_PLANE)
        labels, sizes = _components(core)
        sizes[0] = 0
        if len(sizes) < 3:
            continue
        first, second = (int(i) for i in np.argsort(sizes)[::-1][:2])
        if sizes[second] < 0.15 * sizes[first]:
            continue
        owner = np.where(labels == first, 1, 0).astype(np.uint8) + np.where(labels == second, 2, 0).astype(np.uint8)
        for _ in range(4 * erosions):
            free = inside & (owner == 0)
            grown = ndimage.grey_dilation(owner, footprint=_IN_PLANE)
            if not (free & (grown > 0)).any():
                break
            owner[free] = grown[free]
        # Bits the erosion cut off entirely (small, out in the periphery) go by side.
        columns = np.broadcast_to(np.arange(box[2].start, box[2].stop)[None, None, :], inside.shape)
        rest = inside & (owner == 0)
        first_is_right = float(np.mean(np.nonzero(owner == 1)[2])) < float(np.mean(np.nonzero(owner == 2)[2]))
        right, left = (1, 2) if first_is_right else (2, 1)
        owner[rest & (columns <= mid_x)] = right
        owner[rest & (columns > mid_x)] = left
        pieces = []
        for value in (1, 2):
            piece = np.zeros_like(lung)
            piece[box] = owner == value
            pieces.append(piece)
        return pieces
    log.info("lungs touch too broadly to separate by erosion; cutting them along the mid-line")
    columns = np.arange(lung.shape[2])[None, None, :]
    return [lung & (columns <= mid_x), lung & (columns > mid_x)]


def _fill_lesions(sides: np.ndarray, body: np.ndarray, spacing: np.ndarray, settings: LungMaskSettings) -> np.ndarray:
    """Each lung closed with a ball of ``closing_radius_mm`` and holes filled per slice, inside the body.

    Closing each lung on its own keeps the mediastinum and heart between them out; the other lung's aerated
    voxels stay the other lung's.
    """
    filled = np.zeros_like(sides)
    radius_voxels = np.ceil(settings.closing_radius_mm / spacing).astype(int) + 2
    for side in (RIGHT_LUNG, LEFT_LUNG):
        lung = sides == side
        if not lung.any():
            continue
        box = _bounding_box(lung, radius_voxels)
        closed = _closing(lung[box], settings.closing_radius_mm, spacing)
        closed = _fill_holes_per_slice(closed) & body[box] & ((sides[box] == 0) | lung[box])
        region = filled[box]
        region[closed & (region == 0)] = side
    return filled


def _fill_enclosed_blobs(filled: np.ndarray, hulls: np.ndarray, tissue: np.ndarray,
                         settings: LungMaskSettings) -> np.ndarray:
    """Fill the blobs of dense tissue inside a lung's axial convex hulls that the lung wraps in 3D.

    A consolidation against the mediastinum or the posterior chest wall is too wide for the closing and its
    dent faces the mediastinum or is too deep for the dent rules. What tells it from the heart, the hilum or the
    liver dome (same density) is that the lung surrounds it in 3D: above, below and around, with only fat or a
    small patch of chest wall on its other side, whereas the organs continue beyond the lung's hulls (the heart
    into the mediastinum, the liver dome below the lung's base). So: take the tissue inside each lung's axial
    hull that is not lung, cut thin bridges with an in-plane opening of ``enclosed_opening`` steps, and fill each
    3D component whose face (6-neighbours outside it) is at least ``enclosed_min_lung_fraction`` this lung and at
    most ``enclosed_max_tissue_fraction`` other tissue outside the hulls; it is grown back within the candidate
    by the opening's size. Fat, air and the candidate voxels the opening took off count for neither.
    ``hulls``: each lung's axial convex hulls as labels (from :func:`_fill_costal_dents`).
    """
    out = filled.copy()
    if not hulls.any():
        return out
    box = _bounding_box(hulls > 0, np.ones(3, dtype=int))
    filled, hulls, tissue, region = filled[box], hulls[box], tissue[box], out[box]
    for side in (RIGHT_LUNG, LEFT_LUNG):
        candidate = (hulls == side) & (filled == 0) & tissue
        cores = ndimage.binary_opening(candidate, _IN_PLANE, iterations=settings.enclosed_opening)
        labels, count = ndimage.label(cores)
        if count == 0:
            continue
        lung = filled == side
        other = tissue & ~candidate & (filled == 0)
        face = np.zeros((3, count + 1))  # per component: all face voxels, lung, other tissue
        for axis in range(3):
            for step in (1, -1):
                neighbour = np.roll(labels, step, axis=axis)
                edge = [slice(None)] * 3
                edge[axis] = 0 if step == 1 else -1
                neighbour[tuple(edge)] = 0  # no wrap-around
                ring = (neighbour > 0) & (labels != neighbour)
                for row, where in enumerate((ring, ring & lung, ring & other)):
                    face[row] += np.bincount(neighbour[where], minlength=count + 1)
        total = np.maximum(face[0], 1.0)
        keep = (face[1] >= settings.enclosed_min_lung_fraction * total) & (
            face[2] <= settings.enclosed_max_tissue_fraction * total)
        keep[0] = False
        if not keep.any():
            continue
        kept = ndimage.binary_dilation(keep[labels], _IN_PLANE, iterations=settings.enclosed_opening + 1,
                                       mask=candidate)
        region[kept & (region == 0)] = side
        log.debug("enclosed blobs filled in lung %d: %d voxels", side, int(kept.sum()))
    return out


def _fill_chest_wall_gaps(filled: np.ndarray, coarse: np.ndarray, tissue: np.ndarray, spacing: np.ndarray,
                          settings: LungMaskSettings) -> np.ndarray:
    """Fill the tissue between each lung and the rib cage behind and beside it, along rays from the lung's centre.

    A consolidation filling the back of a lung over a large height (against the posterior chest wall) is wrapped
    by the lung only from the front, and its dent is too deep and too wide for the other rules. The ribs tell where
    the lung should end. Per axial slice and lung (between the lowest quarter and ``wall_max_height_fraction`` of
    the lung's height: the liver and spleen lie inside the ribs at the base, and the ribs run so obliquely in the
    upper chest that their axial cut lies well outside the lung), rays leave the centre of the lung's slice toward
    the back and the side, up to 30 degrees in front of the side (not toward the front, where the heart is, nor
    medially, where the spine is). Beyond the ray's last lung voxel, the non-fat tissue up to the first bone of the
    rib cage (bone within ``wall_bone_slab_mm`` above or below, so the ribs form a closed shell; no further out than
    the median end of the ``wall_smoothing_rays`` rays either side, for a ray slipping between two ribs on a
    coarse grid) is filled, less the usual gap between lung and ribs (pleura, intercostal muscle: the larger of
    the median over all rays of that lung and the ``wall_gap_percentile`` of this slice's rays), when that leaves
    at least ``wall_min_excess_mm``. A ray that meets fat (even a thin plane), air or the body's edge first, or
    bone further than ``wall_max_gap_mm``, fills nothing.
    """
    out = filled.copy()
    reach = max(1, int(round(settings.wall_bone_slab_mm / spacing[0])))
    bone = ndimage.maximum_filter1d(tissue & (coarse > settings.wall_bone_hu), 2 * reach + 1, axis=0)
    passable = tissue & ~bone & (filled == 0)
    thin_fat = (coarse > settings.fat_hu[0]) & (coarse < settings.fat_hu[1])
    pixel = float(min(spacing[1], spacing[2]))
    steps = np.arange(0.0, 2.0 * settings.wall_max_gap_mm + 150.0, 0.5 * pixel)  # mm along the ray
    index = np.arange(steps.size)[None, :]
    ny, nx = filled.shape[1:]
    for side in (RIGHT_LUNG, LEFT_LUNG):
        lung = filled == side
        present = np.flatnonzero(lung.any(axis=(1, 2)))
        if present.size == 0:
            continue
        # From straight back (canonical y), round the side (x runs toward the patient's left), to
        # ``wall_max_anterior_deg`` in front of it, in angle order: the costal surface, away from heart and spine.
        span = 90.0 + settings.wall_max_anterior_deg
        degrees = np.arange(0.0, span + 1e-6, settings.wall_ray_step_deg)
        angles = np.deg2rad(90.0 + degrees if side == RIGHT_LUNG else 90.0 - degrees)
        dy, dx = np.sin(angles), np.cos(angles)
        height = present[-1] - present[0]
        bottom = present[0] + settings.deep_dent_min_height_fraction * height
        top = present[0] + settings.wall_max_height_fraction * height
        records = []
        for z in present[(present >= bottom) & (present <= top)]:
            cy, cx = ndimage.center_of_mass(lung[z])
            ys = np.rint(cy + dy[:, None] * steps[None, :] / spacing[1]).astype(int)
            xs = np.rint(cx + dx[:, None] * steps[None, :] / spacing[2]).astype(int)
            inside = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
            ys, xs = np.clip(ys, 0, ny - 1), np.clip(xs, 0, nx - 1)
            on_lung = lung[z][ys, xs] & inside
            if not on_lung.any():
                continue
            last = np.where(on_lung, index, -1).max(axis=1)
            stop = (index > last[:, None]) & ~(passable[z][ys, xs] & inside)
            # Even a thin fat plane (extrapleural fat, between chest wall muscles) stops a ray past the lung's rim.
            stop |= (index > last[:, None] + 3) & thin_fat[z][ys, xs]
            first = np.where(stop.any(axis=1), stop.argmax(axis=1), steps.size - 1)
            rows = np.arange(len(last))
            hit = (last >= 0) & bone[z][ys[rows, first], xs[rows, first]] & inside[rows, first]
            gap_mm = (steps[first] - steps[np.maximum(last, 0)])
            hit &= gap_mm <= settings.wall_max_gap_mm
            # The rib shell is smooth: a ray slipping between two ribs (coarse grids) ends no further out than the
            # median of its neighbours' ends.
            wall_mm = np.where(hit, steps[first], np.nan)
            half = settings.wall_smoothing_rays
            padded = np.concatenate([np.full(half, np.nan), wall_mm, np.full(half, np.nan)])
            windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
            counts = np.isfinite(windows).sum(axis=1)
            smooth = np.where(counts > 0, np.nanmedian(np.where(counts[:, None] > 0, windows, 0.0), axis=1), np.nan)
            end_mm = np.where(hit, np.fmin(steps[first], smooth), 0.0)
            gap_mm = end_mm - steps[np.maximum(last, 0)]
            records.append((z, ys, xs, last, end_mm, hit, gap_mm))
        gaps = np.concatenate([r[6][r[5]] for r in records]) if records else np.zeros(0)
        if gaps.size == 0:
            continue
        lung_margin_mm = float(np.median(gaps))
        added = 0
        for z, ys, xs, last, wall_end_mm, hit, gap_mm in records:
            # The usual gap of this slice too: where the ribs run obliquely (the upper chest) they lie further out.
            if hit.sum() >= 10:
                margin_mm = max(lung_margin_mm, float(np.percentile(gap_mm[hit], settings.wall_gap_percentile)))
            else:
                margin_mm = lung_margin_mm
            take = hit & (gap_mm > margin_mm + settings.wall_min_excess_mm)
            if not take.any():
                continue
            end_mm = wall_end_mm - margin_mm
            along = (index > last[:, None]) & (steps[None, :] <= end_mm[:, None]) & take[:, None]
            plane = out[z]
            sel = along & (plane[ys, xs] == 0)
            plane[ys[sel], xs[sel]] = side
            added += int(sel.sum())
        log.debug("chest wall gaps of lung %d: margin %.1f mm, %d voxels", side, lung_margin_mm, added)
    return out


def _fill_costal_dents(filled: np.ndarray, tissue: np.ndarray, spacing: np.ndarray, settings: LungMaskSettings,
                       slices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fill, slice by slice, the dents that lesions against the costal pleura leave in each lung's outline.

    The costal surface is convex, so a ball closing leaves the outer part of a wide pleural lesion out; the
    convex hull does not. A dent (a connected piece of the lung's axial convex hull outside the lung, within
    ``tissue``) is filled when it is shallow (``dent_max_depth_mm`` from the hull's edge) and opens onto the
    chest wall: the heart, aorta and hilum make dents that open onto the mediastinum (the part of both lungs'
    joint hull outside either single hull), and the dome of the diaphragm makes deep ones.

    A consolidation filling a whole region of the lung against the chest wall (the anterior half, say) makes a
    deeper dent whose opening lies entirely on the chest wall; such a dent is filled up to
    ``deep_dent_max_depth_mm`` when its opening is long and the slice is above the lung's base, where the deep
    dents of the diaphragm dome are (their tissue is liver, spleen or stomach).

    Only ``slices`` (axial indices) when given. Returns the filled labels and each lung's axial convex hull as
    labels (the right lung's where the two overlap); filling dents, which lie inside the hulls, leaves them as
    they are.
    """
    out = filled.copy()
    hull_labels = np.zeros_like(filled)
    heights = {}
    for side in (RIGHT_LUNG, LEFT_LUNG):
        present = np.flatnonzero((filled == side).any(axis=(1, 2)))
        if present.size:
            heights[side] = (present[0], present[-1])
    pixel_mm = float(np.sqrt(spacing[1] * spacing[2]))
    for z in np.flatnonzero(filled.any(axis=(1, 2))) if slices is None else slices:
        hulls = {side: _convex_hull(filled[z] == side) for side in (RIGHT_LUNG, LEFT_LUNG)
                 if (filled[z] == side).sum() >= 3}
        mediastinum = np.zeros(filled.shape[1:], dtype=bool)
        if len(hulls) == 2:
            joint = _convex_hull(filled[z] > 0)
            mediastinum = ndimage.binary_dilation(joint & ~hulls[RIGHT_LUNG] & ~hulls[LEFT_LUNG])
        for side, hull in hulls.items():
            hull_labels[z][hull & (hull_labels[z] == 0)] = side
            labels, count = ndimage.label(hull & (filled[z] == 0) & tissue[z])
            if count == 0:
                continue
            index = np.arange(1, count + 1)
            depth = ndimage.maximum(ndimage.distance_transform_edt(hull, sampling=spacing[1:]), labels, index)
            # The opening of each dent: the pixels just outside the hull next to it (one dent each, the largest
            # label where two meet, which is rare and harmless).
            mouth = ndimage.grey_dilation(labels, footprint=ndimage.generate_binary_structure(2, 1)) * ~hull
            mouth_size = np.bincount(mouth.ravel(), minlength=count + 1)[1:]
            facing = np.bincount(mouth[mediastinum].ravel(), minlength=count + 1)[1:]
            keep = (depth <= settings.dent_max_depth_mm) & (
                facing <= settings.dent_mediastinal_fraction * np.maximum(mouth_size, 1))
            bottom, top = heights[side]
            if z >= bottom + settings.deep_dent_min_height_fraction * (top - bottom):
                keep |= (depth <= settings.deep_dent_max_depth_mm) & (facing == 0) & (
                    mouth_size * pixel_mm >= settings.deep_dent_min_mouth_mm)
            out[z][np.isin(labels, index[keep])] = side
    return out, hull_labels


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a 2D mask as a mask, computed on its bounding box (scikit-image is slow on big images)."""
    from skimage.morphology import convex_hull_image  # imported here: only the dent filling needs scikit-image

    box = _bounding_box(mask, np.zeros(2, dtype=int))
    hull = np.zeros_like(mask)
    hull[box] = convex_hull_image(mask[box])
    return hull


def _bounding_box(mask: np.ndarray, margin: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, present[0] - margin[axis]), min(mask.shape[axis], present[-1] + margin[axis] + 1)))
    return tuple(box)


def _ball_steps(radius_mm: float, spacing: np.ndarray) -> list[np.ndarray]:
    """3×3×3 structuring elements whose successive application approximates a ball of ``radius_mm``.

    In plane the steps alternate a cross and a square (an octagon after a few steps, within about 8 % of a
    disk); the through-plane neighbours are switched on in just enough steps, spread evenly, to reach the
    radius along z with its own spacing. Repeated 3×3×3 steps are an order of magnitude faster than a
    distance transform on the volumes involved.
    """
    steps = max(1, int(round(radius_mm / min(spacing[1], spacing[2]))))
    z_steps = min(steps, int(round(radius_mm / spacing[0])))
    z_on = {int(np.floor((k + 0.5) * steps / z_steps)) for k in range(z_steps)} if z_steps else set()
    structures = []
    for step in range(steps):
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[1] = ndimage.generate_binary_structure(2, 1 if step % 2 == 0 else 2)
        if step in z_on:
            structure[0, 1, 1] = structure[2, 1, 1] = True
        structures.append(structure)
    return structures


def _closing(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological closing with (an approximation of) a ball of ``radius_mm``.

    The array border counts as inside for the erosion, so a lung cut by the field of view is not eaten away.
    """
    structures = _ball_steps(radius_mm, spacing)
    closed = mask
    for structure in structures:
        closed = ndimage.binary_dilation(closed, structure)
    for structure in structures:
        closed = ndimage.binary_erosion(closed, structure, border_value=1)
    return closed | mask


def _refine(
    image: np.ndarray, sides: np.ndarray, filled: np.ndarray, factors: Sequence[int], air_threshold_hu: float
) -> np.ndarray:
    """Full-resolution labels: the coarse mask's interior as is, its boundary band decided by the HU of each voxel.

    In the band (one coarse voxel either side of the coarse boundary) a voxel is lung when it is air (below
    ``air_threshold_hu``), or when its coarse voxel is lesion filling (filled, not aerated on the coarse grid),
    which no threshold can find. Only the lungs' bounding box is touched at full resolution.
    """
    labels = np.zeros(image.shape, dtype=np.uint8)
    if not filled.any():
        return labels
    coarse_shape = filled.shape
    box = _bounding_box(filled, np.ones(3, dtype=int))
    filled, sides = filled[box], sides[box]
    inner = np.zeros_like(filled)
    band = np.zeros_like(filled)
    lesion = np.zeros(filled.shape, dtype=bool)
    for side in (RIGHT_LUNG, LEFT_LUNG):
        lung = filled == side
        if not lung.any():
            continue
        core = ndimage.binary_erosion(lung, border_value=1)  # the scan's edge is not the lung's edge
        inner[core] = side
        band[ndimage.binary_dilation(lung) & ~core & (band == 0) & ((filled == 0) | lung)] = side
        # Filled, not aerated, and thicker than the one-voxel partial-volume rim of every lung.
        added = lung & (sides != side)
        lesion |= lung & ~core & (ndimage.binary_opening(added, _IN_PLANE) | ~ndimage.binary_dilation(sides == side))
    # One coarse code per voxel, so a single upsampling carries all three maps.
    code = inner + 3 * band + 9 * lesion.astype(np.uint8)
    full_box = tuple(
        slice(b.start * f, n_full if b.stop == n else b.stop * f)
        for b, f, n, n_full in zip(box, factors, coarse_shape, image.shape)
    )
    full_code = _upsample(code, factors, [b.stop - b.start for b in full_box])
    labels_box = full_code % 3
    band_full = (full_code // 3) % 3
    take = (labels_box == 0) & (band_full > 0) & ((image[full_box] < air_threshold_hu) | (full_code >= 9))
    labels_box[take] = band_full[take]
    labels[full_box] = labels_box
    return labels


# ------------------------------------------------------------------------------------------------- files


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _holds_dicom(folder: Path) -> bool:
    return any(entry.is_file() and _is_dicom_file(entry) for entry in folder.iterdir())


def case_name_of(path: Path) -> str:
    """The case name of an input scan: a volume's file name without ending and ``_0000``, or a DICOM folder's name."""
    name = path.name if path.is_dir() else strip_ending(path)
    return name[: -len(CHANNEL_SUFFIX)] if name.endswith(CHANNEL_SUFFIX) else name


def find_scans(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """The CT scans under ``path`` as ``(case, path)`` pairs, sorted by case.

    ``path`` is a volume file, a folder holding one DICOM series, or a folder of volume files and of folders
    holding DICOM series (searched at any depth).

    Raises
    ------
    DscovidError
        When ``path`` does not exist, holds no scan, or two scans would get the same case name.
    """
    path = Path(path)
    if not path.exists():
        raise DscovidError(f"{path}: no such file or folder")
    if path.is_file():
        scans = [path]
    elif _holds_dicom(path):
        scans = [path]
    else:
        scans = sorted(entry for entry in path.iterdir() if is_volume_file(entry))
        scans += sorted(Path(root) for root, _, _ in os.walk(path) if Path(root) != path and _holds_dicom(Path(root)))
    if not scans:
        raise DscovidError(f"{path}: no CT volume (.nii.gz, .nii, .mha, .nrrd) or DICOM series found")
    cases: dict[str, Path] = {}
    for scan in scans:
        case = case_name_of(scan)
        if case in cases:
            raise DscovidError(f"{path}: two scans would both be written as case {case!r}: {cases[case]} and {scan}")
        cases[case] = scan
    return sorted(cases.items())


def write_lung_masks(
    scans: Sequence[tuple[str, Path]],
    output_dir: str | os.PathLike,
    settings: LungMaskSettings | None = None,
    progress: bool = True,
) -> list[tuple[str, str]]:
    """Segment each scan and write ``<output_dir>/<case>.nii.gz`` (uint8 0/1) on the scan's own grid.

    A case that fails (unreadable, no lung) is skipped and reported; the others still run.

    Returns
    -------
    ``(case, reason)`` for each failed case, in input order.
    """
    output_dir = Path(output_dir)
    failures = []
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        for case, scan in progress_bar(scans, desc="lung masks", unit="scan", disable=not progress):
            try:
                image, geometry = read_image(scan)
                started = time.perf_counter()
                sides = segment_lung_sides(image, geometry.spacing_zyx_mm, geometry.direction, settings)
                seconds = time.perf_counter() - started
                write_image((sides > 0).astype(np.uint8), geometry, output_dir / f"{case}.nii.gz")
            except DscovidError as error:
                failures.append((case, str(error)))
                continue
            volumes = lung_volumes_ml(sides, geometry.spacing_zyx_mm)
            log.info("%s: right lung %.0f ml, left lung %.0f ml (%.1f s)", case, volumes["right"], volumes["left"],
                     seconds)
    return failures
