"""Morphology on the working grid: components, per-slice hole filling, boxes, a fast ball closing, convex hulls.

The binary dilations and erosions by 3×3×3 steps (:func:`dilate`, :func:`erode`, :func:`opening`) are ORs and ANDs
of shifted views instead of ``scipy.ndimage``'s generic loop over the structuring element: the same result (tested
against SciPy), an order of magnitude faster, which is most of the lung mask's time.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dscovid.measurements.components import label

# Connectivity within one axial slice only: fills holes slice by slice in a single call.
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


#: 6-connected 3D neighbourhood (``ndimage.generate_binary_structure(3, 1)``, SciPy's default structure).
CROSS_3D = ndimage.generate_binary_structure(3, 1)


def _step_parts(structure: np.ndarray) -> tuple[bool, bool]:
    """(square in plane, through-plane neighbours) of a 3×3×3 step: in plane the centre with its 4 or 8 neighbours,
    through the plane the centre's two neighbours or none. Other structuring elements are refused."""
    structure = np.asarray(structure, dtype=bool)
    square = structure[1].all()
    through = bool(structure[0, 1, 1])
    expected = np.zeros((3, 3, 3), dtype=bool)
    expected[1] = ndimage.generate_binary_structure(2, 2 if square else 1)
    expected[0, 1, 1] = expected[2, 1, 1] = through
    if structure.shape != (3, 3, 3) or not np.array_equal(structure, expected):
        raise ValueError("a step must be the in-plane cross or square, with or without the two through-plane neighbours")
    return bool(square), through


def _combine(mask: np.ndarray, structure: np.ndarray, combine) -> np.ndarray:
    """``combine`` (OR, AND) of ``mask`` with its shifts by the offsets of ``structure``; the border is left alone."""
    square, through = _step_parts(structure)
    out = mask.copy()
    combine(out[:, 1:], mask[:, :-1], out=out[:, 1:])
    combine(out[:, :-1], mask[:, 1:], out=out[:, :-1])
    source = out.copy() if square else mask  # a square is the y step followed by the x step
    combine(out[:, :, 1:], source[:, :, :-1], out=out[:, :, 1:])
    combine(out[:, :, :-1], source[:, :, 1:], out=out[:, :, :-1])
    if through:
        combine(out[1:], mask[:-1], out=out[1:])
        combine(out[:-1], mask[1:], out=out[:-1])
    return out


def dilate(mask: np.ndarray, structure: np.ndarray = CROSS_3D, iterations: int = 1,
           within: np.ndarray | None = None) -> np.ndarray:
    """``ndimage.binary_dilation(mask, structure, iterations, mask=within)`` for a 3×3×3 step (see :func:`_step_parts`)."""
    out = np.asarray(mask, dtype=bool)
    for _ in range(iterations):
        grown = _combine(out, structure, np.logical_or)
        out = grown if within is None else np.where(within, grown, out)
    return out


def erode(mask: np.ndarray, structure: np.ndarray = CROSS_3D, iterations: int = 1,
          border_value: int = 0) -> np.ndarray:
    """``ndimage.binary_erosion(mask, structure, iterations, border_value=border_value)`` for a 3×3×3 step."""
    out = np.asarray(mask, dtype=bool)
    through = _step_parts(structure)[1]
    for _ in range(iterations):
        out = _combine(out, structure, np.logical_and)
        if not border_value:  # outside the array is background: the faces the structure reaches across are eroded
            out[:, [0, -1]] = False
            out[:, :, [0, -1]] = False
            if through:
                out[[0, -1]] = False
    return out


def opening(mask: np.ndarray, structure: np.ndarray = CROSS_3D, iterations: int = 1) -> np.ndarray:
    """``ndimage.binary_opening(mask, structure, iterations)`` for a 3×3×3 step."""
    return dilate(erode(mask, structure, iterations), structure, iterations)


def components(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Connected component labels and the voxel count of each label (index 0 = background).

    ``ndimage.label(mask, structure)``'s labels: 6- and 26-connected components come from
    :func:`dscovid.measurements.components.label` (faster, numbered alike), other structures from SciPy.
    """
    connectivity = _connectivity(structure)
    if connectivity is not None and np.ndim(mask) == 3:
        labels, count = label(mask, connectivity)
    else:
        labels, count = ndimage.label(mask, structure=structure)
    return labels, np.bincount(labels.ravel(), minlength=count + 1)


def _connectivity(structure: np.ndarray | None) -> int | None:
    """6 or 26 for SciPy's default 3D structure or the full 3×3×3 cube; None for any other structure."""
    if structure is None:
        return 6
    structure = np.asarray(structure, dtype=bool)
    if structure.shape != (3, 3, 3):
        return None
    return 6 if np.array_equal(structure, CROSS_3D) else 26 if structure.all() else None


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes(mask, structure=IN_PLANE)``: the background that no in-plane path joins to the
    slice's edge is filled (one labelling of the background instead of SciPy's propagation from the edge)."""
    mask = np.asarray(mask, dtype=bool)
    labels, _ = ndimage.label(~mask, structure=IN_PLANE)
    outside = np.unique(np.concatenate([labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]))
    return mask | ~np.isin(labels, outside[outside > 0]) & (labels > 0)


def bounding_box(mask: np.ndarray, margin: np.ndarray) -> tuple[slice, ...]:
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


def closing(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological closing with (an approximation of) a ball of ``radius_mm``.

    The array border counts as inside for the erosion, so a lung cut by the field of view is not eaten away.
    """
    structures = _ball_steps(radius_mm, spacing)
    closed = mask
    for structure in structures:
        closed = dilate(closed, structure)
    for structure in structures:
        closed = erode(closed, structure, border_value=1)
    return closed | mask


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a 2D mask as a mask: scikit-image's ``convex_hull_image`` (each pixel a diamond reaching
    the middles of its edges; pixels on the hull's outline are in), computed row by row.

    The hull of the row ends' diamonds is the hull of all pixels' (Qhull), and each row of the grid meets the convex
    polygon in one interval. Its ends lie on multiples of 1/(2·height) or on whole pixels, so the small tolerance
    decides exactly which pixel centres are on the outline, as scikit-image's point-in-polygon test does.
    """
    from scipy.spatial import ConvexHull

    out = np.zeros(mask.shape, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return out
    sub = mask[rows[0] : rows[-1] + 1]
    present = sub.any(axis=1)
    r = np.flatnonzero(present).astype(float)
    first = np.argmax(sub[present], axis=1).astype(float)
    last = (sub.shape[1] - 1 - np.argmax(sub[present][:, ::-1], axis=1)).astype(float)
    points = np.concatenate([
        np.stack([r, first - 0.5], axis=1), np.stack([r, last + 0.5], axis=1),
        np.stack([r - 0.5, first], axis=1), np.stack([r + 0.5, first], axis=1),
        np.stack([r - 0.5, last], axis=1), np.stack([r + 0.5, last], axis=1),
    ])
    vertices = points[ConvexHull(points).vertices]  # the diamonds make it two-dimensional, never degenerate
    y0, x0 = vertices[:, 0:1], vertices[:, 1:2]
    y1, x1 = np.roll(vertices, -1, axis=0)[:, 0:1], np.roll(vertices, -1, axis=0)[:, 1:2]
    grid_rows = np.arange(sub.shape[0], dtype=float)[None, :]
    crossing = (grid_rows >= np.minimum(y0, y1)) & (grid_rows <= np.maximum(y0, y1))
    flat = y1 == y0
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(flat, x0, x0 + (grid_rows - y0) * (x1 - x0) / np.where(flat, 1.0, y1 - y0))
    x_end = np.where(flat, x1, x)  # a horizontal edge on a grid row spans both its ends
    low = np.min(np.where(crossing, np.minimum(x, x_end), np.inf), axis=0)
    high = np.max(np.where(crossing, np.maximum(x, x_end), -np.inf), axis=0)
    columns = np.arange(mask.shape[1])[None, :]
    out[rows[0] : rows[-1] + 1] = (columns >= low[:, None] - 1e-6) & (columns <= high[:, None] + 1e-6)
    return out
