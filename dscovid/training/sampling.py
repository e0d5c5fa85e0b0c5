"""Where a training patch is taken: random boxes, boxes forced onto a lesion, and cropping with zero padding.

A box is ``start`` and ``size`` ``(z, y, x)`` in preprocessed voxels. ``start`` may be negative, and
``start + size`` may exceed the volume, only when the volume is smaller than the patch along that axis; the
outside reads as zero (background, outside the lung), and the box keeps describing exactly where the patch lies,
which is what the model's patch-to-grid geometry needs (docs/formats.md §4).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def forced_lesion_flags(batch_size: int, oversample_foreground: float) -> list[bool]:
    """Which samples of a batch must contain lesion: the last ``round(batch_size * fraction)`` (nnU-Net's rule)."""
    n_random = round(batch_size * (1.0 - oversample_foreground))
    return [index >= n_random for index in range(batch_size)]


def _start_range(length: int, size: int) -> tuple[int, int]:
    """Lowest and highest start that keep the patch inside (or, for a short axis, around) the volume."""
    return min(0, length - size), max(0, length - size)


def random_start(shape_zyx: Sequence[int], size_zyx: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A uniformly random box start (3,) int64 inside the volume (centred around it where the volume is smaller)."""
    bounds = [_start_range(length, size) for length, size in zip(shape_zyx, size_zyx)]
    return np.array([rng.integers(low, high + 1) for low, high in bounds], dtype=np.int64)


def lesion_start(
    shape_zyx: Sequence[int],
    size_zyx: Sequence[int],
    locations_zyx: np.ndarray,
    rng: np.random.Generator,
    jitter_fraction: float = 0.25,
) -> np.ndarray:
    """A box start (3,) int64 whose patch contains a randomly chosen lesion voxel.

    The chosen voxel sits at the patch centre moved by up to ``jitter_fraction`` of the patch size, so the network
    does not learn that lesions are always central; the box is then shifted back inside the volume, which keeps the
    voxel inside the patch because the shift never exceeds what the centring left on that side.
    """
    size = np.asarray(size_zyx, dtype=np.int64)
    centre = locations_zyx[rng.integers(len(locations_zyx))].astype(np.int64)
    jitter = np.array([rng.integers(-int(s * jitter_fraction), int(s * jitter_fraction) + 1) for s in size])
    start = centre - size // 2 + jitter
    for axis, (length, extent) in enumerate(zip(shape_zyx, size)):
        low, high = _start_range(int(length), int(extent))
        start[axis] = min(max(start[axis], low), high)
    return start


#: Voxels kept per lesion for per-lesion sampling (a uniform sample of a larger lesion's voxels).
VOXELS_PER_LESION = 2000


def lesion_voxel_groups(lesion: np.ndarray, seed: int = 0,
                        max_voxels: int = VOXELS_PER_LESION) -> list[np.ndarray]:
    """The voxels (K, 3) int64 of each 26-connected lesion of a 0/1 mask (Z, Y, X), at most ``max_voxels`` each.

    The groups of per-lesion sampling: a patch forced onto a lesion first picks one lesion at random, then one of its
    voxels, so a lesion of a few voxels is as often in a patch as one of thousands (voxel sampling gives a lesion a
    share of the patches in proportion to its volume, and small lesions, the ones a model misses, almost none).
    """
    from scipy import ndimage

    from dscovid.measurements.findings import STRUCTURE_26

    labels, _ = ndimage.label(np.asarray(lesion) > 0, structure=STRUCTURE_26)
    rng = np.random.default_rng(seed)
    groups = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        local = np.argwhere(labels[box] == index)
        if len(local) > max_voxels:
            local = local[np.sort(rng.choice(len(local), size=max_voxels, replace=False))]
        groups.append((local + np.array([b.start for b in box])).astype(np.int64))
    return groups


def choose_start(
    shape_zyx: Sequence[int],
    size_zyx: Sequence[int],
    locations_zyx: np.ndarray,
    force_lesion: bool,
    rng: np.random.Generator,
    lesion_groups: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """The start of a training box: on a lesion when forced and the case has lesion locations, else at random.

    With ``lesion_groups`` (:func:`lesion_voxel_groups`) a forced box lands on a lesion chosen uniformly among them,
    then on one of its voxels; without, on one of ``locations_zyx`` chosen uniformly (voxel sampling).
    """
    if force_lesion and lesion_groups:
        group = lesion_groups[rng.integers(len(lesion_groups))]
        return lesion_start(shape_zyx, size_zyx, group, rng)
    if force_lesion and len(locations_zyx):
        return lesion_start(shape_zyx, size_zyx, locations_zyx, rng)
    return random_start(shape_zyx, size_zyx, rng)


def crop(array: np.ndarray, start_zyx: Sequence[int], size_zyx: Sequence[int]) -> np.ndarray:
    """The ``size_zyx`` block of ``array`` (Z, Y, X) starting at ``start_zyx``, zero outside the array."""
    out = np.zeros(tuple(int(s) for s in size_zyx), dtype=array.dtype)
    src, dst = [], []
    for start, size, length in zip(start_zyx, size_zyx, array.shape):
        lo, hi = max(int(start), 0), min(int(start) + int(size), length)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - int(start), lo - int(start) + max(hi - lo, 0)))
    out[tuple(dst)] = array[tuple(src)]
    return out
