"""Resampling of (z, y, x) volumes between voxel grids, in float32 with ``torch.nn.functional.interpolate``.

One convention everywhere: cell-centred sampling (``align_corners=False``), so a grid of ``n`` voxels covering a
length ``L`` has voxel ``i`` centred at ``(i + 0.5) * L / n``. Resampling to a new spacing and back is then the
same operation with the shapes exchanged, and the classification grid obeys docs/formats.md §4.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

#: Downsampling factors from which the classification grid is smoothed first (aliasing becomes visible).
ANTIALIAS_FROM_FACTOR = 2.0


def shape_for_spacing(
    shape_zyx: Sequence[int], spacing_zyx_mm: Sequence[float], target_spacing_zyx_mm: Sequence[float]
) -> tuple[int, int, int]:
    """Voxel counts covering the same extent at ``target_spacing_zyx_mm`` (rounded, at least 1)."""
    extent = np.asarray(shape_zyx, dtype=float) * np.asarray(spacing_zyx_mm, dtype=float)
    return tuple(max(1, int(round(v))) for v in extent / np.asarray(target_spacing_zyx_mm, dtype=float))


def _interpolate(volume: np.ndarray, shape_zyx: Sequence[int]) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    with torch.no_grad():
        out = F.interpolate(tensor, size=tuple(int(v) for v in shape_zyx), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def resample_image(volume: np.ndarray, shape_zyx: Sequence[int]) -> np.ndarray:
    """Trilinear resampling of a (Z, Y, X) volume to ``shape_zyx`` (float32; a copy even when shapes match)."""
    if tuple(volume.shape) == tuple(int(v) for v in shape_zyx):
        return np.array(volume, dtype=np.float32, copy=True)
    return _interpolate(volume, shape_zyx)


def resample_mask(mask: np.ndarray, shape_zyx: Sequence[int]) -> np.ndarray:
    """Resample a 0/1 (Z, Y, X) mask: linear interpolation, then threshold at 0.5 (uint8 0/1).

    Linear-then-threshold keeps smooth boundaries where nearest-neighbour resampling makes staircases, and its
    inverse is the same operation, which is what makes the round trip to the original grid accurate.
    """
    if tuple(mask.shape) == tuple(int(v) for v in shape_zyx):
        return (np.asarray(mask) > 0).astype(np.uint8)
    return (_interpolate(np.asarray(mask, dtype=np.float32), shape_zyx) >= 0.5).astype(np.uint8)


def resample_on_device(
    volume: np.ndarray | torch.Tensor,
    shape_zyx: Sequence[int],
    device: torch.device | str | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """:func:`resample_image` (``threshold=None``) or a thresholded resampling, run on ``device``.

    With ``threshold``, the result is ``resample_image(volume) >= threshold`` as uint8 0/1 (``0.5`` on a 0/1 mask is
    :func:`resample_mask`). The interpolation and the threshold run on ``device`` (default: the CPU), and only the
    result comes back to the host: on a GPU the full-size float volume never exists in host memory.

    Returns
    -------
    (Z, Y, X) float32, or uint8 with ``threshold``; a numpy array in host memory.
    """
    shape_zyx = tuple(int(v) for v in shape_zyx)
    if tuple(volume.shape) == shape_zyx:  # nothing to interpolate
        values = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
        if threshold is not None:
            return (values >= threshold).astype(np.uint8)
        return np.array(values, dtype=np.float32, copy=True)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(volume, torch.Tensor):
        tensor = volume.to(device=device, dtype=torch.float32)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).to(device)
    with torch.no_grad():
        tensor = F.interpolate(tensor[None, None], size=shape_zyx, mode="trilinear", align_corners=False)[0, 0]
        if threshold is not None:
            return (tensor >= threshold).to(torch.uint8).cpu().numpy()
        return tensor.cpu().numpy()


def _smooth(volume: np.ndarray, factors: np.ndarray) -> np.ndarray:
    for axis, factor in enumerate(factors):
        if factor >= ANTIALIAS_FROM_FACTOR:
            volume = ndimage.gaussian_filter1d(volume, sigma=(factor - 1.0) / 2.0, axis=axis, mode="nearest",
                                               truncate=3.0, output=np.float32)
    return volume


def resample_masks(masks: Sequence[np.ndarray], shape_zyx: Sequence[int]) -> list[np.ndarray]:
    """:func:`resample_mask` for several masks of one shape in a single interpolation (channels)."""
    shape_zyx = tuple(int(v) for v in shape_zyx)
    if tuple(masks[0].shape) == shape_zyx:
        return [(np.asarray(mask) > 0).astype(np.uint8) for mask in masks]
    stacked = torch.from_numpy(np.stack([np.asarray(mask, dtype=np.float32) for mask in masks]))[None]
    with torch.no_grad():
        out = F.interpolate(stacked, size=shape_zyx, mode="trilinear", align_corners=False)[0]
    return [(channel >= 0.5).numpy().astype(np.uint8) for channel in out]


def resample_to_grid(volume: np.ndarray, grid_zyx: Sequence[int], sparse: bool = False) -> np.ndarray:
    """Resample a whole (Z, Y, X) volume onto the classification grid ``(N, H, W)`` (docs/formats.md §4).

    Exactly ``F.interpolate(volume[None, None], size=grid_zyx, mode="trilinear", align_corners=False)``, except
    that an axis shrunk by a factor ``f >= 2`` is first smoothed with a Gaussian of σ = (f - 1) / 2 voxels
    (scikit-image's anti-aliasing rule), so that thin structures between the sampled slices are not lost.

    ``sparse=True`` (for a lesion mask, mostly zero) smooths only the non-zero bounding box plus the filter's reach;
    the result is the same, the cost scales with the lesions rather than the volume.

    Returns
    -------
    float32 array of shape ``grid_zyx``.
    """
    volume = np.asarray(volume, dtype=np.float32)
    factors = np.asarray(volume.shape, dtype=float) / np.asarray(grid_zyx, dtype=float)
    if not np.any(factors >= ANTIALIAS_FROM_FACTOR):
        return _interpolate(volume, grid_zyx)
    if not sparse:
        return _interpolate(_smooth(volume, factors), grid_zyx)
    present = [np.flatnonzero(np.any(volume, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if present[0].size == 0:
        return np.zeros(tuple(int(v) for v in grid_zyx), dtype=np.float32)
    box = []
    for axis, indices in enumerate(present):
        reach = int(3.0 * (factors[axis] - 1.0) / 2.0 + 0.5) + 1 if factors[axis] >= ANTIALIAS_FROM_FACTOR else 0
        box.append(slice(max(0, indices[0] - reach), min(volume.shape[axis], indices[-1] + 1 + reach)))
    smoothed = np.zeros_like(volume)
    # 'nearest' edges: a box that stops inside the volume has zeros beyond it, exactly what the filter would see.
    smoothed[tuple(box)] = _smooth(volume[tuple(box)], factors)
    return _interpolate(smoothed, grid_zyx)
