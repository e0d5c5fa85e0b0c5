"""The training data loader: batch contents, lesion oversampling, and geometric consistency of the augmentation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import make_cache, to_grid
from scipy.ndimage import affine_transform, gaussian_filter

from dscovid.training.augmentation import (
    AugmentationSettings,
    draw_spatial_matrix,
    mirror,
    resample_grid,
    resample_patch,
)
from dscovid.training.data import list_cache_cases
from dscovid.training.loader import PatchLoader, build_loader, close_loader
from dscovid.training.sampling import crop


def _smooth_volume(shape=(24, 48, 40), seed=0):
    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.random(shape), 4).astype(np.float32) * 10


def test_identity_transform_is_a_plain_crop():
    volume = _smooth_volume()
    start, size = np.array([3, -2, 10]), (8, 16, 16)
    assert np.allclose(resample_patch(volume, start, size, np.eye(3)), crop(volume, start, size), atol=1e-5)
    grid = to_grid(volume, (12, 16, 16))
    assert np.allclose(resample_grid(grid, volume.shape, start, size, np.eye(3)), grid, atol=1e-5)


def test_rotation_moves_patch_and_grid_together():
    """The transformed grid must be the grid of the transformed volume: the box mapping stays exact."""
    volume = _smooth_volume()
    spacing = (2.0, 1.0, 1.0)
    settings = AugmentationSettings(p_rotation=1.0, rotation_deg=25, p_scale=1.0)
    matrix = draw_spatial_matrix(settings, spacing, np.random.default_rng(3))
    assert matrix is not None and not np.allclose(matrix, np.eye(3))
    start, size = np.array([6, 10, 8]), (8, 20, 20)
    centre = start + (np.array(size) - 1) / 2
    whole = affine_transform(volume, matrix, offset=centre - matrix @ centre, order=1, mode="constant")
    # The patch is the box of the transformed volume ...
    assert np.allclose(resample_patch(volume, start, size, matrix), crop(whole, start, size), atol=1e-4)
    # ... and the transformed grid is (up to interpolation) the grid of the transformed volume.
    grid = to_grid(volume, (12, 24, 20))
    moved = resample_grid(grid, volume.shape, start, size, matrix)
    expected = to_grid(whole, (12, 24, 20))
    inner = (slice(2, -2), slice(3, -3), slice(3, -3))  # away from the zero-padded border
    assert np.abs(moved - expected)[inner].mean() < 0.02 * np.abs(expected[inner]).mean()
    # A wrong centre would not match: the check above has teeth.
    wrong = resample_grid(grid, volume.shape, start + np.array([0, 10, 10]), size, matrix)
    assert np.abs(wrong - expected)[inner].mean() > 3 * np.abs(moved - expected)[inner].mean()


def test_mirror_moves_box_to_mirrored_position():
    volume = _smooth_volume()
    start, size = np.array([2, 5, 7]), np.array([8, 16, 16])
    sample = {"data": crop(volume, start, size)[None], "seg": crop(volume, start, size)[None],
              "cls_image": to_grid(volume, (12, 24, 20))[None], "cls_lesion": to_grid(volume, (12, 24, 20))[None],
              "patch_box": np.array([start, size], dtype=np.float64), "volume_shape": np.array(volume.shape, float)}
    out = mirror(sample, axis=2)
    flipped = volume[:, :, ::-1]
    new_start = out["patch_box"][0].astype(int)
    assert new_start[2] == volume.shape[2] - start[2] - size[2]
    assert np.allclose(out["data"][0], crop(flipped, new_start, size))
    assert np.allclose(out["cls_image"][0], to_grid(np.ascontiguousarray(flipped), (12, 24, 20)), atol=1e-5)


@pytest.mark.parametrize("lesion_sampling", ["voxel", "lesion"])
def test_loader_batches_in_worker_process(tmp_path, lesion_sampling):
    dataset_dir = make_cache(tmp_path, n_cases=6, unannotated=("case_0003",))
    cases = list(list_cache_cases(dataset_dir / "3d_cpu").values())
    loader = build_loader(cases, 2, (8, 16, 16), (2.0, 1.5, 1.5), 0.5, AugmentationSettings(), seed=1, num_workers=1,
                          lesion_sampling=lesion_sampling)
    try:
        batches = [next(loader) for _ in range(12)]
    finally:
        close_loader(loader)
    batch = batches[0]
    assert batch["data"].shape == (2, 1, 8, 16, 16) and batch["cls_image"].shape == (2, 1, 16, 16, 16)
    assert batch["patch_box"].shape == (2, 2, 3) and batch["volume_shape"].shape == (2, 3)
    assert batch["data"].dtype == np.float32 and batch["class_index"].dtype == np.int64
    # The second sample of each batch is forced onto a lesion whenever its case has one.
    for b in batches:
        if b["class_index"][1] != 2 and b["lesion_annotated"][1]:
            assert b["seg"][1].sum() > 0
        if not b["lesion_annotated"][0]:
            assert b["seg"][0].sum() == 0


def test_seeded_loader_repeats(tmp_path):
    dataset_dir = make_cache(tmp_path, n_cases=4)
    cases = list(list_cache_cases(dataset_dir / "3d_cpu").values())
    settings = AugmentationSettings(p_rotation=0.5, p_scale=0.5, p_gamma=0.5, p_noise=0.5)

    def draw(seed):
        loader = build_loader(cases, 2, (8, 16, 16), (2.0, 1.5, 1.5), 0.5, settings, seed=seed, num_workers=0)
        return [next(loader) for _ in range(4)]

    first, again, other = draw(5), draw(5), draw(6)
    assert all(np.array_equal(a["data"], b["data"]) and np.array_equal(a["patch_box"], b["patch_box"])
               for a, b in zip(first, again))
    assert not all(np.array_equal(a["data"], b["data"]) for a, b in zip(first, other))


def test_intensity_is_shared_by_both_views_and_keeps_the_outside_zero():
    from dscovid.training.augmentation import augment_sample

    rng = np.random.default_rng(0)
    volume = np.where(_smooth_volume() > 5, 0.4, 0.0).astype(np.float32)
    start, size = np.array([4, 10, 8]), (8, 16, 16)
    grid = to_grid(volume, (24, 48, 40))  # the grid at full resolution: it equals the volume
    sample = {"data": crop(volume, start, size)[None], "seg": np.zeros((1, *size), np.float32),
              "cls_image": grid[None].copy(), "cls_lesion": np.zeros((1, 24, 48, 40), np.float32),
              "patch_box": np.array([start, size], dtype=np.float64), "volume_shape": np.array(volume.shape, float)}
    settings = AugmentationSettings(mirror_axes=(), p_brightness=1, p_contrast=1, p_gamma=1, p_noise=0)
    out = augment_sample(sample, settings, rng)
    assert not np.allclose(out["data"], crop(volume, start, size)[None])  # it did change the image
    assert np.allclose(out["data"][0], crop(out["cls_image"][0], start, size), atol=1e-6)  # the same mapping
    assert np.all(out["data"][0][crop(volume, start, size) == 0] == 0)


def _lung_patch(seed: int = 0) -> np.ndarray:
    """A (1, 12, 32, 32) patch: a lung at 0.3 with fine noise inside a box, 0 (masked) outside."""
    rng = np.random.default_rng(seed)
    patch = np.zeros((12, 32, 32), np.float32)
    patch[:, 4:28, 4:28] = 0.3 + 0.05 * rng.standard_normal((12, 24, 24))
    return patch[None]


def test_scanner_looks_change_the_texture_as_a_scanner_would():
    from dscovid.training.augmentation import degrade_patch

    patch = _lung_patch()
    inside = patch[0] != 0
    detail = lambda image: float(np.std((image[0] - gaussian_filter(image[0], (0, 1, 1)))[:, 8:24, 8:24]))  # noqa: E731
    blurred, sharpened = degrade_patch(patch, 1.0, None, None), degrade_patch(patch, None, 1.0, None)
    assert detail(blurred) < 0.6 * detail(patch) < detail(sharpened)
    thick = degrade_patch(patch, None, None, 0.5)
    assert thick.shape == patch.shape
    assert np.mean(np.abs(np.diff(thick[0], axis=0))[1:-1, 6:26, 6:26]) < 0.7 * np.mean(
        np.abs(np.diff(patch[0], axis=0))[1:-1, 6:26, 6:26])  # neighbouring slices alike
    for out in (blurred, sharpened, thick):
        assert np.all(out[0][~inside] == 0) and out.min() >= 0 and out.max() <= 1
        # the masked outside does not darken the lung's edge: its mean stays that of the lung
        assert abs(float(out[0][:, 4, 4:28].mean()) - 0.3) < 0.02


def test_scanner_looks_are_off_by_default_and_draw_no_random_number():
    """A seeded default training must see the same batches as before the scanner looks existed: with everything
    off, a sample costs exactly one draw for each of brightness, contrast, gamma and the two views' noise."""
    from dscovid.training.augmentation import augment_sample

    sample = {"data": _lung_patch(), "seg": np.zeros((1, 12, 32, 32), np.float32),
              "cls_image": _lung_patch(1)[:, :8, :16, :16].copy(), "cls_lesion": np.zeros((1, 8, 16, 16), np.float32),
              "patch_box": np.array([[0, 0, 0], [12, 32, 32]], dtype=np.float64),
              "volume_shape": np.array([12, 32, 32], float)}
    rng, reference = np.random.default_rng(3), np.random.default_rng(3)
    out = augment_sample(sample, AugmentationSettings(mirror_axes=(), p_brightness=0, p_contrast=0, p_gamma=0,
                                                      p_noise=0), rng)
    reference.random(5)
    assert rng.random() == reference.random()
    assert np.array_equal(out["data"], _lung_patch())
    assert AugmentationSettings().p_blur == AugmentationSettings().p_sharpen == AugmentationSettings().p_thick_slices == 0
    assert AugmentationSettings().p_context == 0


def _two_lesion_map(cell_ml: float) -> np.ndarray:
    """(1, 16, 32, 32): a 4-cell lesion (small), a 6x10x10 lesion (large) and a faint 0.01 haze elsewhere."""
    grid = np.full((1, 16, 32, 32), 0.01, np.float32)
    grid[0, 2:4, 2:4, 2] = 1.0
    grid[0, 8:14, 15:25, 15:25] = 0.8
    assert 4 * cell_ml < 10 < 480 * cell_ml
    return grid


def test_context_degradation_drops_small_lesions_and_scales_the_rest():
    from dscovid.training.augmentation import degrade_context

    grid = _two_lesion_map(cell_ml=0.5)
    out = degrade_context(grid, 0.5, ((10.0, 1.0),), 0.8, np.random.default_rng(0))
    assert np.all(out[0, 2:4, 2:4, 2] == 0)  # the small lesion is gone
    assert np.allclose(out[0, 8:14, 15:25, 15:25], 0.64)  # the large one kept and scaled
    assert np.isclose(out[0, 0, 31, 31], 0.008)  # the haze is no lesion: scaled, not removed
    assert np.array_equal(grid, _two_lesion_map(cell_ml=0.5))  # the input is not changed
    # A lesion is removed with the probability of the first volume bound it is under, per lesion and draw.
    rng = np.random.default_rng(1)
    drops = ((10.0, 0.5), (1000.0, 0.1))
    small, large = zip(*[(out[0, 2, 2, 2] == 0, out[0, 10, 20, 20] == 0) for out in
                         (degrade_context(grid, 0.5, drops, 1.0, rng) for _ in range(400))])
    assert 0.4 < np.mean(small) < 0.6 and 0.05 < np.mean(large) < 0.15


def test_loader_knows_the_volume_of_a_grid_cell(tmp_path):
    """``cell_ml`` turns the lesion context back into millilitres: the preprocessor's map of a lesion mask, summed
    over the grid, gives the mask's volume at the preprocessed spacing (the degradation's bounds are in ml)."""
    from dscovid.preprocessing.resampling import resample_to_grid

    dataset_dir = make_cache(tmp_path, n_cases=3)
    cases = list(list_cache_cases(dataset_dir / "3d_cpu").values())
    spacing = (2.0, 1.5, 1.5)
    loader = PatchLoader(cases, 1, (8, 16, 16), spacing, 0.0, AugmentationSettings.none())
    for case in cases:
        sample = loader.make_sample(case, False)
        lesion = case.load()["lesion"].astype(np.float32)
        on_grid = resample_to_grid(lesion, sample["cls_lesion"].shape[1:], sparse=True)
        assert np.isclose(on_grid.sum() * sample["cell_ml"], lesion.sum() * np.prod(spacing) / 1000, rtol=0.03)


def test_false_lesions_lie_on_healthy_lung_with_their_volume():
    """Each ball is centred on a lung cell the map does not mark, is cut to the lung, holds its volume in ml when
    it is not cut (cells are anisotropic: the radius is in millimetres), and leaves the real lesions and the input
    alone."""
    from dscovid.training.augmentation import add_false_lesions

    grid = _two_lesion_map(cell_ml=0.5)
    region = np.zeros((16, 32, 32), bool)
    region[1:15, 1:31, 1:31] = True
    cell_mm = (2.0, 1.0, 1.0)
    cell_ml = float(np.prod(cell_mm)) / 1000.0
    rng = np.random.default_rng(0)
    volumes = []
    for _ in range(40):
        out = add_false_lesions(grid, region, cell_mm, [0.3], [1.0], rng)
        added = out[0] - grid[0]
        assert added.min() >= 0 and added.max() > 0.9 and not added[~region].any()
        centre = np.unravel_index(np.argmax(added), added.shape)
        assert grid[0][centre] <= 0.05  # on healthy lung
        assert np.all(out[0][grid[0] > 0.05] >= grid[0][grid[0] > 0.05])
        volumes.append(added.sum() * cell_ml)
    assert max(volumes) == pytest.approx(0.3, rel=0.15)  # a ball inside the lung
    assert min(volumes) < 0.8 * max(volumes)  # and balls cut by the lung's edge
    assert np.array_equal(grid, _two_lesion_map(cell_ml=0.5))
    # No healthy lung cell: nothing to add.
    assert np.array_equal(add_false_lesions(grid, grid[0] > 0.05, cell_mm, [1.0], [1.0], rng), grid)


def test_loader_sample_with_false_lesions(tmp_path):
    """The false-lesion trainer's loader hands over maps with more lesion than the case's own, inside its lung."""
    dataset_dir = make_cache(tmp_path, n_cases=2)
    cases = list(list_cache_cases(dataset_dir / "3d_cpu").values())
    plain = PatchLoader(cases, 1, (8, 16, 16), (2.0, 1.5, 1.5), 0.0, AugmentationSettings.none(), seed=1)
    settings = dataclasses.replace(AugmentationSettings.none(), p_false_lesions=1.0, false_lesion_ml=(0.5, 1.0))
    augmented = PatchLoader(cases, 1, (8, 16, 16), (2.0, 1.5, 1.5), 0.0, settings, seed=1)
    for case in cases:
        before, after = plain.make_sample(case, False), augmented.make_sample(case, False)
        gained = after["cls_lesion"] - before["cls_lesion"]
        assert gained.min() >= 0 and gained.sum() > 0
        assert not gained[after["cls_image"] == 0].any()


def test_correlated_noise_keeps_its_level_and_gains_grain():
    """Smoothed noise has the drawn standard deviation and neighbours that move together in-plane (not along z)."""
    from dscovid.training.augmentation import correlated

    rng = np.random.default_rng(0)
    white = rng.normal(0.0, 0.05, (1, 16, 64, 64))
    grain = correlated(white, 1.0, 0.05)
    assert grain.std() == pytest.approx(0.05, rel=0.01)

    def neighbour_correlation(noise, axis):
        return np.corrcoef(noise[0].ravel(), np.roll(noise[0], 1, axis=axis).ravel())[0, 1]

    assert abs(neighbour_correlation(white, 2)) < 0.05
    assert neighbour_correlation(grain, 2) > 0.5 and neighbour_correlation(grain, 1) > 0.5
    assert abs(neighbour_correlation(grain, 0)) < 0.05
    assert AugmentationSettings().noise_correlation_voxels == (0.0, 0.0)
