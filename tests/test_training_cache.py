"""Reading and sampling the preprocessed cache, on a tiny cache written directly in the docs/formats.md §2 format
(``conftest.make_cache``: it does not need the preprocessing code)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_cache

from dscovid.errors import DscovidError
from dscovid.training.data import list_cache_cases
from dscovid.training.sampling import choose_start, crop, forced_lesion_flags, lesion_voxel_groups


def test_cache_lists_cases_with_both_files(tmp_path):
    dataset_dir = make_cache(tmp_path, n_cases=4)
    (dataset_dir / "3d_cpu" / "case_0003.npz").unlink()  # an interrupted write leaves one file without the other
    cases = list_cache_cases(dataset_dir / "3d_cpu")
    assert sorted(cases) == ["case_0000", "case_0001", "case_0002"]
    arrays = cases["case_0000"].load()
    assert arrays["image"].shape == (20, 40, 40) and arrays["cls_image"].shape == (16, 16, 16)
    assert cases["case_0000"].stratum().lesion_voxels == arrays["lesion"].sum() > 0


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(DscovidError, match="run dscovid_plan_and_preprocess"):
        list_cache_cases(tmp_path / "nope")


def test_forced_patches_contain_lesion_and_crop_pads_with_zero():
    rng = np.random.default_rng(0)
    volume = np.zeros((10, 30, 30), dtype=np.uint8)
    volume[2:4, 25:28, 1:3] = 1
    locations = np.argwhere(volume)
    for _ in range(50):
        start = choose_start(volume.shape, (16, 8, 8), locations, True, rng)
        patch = crop(volume, start, (16, 8, 8))
        assert patch.shape == (16, 8, 8) and patch.sum() > 0
        assert start[0] <= 0 and start[0] + 16 >= 10  # the short axis is covered entirely
    assert forced_lesion_flags(2, 0.33) == [False, True]
    assert forced_lesion_flags(3, 0.0) == [False, False, False]


def test_per_lesion_sampling_puts_a_small_lesion_in_as_many_patches_as_a_large_one():
    # One large lesion (2,400 voxels) and one small (8 voxels), far apart: a patch holds one or the other.
    volume = np.zeros((12, 60, 60), dtype=np.uint8)
    volume[2:10, 5:35, 5:15] = 1
    volume[5:7, 50:52, 50:52] = 1
    locations = np.argwhere(volume)
    groups = lesion_voxel_groups(volume, max_voxels=500)
    assert sorted(len(group) for group in groups) == [8, 500]
    assert all(volume[tuple(group.T)].all() for group in groups)

    def small_share(lesion_groups, draws=400):
        rng = np.random.default_rng(1)
        small = 0
        for _ in range(draws):
            start = choose_start(volume.shape, (8, 8, 8), locations, True, rng, lesion_groups)
            patch = crop(volume, start, (8, 8, 8))
            assert patch.sum() > 0
            small += bool(start[1] + 8 > 45)  # reaches the small lesion, so cannot hold the large one
        return small / draws

    assert small_share(None) < 0.02  # voxel sampling: 8 of 2,408 voxels
    assert 0.4 < small_share(groups) < 0.6  # per-lesion: one lesion in two
    assert lesion_voxel_groups(np.zeros((4, 4, 4), dtype=np.uint8)) == []
