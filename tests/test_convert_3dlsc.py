"""3DLSC-COVID converter: layout, classes, annotation flags, masks that do not fit their CT, idempotent re-run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dataset_conversion.convert_3dlsc import (
    IDENTITY,
    AxisTransform,
    all_transforms,
    anatomy_fields,
    choose_label_transform,
    convert_3dlsc,
)
from dscovid.errors import DscovidError
from dscovid.io.image_io import read_mask
from dscovid.io.validate import verify_dataset

SHAPE = (24, 64, 64)
SPACING_XYZ = (1.5, 1.5, 2.5)


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A chest-like CT (z, y, x) in HU with a lesion in the right lung (low x), and its lesion mask.

    The body sits posteriorly (high y) and the lungs are asymmetric, so every flip moves the lesion
    somewhere it does not belong.
    """
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    ct = np.full(SHAPE, -1000.0)
    body = ((y - 40) / 16.0) ** 2 + ((x - 32) / 28.0) ** 2 <= 1
    ct[body] = 40.0
    # Lungs narrow towards the apex (low z), so that a reversed z does not fit either.
    scale = np.where((z >= 2) & (z <= 19), 0.5 + 0.5 * (z - 2) / 17.0, 1e-6)
    right = ((y - 40) / (10.0 * scale)) ** 2 + ((x - 19) / (9.0 * scale)) ** 2 <= 1
    left = ((y - 41) / (9.0 * scale)) ** 2 + ((x - 45) / (7.0 * scale)) ** 2 <= 1
    ct[right | left] = -850.0
    lesion = ((z - 14) / 2.0) ** 2 + ((y - 44) / 3.0) ** 2 + ((x - 16) / 3.0) ** 2 <= 1
    ct[lesion] = -300.0
    ct += np.random.default_rng(seed).normal(0, 10, SHAPE)
    return np.rint(ct).astype(np.int16), lesion.astype(np.uint8)


def _write(array: np.ndarray, path: Path, spacing=SPACING_XYZ) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-48.0, -40.0, -100.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _tree(root: Path) -> Path:
    """covid 1 (good mask + npy lung mask), covid 2 (mirrored mask), covid 3 (no mask), cap 4 (transposed mask), normal 5."""
    for index, (folder, name) in enumerate([("covid", "1"), ("covid", "2"), ("covid", "3"), ("cap", "4"), ("normal", "5")]):
        ct, lesion = _phantom(index)
        _write(ct, root / folder / "data-nii" / f"{name}.nii.gz")
        if name == "1":
            _write(lesion, root / folder / "segment_label" / f"{name}.nii")
            lung = (ct < -600) & (ct > -950)
            (root / folder / "lung-npy").mkdir()
            np.save(root / folder / "lung-npy" / f"{name}.npy", lung.astype(np.uint8))
        if name == "2":
            _write(lesion[:, ::-1, :], root / folder / "segment_label" / f"{name}.nii")
        if name == "4":
            image = sitk.GetImageFromArray(np.ascontiguousarray(lesion.transpose(2, 1, 0)))
            (root / folder / "segment_label").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(root / folder / "segment_label" / f"{name}.nii.gz"))
    return root


def test_convert_3dlsc_classes_annotation_and_refused_masks(tmp_path: Path) -> None:
    source = _tree(tmp_path / "3DLSC")
    out = tmp_path / "Dataset201_LSC"
    report = convert_3dlsc(source, out)
    assert verify_dataset(out) == []
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    cases = meta["cases"]
    assert sorted(cases) == ["covid_1", "covid_3", "normal_5"]
    assert cases["covid_1"] == {**cases["covid_1"], "class": "covid", "lesion_annotated": True}
    assert cases["covid_3"]["lesion_annotated"] is False and cases["covid_3"]["class"] == "covid"
    assert cases["normal_5"]["class"] == "non_pneumonia" and cases["normal_5"]["lesion_annotated"] is True
    assert meta["intensity_unit"] == "HU"
    assert cases["covid_1"]["metadata"]["source_files"]["label"] == "covid/segment_label/1.nii"
    assert not (out / "labelsTr" / "covid_3.nii.gz").exists()
    normal, _ = read_mask(out / "labelsTr" / "normal_5.nii.gz")
    assert normal.max() == 0
    label, geometry = read_mask(out / "labelsTr" / "covid_1.nii.gz")
    assert label.sum() > 0 and geometry.spacing_zyx_mm == (2.5, 1.5, 1.5)
    assert (out / "lungsTr" / "covid_1.nii.gz").exists()

    reasons = {item.source_id: item.reason for item in report.skipped}
    assert set(reasons) == {"covid/2", "cap/4"}
    assert "mirrored" in reasons["covid/2"] and "outside the body" in reasons["covid/2"]
    assert "--fix-orientation" in reasons["covid/2"]
    assert reasons["cap/4"].startswith("label shape (64, 64, 24) does not match image (24, 64, 64)")
    assert meta["conversion"]["skipped"]["covid/2"] == reasons["covid/2"]

    before = (out / "dataset.json").read_bytes()
    mtime = (out / "imagesTr" / "covid_1_0000.nii.gz").stat().st_mtime_ns
    again = convert_3dlsc(source, out)
    assert again.up_to_date == ["covid_1", "covid_3", "normal_5"]
    assert (out / "dataset.json").read_bytes() == before
    assert (out / "imagesTr" / "covid_1_0000.nii.gz").stat().st_mtime_ns == mtime


def test_fix_orientation_applies_the_unambiguous_transform(tmp_path: Path) -> None:
    source = _tree(tmp_path / "3DLSC")
    out = tmp_path / "Dataset202_LSC"
    report = convert_3dlsc(source, out, fix_orientation=True)
    assert verify_dataset(out) == []
    cases = json.loads((out / "dataset.json").read_text(encoding="utf-8"))["cases"]
    assert {"covid_2", "cap_4"} <= set(cases), report.summary_lines()
    fixed = cases["covid_2"]["metadata"]["label_orientation_fix"]
    assert fixed["flips"] == [False, True, False] and fixed["order"] == [0, 1, 2]
    _, expected = _phantom(1)
    label, _ = read_mask(out / "labelsTr" / "covid_2.nii.gz")
    np.testing.assert_array_equal(label, expected)
    label, _ = read_mask(out / "labelsTr" / "cap_4.nii.gz")
    np.testing.assert_array_equal(label, _phantom(3)[1])


def test_mask_mirrored_left_right_is_caught_by_density() -> None:
    """A left-right mirror keeps the lesion inside the lungs; only the HU under it gives it away."""
    ct, lesion = _phantom(0)
    fields = anatomy_fields(ct, (2.5, 1.5, 1.5))
    transform, fit = choose_label_transform(lesion, ct, fields, True, False)
    assert transform == IDENTITY and fit.in_lungs > 0.9 and fit.median_hu > -400
    with pytest.raises(DscovidError, match="mirrored or rotated"):
        choose_label_transform(lesion[:, :, ::-1], ct, fields, True, False)
    fixed, _ = choose_label_transform(lesion[:, :, ::-1], ct, fields, True, True)
    assert fixed == AxisTransform((0, 1, 2), (False, False, True))


def test_header_mismatch_is_refused() -> None:
    ct, lesion = _phantom(0)
    fields = anatomy_fields(ct, (2.5, 1.5, 1.5))
    with pytest.raises(DscovidError, match="label geometry does not match the image"):
        choose_label_transform(lesion, ct, fields, False, False, "direction differs")


def test_transforms_map_indices_like_the_arrays() -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((4, 5, 6), dtype=np.uint8)
    points = np.stack([rng.integers(0, n, 10) for n in mask.shape], axis=1)
    mask[tuple(points.T)] = 1
    transforms = all_transforms()
    assert len(transforms) == 48 and transforms[0] == IDENTITY
    for transform in transforms:
        moved = transform.apply(mask)
        mapped = transform.map_indices(np.argwhere(mask), mask.shape)
        assert moved.shape == transform.output_shape(mask.shape)
        assert sorted(map(tuple, mapped)) == sorted(map(tuple, np.argwhere(moved)))


def test_lung_npy_in_another_axis_order_is_reported_then_fixed(tmp_path: Path) -> None:
    source = tmp_path / "3DLSC"
    ct, _ = _phantom(0)
    _write(ct, source / "normal" / "data-nii" / "7.nii.gz")
    (source / "normal" / "lung-npy").mkdir()
    lung = ((ct < -600) & (ct > -950)).astype(np.uint8)
    np.save(source / "normal" / "lung-npy" / "7.npy", lung.transpose(2, 1, 0))
    report = convert_3dlsc(source, tmp_path / "Dataset203_LSC")
    assert report.converted == [] and report.skipped[0].reason.startswith("lung mask shape (64, 64, 24) does not match image")
    assert not (tmp_path / "Dataset203_LSC" / "dataset.json").exists()
    report = convert_3dlsc(source, tmp_path / "Dataset204_LSC", fix_orientation=True)
    assert report.converted == ["normal_7"]
    written, _ = read_mask(tmp_path / "Dataset204_LSC" / "lungsTr" / "normal_7.nii.gz")
    np.testing.assert_array_equal(written, lung)
    assert verify_dataset(tmp_path / "Dataset204_LSC") == []


def test_disk_closing_matches_scipy() -> None:
    from scipy import ndimage

    from dataset_conversion.convert_3dlsc import _close_disk

    mask = np.random.default_rng(1).random((40, 50)) > 0.7
    radius = 3
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = yy**2 + xx**2 <= radius**2
    expected = ndimage.binary_closing(np.pad(mask, radius + 1), structure=disk)[radius + 1:-radius - 1, radius + 1:-radius - 1]
    np.testing.assert_array_equal(_close_disk(mask, radius), expected)


@pytest.mark.realdata
def test_mirrored_masks_are_caught_on_a_real_covid_ct(test_data: Path) -> None:
    """On a real COVID-19 CT (2.5 mm), a mask of its dense lung voxels in one lung fits as is and
    every single flip is reported, with the flip that undoes it found by --fix-orientation."""
    from scipy import ndimage

    from dscovid.io.image_io import read_image

    ct, geometry = read_image(test_data / "covid_ct_md_derived" / "P002_ct_2p5mm.nii.gz")
    fields = anatomy_fields(ct, geometry.spacing_zyx_mm)
    assert fields.stride == 1 and 3000 < fields.lungs.sum() * np.prod(geometry.spacing_zyx_mm) / 1000 < 6000  # ml
    lesion = ndimage.binary_opening(fields.lungs & (ct > -700) & (ct < -200))
    lesion[:, :, ct.shape[2] // 2:] = False
    lesion = lesion.astype(np.uint8)
    assert choose_label_transform(lesion, ct, fields, True, False)[0] == IDENTITY
    for axis in range(3):
        flipped = np.flip(lesion, axis)
        with pytest.raises(DscovidError, match="mirrored or rotated"):
            choose_label_transform(flipped, ct, fields, True, False)
        fixed, _ = choose_label_transform(flipped, ct, fields, True, True)
        assert fixed == AxisTransform((0, 1, 2), tuple(a == axis for a in range(3)))
