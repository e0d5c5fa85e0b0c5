"""The coarse working grid: block averaging onto it, and the full-resolution labels refined from it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dscovid.errors import DscovidError
from dscovid.preprocessing.lung.morphology import IN_PLANE, bounding_box, dilate, erode, opening
from dscovid.preprocessing.lung.settings import LEFT_LUNG, RIGHT_LUNG

_AIR_HU = -1024.0


def block_mean(image: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Mean over blocks of ``factors`` voxels (a trailing partial block is dropped), HU clipped to [-1024, 3071].

    Done in slabs of slices, so a 512×512×600 scan never needs a full float copy. An integer scan (the usual
    case) is summed exactly in int32 as one strided view per offset within the block, which is several times
    faster than NumPy's sum over three interleaved axes.
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
        region = image[start * fz : stop * fz, : ny * fy, : nx * fx]
        if integral:
            block = np.clip(region.astype(np.int32), int(_AIR_HU), 3071)
            total = np.zeros((stop - start, ny, nx), dtype=np.int32)
            for offset in np.ndindex(fz, fy, fx):
                total += block[offset[0]::fz, offset[1]::fy, offset[2]::fx]
        else:
            block = np.clip(region, _AIR_HU, 3071.0).reshape(stop - start, fz, ny, fy, nx, fx)
            total = block.sum(axis=(1, 3, 5), dtype=np.float64)
        out[start:stop] = total / float(fz * fy * fx)
    return out


def upsample(coarse: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Repeat each coarse voxel over its block of the full grid (the dropped partial blocks take the last one)."""
    out = coarse
    for axis, (n, f, c) in enumerate(zip(shape, factors, coarse.shape)):
        if f == 1 and n == c:
            continue
        repeats = np.full(c, f)
        repeats[-1] += n - c * f
        out = np.repeat(out, repeats, axis=axis)
    return out


def refine(
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
    box = bounding_box(filled, np.ones(3, dtype=int))
    filled, sides = filled[box], sides[box]
    inner = np.zeros_like(filled)
    band = np.zeros_like(filled)
    lesion = np.zeros(filled.shape, dtype=bool)
    for side in (RIGHT_LUNG, LEFT_LUNG):
        lung = filled == side
        if not lung.any():
            continue
        core = erode(lung, border_value=1)  # the scan's edge is not the lung's edge
        inner[core] = side
        band[dilate(lung) & ~core & (band == 0) & ((filled == 0) | lung)] = side
        # Filled, not aerated, and thicker than the one-voxel partial-volume rim of every lung.
        added = lung & (sides != side)
        lesion |= lung & ~core & (opening(added, IN_PLANE) | ~dilate(sides == side))
    # One coarse code per voxel, so a single upsampling carries all three maps.
    code = inner + 3 * band + 9 * lesion.astype(np.uint8)
    full_box = tuple(
        slice(b.start * f, n_full if b.stop == n else b.stop * f)
        for b, f, n, n_full in zip(box, factors, coarse_shape, image.shape)
    )
    full_code = upsample(code, factors, [b.stop - b.start for b in full_box])
    labels_box = full_code % 3
    band_full = (full_code // 3) % 3
    take = (labels_box == 0) & (band_full > 0) & ((image[full_box] < air_threshold_hu) | (full_code >= 9))
    labels_box[take] = band_full[take]
    labels[full_box] = labels_box
    return labels
