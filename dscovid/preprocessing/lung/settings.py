"""The knobs of the classical lung segmentation, and its labels."""

from __future__ import annotations

from dataclasses import dataclass

#: Label values of :func:`dscovid.preprocessing.lung.segment_lung_sides` (lungmask R231 convention).
RIGHT_LUNG = 1
LEFT_LUNG = 2


@dataclass(frozen=True)
class LungMaskSettings:
    """The knobs of the classical lung segmentation (defaults tuned on real and synthetic chest CT).

    Attributes
    ----------
    working_spacing_mm : target voxel size of the coarse working grid (integer block averaging, so the real
        working spacing is the nearest integer multiple of the input spacing).
    body_threshold_hu : tissue of the body is above this.
    air_threshold_hu : aerated lung (ground glass included) is below this.
    airway_max_area_mm2 : an axial air piece this small or smaller can be trachea or main bronchus.
    airway_max_offset_mm : ... when its centre is at most this far (left-right) from the body's mid-line.
    airway_seed_depth_mm : the airway tube must reach this close to the top of the air region.
    closing_radius_mm : radius of the ball of the per-lung 3D closing that brings pleural lesions in.
    dent_max_depth_mm, dent_mediastinal_fraction : a dent of an axial lung outline (inside its convex hull) is
        filled when at most this deep and when at most this fraction of its opening faces the mediastinum.
    deep_dent_max_depth_mm, deep_dent_min_mouth_mm, deep_dent_min_height_fraction : a deeper dent (up to this
        depth) is filled too when its opening touches no mediastinum at all, is at least this long, and the slice
        lies above this fraction of the lung's height (the diaphragm dome makes deep dents at the base).
    enclosed_min_lung_fraction, enclosed_max_tissue_fraction, enclosed_opening : a blob of non-fat tissue inside
        a lung's axial convex hulls (after an in-plane opening of this many steps, which cuts thin bridges) is
        filled when at least the first fraction of its 3D face is that lung and at most the second is other
        tissue (a consolidation wrapped by the lung, not the heart or the liver dome, which continue outside).
    chest_wall_gaps : also fill the gaps between each lung and its ribs
        (:func:`~dscovid.preprocessing.lung.filling.fill_chest_wall_gaps`). Off by default: it keeps more of a
        consolidation filling the back of a lung, but networks trained on such masks segmented worse (measured in
        docs/lung_mask.md, Limits); ``dscovid_lung_mask --chest-wall-gaps`` turns it on.
    wall_bone_hu, wall_bone_slab_mm, wall_max_gap_mm, wall_ray_step_deg, wall_max_anterior_deg, wall_smoothing_rays,
    wall_min_excess_mm, wall_gap_percentile, wall_max_height_fraction : the chest wall gaps: bone is above
        ``wall_bone_hu`` (its maximum over this many mm up and down closes the rib shell); rays every
        ``wall_ray_step_deg`` degrees from straight back to the side and this many degrees in front of it; bone at
        most ``wall_max_gap_mm`` beyond the lung, and no further out than the median of this many rays on each side;
        filled when the gap exceeds the usual one (the larger of the lung's median and this percentile of the slice)
        by ``wall_min_excess_mm``; only up to this fraction of the lung's height.
    fat_hu : on the working grid, fat lies in this range; lesion filling never adds fat (consolidation is
        denser, ground glass lighter).
    min_lung_ml : the lungs' air must be at least this large, or there is no lung.
    min_lung_fraction : ... and fill at least this fraction of the body's cross-section on some axial slice
        (mid-chest: 25-40 %; bowel gas in a pelvis CT: under 10 %).
    second_lung_min_fraction : the second air component counts as a lung when its volume is at least this
        fraction of the largest one.
    """

    working_spacing_mm: float = 2.0
    body_threshold_hu: float = -500.0
    air_threshold_hu: float = -400.0
    airway_max_area_mm2: float = 700.0
    airway_max_offset_mm: float = 30.0
    airway_seed_depth_mm: float = 10.0
    closing_radius_mm: float = 20.0
    dent_max_depth_mm: float = 30.0
    dent_mediastinal_fraction: float = 0.2
    deep_dent_max_depth_mm: float = 60.0
    deep_dent_min_mouth_mm: float = 20.0
    deep_dent_min_height_fraction: float = 0.25
    enclosed_min_lung_fraction: float = 0.65
    enclosed_max_tissue_fraction: float = 0.15
    enclosed_opening: int = 2
    fat_hu: tuple[float, float] = (-180.0, -60.0)
    chest_wall_gaps: bool = False
    wall_bone_hu: float = 200.0
    wall_bone_slab_mm: float = 15.0
    wall_max_gap_mm: float = 80.0
    wall_ray_step_deg: float = 1.0
    wall_max_anterior_deg: float = 30.0
    wall_smoothing_rays: int = 10
    wall_min_excess_mm: float = 3.0
    wall_gap_percentile: float = 25.0
    wall_max_height_fraction: float = 0.75
    min_lung_ml: float = 10.0
    min_lung_fraction: float = 0.15
    second_lung_min_fraction: float = 0.05
