"""Synthetic chest-CT phantoms with COVID-19 / CAP lesions: the project's built-in dataset.

Each case is a plausible chest CT in Hounsfield units (see :mod:`dataset_conversion.synthetic_anatomy` for the
anatomy, :mod:`dataset_conversion.synthetic_trees` for vessels and airways and
:mod:`dataset_conversion.synthetic_lesions` for the lesions, which follow the paper's four findings). The anatomy
is built analytically in patient millimetres and sampled on the case's voxel grid, then blurred like a scanner
and given correlated noise. Spacing, slice thickness, field of view, patient size and orientation (flipped axes,
small oblique rotations) vary between cases.

Case ``i`` of seed ``s`` depends on ``(s, i)`` only, so cases can be generated in any order or in parallel, and
``--full-size`` renders the same patient (same anatomy and lesions) on a finer grid. Named variants
(:mod:`dataset_conversion.synthetic_variants`: thick slices, strong noise and a sharp kernel, another field of
view and spacing, other lesion sizes) scan the same patients differently.

Public functions: :func:`generate_case`, :func:`generate_dataset`, :func:`class_for_index`.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from dataset_conversion.synthetic_anatomy import AIR_HU, Anatomy, dome_z, sample_anatomy, texture, tissue_hu
from dataset_conversion.synthetic_lesions import Lesion, plan_lesions, sample_lung
from dataset_conversion.synthetic_trees import airways, occupancy, pulmonary_vessels
from dataset_conversion.synthetic_variants import (
    DEFAULT_VARIANT,
    DRAWN_FIELDS,
    Variant,
    get_variant,
    require_full_size_compatible,
)
from dscovid.errors import DscovidError
from dscovid.io.dataset import CHANNEL_SUFFIX, load_dataset_json, make_dataset_json, write_json_atomic
from dscovid.io.image_io import Geometry, write_image

log = logging.getLogger(__name__)

GENERATOR_VERSION = "2"

#: Ten consecutive cases hold 4 COVID-19, 3 CAP and 3 non-pneumonia scans, in an order shuffled per block and seed.
_CLASS_BLOCK = ("covid",) * 4 + ("cap",) * 3 + ("non_pneumonia",) * 3

#: Thickness (mm) of the peripheral rim at which the phantoms are tuned to the paper's peripheral lesion ratios
#: (62.4 % COVID-19, 24.5 % CAP). The paper does not state the thickness behind these numbers (Fig. 1 i plots
#: PLR against it); 15 mm is this project's choice.
PLR_THICKNESS_MM = 15.0

#: Largest number of voxels whose patient coordinates are held at once (the full-size grid is rendered in slabs).
_SLAB_VOXELS = 2_500_000


@dataclass(frozen=True)
class Grid:
    """The voxel grid of one case and where the patient lies in it.

    ``patient_to_world_mm`` is added to patient coordinates (module doc of synthetic_anatomy) to get LPS world
    coordinates. The scanner model: slice profile FWHM ``slice_thickness_mm`` and in-plane point spread FWHM
    ``psf_fwhm_mm`` (each blur sigma at least ``min_blur_voxels``), in-plane unsharp masking of
    ``edge_enhancement`` (0: none), noise of standard deviation ``noise_hu`` correlated in-plane by a Gaussian of
    ``noise_correlation_voxels``.
    """

    geometry: Geometry
    patient_to_world_mm: tuple[float, float, float]
    slice_thickness_mm: float
    psf_fwhm_mm: float
    noise_hu: float
    padding_hu: float | None
    orientation: str
    table_gap_mm: float
    noise_correlation_voxels: float = 0.7
    min_blur_voxels: float = 0.4
    edge_enhancement: float = 0.0

    def index_to_patient(self) -> np.ndarray:
        """4×4 matrix from homogeneous (z, y, x, 1) voxel indices to patient (X, Y, Z, 1) mm."""
        matrix = self.geometry.index_to_world_matrix()
        matrix[:3, 3] -= np.asarray(self.patient_to_world_mm)
        return matrix

    def patient_to_index(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_patient())

    def patient_coordinates(self, z_range: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient X, Y, Z (float32, mm) of the voxels of slices ``z_range[0]:z_range[1]``, each (z, y, x)."""
        _, ny, nx = self.geometry.shape_zyx
        matrix = self.index_to_patient().astype(np.float32)
        iz = np.arange(*z_range, dtype=np.float32)[:, None, None]
        iy = np.arange(ny, dtype=np.float32)[None, :, None]
        ix = np.arange(nx, dtype=np.float32)[None, None, :]
        return tuple(matrix[k, 0] * iz + matrix[k, 1] * iy + matrix[k, 2] * ix + matrix[k, 3] for k in range(3))


@dataclass
class SyntheticCase:
    """One generated case: image (int16 HU), lesion and lung masks (uint8), all (z, y, x) on ``geometry``."""

    image_hu: np.ndarray
    lesion: np.ndarray
    lung: np.ndarray
    geometry: Geometry
    class_name: str
    metadata: dict

    def __iter__(self):
        return iter((self.image_hu, self.lesion, self.lung, self.geometry, self.class_name, self.metadata))


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """Independent random streams per case: anatomy, lesions and trees do not depend on the grid or on each other."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), stream]))


def class_for_index(seed: int, index: int) -> str:
    """Class of case ``index``: each block of ten holds 4 covid, 3 cap, 3 non_pneumonia, shuffled per (seed, block)."""
    order = _rng(seed, index // 10, 99).permutation(len(_CLASS_BLOCK))
    return _CLASS_BLOCK[int(order[index % 10])]


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [k for k in range(3) if k != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def sample_grid(anatomy: Anatomy, rng: np.random.Generator, full_size: bool = False, scale: float = 1.0,
                variant: Variant = DEFAULT_VARIANT, variant_draws: np.ndarray | None = None) -> Grid:
    """Draw the scan of one patient: orientation, field of view, spacing, slice thickness, noise, padding.

    ``scale`` multiplies the voxel counts (and divides the spacing) of the default small grid: 0.5 gives tiny cases
    for fast statistical tests. ``variant`` changes some of the draws (see
    :mod:`dataset_conversion.synthetic_variants`); its values come from ``variant_draws`` (uniform numbers in
    [0, 1), one per field of ``DRAWN_FIELDS``), never from ``rng``, so ``rng`` is consumed exactly as by the
    default and the default grid is unchanged.
    """
    lateral, anterior, posterior = anatomy.body_half_extent()
    choice = rng.uniform()
    flips = np.eye(3)
    rotation = np.eye(3)
    if choice < 0.5:
        orientation = "identity"
    elif choice < 0.7:
        orientation, flips = "z_flipped", np.diag([1.0, 1.0, -1.0])
    elif choice < 0.85:
        orientation, flips = "xy_flipped", np.diag([-1.0, -1.0, 1.0])
    elif choice < 0.93:
        angle = rng.uniform(4.0, 12.0) * rng.choice([-1, 1])
        orientation, rotation = f"gantry_tilt_{angle:+.1f}deg", _rotation(0, angle)
    else:
        angle = rng.uniform(3.0, 8.0) * rng.choice([-1, 1])
        orientation, rotation = f"axial_rotation_{angle:+.1f}deg", _rotation(2, angle)
    direction = rotation @ flips
    tilt = np.degrees(np.arccos(np.clip(abs(rotation[2, 2]), 0, 1)))
    spin = np.degrees(np.arccos(np.clip(abs(rotation[0, 0]), 0, 1)))
    extent_xy = max(2 * lateral, anterior + posterior + 2 * 30.0)
    fov = extent_xy * rng.uniform(1.0, 1.1) * (1.0 + np.sin(np.radians(spin))) + 10.0
    z_extent = (anatomy.top_z - anatomy.bottom_z + rng.uniform(0.0, 30.0)
                + (anterior + posterior) * np.sin(np.radians(tilt)))
    if full_size:
        require_full_size_compatible(variant)
        n_xy = 512
        spacing_z = rng.uniform(1.0, 1.5)
        # A large patient's shoulders may be cut by the field of view, as on real scans.
        fov = float(np.clip(fov, 512 * 0.6, 512 * 0.8))
        thickness_ratio = rng.choice([1.0, 1.0, 1.25, 1.6])
        psf = rng.uniform(0.7, 1.2)
        noise = rng.uniform(18.0, 40.0)
    else:
        spacing_xy = rng.uniform(2.4, 3.0)
        matrix = (100, 160)
        spacing_z = rng.uniform(3.0, 4.0)
        thickness_ratio = rng.choice([1.0, 1.0, 1.2])
        psf = rng.uniform(1.0, 1.6)
        noise = rng.uniform(8.0, 22.0)
    drawn = _variant_values(variant, variant_draws)
    if "fov_factor" in drawn:
        fov = fov * drawn["fov_factor"]
    if not full_size:
        spacing_xy = drawn.get("spacing_xy_mm", spacing_xy)
        matrix = variant.matrix_xy or matrix
        n_xy = int(np.clip(np.ceil(fov / spacing_xy), *matrix))
    spacing_z = drawn.get("slice_spacing_mm", spacing_z)
    thickness = spacing_z * drawn.get("slice_thickness_ratio", thickness_ratio)
    psf = psf * drawn.get("psf_factor", 1.0)
    noise = noise * drawn.get("noise_factor", 1.0)
    n_xy = max(int(round(n_xy * scale)), 16)
    spacing_xy = fov / n_xy
    if "slice_spacing_mm" in drawn:
        # Real reconstructions have round slice spacings: keep it exactly and cover a little more instead.
        spacing_z = spacing_z / scale
        n_z = int(np.ceil(z_extent / spacing_z))
    else:
        n_z = int(np.ceil(z_extent / spacing_z * scale))
        spacing_z = z_extent / n_z
    padding = float(rng.choice([-2048.0, -3024.0])) if rng.uniform() < 0.35 else None
    centre = np.array([rng.uniform(-8, 8), 0.5 * (posterior - anterior) + rng.uniform(-8, 8),
                       0.5 * (anatomy.top_z + anatomy.bottom_z) + rng.uniform(-6, 6)])
    to_world = np.array([rng.uniform(-20, 20), rng.uniform(-40, 40), rng.uniform(-600, 0)])
    spacing_xyz = np.array([spacing_xy, spacing_xy, spacing_z])
    index_centre = (np.array([n_xy, n_xy, n_z]) - 1) / 2.0
    origin = centre + to_world - (direction * spacing_xyz[None, :]) @ index_centre
    geometry = Geometry(
        shape_zyx=(n_z, n_xy, n_xy),
        spacing_zyx_mm=(float(spacing_z), float(spacing_xy), float(spacing_xy)),
        origin_xyz_mm=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in direction.ravel()),
    )
    return Grid(geometry=geometry, patient_to_world_mm=tuple(float(v) for v in to_world),
                slice_thickness_mm=float(thickness), psf_fwhm_mm=float(psf), noise_hu=float(noise),
                padding_hu=padding, orientation=orientation, table_gap_mm=float(rng.uniform(5.0, 30.0)),
                noise_correlation_voxels=_or(variant.noise_correlation_voxels, Grid.noise_correlation_voxels),
                min_blur_voxels=_or(variant.min_blur_voxels, Grid.min_blur_voxels),
                edge_enhancement=drawn.get("edge_enhancement", Grid.edge_enhancement))


def _or(value: float | None, default: float) -> float:
    return default if value is None else float(value)


def _variant_values(variant: Variant, draws: np.ndarray | None) -> dict[str, float]:
    """The value of each range field the variant sets, from its slot of ``draws`` (uniform in [0, 1))."""
    values = {}
    for slot, name in enumerate(DRAWN_FIELDS):
        bounds = getattr(variant, name)
        if bounds is not None:
            if draws is None:
                raise ValueError(f"variant {variant.name!r} needs its random draws")
            low, high = bounds
            values[name] = float(low + (high - low) * draws[slot])
    return values


def _table(anatomy: Anatomy, grid: Grid, X, Y):
    """HU of the patient table under the back (two thin shells around a foam core), NaN elsewhere."""
    _, _, posterior = anatomy.body_half_extent()
    top = posterior + grid.table_gap_mm
    depth = Y - top
    curved = depth - 0.0006 * X**2  # the table top is slightly concave
    shell = ((curved >= 0) & (curved < 2.5)) | ((curved >= 12.0) & (curved < 14.5))
    core = (curved >= 2.5) & (curved < 12.0)
    wide = np.abs(X) < 230.0
    return np.where(wide & shell, 150.0, np.where(wide & core, -850.0, np.nan))


def _render_anatomy(anatomy: Anatomy, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """HU and lung mask of the anatomy on the grid, slab by slab to bound memory."""
    nz, ny, nx = grid.geometry.shape_zyx
    hu = np.empty((nz, ny, nx), dtype=np.float32)
    lung = np.empty((nz, ny, nx), dtype=bool)
    step = max(1, _SLAB_VOXELS // (ny * nx))
    for z0 in range(0, nz, step):
        z1 = min(z0 + step, nz)
        X, Y, Z = grid.patient_coordinates((z0, z1))
        slab, lung[z0:z1] = tissue_hu(anatomy, X, Y, Z)
        table = _table(anatomy, grid, X, Y)
        air = slab == AIR_HU
        slab[air & np.isfinite(table)] = table[air & np.isfinite(table)]
        hu[z0:z1] = slab
    return hu, lung


def _index_box(grid: Grid, low: np.ndarray, high: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Voxel index slices (z, y, x) covering the patient-mm box ``[low, high]`` (None when it misses the grid)."""
    corners = np.array([[x, y, z, 1.0] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    index = corners @ grid.patient_to_index().T
    start = np.floor(index[:, :3].min(axis=0)).astype(int) - 1
    stop = np.ceil(index[:, :3].max(axis=0)).astype(int) + 2
    shape = np.array(grid.geometry.shape_zyx)
    start, stop = np.clip(start, 0, shape), np.clip(stop, 0, shape)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def _box_coordinates(grid: Grid, box: tuple[slice, slice, slice]):
    matrix = grid.index_to_patient().astype(np.float32)
    iz = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None, None]
    iy = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :, None]
    ix = np.arange(box[2].start, box[2].stop, dtype=np.float32)[None, None, :]
    return tuple(matrix[k, 0] * iz + matrix[k, 1] * iy + matrix[k, 2] * ix + matrix[k, 3] for k in range(3))


def _paint_lesions(anatomy: Anatomy, grid: Grid, lesions: list[Lesion], hu: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Paint each lesion's texture into the lung part of ``hu`` (in place); return the mask of painted voxels."""
    lesion_mask = np.zeros(hu.shape, dtype=bool)
    for lesion in lesions:
        box = _index_box(grid, *lesion.bounds())
        if box is None:
            continue
        X, Y, Z = _box_coordinates(grid, box)
        # A little texture on the radius makes the boundary irregular rather than a smooth ellipsoid.
        radius = lesion.radius(X, Y, Z) * (1.0 + 0.006 * texture(anatomy, X, Y, Z, scale=1.8))
        in_lung = lung[box]
        reach = float(lesion.axes.min())
        weight = np.clip((1.0 - radius) * reach / lesion.edge_mm + 0.5, 0.0, 1.0) * in_lung
        inside = (radius <= 1.0) & in_lung
        # Where the pleura cuts the blob, islands can be left apart from the lesion (across a recess or the
        # mediastinum); only the largest piece is painted, so a planned lesion is one lesion on the scan.
        labels, count = ndimage.label(inside, structure=np.ones((3, 3, 3), dtype=bool))
        if count > 1:
            largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
            keep = labels == largest
            dropped = ndimage.binary_dilation(inside & ~keep, iterations=2) & ~keep
            weight[dropped] = 0.0
            inside = keep
        if lesion.kind == "consolidation":
            value = lesion.level_hu + 0.8 * texture(anatomy, X, Y, Z, scale=2.5)
        else:
            value = lesion.level_hu + 1.6 * texture(anatomy, X, Y, Z, scale=2.5)
            if lesion.kind == "mixed":
                core = np.clip((0.55 - radius) * reach / 2.0 + 0.5, 0.0, 1.0)
                value = value * (1 - core) + (lesion.core_hu + 0.8 * texture(anatomy, X, Y, Z, scale=2.5)) * core
        region = hu[box]
        hu[box] = region * (1.0 - weight) + value * weight
        lesion_mask[box] |= inside
    return lesion_mask


def _composite_trees(anatomy: Anatomy, grid: Grid, hu: np.ndarray, seed: int, index: int) -> None:
    """Add the bronchi (wall and air lumen) and the vessels to ``hu`` as partial volumes (in place).

    The trees stay inside the lungs by construction (their end points are checked analytically while growing).
    """
    spacing = np.asarray(grid.geometry.spacing_zyx_mm)
    voxel = float(np.prod(spacing))
    shape = grid.geometry.shape_zyx
    to_index = grid.patient_to_index()
    bronchi = airways(anatomy, _rng(seed, index, 3))
    vessels = pulmonary_vessels(anatomy, _rng(seed, index, 4))
    render_rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), 5, *shape]))
    common = dict(patient_to_index=to_index, shape_zyx=shape, voxel_volume_mm3=voxel,
                  min_spacing_mm=float(spacing.min()), rng=render_rng)
    outer = occupancy(bronchi, radius_scale=1.0, radius_offset_mm=0.0, **common)
    lumen = occupancy(bronchi, radius_scale=0.75, radius_offset_mm=-0.2, **common)
    lumen = np.minimum(lumen, outer)
    wall = outer - lumen
    hu *= 1.0 - outer
    hu += wall * 20.0 + lumen * AIR_HU
    vessel = occupancy(vessels, **common)
    hu *= 1.0 - vessel
    hu += vessel * anatomy.blood_hu


def _scanner(grid: Grid, hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur like the scanner (in-plane point spread, slice profile, kernel overshoot), add correlated noise, clip,
    pad, to int16."""
    spacing = np.asarray(grid.geometry.spacing_zyx_mm)
    sigma_mm = np.array([grid.slice_thickness_mm, grid.psf_fwhm_mm, grid.psf_fwhm_mm]) / 2.3548
    # Below ~0.4 voxel a Gaussian does nothing visible; the coarse grids still get the partial-volume look.
    sigma = np.maximum(sigma_mm / spacing, grid.min_blur_voxels)
    blurred = ndimage.gaussian_filter(hu, sigma=sigma, mode="nearest")
    if grid.edge_enhancement > 0:
        # A sharp reconstruction kernel overshoots at edges: unsharp masking in-plane.
        smooth = ndimage.gaussian_filter(blurred, sigma=(0.0, 1.0, 1.0), mode="nearest")
        blurred += grid.edge_enhancement * (blurred - smooth)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    correlation = grid.noise_correlation_voxels
    noise = ndimage.gaussian_filter(noise, sigma=(0.0, correlation, correlation))
    noise *= grid.noise_hu / max(float(noise.std()), 1e-6)
    image = np.clip(np.rint(blurred + noise), -1024, 3071).astype(np.int16)
    if grid.padding_hu is not None:
        # Outside the reconstruction circle scanners write a padding value far below air.
        _, ny, nx = hu.shape
        yy, xx = np.ogrid[:ny, :nx]
        outside = (yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2 > (min(ny, nx) / 2) ** 2
        image[:, outside] = int(grid.padding_hu)
    return image


def _landmarks(anatomy: Anatomy, grid: Grid) -> dict[str, list[float]]:
    """World (LPS, mm) positions of a few tissues, for tests that check HU values at known places."""
    H, a = anatomy.lung_height_mm, anatomy.a_in
    # Mid-height of the vertebra nearest the thorax centre (away from the discs).
    z_mid = np.round((0.0 + anatomy.disc_phase_mm) / anatomy.rib_pitch_mm) * anatomy.rib_pitch_mm \
        - anatomy.disc_phase_mm + 0.5 * anatomy.rib_pitch_mm + 3.0
    liver_x, liver_y = -0.45 * a, 0.1 * anatomy.b_in_post
    points = {
        "vertebral_body": (0.0, anatomy.vertebra_y_mm, float(z_mid)),
        "liver": (liver_x, liver_y, float(dome_z(anatomy, liver_x, liver_y)) - 35.0),
        "subcutaneous_fat": (0.0, -(anatomy.b_in_ant + anatomy.rib_mm + anatomy.muscle_mm + 0.5 * anatomy.fat_mm),
                             0.0),
        "right_lung": (-0.7 * a, -0.1 * anatomy.b_in_ant, 0.1 * H),
        "air_in_front": (0.0, -(anatomy.body_half_extent()[1] + 12.0), 0.0),
    }
    offset = np.asarray(grid.patient_to_world_mm)
    return {name: [round(float(v), 3) for v in np.asarray(p) + offset] for name, p in points.items()}


def generate_case(seed: int, index: int, full_size: bool = False, scale: float = 1.0,
                  variant: str | Variant | None = None) -> SyntheticCase:
    """Generate case ``index`` of the dataset of ``seed``.

    Parameters
    ----------
    seed, index : the case depends on these two numbers only.
    full_size : render on a 512×512 grid (0.6-0.8 mm) with about 200-350 slices of 1-1.5 mm (benchmarks) instead
        of the small grid (100-160 voxels in-plane at about 2.4-3.1 mm, about 60-130 slices of 3-4 mm).
    scale : multiply the voxel counts of the grid (0.5 gives tiny cases for statistics tests); the anatomy and the
        lesions do not change.
    variant : a name of :data:`dataset_conversion.synthetic_variants.VARIANTS` (or a ``Variant``); ``None`` or
        ``"default"`` is the default generator. The patient (anatomy) of ``(seed, index)`` is the same in every
        variant, and so are the lesions of a variant that does not change them.

    Returns
    -------
    A :class:`SyntheticCase`, which also unpacks as ``(image_hu, lesion, lung, geometry, class_name, metadata)``:
    ``image_hu`` int16 (Z, Y, X) in HU; ``lesion`` and ``lung`` uint8 (Z, Y, X) 0/1 with lesion ⊂ lung;
    ``metadata`` a JSON-ready dict of the generation parameters.
    """
    variant = get_variant(variant)
    class_name = class_for_index(seed, index)
    anatomy = sample_anatomy(_rng(seed, index, 0))
    grid_rng = _rng(seed, index, 12 if full_size else 2)
    variant_draws = _rng(seed, index, 20).uniform(size=len(DRAWN_FIELDS))
    grid = sample_grid(anatomy, grid_rng, full_size=full_size, scale=scale, variant=variant,
                       variant_draws=variant_draws)
    lesion_rng = _rng(seed, index, 1)
    lesions = plan_lesions(
        anatomy, class_name, lesion_rng, sample_lung(anatomy, lesion_rng),
        count_factor=_or(variant.lesion_count_factor, 1.0),
        volume_ratio_factor=_or(variant.lesion_volume_ratio_factor, 1.0),
        volume_range_ml=variant.lesion_volume_ml,
        separation=_or(variant.lesion_separation, 1.0),
    )
    hu, lung = _render_anatomy(anatomy, grid)
    lesion = _paint_lesions(anatomy, grid, lesions, hu, lung)
    _composite_trees(anatomy, grid, hu, seed, index)
    image = _scanner(grid, hu, grid_rng)
    spacing = np.asarray(grid.geometry.spacing_zyx_mm)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesion_ml = float(lesion.sum()) * voxel_ml
    lung_ml = float(lung.sum()) * voxel_ml
    metadata = {
        "generator": f"dscovid synthetic v{GENERATOR_VERSION}",
        "seed": int(seed),
        "index": int(index),
        "full_size": bool(full_size),
        "variant": variant.name,
        "lesion_count": len(lesions),
        "lesions": [lesion_.summary() for lesion_ in lesions],
        "lesion_volume_ml": round(lesion_ml, 2),
        "lung_volume_ml": round(lung_ml, 2),
        "lesion_volume_ratio": round(lesion_ml / lung_ml, 5) if lung_ml else 0.0,
        "orientation": grid.orientation,
        "spacing_zyx_mm": [round(v, 4) for v in grid.geometry.spacing_zyx_mm],
        "slice_thickness_mm": round(grid.slice_thickness_mm, 3),
        "field_of_view_mm": round(grid.geometry.shape_zyx[2] * grid.geometry.spacing_zyx_mm[2], 1),
        "chest_width_mm": round(2 * anatomy.body_half_extent()[0], 1),
        "subcutaneous_fat_mm": round(anatomy.fat_mm, 1),
        "intravenous_contrast": bool(anatomy.blood_hu > 100),
        "noise_hu": round(grid.noise_hu, 1),
        "psf_fwhm_mm": round(grid.psf_fwhm_mm, 3),
        "noise_correlation_voxels": grid.noise_correlation_voxels,
        "edge_enhancement": round(grid.edge_enhancement, 3),
        "padding_hu": grid.padding_hu,
        "confounders": {"dependent_atelectasis": anatomy.atelectasis_mm > 0, "emphysema": anatomy.emphysema},
        "landmarks_xyz_mm": _landmarks(anatomy, grid),
    }
    return SyntheticCase(image_hu=image, lesion=lesion.astype(np.uint8), lung=lung.astype(np.uint8),
                         geometry=grid.geometry, class_name=class_name, metadata=metadata)


def case_name(index: int) -> str:
    return f"case_{index:04d}"


def _write_case(args: tuple[Path, int, int, bool, float, Variant]) -> tuple[str, str, dict]:
    out_dir, seed, index, full_size, scale, variant = args
    case = generate_case(seed, index, full_size=full_size, scale=scale, variant=variant)
    name = case_name(index)
    write_image(case.image_hu, case.geometry, out_dir / "imagesTr" / f"{name}{CHANNEL_SUFFIX}.nii.gz")
    write_image(case.lesion, case.geometry, out_dir / "labelsTr" / f"{name}.nii.gz")
    write_image(case.lung, case.geometry, out_dir / "lungsReference" / f"{name}.nii.gz")
    return name, case.class_name, case.metadata


def _prepare_output(out_dir: Path) -> None:
    """Refuse to write into a folder holding something else; clear a previous synthetic dataset there."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DscovidError(f"{out_dir}: exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    meta_path = out_dir / "dataset.json"
    if not meta_path.is_file() or "synthetic" not in load_dataset_json(meta_path):
        raise DscovidError(f"{out_dir}: folder is not empty and does not hold a synthetic dataset; choose another -o")
    for folder in ("imagesTr", "labelsTr", "lungsReference"):
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    meta_path.unlink()


def generate_dataset(
    out_dir: str | os.PathLike,
    n_cases: int,
    seed: int,
    full_size: bool = False,
    first_index: int = 0,
    num_processes: int = 1,
    scale: float = 1.0,
    variant: str | Variant | None = None,
) -> Path:
    """Write a raw dataset of ``n_cases`` synthetic cases (``case_{first_index:04d}`` onward) to ``out_dir``.

    The folder gets ``imagesTr/<case>_0000.nii.gz`` (int16 HU), ``labelsTr/<case>.nii.gz`` (uint8 lesion mask),
    ``lungsReference/<case>.nii.gz`` (the true lung masks, for testing lung segmentation; the pipeline does not read
    them) and ``dataset.json`` (written last, so a folder without it is an unfinished run). A folder that already
    holds a synthetic dataset is replaced; any other non-empty folder is refused. ``scale`` < 1 makes tiny cases
    for fast tests of other stages (see :func:`generate_case`). ``variant`` names a variant of
    :mod:`dataset_conversion.synthetic_variants` (default: the default generator); dataset.json's ``synthetic``
    entry records its name and the parameters it changes.

    Returns
    -------
    ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    if n_cases < 1:
        raise DscovidError(f"number of cases must be at least 1, got {n_cases}")
    if first_index < 0:
        raise DscovidError(f"first index must be >= 0, got {first_index}")
    if not 0.1 <= scale <= 4.0:
        raise DscovidError(f"scale must be between 0.1 and 4, got {scale:g}")
    variant = get_variant(variant)
    if full_size:
        require_full_size_compatible(variant)
    _prepare_output(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, seed, index, full_size, scale, variant) for index in range(first_index, first_index + n_cases)]
    results = []
    if num_processes > 1:
        with ProcessPoolExecutor(max_workers=num_processes) as pool:
            for result in tqdm(pool.map(_write_case, jobs), total=len(jobs), desc="synthetic cases", unit="case"):
                results.append(result)
    else:
        for job in tqdm(jobs, desc="synthetic cases", unit="case"):
            results.append(_write_case(job))
    cases = {name: {"class": class_name, "lesion_annotated": True, "metadata": metadata}
             for name, class_name, metadata in results}
    counts = {c: sum(1 for _, k, _ in results if k == c) for c in ("covid", "cap", "non_pneumonia")}
    data = make_dataset_json(
        out_dir.name,
        cases,
        description="Synthetic chest CT phantoms with COVID-19 / CAP lesions (dscovid dataset_conversion.synthetic)",
        synthetic={"generator_version": GENERATOR_VERSION, "seed": int(seed), "n_cases": int(n_cases),
                   "first_index": int(first_index), "full_size": bool(full_size), "scale": float(scale),
                   "variant": variant.name, "variant_description": variant.description,
                   "variant_parameters": variant.changes(),
                   "plr_thickness_mm": PLR_THICKNESS_MM, "lung_reference_folder": "lungsReference"},
    )
    write_json_atomic(data, out_dir / "dataset.json")
    log.info("wrote %d synthetic cases (variant %s; %s) to %s", n_cases, variant.name,
             ", ".join(f"{v} {k}" for k, v in counts.items()), out_dir)
    return out_dir
