"""MosMedData converter: CT-0 normal with empty mask, CT-1..4 covid with severity, masked studies annotated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dataset_conversion.convert_mosmed import convert_mosmed
from dscovid.io.image_io import read_image, read_mask
from dscovid.io.validate import verify_dataset


def _write(array: np.ndarray, path: Path, spacing=(0.8, 0.8, 8.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-200.0, -180.0, -300.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _ct(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 200, size=(5, 16, 12)).astype(np.int16)


def test_convert_mosmed(tmp_path: Path) -> None:
    root = tmp_path / "MosMedData"
    for number, category in [(1, 0), (255, 1), (256, 1), (900, 3), (1100, 4)]:
        _write(_ct(number), root / "studies" / f"CT-{category}" / f"study_{number:04d}.nii.gz")
    mask = np.zeros((5, 16, 12), dtype=np.uint8)
    mask[2, 4:8, 3:6] = 255  # stored as 0/255 in some copies: binarised
    _write(mask, root / "masks" / "study_0255_mask.nii.gz")
    _write(mask[:4], root / "masks" / "study_0256_mask.nii.gz")  # wrong number of slices
    (root / "dataset_registry.csv").write_text(
        "study_id,category,study_file,mask_file\n"
        "study_0001,CT-0,/MosMedData/studies/CT-0/study_0001.nii.gz,\n"
        "study_0255,CT-1,/MosMedData/studies/CT-1/study_0255.nii.gz,/MosMedData/masks/study_0255_mask.nii.gz\n"
        "study_0900,CT-2,/MosMedData/studies/CT-2/study_0900.nii.gz,\n"  # contradicts its folder
    )
    out = tmp_path / "Dataset102_MosMed"
    report = convert_mosmed(root, out, num_processes=2)
    assert verify_dataset(out) == []
    reasons = {item.source_id: item.reason for item in report.skipped}
    assert reasons == {
        "CT-1/study_0256": "label shape (4, 16, 12) does not match image (5, 16, 12)",
        "CT-3/study_0900": "dataset_registry.csv says CT-2 but the study lies in CT-3/",
    }
    cases = json.loads((out / "dataset.json").read_text(encoding="utf-8"))["cases"]
    assert {c: (e["class"], e["lesion_annotated"], e["metadata"]["severity"]) for c, e in cases.items()} == {
        "study_0001": ("non_pneumonia", True, "CT-0"),
        "study_0255": ("covid", True, "CT-1"),
        "study_1100": ("covid", False, "CT-4"),
    }
    assert cases["study_1100"]["metadata"]["involvement"] == ">75%"
    label, geometry = read_mask(out / "labelsTr" / "study_0255.nii.gz")
    assert label.sum() == 12 and geometry.direction == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    assert read_mask(out / "labelsTr" / "study_0001.nii.gz")[0].max() == 0
    image, _ = read_image(out / "imagesTr" / "study_0255_0000.nii.gz")
    np.testing.assert_array_equal(image, _ct(255))

    before = (out / "dataset.json").read_bytes()
    again = convert_mosmed(root, out)
    assert again.up_to_date == again.converted and (out / "dataset.json").read_bytes() == before

    # A study whose mask is fixed converts on the next run; the others stay untouched.
    _write(mask, root / "masks" / "study_0256_mask.nii.gz")
    third = convert_mosmed(root, out)
    assert "study_0256" in third.converted and "study_0256" not in third.up_to_date
    assert set(third.up_to_date) == {"study_0001", "study_0255", "study_1100"}
    assert verify_dataset(out) == []


def test_a_run_where_everything_fails_leaves_the_previous_dataset_intact(tmp_path: Path) -> None:
    root = tmp_path / "MosMedData"
    _write(_ct(1), root / "studies" / "CT-0" / "study_0001.nii.gz")
    out = tmp_path / "Dataset113_MosMed"
    assert convert_mosmed(root, out).converted == ["study_0001"]
    _write(np.full((5, 16, 12), 50, np.int16), root / "studies" / "CT-0" / "study_0001.nii.gz")  # no air: not HU
    report = convert_mosmed(root, out)
    assert report.converted == [] and "Hounsfield" in report.skipped[0].reason
    assert verify_dataset(out) == []
