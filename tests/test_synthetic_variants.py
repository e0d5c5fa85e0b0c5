"""Named variants of the synthetic generator: the default stays as it was, each variant keeps to its documented
ranges, the lesion variants change the lesion sizes, and datasets say which variant they are."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from dataset_conversion.synthetic import (
    _rng,
    _scanner,
    class_for_index,
    generate_case,
    generate_dataset,
    sample_grid,
)
from dataset_conversion.synthetic_anatomy import sample_anatomy
from dataset_conversion.synthetic_variants import (
    DRAWN_FIELDS,
    VARIANTS,
    Variant,
    combine,
    get_variant,
)
from dscovid.cli.make_synthetic import main as make_synthetic_main
from dscovid.errors import DscovidError

#: The default generator's output before variants existed (commit 72c8cdf): (seed, index, full_size, scale) →
#: (class, shape, spacing, lung voxels, lesion voxels, sum of the image in HU). A deliberate change of the default
#: must bump GENERATOR_VERSION and refresh these; anything else that changes them is a bug.
_DEFAULT_SNAPSHOT = {
    (4, 2, False, 0.3): ("covid", (24, 38, 38), (11.930998, 8.751975, 8.751975), 3154, 129, -33380581),
    (9, 13, False, 0.3): ("cap", (25, 41, 41), (12.120213, 9.919985, 9.919985), 4032, 85, -23556100),
    (1, 0, True, 0.12): ("cap", (28, 61, 61), (10.763084, 6.714754, 6.714754), 9922, 129, -52881464),
}

#: The default's draws that a variant's factors multiply (small grid, full size).
_DEFAULT_NOISE_HU = {False: (8.0, 22.0), True: (18.0, 40.0)}
_DEFAULT_PSF_MM = {False: (1.0, 1.6), True: (0.7, 1.2)}


@pytest.mark.parametrize("key", list(_DEFAULT_SNAPSHOT))
def test_default_output_is_unchanged(key):
    seed, index, full_size, scale = key
    class_name, shape, spacing, lung, lesion, image_sum = _DEFAULT_SNAPSHOT[key]
    for variant in (None, "default"):
        case = generate_case(seed, index, full_size=full_size, scale=scale, variant=variant)
        assert case.class_name == class_name and case.geometry.shape_zyx == shape
        np.testing.assert_allclose(case.geometry.spacing_zyx_mm, spacing, atol=1e-5)
        assert int(case.lung.sum()) == lung and int(case.lesion.sum()) == lesion
        # The sum is exact on this platform; a few voxels rounded the other way elsewhere would move it by a few
        # HU, a different noise realisation or grid by thousands.
        assert abs(int(case.image_hu.astype(np.int64).sum()) - image_sum) < 50


def test_a_variant_that_changes_nothing_is_the_default():
    nothing = Variant("nothing", "no change")
    first = generate_case(3, 7, scale=0.3)
    second = generate_case(3, 7, scale=0.3, variant=nothing)
    np.testing.assert_array_equal(first.image_hu, second.image_hu)
    np.testing.assert_array_equal(first.lesion, second.lesion)
    assert first.geometry == second.geometry


def _draws(seed: int, index: int) -> np.ndarray:
    return _rng(seed, index, 20).uniform(size=len(DRAWN_FIELDS))


def _grids(variant, full_size: bool = False, cases: int = 12):
    """(default grid, variant grid) of the same patients: the variant's changes on the same default draws."""
    for index in range(cases):
        anatomy = sample_anatomy(_rng(1, index, 0))
        stream = 12 if full_size else 2
        default = sample_grid(anatomy, _rng(1, index, stream), full_size=full_size)
        changed = sample_grid(anatomy, _rng(1, index, stream), full_size=full_size, variant=variant,
                              variant_draws=_draws(1, index))
        yield default, changed


def _within(value: float, bounds, slack: float = 1e-6) -> bool:
    return bounds[0] - slack <= value <= bounds[1] + slack


@pytest.mark.parametrize("name", [name for name in VARIANTS if name != "default"])
def test_scan_parameters_stay_in_the_documented_ranges(name):
    variant = VARIANTS[name]
    for default, grid in _grids(variant):
        spacing_z, spacing_xy, _ = grid.geometry.spacing_zyx_mm
        fov = grid.geometry.shape_zyx[2] * spacing_xy
        default_fov = default.geometry.shape_zyx[2] * default.geometry.spacing_zyx_mm[2]
        if variant.slice_spacing_mm is not None:
            assert _within(spacing_z, variant.slice_spacing_mm)
            # The lungs and their margins stay covered.
            assert grid.geometry.shape_zyx[0] * spacing_z >= default.geometry.shape_zyx[0] * \
                default.geometry.spacing_zyx_mm[0] - 1e-6
        else:
            assert spacing_z == default.geometry.spacing_zyx_mm[0]
        if variant.slice_thickness_ratio is not None:
            ratio = grid.slice_thickness_mm / spacing_z
            assert _within(ratio, variant.slice_thickness_ratio)
        if variant.fov_factor is not None:
            assert _within(fov / default_fov, variant.fov_factor)
            assert _within(spacing_xy, (variant.spacing_xy_mm[0] * 0.98, variant.spacing_xy_mm[1]))
            assert _within(grid.geometry.shape_zyx[2], variant.matrix_xy)
        else:
            assert grid.geometry.shape_zyx[1:] == default.geometry.shape_zyx[1:]
        noise_low, noise_high = _DEFAULT_NOISE_HU[False]
        factor = variant.noise_factor or (1.0, 1.0)
        assert _within(grid.noise_hu, (noise_low * factor[0], noise_high * factor[1]))
        assert _within(grid.noise_hu / default.noise_hu, factor)
        psf_low, psf_high = _DEFAULT_PSF_MM[False]
        factor = variant.psf_factor or (1.0, 1.0)
        assert _within(grid.psf_fwhm_mm, (psf_low * factor[0], psf_high * factor[1]))
        assert _within(grid.edge_enhancement, variant.edge_enhancement or (0.0, 0.0))
        if variant.noise_correlation_voxels is not None:
            assert grid.noise_correlation_voxels == variant.noise_correlation_voxels
        # Where the patient lies and how the scan is stored are the default's.
        assert grid.orientation == default.orientation and grid.padding_hu == default.padding_hu


@pytest.mark.parametrize("name", ["thick_noisy", "wide_small"])
def test_recorded_parameters_of_generated_cases(name):
    """The metadata of generated cases (scale 0.5: spacings doubled) hold the variant's values."""
    variant = VARIANTS[name]
    for index in range(3):
        meta = generate_case(2, index, scale=0.5, variant=name).metadata
        assert meta["variant"] == name
        spacing_z, spacing_xy, _ = (s * 0.5 for s in meta["spacing_zyx_mm"])
        assert _within(spacing_z, variant.slice_spacing_mm, slack=1e-3)
        if variant.spacing_xy_mm is not None:
            assert _within(spacing_xy, (variant.spacing_xy_mm[0] * 0.97, variant.spacing_xy_mm[1] * 1.03))
        factor = variant.noise_factor or (1.0, 1.0)
        assert _within(meta["noise_hu"], (8.0 * factor[0] - 0.05, 22.0 * factor[1] + 0.05))
        if variant.edge_enhancement is not None:
            assert _within(meta["edge_enhancement"], variant.edge_enhancement, slack=1e-3)
            assert meta["slice_thickness_mm"] == pytest.approx(5.0)


def test_combined_variants_draw_what_their_parts_draw():
    pairs = {"thick_noisy": ("thick_slices", "sharp_noisy"), "wide_small": ("wide_fov", "small_lesions")}
    for name, parts in pairs.items():
        assert VARIANTS[name].changes() == {**VARIANTS[parts[0]].changes(), **VARIANTS[parts[1]].changes()}
    for (_, thick), (_, sharp), (_, both) in zip(_grids(VARIANTS["thick_slices"]), _grids(VARIANTS["sharp_noisy"]),
                                                 _grids(VARIANTS["thick_noisy"])):
        assert both.geometry == thick.geometry
        assert (both.noise_hu, both.psf_fwhm_mm, both.edge_enhancement) == \
            (sharp.noise_hu, sharp.psf_fwhm_mm, sharp.edge_enhancement)
    with pytest.raises(ValueError, match="both set"):
        combine("twice", "", VARIANTS["thick_slices"], VARIANTS["thick_noisy"])


def test_grid_variants_scan_the_same_patient_and_lesions():
    default = generate_case(5, 0, scale=0.4)
    for name in ("thick_noisy", "wide_fov"):
        case = generate_case(5, 0, scale=0.4, variant=name)
        assert case.class_name == default.class_name
        assert case.metadata["lesions"] == default.metadata["lesions"]
        assert case.metadata["landmarks_xyz_mm"] == default.metadata["landmarks_xyz_mm"]
        assert case.metadata["lung_volume_ml"] == pytest.approx(default.metadata["lung_volume_ml"], rel=0.08)


def test_sharp_noisy_scanner_is_noisier_finer_grained_and_overshoots():
    """The scanner model on a step phantom (-800 HU | 40 HU in x): noise level and grain, and the kernel's edge."""
    default, sharp = next(_grids(VARIANTS["sharp_noisy"]))
    hu = np.full((24, 64, 64), 40.0, dtype=np.float32)
    hu[:, :, :32] = -800.0
    measured = {}
    for name, grid in (("default", default), ("sharp", sharp)):
        image = _scanner(replace(grid, padding_hu=None), hu.copy(), np.random.default_rng(0)).astype(np.float32)
        flat = image[:, :, 44:60] - 40.0
        lag1 = float(np.mean(flat[:, :-1] * flat[:, 1:]) / np.mean(flat**2))
        profile = image.mean(axis=(0, 1))
        measured[name] = (float(flat.std()), lag1, float(profile.max()), float(profile.min()))
        assert measured[name][0] == pytest.approx(grid.noise_hu, rel=0.1)
    assert measured["sharp"][0] > 3.0 * measured["default"][0]
    assert measured["sharp"][1] < 0.5 * measured["default"][1], "a sharp kernel leaves finer-grained noise"
    # Unsharp masking overshoots on both sides of the edge; the default blur stays between the two levels.
    assert measured["sharp"][2] > 40.0 + 50.0 and measured["sharp"][3] < -800.0 - 50.0
    assert measured["default"][2] < 40.0 + 10.0 and measured["default"][3] > -800.0 - 10.0


def test_full_size_combines_with_slices_scanner_and_lesions_only():
    for _, grid in _grids(VARIANTS["thick_noisy"], full_size=True, cases=4):
        assert grid.geometry.shape_zyx[1:] == (512, 512)
        assert grid.geometry.spacing_zyx_mm[0] == 5.0 and grid.slice_thickness_mm == 5.0
        low, high = _DEFAULT_NOISE_HU[True]
        assert _within(grid.noise_hu, (low * 3.0, high * 4.5))
    anatomy = sample_anatomy(_rng(0, 0, 0))
    for name in ("wide_fov", "wide_small"):
        with pytest.raises(DscovidError, match="in-plane grid"):
            sample_grid(anatomy, _rng(0, 0, 12), full_size=True, variant=VARIANTS[name], variant_draws=_draws(0, 0))


def _components_ml(case) -> np.ndarray:
    labels, count = ndimage.label(case.lesion, structure=np.ones((3, 3, 3), dtype=bool))
    voxel_ml = float(np.prod(case.geometry.spacing_zyx_mm)) / 1000.0
    return np.bincount(labels.ravel(), minlength=count + 1)[1:] * voxel_ml


def test_lesion_variants_change_lesion_sizes_measured_on_the_masks():
    """Lesion volumes measured as 26-connected components of the masks, over the same 6 patients with lesions."""
    indices = [i for i in range(14) if class_for_index(8, i) != "non_pneumonia"][:6]
    measured = {name: [_components_ml(generate_case(8, i, scale=0.8, variant=name)) for i in indices]
                for name in ("default", "small_lesions", "large_lesions")}
    small, large = VARIANTS["small_lesions"], VARIANTS["large_lesions"]
    every = {name: np.concatenate(sizes) for name, sizes in measured.items()}
    # Each lesion within the variant's volume range (calibration inside the lung and voxelisation: ±30 %).
    assert every["small_lesions"].max() <= 1.3 * small.lesion_volume_ml[1]
    assert every["large_lesions"].min() >= 0.7 * large.lesion_volume_ml[0]
    assert np.median(every["small_lesions"]) < 0.5 * np.median(every["default"])
    assert np.median(every["large_lesions"]) > np.median(every["default"])
    counts = {name: np.mean([len(sizes) for sizes in per_case]) for name, per_case in measured.items()}
    assert counts["small_lesions"] > 2.0 * counts["default"] > 2.0 * counts["large_lesions"]


def test_unknown_variant_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "Dataset005_Synthetic"
    assert make_synthetic_main(["-o", str(out), "-n", "1", "--variant", "blurry", "-q"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "unknown synthetic variant 'blurry'" in error and "thick_noisy" in error
    assert make_synthetic_main(["-o", str(out), "-n", "1", "--variant", "wide_small", "--full-size", "-q"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--full-size" in error
    assert not out.exists(), "nothing is written when the arguments are refused"
    with pytest.raises(DscovidError):
        get_variant("Thick_Noisy")


def test_dataset_json_records_the_variant(tmp_path):
    from dscovid.io.validate import verify_dataset

    out = tmp_path / "Dataset006_Synthetic"
    assert make_synthetic_main(["-o", str(out), "-n", "2", "--seed", "4", "--scale", "0.3",
                                "--variant", "thick_noisy", "-q"]) == 0
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    synthetic = meta["synthetic"]
    assert synthetic["variant"] == "thick_noisy"
    assert synthetic["variant_parameters"] == VARIANTS["thick_noisy"].changes()
    assert synthetic["variant_parameters"]["slice_spacing_mm"] == [5.0, 5.0]
    assert all(case["metadata"]["variant"] == "thick_noisy" for case in meta["cases"].values())
    assert verify_dataset(out) == []
    default = generate_dataset(tmp_path / "Dataset007_Synthetic", n_cases=1, seed=4, scale=0.3)
    synthetic = json.loads((default / "dataset.json").read_text(encoding="utf-8"))["synthetic"]
    assert synthetic["variant"] == "default" and synthetic["variant_parameters"] == {}
