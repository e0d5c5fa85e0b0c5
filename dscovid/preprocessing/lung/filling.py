"""Lesion-aware filling of each lung on the working grid: dense lesions brought inside without any threshold.

The closing (pleural lesions), the costal dents (wide lesions against the chest wall), the enclosed blobs (a round
consolidation the lung wraps in 3D) and, optionally, the chest wall gaps (a consolidation filling the back of a lung).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from dscovid.measurements.components import label
from dscovid.preprocessing.lung.morphology import (
    IN_PLANE,
    bounding_box,
    closing,
    convex_hull,
    dilate,
    fill_holes_per_slice,
    opening,
)
from dscovid.preprocessing.lung.settings import LEFT_LUNG, RIGHT_LUNG, LungMaskSettings

log = logging.getLogger(__name__)


def fill_lesions(sides: np.ndarray, body: np.ndarray, spacing: np.ndarray, settings: LungMaskSettings) -> np.ndarray:
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
        box = bounding_box(lung, radius_voxels)
        closed = closing(lung[box], settings.closing_radius_mm, spacing)
        closed = fill_holes_per_slice(closed) & body[box] & ((sides[box] == 0) | lung[box])
        region = filled[box]
        region[closed & (region == 0)] = side
    return filled


def fill_enclosed_blobs(filled: np.ndarray, hulls: np.ndarray, tissue: np.ndarray,
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
    ``hulls``: each lung's axial convex hulls as labels (from :func:`fill_costal_dents`).
    """
    out = filled.copy()
    if not hulls.any():
        return out
    box = bounding_box(hulls > 0, np.ones(3, dtype=int))
    filled, hulls, tissue, region = filled[box], hulls[box], tissue[box], out[box]
    for side in (RIGHT_LUNG, LEFT_LUNG):
        candidate = (hulls == side) & (filled == 0) & tissue
        cores = opening(candidate, IN_PLANE, iterations=settings.enclosed_opening)
        labels, count = label(cores, 6)
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
        kept = dilate(keep[labels], IN_PLANE, iterations=settings.enclosed_opening + 1, within=candidate)
        region[kept & (region == 0)] = side
        log.debug("enclosed blobs filled in lung %d: %d voxels", side, int(kept.sum()))
    return out


def fill_chest_wall_gaps(filled: np.ndarray, coarse: np.ndarray, tissue: np.ndarray, spacing: np.ndarray,
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


def _label_maxima(values: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """The largest of ``values`` (>= 0) over each label 1..``count``: ``ndimage.maximum(values, labels, 1..count)``
    without its sort of the whole slice per call (it was most of the lung mask's time)."""
    inside = labels > 0
    maxima = np.zeros(count + 1, dtype=np.float64)
    np.maximum.at(maxima, labels[inside], values[inside])
    return maxima[1:]


def fill_costal_dents(filled: np.ndarray, tissue: np.ndarray, spacing: np.ndarray, settings: LungMaskSettings,
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
        hulls = {side: convex_hull(filled[z] == side) for side in (RIGHT_LUNG, LEFT_LUNG)
                 if (filled[z] == side).sum() >= 3}
        mediastinum = np.zeros(filled.shape[1:], dtype=bool)
        if len(hulls) == 2:
            joint = convex_hull(filled[z] > 0)
            mediastinum = ndimage.binary_dilation(joint & ~hulls[RIGHT_LUNG] & ~hulls[LEFT_LUNG])
        for side, hull in hulls.items():
            hull_labels[z][hull & (hull_labels[z] == 0)] = side
            # Everything below happens inside the hull's box and one pixel around it (the dents' mouths), which
            # gives the same distances as the whole slice: the ring around the box is outside the hull.
            box = bounding_box(hull, np.ones(2, dtype=int))
            hull = hull[box]
            labels, count = label(hull & (filled[z][box] == 0) & tissue[z][box], 4)
            if count == 0:
                continue
            index = np.arange(1, count + 1)
            depth = _label_maxima(ndimage.distance_transform_edt(hull, sampling=spacing[1:]), labels, count)
            # The opening of each dent: the pixels just outside the hull next to it (one dent each, the largest
            # label where two meet, which is rare and harmless).
            mouth = ndimage.grey_dilation(labels, footprint=ndimage.generate_binary_structure(2, 1)) * ~hull
            mouth_size = np.bincount(mouth.ravel(), minlength=count + 1)[1:]
            facing = np.bincount(mouth[mediastinum[box]].ravel(), minlength=count + 1)[1:]
            keep = (depth <= settings.dent_max_depth_mm) & (
                facing <= settings.dent_mediastinal_fraction * np.maximum(mouth_size, 1))
            bottom, top = heights[side]
            if z >= bottom + settings.deep_dent_min_height_fraction * (top - bottom):
                keep |= (depth <= settings.deep_dent_max_depth_mm) & (facing == 0) & (
                    mouth_size * pixel_mm >= settings.deep_dent_min_mouth_mm)
            out[z][box][np.isin(labels, index[keep])] = side
    return out, hull_labels
