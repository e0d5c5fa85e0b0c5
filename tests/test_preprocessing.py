"""Preprocessor: canonical orientation, exact inverse mapping, cache format, atomic writes and staleness."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from conftest import make_raw_dataset, phantom, rotation_direction, small_configuration, small_plans

from dscovid.io.dataset import load_raw_dataset
from dscovid.io.image_io import Geometry
from dscovid.preprocessing.orientation import (
    axis_codes,
    canonical_geometry,
    canonical_reorientation,
    from_canonical,
    to_canonical,
)
from dscovid.preprocessing.preprocessor import grow_mask, preprocess_dataset, preprocess_image, restore_to_original
from dscovid.preprocessing.resampling import resample_to_grid

# --------------------------------------------------------------------------- tiny raw datasets for the tests


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


# --------------------------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("permute", [(0, 1, 2), (1, 0, 2), (2, 0, 1), (0, 2, 1)])
@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, 1, -1), (1, -1, -1)])
def test_canonical_orientation_keeps_every_voxel_at_its_world_position(permute, flips):
    geometry = Geometry((5, 6, 7), (2.5, 0.8, 0.9), (10.0, -20.0, 30.0), rotation_direction(flips, 12.0, permute))
    reorientation = canonical_reorientation(geometry)
    canonical = canonical_geometry(geometry, reorientation)
    array = np.arange(np.prod(geometry.shape_zyx)).reshape(geometry.shape_zyx)
    moved = to_canonical(array, reorientation)
    assert moved.shape == canonical.shape_zyx
    assert np.array_equal(from_canonical(moved, reorientation), array)
    # The canonical direction is the nearest to identity: the residual rotation only (12 degrees).
    assert np.allclose(np.diag(canonical.direction_matrix), [np.cos(np.deg2rad(12)), np.cos(np.deg2rad(12)), 1.0])
    rng = np.random.default_rng(0)
    old_m, new_m = geometry.index_to_world_matrix(), canonical.index_to_world_matrix()
    for _ in range(10):
        index = tuple(int(rng.integers(0, n)) for n in canonical.shape_zyx)
        value = moved[index]
        original_index = np.unravel_index(int(value), geometry.shape_zyx)
        assert np.allclose(new_m @ np.append(index, 1), old_m @ np.append(original_index, 1), atol=1e-6)


def test_axis_codes():
    assert axis_codes(np.eye(3).reshape(-1)) == "LPS"
    assert axis_codes(rotation_direction((-1, -1, 1))) == "RAS"
    assert axis_codes(rotation_direction((1, 1, -1), 0, (2, 1, 0))) == "SPR"


# --------------------------------------------------------------------------------------------- round trip


def test_classification_grid_is_trilinear_align_corners_false():
    volume = np.random.default_rng(0).random((20, 24, 28)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(volume)[None, None], size=(16, 32, 36),
                                               mode="trilinear", align_corners=False)[0, 0].numpy()
    assert np.allclose(resample_to_grid(volume, (16, 32, 36)), expected, atol=1e-6)


@pytest.mark.parametrize("direction", [
    np.eye(3).reshape(-1).tolist(),
    rotation_direction((-1, 1, -1), 0.0, (1, 0, 2)),     # flipped and permuted
    rotation_direction((1, -1, -1), 15.0, (0, 1, 2)),    # flipped and oblique
])
def test_restore_recovers_original_lesion_mask(direction):
    # Lesions of about 2 cm, resampled from 2.5 x 0.7 x 0.8 mm to 2 x 1 x 1 mm and back.
    image, lung, lesion = phantom((30, 72, 64), seed=3, lesion_radius=0.4)
    geometry = Geometry(image.shape, (2.5, 0.7, 0.8), (5.0, -3.0, 40.0), tuple(direction))
    configuration = small_configuration(spacing=(2.0, 1.0, 1.0), grid=(16, 32, 32))
    arrays, properties = preprocess_image(image, geometry, configuration, lung=lung, lesion=lesion, case_name="c")
    assert arrays["image"].dtype == np.float32 and arrays["lesion"].dtype == np.uint8
    assert 0.0 <= arrays["image"].min() and arrays["image"].max() <= 1.0
    assert np.all(arrays["image"][arrays["lung"] == 0] == 0)
    assert arrays["cls_image"].shape == (16, 32, 32) and arrays["cls_lesion"].shape == (16, 32, 32)
    json.dumps(properties)  # JSON-serialisable
    restored = restore_to_original(arrays["lesion"], properties, is_mask=True)
    assert restored.shape == lesion.shape and restored.dtype == np.uint8
    assert dice(restored, lesion) >= 0.98
    assert Geometry.from_dict(properties["original_geometry"]).matches(geometry)
    restored_image = restore_to_original(arrays["image"], properties, is_mask=False)
    inside = (lung > 0) & (lesion == 0)
    expected = (np.clip(image.astype(np.float32), -1400, 200) + 1400) / 1600
    assert np.median(np.abs(restored_image[inside] - expected[inside])) < 0.02
    # Lesion samples index lesion voxels of the preprocessed grid.
    locations = np.asarray(properties["lesion_locations_zyx"])
    assert 0 < len(locations) <= 500
    assert np.all(arrays["lesion"][tuple(locations.T)] == 1)


def test_restore_is_exact_at_the_original_spacing():
    image, lung, lesion = phantom((20, 40, 36), seed=5, lesion_radius=0.2)
    geometry = Geometry(image.shape, (2.5, 0.7, 0.8), (0.0, 0.0, 0.0), rotation_direction((1, -1, -1), 7.0, (2, 1, 0)))
    reorientation = canonical_reorientation(geometry)
    spacing = canonical_geometry(geometry, reorientation).spacing_zyx_mm
    arrays, properties = preprocess_image(image, geometry, small_configuration(spacing=spacing), lung=lung,
                                          lesion=lesion)
    assert np.array_equal(restore_to_original(arrays["lesion"], properties, is_mask=True), lesion)
    assert np.array_equal(restore_to_original(arrays["lung"], properties, is_mask=True), lung)


def test_preprocessed_geometry_places_the_lesion_where_it_was():
    image, lung, lesion = phantom((30, 72, 64), seed=4, lesion_radius=0.25, n_lesions=1)
    geometry = Geometry(image.shape, (2.0, 0.75, 0.75), (0.0, 0.0, 0.0), rotation_direction((-1, 1, -1), 0, (1, 0, 2)))
    arrays, properties = preprocess_image(image, geometry, small_configuration(), lung=lung, lesion=lesion)
    before = geometry.index_to_world_matrix() @ np.append(np.argwhere(lesion).mean(axis=0), 1)
    grid = Geometry.from_dict(properties["preprocessed_geometry"])
    after = grid.index_to_world_matrix() @ np.append(np.argwhere(arrays["lesion"]).mean(axis=0), 1)
    assert np.allclose(before[:3], after[:3], atol=1.0)


def test_no_lung_is_an_error_naming_the_case():
    from dscovid.errors import DscovidError

    image, lung, _ = phantom((10, 20, 20))
    geometry = Geometry(image.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).reshape(-1)))
    with pytest.raises(DscovidError, match="pelvis_01: no lung found"):
        preprocess_image(image, geometry, small_configuration(), lung=np.zeros_like(lung), case_name="pelvis_01")


# --------------------------------------------------------------------------------------------- the dataset


def test_dataset_cache_format_and_rerun_skips_up_to_date(tmp_path):
    folder = make_raw_dataset(tmp_path / "raw", [{"class": "covid"}, {"class": "non_pneumonia"}])
    out = tmp_path / "pre" / folder.name
    dataset = load_raw_dataset(folder)
    first = preprocess_dataset(dataset, out, small_plans(), ["3d_test"], progress=False)
    assert first["processed"] == ["case_000", "case_001"] and not first["failed"]
    with np.load(out / "3d_test" / "case_000.npz") as data:
        assert set(data.files) == {"image", "lesion", "lung", "region", "cls_image", "cls_lesion"}
        assert data["lesion"].any()
    props = json.loads((out / "3d_test" / "case_001.json").read_text(encoding="utf-8"))
    assert props["class_name"] == "non_pneumonia" and props["class_index"] == 2 and props["lesion_annotated"]
    second = preprocess_dataset(dataset, out, small_plans(), ["3d_test"], progress=False)
    assert second["processed"] == [] and sorted(second["skipped"]) == ["case_000", "case_001"]
    # Stale: a touched source file, or a changed preprocessing configuration.
    label = folder / "labelsTr" / "case_001.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    assert preprocess_dataset(dataset, out, small_plans(), ["3d_test"], progress=False)["processed"] == ["case_001"]
    changed = small_plans(small_configuration(margin=6.0))
    assert preprocess_dataset(dataset, out, changed, ["3d_test"], progress=False)["processed"] == ["case_000",
                                                                                                  "case_001"]


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dscovid.io.dataset import load_raw_dataset
    from dscovid.plans.configuration import load_plans
    import dscovid.preprocessing.preprocessor as pre
    original = pre.preprocess_image
    def slow(*args, **kwargs):
        time.sleep(float(sys.argv[4]))  # widen the window in which the kill lands mid-dataset
        return original(*args, **kwargs)
    pre.preprocess_image = slow
    plans = load_plans(sys.argv[3])
    pre.preprocess_dataset(load_raw_dataset(sys.argv[1]), Path(sys.argv[2]), plans, ["3d_test"], progress=False)
""")


def test_killed_run_leaves_no_corrupt_file_and_rerun_redoes_only_missing(tmp_path):
    folder = make_raw_dataset(tmp_path / "raw", [{"class": "covid"}, {"class": "cap"}, {"class": "covid"},
                                                 {"class": "non_pneumonia"}])
    out = tmp_path / "pre" / folder.name
    plans_file = tmp_path / "plans.json"
    plans_file.write_text(json.dumps(small_plans().to_dict()))
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), str(folder), str(out), str(plans_file), "1.0"])
    target = out / "3d_test"
    deadline = time.time() + 120
    while time.time() < deadline and not list(target.glob("*.json")):
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = sorted(p.stem for p in target.glob("*.json"))
    assert 1 <= len(done_before) < 4
    for npz in target.glob("*.npz"):  # every file under its final name loads completely
        with np.load(npz) as data:
            assert data["image"].size > 0
    result = preprocess_dataset(load_raw_dataset(folder), out, small_plans(), ["3d_test"], progress=False)
    assert sorted(result["skipped"]) == done_before
    assert sorted(result["processed"]) == sorted(set(f"case_{i:03d}" for i in range(4)) - set(done_before))
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # temporaries of the killed run...
    for npz in target.glob("*.npz"):
        with np.load(npz) as data:
            assert data["lesion"].shape == data["image"].shape


# --------------------------------------------------------------------------------------------- the command


def test_command_plans_and_preprocesses_then_skips(tmp_path, capsys):
    from dscovid.cli.plan_and_preprocess import main

    make_raw_dataset(tmp_path / "raw", [{"class": "covid"}, {"class": "cap"}, {"class": "non_pneumonia"}],
                     name="Dataset901_Cli")
    args = ["-d", "901", "--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pre"), "-c", "3d_cpu",
            "-np", "1", "-q"]
    assert main(args) == 0
    out = tmp_path / "pre" / "Dataset901_Cli"
    assert {p.name for p in out.iterdir()} >= {"dataset.json", "dataset_fingerprint.json", "plans.json", "3d_cpu"}
    assert not (out / "3d_paper").exists()  # planned, but only -c configurations are preprocessed
    plans = json.loads((out / "plans.json").read_text(encoding="utf-8"))
    assert set(plans["configurations"]) == {"3d_paper", "3d_cpu"}
    assert len(list((out / "3d_cpu").glob("*.npz"))) == 3
    stamp = (out / "3d_cpu" / "case_000.npz").stat().st_mtime_ns
    assert main(args) == 0  # nothing changed: nothing is redone
    assert (out / "3d_cpu" / "case_000.npz").stat().st_mtime_ns == stamp
    # A plans file of another dataset is refused in one line.
    plans["dataset_name"] = "Dataset999_Other"
    other = tmp_path / "other_plans.json"
    other.write_text(json.dumps(plans))
    capsys.readouterr()
    assert main(args + ["--plans", str(other)]) == 1
    error = capsys.readouterr().err.strip()
    assert "the plans are for Dataset999_Other, not Dataset901_Cli" in error and "\n" not in error


def test_sparse_classification_grid_equals_dense():
    lesion = np.zeros((96, 40, 50), dtype=np.uint8)
    lesion[30:41, 10:20, 5:9] = 1
    lesion[88:96, 30:35, 40:50] = 1  # touching the volume's edge
    dense = resample_to_grid(lesion, (16, 32, 16))
    assert np.allclose(resample_to_grid(lesion, (16, 32, 16), sparse=True), dense, atol=1e-6)
    assert not resample_to_grid(np.zeros_like(lesion), (16, 32, 16), sparse=True).any()


@pytest.mark.realdata
def test_real_ct_round_trip_with_the_built_in_lung_mask(test_data):
    from dscovid.io.image_io import read_image
    from dscovid.preprocessing.lung import segment_lungs

    image, geometry = read_image(test_data / "covid_ct_md_derived" / "P002_ct_2p5mm.nii.gz")
    lung = np.asarray(segment_lungs(image, geometry.spacing_zyx_mm, geometry.direction), dtype=np.uint8)
    arrays, properties = preprocess_image(image, geometry, small_configuration(spacing=(3.0, 2.0, 2.0)), lung=lung,
                                          case_name="P002")
    # A real chest: the cropped lung box is 15-40 cm across in every direction.
    box_mm = np.asarray(properties["shape_after_crop_zyx"]) * np.asarray(properties["spacing_after_crop_zyx_mm"])
    assert np.all((box_mm > 150) & (box_mm < 400))
    assert dice(restore_to_original(arrays["lung"], properties, is_mask=True), lung) >= 0.97
    assert 0.0 < arrays["image"][arrays["lung"] > 0].mean() < 0.5  # aerated lung sits low in [-1400, 200]


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.1219, 0.8, 0.8), (5.0, 0.7, 0.65), (2.5, 3.1, 3.1)])
def test_lung_margin_is_the_exact_euclidean_distance_in_mm(spacing):
    """The grown region (edt's distance transform) against SciPy's exact one, on two lung-like blobs with a hole
    and an island: every voxel within the margin in millimetres, nothing farther (voxels within a micrometre of the
    margin may fall either way: float32 against float64)."""
    from scipy import ndimage

    rng = np.random.default_rng(int(spacing[0] * 100))
    shape = (30, 48, 56)
    zz, yy, xx = np.indices(shape)
    mask = (((zz - 14) / 10) ** 2 + ((yy - 24) / 15) ** 2 + ((xx - 15) / 9) ** 2 < 1) | (
        ((zz - 16) / 11) ** 2 + ((yy - 22) / 14) ** 2 + ((xx - 40) / 10) ** 2 < 1)
    mask[14, 20:24, 14:17] = False  # a hole inside a lung
    mask[rng.integers(3, 27), rng.integers(3, 45), rng.integers(3, 53)] = True  # an island
    for margin in (0.0, 4.0, 10.0):
        grown = grow_mask(mask.astype(np.uint8), spacing, margin)
        assert grown.dtype == np.uint8 and grown.shape == shape
        exact = ndimage.distance_transform_edt(~mask, sampling=spacing)
        decided = np.abs(exact - margin) > 1e-3
        np.testing.assert_array_equal(grown[decided].astype(bool), (exact <= margin)[decided])
        assert grown[mask].all()


def test_lung_margin_keeps_the_rim_around_the_lung_and_the_target_only_where_it_is_seen():
    image, lung, _ = phantom((28, 56, 48), seed=3)
    # A lesion half outside the lung mask, as a consolidation the classical mask left out.
    lesion = np.zeros_like(lung)
    z, y, x = np.nonzero(lung)
    right = x < lung.shape[2] // 2  # one lung (the median over both would fall between them)
    edge = (int(round(z[right].mean())), y[right].max(), int(np.median(x[right & (y == y[right].max())])))
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in lung.shape], indexing="ij")
    lesion[(zz - edge[0]) ** 2 + (yy - edge[1] + 1) ** 2 + (xx - edge[2]) ** 2 <= 25] = 1
    geometry = Geometry(tuple(image.shape), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).reshape(-1)))
    plain = small_configuration()
    wide = plain.with_overrides({"preprocessing.lung_margin_mm": 4.0})
    arrays0, props0 = preprocess_image(image, geometry, plain, lung=lung, lesion=lesion)
    arrays4, props4 = preprocess_image(image, geometry, wide, lung=lung, lesion=lesion)
    assert props0["lung_margin_mm"] == 0.0 and props4["lung_margin_mm"] == 4.0
    np.testing.assert_array_equal(arrays0["region"], arrays0["lung"])
    lung_r, region = arrays4["lung"] > 0, arrays4["region"] > 0
    assert (region >= lung_r).all() and region.sum() > lung_r.sum()
    # The rim is the lung grown by 4 mm (2 voxels at 2 mm): nothing farther, everything nearer.
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~lung_r, sampling=(2.0, 2.0, 2.0))
    np.testing.assert_array_equal(region, distance <= 4.0)
    for arrays in (arrays0, arrays4):
        kept = arrays["region"] > 0
        assert (arrays["image"][~kept] == 0).all() and arrays["image"][kept].max() > 0
        assert not (arrays["lesion"] & ~kept).any(), "a lesion voxel the network cannot see stays in the target"
    # The margin shows more of the lesion to the network, and keeps it in the target.
    assert arrays4["lesion"].sum() > arrays0["lesion"].sum() > 0
