"""The measurements of the paper's four findings against hand-computed values and a brute-force erosion."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dscovid.io.image_io import Geometry
from dscovid.measurements import findings


def _two_blobs() -> np.ndarray:
    lesion = np.zeros((10, 20, 30), dtype=np.uint8)
    lesion[1:3, 2:5, 3:7] = 1  # 2 × 3 × 4 = 24 voxels
    lesion[6:9, 10:12, 20:21] = 1  # 3 × 2 × 1 = 6 voxels
    return lesion


def test_components_volume_size_and_centre_in_mm():
    spacing = (2.0, 0.5, 0.8)
    components = findings.lesion_components(_two_blobs(), spacing)
    assert [c.voxels for c in components] == [24, 6]
    assert components[0].volume_ml == pytest.approx(24 * 2.0 * 0.5 * 0.8 / 1000)
    assert components[0].bbox_size_zyx_mm == pytest.approx((4.0, 1.5, 3.2))
    assert components[0].centre_zyx_mm == pytest.approx((1.5 * 2.0, 3.0 * 0.5, 4.5 * 0.8))
    assert components[1].centre_zyx_mm == pytest.approx((7.0 * 2.0, 10.5 * 0.5, 20.0 * 0.8))


def test_count_uses_26_connectivity():
    lesion = np.zeros((5, 5, 5), dtype=bool)
    lesion[1, 1, 1] = lesion[2, 2, 2] = True  # touching by a corner only: one lesion
    lesion[4, 4, 4] = True
    assert findings.lesion_count(lesion) == 2
    assert findings.lesion_count(np.zeros((4, 4, 4))) == 0
    assert findings.lesion_components(np.zeros((4, 4, 4)), (1, 1, 1)) == []


def test_volume_ratio_counts_the_lesion_as_lung():
    lung = np.zeros((4, 10, 10), dtype=bool)
    lung[:, 2:8, 2:8] = True  # 144 voxels
    lesion = np.zeros_like(lung)
    lesion[0, 2:5, 2:5] = True  # 9 inside the lung
    lesion[0, 0, 0] = True  # 1 outside (carved out of the lung mask)
    assert findings.lesion_volume_ratio(lesion, lung) == pytest.approx(10 / 145)
    assert np.isnan(findings.lesion_volume_ratio(np.zeros_like(lung), np.zeros_like(lung)))


def _brute_force_plr(lesion, lung, spacing, thickness):
    """Equation 1 with an explicit disk kernel of radius ``thickness`` mm and binary_erosion per slice."""
    ry = int(np.floor(thickness / spacing[1]))
    rx = int(np.floor(thickness / spacing[2]))
    yy, xx = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    disk = (yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2 <= thickness**2
    rim_lesion = 0
    for z in range(lung.shape[0]):
        eroded = ndimage.binary_erosion(lung[z], structure=disk, border_value=0)
        rim_lesion += np.count_nonzero(lung[z] & ~eroded & lesion[z])
    return rim_lesion / np.count_nonzero(lesion)


def test_plr_matches_brute_force_erosion_with_anisotropic_spacing():
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[0:6, 0:48, 0:40]
    lung = ((yy - 24) / 20.0) ** 2 + ((xx - 18) / 17.0) ** 2 < 1.0
    lung[:, 20:, 30:] = True  # touches the image border: outside the image counts as non-lung
    lesion = (rng.random(lung.shape) < 0.3) & ndimage.binary_dilation(lung, iterations=2)
    spacing = (2.5, 0.7, 1.1)
    thicknesses = [0.0, 1.0, 2.2, 3.5, 7.0]
    ours = findings.peripheral_lesion_ratios(lesion, lung, spacing, thicknesses)
    expected = [_brute_force_plr(lesion, lung, spacing, t) for t in thicknesses]
    assert ours == pytest.approx(expected)
    assert ours[0] == 0.0
    assert np.all(np.diff(ours) >= 0)
    assert findings.peripheral_lesion_ratio(lesion, lung, spacing, 3.5) == pytest.approx(expected[3])


def test_plr_of_small_lesions_deep_in_a_large_lung_matches_brute_force():
    """Small lesions far from each other: the distances are taken in a window around each slice's lesions, whose
    edges lie inside the lung; the counts must still be those of the erosion over the whole slice."""
    rng = np.random.default_rng(3)
    zz, yy, xx = np.mgrid[0:8, 0:90, 0:80]
    lung = ((yy - 45) / 42.0) ** 2 + ((xx - 40) / 38.0) ** 2 < 1.0
    lung[:, 40:50, 10:14] = False  # a vessel-like hole inside the lung
    lesion = np.zeros_like(lung)
    for _ in range(12):
        z, y, x = rng.integers(0, 8), rng.integers(3, 87), rng.integers(3, 77)
        lesion[z, y - 2 : y + 2, x - 2 : x + 3] = True
    spacing = (2.0, 0.8, 0.65)
    thicknesses = [0.5, 2.0, 4.0, 9.0]
    expected = [_brute_force_plr(lesion, lung, spacing, t) for t in thicknesses]
    assert 0.0 < expected[-1] < 1.0
    assert findings.peripheral_lesion_ratios(lesion, lung, spacing, thicknesses) == pytest.approx(expected)


def test_plr_is_nan_without_lesion_and_zero_without_lung():
    lung = np.ones((3, 8, 8), dtype=bool)
    assert np.isnan(findings.peripheral_lesion_ratio(np.zeros_like(lung), lung, (1, 1, 1), 5.0))
    lesion = np.zeros_like(lung)
    lesion[1, 4, 4] = True
    assert findings.peripheral_lesion_ratio(lesion, np.zeros_like(lung), (1, 1, 1), 5.0) == 0.0


def test_hu_statistics_and_windows():
    image = np.full((2, 4, 5), -1000, dtype=np.int16)
    lesion = np.zeros(image.shape, dtype=bool)
    values = [-900, -700, -600, 0, 100, 140, 300, -1200]
    lesion.flat[: len(values)] = True
    image.flat[: len(values)] = values
    stats = findings.lesion_hu_statistics(image, lesion)
    assert stats["voxels"] == 8
    assert stats["mean"] == pytest.approx(np.mean(values))
    assert stats["std"] == pytest.approx(np.std(values))
    assert stats["p50"] == pytest.approx(np.median(values))
    assert stats["fraction_ggo_-960_-600"] == pytest.approx(3 / 8)
    assert stats["fraction_consolidation_-70_140"] == pytest.approx(3 / 8)
    assert sum(stats["histogram"]) == 8  # out-of-range values are clipped into the end bins
    empty = findings.lesion_hu_statistics(image, np.zeros_like(lesion))
    assert np.isnan(empty["mean"]) and sum(empty["histogram"]) == 0


def test_spread_is_root_total_variance_of_centres():
    spacing = (2.0, 0.5, 0.8)
    c1 = np.array((1.5 * 2.0, 3.0 * 0.5, 4.5 * 0.8))
    c2 = np.array((7.0 * 2.0, 10.5 * 0.5, 20.0 * 0.8))
    assert findings.lesion_spread_mm(_two_blobs(), spacing) == pytest.approx(np.linalg.norm(c1 - c2) / 2)
    single = np.zeros((3, 3, 3))
    single[1, 1, 1] = 1
    assert findings.lesion_spread_mm(single, spacing) == 0.0
    assert np.isnan(findings.lesion_spread_mm(np.zeros((3, 3, 3)), spacing))


def _two_lungs():
    lung = np.zeros((4, 10, 20), dtype=bool)
    lung[:, 2:8, 1:8] = True  # small x
    lung[:, 2:8, 11:19] = True  # large x
    lesion = np.zeros_like(lung)
    lesion[0, 3:5, 2:4] = True  # 4 voxels at small x
    return lesion, lung


def test_involvement_sides_follow_the_geometry_direction():
    lesion, lung = _two_lungs()
    default = findings.lung_involvement(lesion, lung)
    # Identity direction (LPS): index x grows toward the patient's left, so small x is the right lung.
    assert default["right"]["lesion_voxels"] == 4 and default["left"]["lesion_voxels"] == 0
    assert default["right"]["ratio"] == pytest.approx(4 / (4 * 6 * 7))
    flipped = Geometry((4, 10, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    swapped = findings.lung_involvement(lesion, lung, flipped)
    assert swapped["left"]["lesion_voxels"] == 4 and swapped["right"]["lesion_voxels"] == 0
    joined = lung.copy()
    joined[:, 4, 8:11] = True  # the lungs touch: split at the centre of mass
    assert findings.lung_involvement(lesion, joined)["right"]["lesion_voxels"] == 4


def test_case_findings_gathers_everything_and_handles_no_lesion():
    lesion, lung = _two_lungs()
    image = np.where(lung, -850, 40).astype(np.int16)
    result = findings.case_findings(image, lesion, lung, (2.0, 1.0, 1.0), thicknesses_mm=(0, 2, 4))
    assert result["lesion_count"] == 1
    assert result["lesion_volume_ml"] == pytest.approx(4 * 2.0 / 1000)
    assert result["lesion_volume_ratio"] == pytest.approx(4 / lung.sum())
    assert result["plr"]["ratio"][0] == 0.0 and result["plr"]["ratio"][2] == 1.0
    none = findings.case_findings(image, np.zeros_like(lesion), lung, (2.0, 1.0, 1.0))
    assert none["lesion_count"] == 0 and none["lesion_volume_ratio"] == 0.0
    assert np.isnan(none["spread_mm"]) and all(np.isnan(none["plr"]["ratio"]))
