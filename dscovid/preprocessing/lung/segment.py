"""Classical lung segmentation of chest CT that keeps dense lesions inside the mask.

No trained weights: thresholds, connected components and morphology, most of it on a coarse working grid
(about 2 mm) and refined at full resolution. The steps, in the order :func:`segment_lung_sides` runs them:

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
lungmask's R231 convention: 1 = right lung, 2 = left lung). Step 1 is :mod:`dscovid.preprocessing.orientation`'s,
steps 2 and 7 are in :mod:`.grid`, 3 to 5 in :mod:`.lungs`, 6 in :mod:`.filling`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from dscovid.errors import DscovidError
from dscovid.preprocessing.lung.filling import fill_chest_wall_gaps, fill_costal_dents, fill_enclosed_blobs, fill_lesions
from dscovid.preprocessing.lung.grid import block_mean, refine
from dscovid.preprocessing.lung.lungs import airway, body_mask, pick_lungs
from dscovid.preprocessing.lung.morphology import IN_PLANE, opening
from dscovid.preprocessing.lung.settings import LEFT_LUNG, RIGHT_LUNG, LungMaskSettings
from dscovid.preprocessing.orientation import from_canonical, reorientation_of, to_canonical

log = logging.getLogger(__name__)


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
    reorientation = reorientation_of(direction)
    canonical = to_canonical(image_hu, reorientation)
    canonical_spacing = spacing[list(reorientation.transpose_zyx)]

    factors = tuple(max(1, int(round(settings.working_spacing_mm / s))) for s in canonical_spacing)
    if canonical.shape[0] // factors[0] < 16:  # a thin slab: keep every slice, 3D steps need some depth
        factors = (1,) + factors[1:]
    coarse = block_mean(canonical, factors)
    coarse_spacing = canonical_spacing * np.asarray(factors)
    log.debug("working grid %s at %s mm (factors %s)", coarse.shape, np.round(coarse_spacing, 2), factors)

    body = body_mask(coarse, settings.body_threshold_hu)
    air = body & (coarse < settings.air_threshold_hu)
    air &= ~airway(air, body, coarse_spacing, settings)
    sides = pick_lungs(air, body, coarse_spacing, settings)
    # Lesions are denser than fat; mediastinal and pericardial fat next to the lungs is what filling must not take.
    # The opening drops the one-voxel rim where lesion and aerated lung average to fat-like values.
    fat = opening((coarse > settings.fat_hu[0]) & (coarse < settings.fat_hu[1]), IN_PLANE)
    filled = fill_lesions(sides, body & ~fat, coarse_spacing, settings)
    filled, hulls = fill_costal_dents(filled, body & ~fat, coarse_spacing, settings)
    blobs = fill_enclosed_blobs(filled, hulls, body & ~fat, settings)
    changed = np.flatnonzero((blobs != filled).any(axis=(1, 2)))
    filled = fill_costal_dents(blobs, body & ~fat, coarse_spacing, settings, changed)[0] if changed.size else blobs
    if settings.chest_wall_gaps:
        filled = fill_chest_wall_gaps(filled, coarse, body & ~fat, coarse_spacing, settings)
    labels = refine(canonical, sides, filled, factors, settings.air_threshold_hu)
    return np.ascontiguousarray(from_canonical(labels, reorientation))


def lung_volumes_ml(labels: np.ndarray, spacing_zyx_mm: Sequence[float]) -> dict[str, float]:
    """Volumes in ml of the right (label 1) and left (label 2) lung of a :func:`segment_lung_sides` result."""
    voxel_ml = float(np.prod(spacing_zyx_mm)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=3)
    return {"right": float(counts[RIGHT_LUNG]) * voxel_ml, "left": float(counts[LEFT_LUNG]) * voxel_ml}
