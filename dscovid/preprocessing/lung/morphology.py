"""Morphology on the working grid: components, per-slice hole filling, boxes, a fast ball closing, convex hulls."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Connectivity within one axial slice only: fills holes slice by slice in a single call.
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def components(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Connected component labels and the voxel count of each label (index 0 = background)."""
    labels, count = ndimage.label(mask, structure=structure)
    return labels, np.bincount(labels.ravel(), minlength=count + 1)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(mask, structure=IN_PLANE)


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
        closed = ndimage.binary_dilation(closed, structure)
    for structure in structures:
        closed = ndimage.binary_erosion(closed, structure, border_value=1)
    return closed | mask


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a 2D mask as a mask, computed on its bounding box (scikit-image is slow on big images)."""
    from skimage.morphology import convex_hull_image  # imported here: only the dent filling needs scikit-image

    box = bounding_box(mask, np.zeros(2, dtype=int))
    hull = np.zeros_like(mask)
    hull[box] = convex_hull_image(mask[box])
    return hull
