"""Augmentation that keeps the segmentation patch and the classification grid geometrically consistent.

The two branches of the network meet through the patch box (docs/formats.md §4), so an augmentation that moves
the patch content must move the classification grid the same way, or the cross-stitch would mix features of
different anatomy. Three decisions follow:

- **Rotation and scaling** act on the whole scan about the patch centre, in millimetres (so anisotropic voxels
  rotate correctly): the patch is resampled from the full volume, and the classification grid is resampled from
  itself with the same transform. The patch box is unchanged, because a transform about the patch centre maps the
  box onto itself, and the mapping of docs/formats.md §4 stays exact. Rotation is in-plane (about z) only:
  thick-slice CT is strongly anisotropic, and nnU-Net does the same for such patches.
- **Mirroring** flips the patch, the masks and the classification grid along the same axis and moves the box to
  its mirrored position (``start' = L - start - size``), again exact. By default only left-right (x): flipping z
  or y would erase the lower-lobe and posterior predominance that distinguishes COVID-19 from CAP.
- **Intensity** (brightness, contrast, gamma) draws its parameters once per sample and applies them to the patch
  and the classification image alike (they are views of one scan); Gaussian noise (batchgenerators) is drawn
  independently for each. Voxels that were 0 (outside the lung, masked by preprocessing) stay 0.
- **Scanner** (blur, sharpening, thick slices; off by default, a trainer variant turns them on) acts on the
  segmentation patch only: it imitates another reconstruction kernel (in-plane Gaussian blur, or unsharp masking
  for a sharp kernel) and thicker slices (the patch taken down to fewer slices and back), which change the texture
  at the patch's resolution; each cell of the classification grid already averages many scan voxels.
- **Correlated noise** (off by default, a trainer variant turns it on): the Gaussian noise smoothed in-plane before
  it is added, so it has the grain of a scanner's kernel rather than independent voxels.
- **Lesion context** (off by default, a trainer variant turns it on) acts on the classifier's lesion map alone,
  the ground truth or the network's cached Ŝ that stands for Ŝ outside the patch: it removes whole lesions, small
  ones more often than large ones, and scales what is left down, as the network's map of an unseen scan misses
  and under-segments lesions that its map of a training scan (or the ground truth) has. The classifier then learns
  not to read "few small lesions" as CAP or non-pneumonia from a map that only lost them.
- **False lesions** (off by default, a trainer variant turns them on) also act on the classifier's lesion map
  alone: they add a few lesion-shaped blobs on healthy lung of any scan, the class unchanged, as the network's map
  of a noisier scanner's scan marks dense parenchyma. The image under them is the scan's own, so a classifier
  that reads the image where the map points (the lesion gate) learns that a map over normal lung is no finding.

All random parameters come from the data loader's own generator (one stream per background worker, derived from
the run seed), not from numpy's or Python's global generators, so a seeded run sees the same batches again.
Spatial resampling needs the full volume, so it happens while the patch is cut; the rest acts on the sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import affine_transform, gaussian_filter, label, zoom


@dataclass(frozen=True)
class AugmentationSettings:
    """Probabilities and ranges (nnU-Net's defaults where they apply; the image is in [0, 1], not z-scored)."""

    p_rotation: float = 0.2
    rotation_deg: float = 15.0  # in-plane, uniform in [-r, r]
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.85, 1.15)
    mirror_axes: tuple[int, ...] = (2,)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.01)
    noise_correlation_voxels: tuple[float, float] = (0.0, 0.0)  # in-plane Gaussian sigma of the noise (0: white)
    p_blur: float = 0.0
    blur_sigma_voxels: tuple[float, float] = (0.5, 1.5)  # in-plane
    p_sharpen: float = 0.0
    sharpen_amount: tuple[float, float] = (0.3, 1.0)  # unsharp masking, in-plane sigma 1 voxel
    p_thick_slices: float = 0.0
    slice_zoom: tuple[float, float] = (0.4, 0.8)  # slices kept, as a share of the patch's
    p_context: float = 0.0  # the lesion context degraded (degrade_context)
    context_drop: tuple[tuple[float, float], ...] = ((10.0, 0.9), (30.0, 0.4), (100.0, 0.05))  # (below ml, p)
    context_gain: tuple[float, float] = (0.5, 1.0)
    p_false_lesions: float = 0.0  # lesions added on healthy lung (add_false_lesions)
    false_lesion_count: tuple[int, int] = (1, 3)  # inclusive
    false_lesion_ml: tuple[float, float] = (2.0, 40.0)  # log-uniform
    false_lesion_level: tuple[float, float] = (0.5, 1.0)  # the map's value at a false lesion's core

    @classmethod
    def none(cls) -> AugmentationSettings:
        """No augmentation at all (validation batches)."""
        return cls(p_rotation=0, p_scale=0, mirror_axes=(), p_brightness=0, p_contrast=0, p_gamma=0, p_noise=0)

    @classmethod
    def scanner(cls) -> AugmentationSettings:
        """The defaults plus other scanners: noise three times as often, blur, sharpening and thick slices."""
        return cls(p_noise=0.3, p_blur=0.2, p_sharpen=0.2, p_thick_slices=0.25)

    @classmethod
    def context(cls) -> AugmentationSettings:
        """The defaults plus the lesion context of an unseen scan's quality for half of the samples."""
        return cls(p_context=0.5)

    @classmethod
    def false_lesions(cls) -> AugmentationSettings:
        """The defaults plus false lesions on healthy lung in the classifier's lesion map for half of the samples."""
        return cls(p_false_lesions=0.5)

    @classmethod
    def scanner_noise(cls) -> AugmentationSettings:
        """The defaults with the noise of other scanners alone: three times as often, correlated in-plane as a
        reconstruction kernel makes it (no blur, sharpening or thick slices)."""
        return cls(p_noise=0.3, noise_correlation_voxels=(0.5, 1.5))


def draw_spatial_matrix(
    settings: AugmentationSettings, spacing_zyx_mm: Sequence[float], rng: np.random.Generator
) -> np.ndarray | None:
    """A random (3, 3) map from output to input voxel offsets (z, y, x), or None for the identity.

    In millimetres the map is ``R(-angle) / scale`` (an in-plane rotation about z and an isotropic zoom); in voxels
    it is conjugated by the spacing, ``S^-1 M S``.
    """
    rotate = rng.random() < settings.p_rotation
    zoom = rng.random() < settings.p_scale
    if not (rotate or zoom):
        return None
    angle = np.deg2rad(rng.uniform(-settings.rotation_deg, settings.rotation_deg)) if rotate else 0.0
    scale = rng.uniform(*settings.scale_range) if zoom else 1.0
    return spatial_matrix(angle, scale, spacing_zyx_mm)


def spatial_matrix(angle_rad: float, scale: float, spacing_zyx_mm: Sequence[float]) -> np.ndarray:
    """The (3, 3) output-to-input voxel map of an in-plane rotation by ``angle_rad`` about z and a zoom by
    ``scale``: ``R(-angle) / scale`` in millimetres, ``S^-1 M S`` in voxels."""
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    spacing = np.asarray(spacing_zyx_mm, dtype=np.float64)
    return np.diag(1.0 / spacing) @ (rotation.T / scale) @ np.diag(spacing)


def resample_patch(
    volume: np.ndarray, start_zyx: np.ndarray, size_zyx: Sequence[int], matrix: np.ndarray, order: int = 1
) -> np.ndarray:
    """Patch ``[start, start + size)`` of ``volume`` (Z, Y, X) after ``matrix`` about the patch centre; 0 outside."""
    size = np.asarray(size_zyx, dtype=np.float64)
    centre = np.asarray(start_zyx, dtype=np.float64) + (size - 1) / 2
    offset = centre + matrix @ (np.asarray(start_zyx, dtype=np.float64) - centre)
    out = affine_transform(volume.astype(np.float32, copy=False), matrix, offset=offset,
                           output_shape=tuple(int(s) for s in size_zyx), order=order, mode="constant", cval=0.0)
    return out


def resample_grid(
    grid: np.ndarray, volume_shape_zyx: Sequence[int], start_zyx: np.ndarray, size_zyx: Sequence[int],
    matrix: np.ndarray,
) -> np.ndarray:
    """The classification grid (N, H, W) after the same transform about the patch centre (in volume voxels).

    Cell ``i`` of a grid with ``n`` cells over ``L`` voxels is centred at voxel ``(i + 0.5) L / n - 0.5``
    (cell-centred, ``align_corners=False``); the grid is resampled from itself at the transformed cell centres.
    """
    lengths = np.asarray(volume_shape_zyx, dtype=np.float64)
    cells = np.asarray(grid.shape, dtype=np.float64)
    to_voxel = lengths / cells  # D
    centre = np.asarray(start_zyx, dtype=np.float64) + (np.asarray(size_zyx, dtype=np.float64) - 1) / 2
    first_voxel = 0.5 * to_voxel - 0.5  # voxel position of cell 0
    grid_matrix = np.diag(1.0 / to_voxel) @ matrix @ np.diag(to_voxel)
    offset = (centre + matrix @ (first_voxel - centre) + 0.5) / to_voxel - 0.5
    return affine_transform(grid.astype(np.float32, copy=False), grid_matrix, offset=offset,
                            output_shape=grid.shape, order=1, mode="constant", cval=0.0)


def mirror(sample: dict, axis: int) -> dict:
    """Flip the patch, its mask and the classification grid along ``axis`` (0 z, 1 y, 2 x), and mirror the box.

    ``sample`` holds ``data``/``seg`` (1, Z, Y, X), ``cls_image``/``cls_lesion`` (1, N, H, W), ``patch_box``
    (2, 3) start and size, ``volume_shape`` (3,); it is changed in place and returned.
    """
    for key in ("data", "seg", "cls_image", "cls_lesion"):
        sample[key] = np.ascontiguousarray(np.flip(sample[key], axis=axis + 1))
    start, size = sample["patch_box"][0, axis], sample["patch_box"][1, axis]
    sample["patch_box"][0, axis] = sample["volume_shape"][axis] - start - size
    return sample


def adjust_intensity(
    image: np.ndarray, mean: float, brightness: float | None, contrast: float | None, gamma: float | None
) -> np.ndarray:
    """Brightness (multiply), contrast about ``mean``, clip to [0, 1], then gamma; voxels that were 0 stay 0."""
    outside = image == 0
    out = image.astype(np.float32, copy=True)
    if brightness is not None:
        out *= brightness
    if contrast is not None:
        out = (out - mean) * contrast + mean
    out = np.clip(out, 0.0, 1.0)
    if gamma is not None:
        out = out**gamma
    out[outside] = 0.0
    return out


def _inside_only(operation, image: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """``operation`` (a linear filter) over the voxels inside the region alone (normalised convolution): the zeros
    that preprocessing wrote outside the lung do not darken its edge, as they would not on a scanner."""
    weight = operation(inside.astype(np.float32))
    return operation(image * inside) / np.maximum(weight, 1e-3)


def degrade_patch(image: np.ndarray, blur: float | None, sharpen: float | None,
                  slice_zoom: float | None) -> np.ndarray:
    """The patch (1, Z, Y, X) as another scanner would give it; voxels that were 0 stay 0, values stay in [0, 1].

    ``blur``: in-plane Gaussian sigma in voxels; ``sharpen``: amount of in-plane unsharp masking (sigma 1 voxel);
    ``slice_zoom``: the share of the slices kept (linear down, then linear back to the patch's slice count).
    """
    inside = image[0] != 0
    out = image[0].astype(np.float32, copy=True)
    if blur is not None:
        out = _inside_only(lambda v: gaussian_filter(v, sigma=(0.0, blur, blur), mode="nearest"), out, inside)
    if sharpen is not None:
        low = _inside_only(lambda v: gaussian_filter(v, sigma=(0.0, 1.0, 1.0), mode="nearest"), out, inside)
        out = out + sharpen * (out - low)
    if slice_zoom is not None and out.shape[0] > 1:
        count = out.shape[0]
        slices = max(1, int(round(count * slice_zoom)))

        def thick(volume: np.ndarray) -> np.ndarray:
            fewer = zoom(volume, (slices / count, 1.0, 1.0), order=1, mode="nearest", grid_mode=True)
            return zoom(fewer, (count / slices, 1.0, 1.0), order=1, mode="nearest", grid_mode=True)[:count]

        out = _inside_only(thick, out, inside)
    out = np.clip(out, 0.0, 1.0)
    out[~inside] = 0.0
    return out[None]


#: Cells of the lesion map above this belong to a lesion (the network's map is a small positive number elsewhere).
CONTEXT_LESION_THRESHOLD = 0.05


def degrade_context(grid: np.ndarray, cell_ml: float, drop: Sequence[tuple[float, float]], gain: float,
                    rng: np.random.Generator) -> np.ndarray:
    """The lesion map (1, N, H, W) with some lesions removed and the rest scaled by ``gain``.

    A lesion is a 26-connected component of the cells above :data:`CONTEXT_LESION_THRESHOLD`; its volume is the sum
    of its cells' values times ``cell_ml``. ``drop`` lists (volume below which, probability) in increasing volume:
    a lesion is removed with the probability of the first bound its volume is under, larger ones are kept.
    """
    labels, count = label(grid[0] > CONTEXT_LESION_THRESHOLD, structure=np.ones((3, 3, 3), dtype=bool))
    out = grid.astype(np.float32, copy=True)
    if count:
        volumes = np.bincount(labels.ravel(), weights=grid[0].ravel().astype(np.float64), minlength=count + 1)
        volumes = volumes[1:] * cell_ml
        chances = np.zeros(count)
        for bound, chance in reversed(tuple(drop)):
            chances[volumes < bound] = chance
        removed = np.flatnonzero(rng.random(count) < chances) + 1
        out[0][np.isin(labels, removed)] = 0.0
    out *= gain
    return out


def add_false_lesions(grid: np.ndarray, region: np.ndarray, cell_mm: Sequence[float], volumes_ml: Sequence[float],
                      levels: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """The lesion map (1, N, H, W) with one ball per entry of ``volumes_ml`` added on healthy lung.

    ``region`` (N, H, W) bool is where the scan has lung (the classification image's nonzero cells); a ball is
    centred on a cell of it that the map does not mark (below :data:`CONTEXT_LESION_THRESHOLD`), has the volume's
    radius in millimetres (``cell_mm`` the grid's cell size, z y x), the value ``level`` inside with a one-cell soft
    edge, and is cut to the region; the map keeps the larger of its own value and the ball's. Without a free lung
    cell the map is returned unchanged.
    """
    out = grid.astype(np.float32, copy=True)
    free = np.flatnonzero(region & (grid[0] <= CONTEXT_LESION_THRESHOLD))
    if not free.size:
        return out
    cell = np.asarray(cell_mm, dtype=np.float64)
    axes = [np.arange(size) * step for size, step in zip(region.shape, cell)]
    for volume, level in zip(volumes_ml, levels):
        centre = np.array(np.unravel_index(free[rng.integers(free.size)], region.shape)) * cell
        radius = (3.0 * float(volume) * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
        distance = np.sqrt(sum(((axis - c) ** 2).reshape([-1 if i == a else 1 for i in range(3)])
                               for a, (axis, c) in enumerate(zip(axes, centre))))
        ball = float(level) * np.clip((radius - distance) / cell.min() + 0.5, 0.0, 1.0) * region
        np.maximum(out[0], ball.astype(np.float32), out=out[0])
    return out


def augment_sample(sample: dict, settings: AugmentationSettings, rng: np.random.Generator) -> dict:
    """Mirroring, then intensity with one draw for both views, then the scanner's look of the patch (only where
    its probability is above 0, so the default draws the same random numbers as without it), then independent
    Gaussian noise (in place).

    Contrast is taken about the classification image's mean inside the lung (the scan's mean, the same for both
    views); gamma acts on the fixed [0, 1] range of the preprocessed image. The lesion context is degraded (with
    ``settings.p_context`` > 0 only) using ``sample["cell_ml"]``, the volume of one classification-grid cell, and
    gets false lesions (``settings.p_false_lesions`` > 0 only) sized with ``sample["cell_mm"]``, the cell's size in
    millimetres (z, y, x).
    """
    for axis in settings.mirror_axes:
        if rng.random() < 0.5:
            mirror(sample, axis)
    if settings.p_context > 0 and rng.random() < settings.p_context:
        sample["cls_lesion"] = degrade_context(sample["cls_lesion"], float(sample["cell_ml"]), settings.context_drop,
                                               rng.uniform(*settings.context_gain), rng)
    if settings.p_false_lesions > 0 and rng.random() < settings.p_false_lesions:
        count = int(rng.integers(settings.false_lesion_count[0], settings.false_lesion_count[1] + 1))
        volumes = np.exp(rng.uniform(*np.log(settings.false_lesion_ml), size=count))
        levels = rng.uniform(*settings.false_lesion_level, size=count)
        sample["cls_lesion"] = add_false_lesions(sample["cls_lesion"], sample["cls_image"][0] > 0, sample["cell_mm"],
                                                 volumes, levels, rng)
    brightness = rng.uniform(*settings.brightness_range) if rng.random() < settings.p_brightness else None
    contrast = rng.uniform(*settings.contrast_range) if rng.random() < settings.p_contrast else None
    gamma = rng.uniform(*settings.gamma_range) if rng.random() < settings.p_gamma else None
    if brightness is not None or contrast is not None or gamma is not None:
        inside = sample["cls_image"][sample["cls_image"] > 0]
        mean = float(inside.mean()) if inside.size else 0.5
        for key in ("data", "cls_image"):
            sample[key] = adjust_intensity(sample[key], mean, brightness, contrast, gamma)
    blur = rng.uniform(*settings.blur_sigma_voxels) if settings.p_blur > 0 and rng.random() < settings.p_blur \
        else None
    sharpen = rng.uniform(*settings.sharpen_amount) if settings.p_sharpen > 0 and rng.random() < settings.p_sharpen \
        else None
    slices = rng.uniform(*settings.slice_zoom) \
        if settings.p_thick_slices > 0 and rng.random() < settings.p_thick_slices else None
    if blur is not None or sharpen is not None or slices is not None:
        sample["data"] = degrade_patch(sample["data"], blur, sharpen, slices)
    for key in ("data", "cls_image"):
        if rng.random() < settings.p_noise:
            sigma = np.sqrt(rng.uniform(*settings.noise_variance))
            noise = rng.normal(0.0, sigma, sample[key].shape)
            if settings.noise_correlation_voxels[1] > 0:
                noise = correlated(noise, rng.uniform(*settings.noise_correlation_voxels), sigma)
            sample[key] = (sample[key] + noise).astype(np.float32)
    return sample


def correlated(noise: np.ndarray, correlation_voxels: float, sigma: float) -> np.ndarray:
    """White ``noise`` (1, Z, Y, X) smoothed in-plane by a Gaussian of ``correlation_voxels`` and brought back to the
    standard deviation ``sigma``: the grain of a reconstruction kernel, as the phantoms' scanner makes it."""
    smooth = gaussian_filter(noise[0], sigma=(0.0, correlation_voxels, correlation_voxels), mode="wrap")
    return (smooth * (sigma / max(float(smooth.std()), 1e-12)))[None]
