"""Named variants of the synthetic phantoms: datasets that differ strongly from the default in how they were scanned.

A variant is a set of parameter changes on top of the default generator (:mod:`dataset_conversion.synthetic`),
never a copy of it: every field left at ``None`` keeps the default's draw. The anatomy of case ``(seed, i)`` is
the same in every variant; a variant that does not touch the lesions also keeps the same lesions (in patient mm),
so a model trained on the default can be tested on exactly the same patients scanned differently.

The fields fall into four groups, which also decide how a variant combines with ``--full-size``:

- **in-plane grid** (``fov_factor``, ``spacing_xy_mm``, ``matrix_xy``): the small grid only; ``--full-size`` fixes
  a 512×512 matrix, so a variant that changes these is refused with it;
- **slices** (``slice_spacing_mm``, ``slice_thickness_ratio``): absolute, valid on any grid;
- **scanner** (``noise_factor``, ``noise_correlation_voxels``, ``psf_factor``, ``min_blur_voxels``,
  ``edge_enhancement``): relative to the default's draws, so they apply to the full-size grid as well;
- **lesions** (``lesion_count_factor``, ``lesion_volume_ratio_factor``, ``lesion_volume_ml``,
  ``lesion_separation``): in patient mm, independent of the grid.

Every range field ``(low, high)`` is drawn uniformly per case from its own random number (one fixed slot per
field, from a stream separate from the default's), so a combined variant draws the same values as the single-factor
variants it is made of, and the default's own draws (hence its noise realisation) stay aligned.

Public names: :class:`Variant`, :data:`VARIANTS`, :func:`get_variant`, :data:`DEFAULT_VARIANT`,
:func:`combine`, :func:`require_full_size_compatible`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from dscovid.errors import DscovidError

Range = tuple[float, float]

#: Fields that change the in-plane grid of the small scan (refused with ``--full-size``).
IN_PLANE_FIELDS = ("fov_factor", "spacing_xy_mm", "matrix_xy")

#: Range fields drawn per case, in the order of their random slot (append only: a new field must not move the
#: slots of the others, or existing variants would change).
DRAWN_FIELDS = ("fov_factor", "spacing_xy_mm", "slice_spacing_mm", "slice_thickness_ratio", "noise_factor",
                "psf_factor", "edge_enhancement")


@dataclass(frozen=True)
class Variant:
    """A named set of changes to the default synthetic generator (``None``: as the default).

    Attributes
    ----------
    name, description : how the variant is asked for and what it is for.
    fov_factor : multiplies the default field of view (1.0-1.1 × the body's extent + 10 mm), (low, high).
    spacing_xy_mm : in-plane spacing drawn for the small grid, mm (default 2.4-3.0), (low, high).
    matrix_xy : (min, max) in-plane voxel count of the small grid (default 100-160).
    slice_spacing_mm : slice spacing, mm, kept exactly (the default draws 3-4 mm and fits it to the covered
        length); at ``scale`` < 1 it is divided by ``scale`` like every spacing.
    slice_thickness_ratio : slice thickness / slice spacing (default one of 1, 1, 1.2 small; 1, 1, 1.25, 1.6 full).
    noise_factor : multiplies the default noise standard deviation (8-22 HU small, 18-40 HU full size).
    noise_correlation_voxels : in-plane Gaussian sigma (voxels) that correlates the noise (default 0.7); a sharp
        kernel leaves the noise finer grained.
    psf_factor : multiplies the default in-plane point spread FWHM (1.0-1.6 mm small, 0.7-1.2 mm full size).
    min_blur_voxels : floor of the blur sigma in voxels on every axis (default 0.4, the partial-volume look).
    edge_enhancement : amount of in-plane unsharp masking (sigma 1 voxel) after the blur, the overshoot of a sharp
        reconstruction kernel (default 0: none).
    lesion_count_factor : multiplies the planned number of lesions per scan (rounded up, at least 1).
    lesion_volume_ratio_factor : multiplies the per-scan lesion volume ratio drawn for the class.
    lesion_volume_ml : (min, max) volume of one planned lesion, ml (default: at least 2 ml COVID-19, 6 ml CAP).
    lesion_separation : multiplies the distance kept between lesions when they are placed (default 1; below 1
        lesions may touch and merge into confluent ones).
    """

    name: str
    description: str
    fov_factor: Range | None = None
    spacing_xy_mm: Range | None = None
    matrix_xy: tuple[int, int] | None = None
    slice_spacing_mm: Range | None = None
    slice_thickness_ratio: Range | None = None
    noise_factor: Range | None = None
    noise_correlation_voxels: float | None = None
    psf_factor: Range | None = None
    min_blur_voxels: float | None = None
    edge_enhancement: Range | None = None
    lesion_count_factor: float | None = None
    lesion_volume_ratio_factor: float | None = None
    lesion_volume_ml: Range | None = None
    lesion_separation: float | None = None

    def changes(self) -> dict:
        """The fields this variant sets (JSON-ready: tuples as lists), the record of what it is."""
        changed = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name not in ("name", "description") and value is not None:
                changed[field.name] = list(value) if isinstance(value, tuple) else value
        return changed

    @property
    def changes_in_plane_grid(self) -> bool:
        return any(getattr(self, name) is not None for name in IN_PLANE_FIELDS)


def combine(name: str, description: str, *parts: Variant) -> Variant:
    """A variant made of the changes of ``parts`` (which must not set the same field)."""
    combined = Variant(name=name, description=description)
    for part in parts:
        for key in part.changes():
            if getattr(combined, key) is not None:
                raise ValueError(f"variants {[p.name for p in parts]} both set {key}")
            combined = replace(combined, **{key: getattr(part, key)})
    return combined


DEFAULT_VARIANT = Variant("default", "the default generator, unchanged")

THICK_SLICES = Variant(
    "thick_slices",
    "5 mm slices reconstructed 5 mm thick (the routine protocol of many older scanners): lesions of a few mm "
    "are partial volumes on one or two slices",
    slice_spacing_mm=(5.0, 5.0),
    slice_thickness_ratio=(1.0, 1.0),
)

SHARP_NOISY = Variant(
    "sharp_noisy",
    "strong, fine-grained noise and a sharp reconstruction kernel (low dose, lung/bone kernel): 3-4.5 × the "
    "default noise, barely correlated, half the point spread, no blur floor, edge overshoot",
    noise_factor=(3.0, 4.5),
    noise_correlation_voxels=0.25,
    psf_factor=(0.4, 0.6),
    min_blur_voxels=0.0,
    edge_enhancement=(0.5, 1.0),
)

WIDE_FOV = Variant(
    "wide_fov",
    "a wide field of view (1.3-1.5 × the default: much air and table around the patient) on a finer in-plane "
    "grid (1.8-2.2 mm, 160-352 voxels) with thinner slices (2.0-2.5 mm)",
    fov_factor=(1.3, 1.5),
    spacing_xy_mm=(1.8, 2.2),
    matrix_xy=(160, 352),
    slice_spacing_mm=(2.0, 2.5),
)

SMALL_LESIONS = Variant(
    "small_lesions",
    "many small lesions: 3 × the lesions per scan, 0.3 × the lesion volume ratio (a tenth of the default's "
    "volume per lesion), each lesion 0.3-10 ml (8-27 mm across); COVID-19 still has more lesions, more lesion "
    "volume and more peripheral ground glass than CAP",
    lesion_count_factor=3.0,
    lesion_volume_ratio_factor=0.3,
    lesion_volume_ml=(0.3, 10.0),
)

LARGE_LESIONS = Variant(
    "large_lesions",
    "few large confluent lesions: half the lesions per scan at the default lesion volume ratio, each lesion at "
    "least 10 ml, allowed to touch (half the spacing between lesions) and merge",
    lesion_count_factor=0.5,
    lesion_volume_ml=(10.0, 2000.0),
    lesion_separation=0.5,
)

THICK_NOISY = combine("thick_noisy", "thick_slices and sharp_noisy together: 5 mm slices, strong fine-grained noise "
                      "and a sharp kernel", THICK_SLICES, SHARP_NOISY)

WIDE_SMALL = combine("wide_small", "wide_fov and small_lesions together: another field of view and spacing "
                     "distribution with many small lesions", WIDE_FOV, SMALL_LESIONS)

#: The registry: name → variant. The two combined presets are the "very different" datasets of issue 19.
VARIANTS: dict[str, Variant] = {v.name: v for v in (DEFAULT_VARIANT, THICK_NOISY, WIDE_SMALL, THICK_SLICES,
                                                     SHARP_NOISY, WIDE_FOV, SMALL_LESIONS, LARGE_LESIONS)}


def get_variant(variant: str | Variant | None) -> Variant:
    """The variant named ``variant`` (a :class:`Variant` is returned as is; ``None`` is the default)."""
    if variant is None:
        return DEFAULT_VARIANT
    if isinstance(variant, Variant):
        return variant
    if variant not in VARIANTS:
        raise DscovidError(f"unknown synthetic variant {variant!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def require_full_size_compatible(variant: Variant) -> None:
    """Refuse a variant that changes the in-plane grid, which ``--full-size`` fixes at 512×512."""
    if variant.changes_in_plane_grid:
        raise DscovidError(f"synthetic variant {variant.name!r} changes the in-plane grid (field of view, spacing), "
                           "which --full-size fixes at 512x512; use one or the other")
