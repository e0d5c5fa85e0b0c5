"""COVID-CT-MD converter: DICOM series, classes, slice labels re-indexed by SliceLocation, real sample data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from dataset_conversion.convert_covid_ct_md import align_slice_labels, convert_covid_ct_md
from dscovid.io.image_io import read_image, read_mask
from dscovid.io.validate import verify_dataset

SLICES = 8


def _write_series(folder: Path, seed: int, location_sign: float) -> np.ndarray:
    """Write a small CT series whose file numbers run against z; SliceLocation = location_sign × IPP z."""
    folder.mkdir(parents=True)
    volume = np.random.default_rng(seed).integers(-1000, 100, size=(SLICES, 12, 10)).astype(np.int16)
    uid = f"1.2.826.0.1.3680043.2.1125.{seed}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(SLICES):
        slice_image = sitk.GetImageFromArray(volume[z])
        slice_image.SetSpacing((0.7, 0.7))
        position = -300.0 + 2.0 * z
        tags = {
            "0008|0060": "CT", "0020|000d": uid + ".1", "0020|000e": uid + ".2", "0008|0018": f"{uid}.3.{z}",
            "0020|0013": str(SLICES - z), "0020|0032": f"-100\\-120\\{position}", "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|1041": f"{location_sign * position:.1f}", "0018|0050": "2.0", "0028|0030": "0.7\\0.7",
        }
        for key, value in tags.items():
            slice_image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{SLICES - z:04d}.dcm"))
        writer.Execute(slice_image)
    return volume


def _release(root: Path) -> dict[str, np.ndarray]:
    """Full-release naming: two COVID cases (one unlabelled), one CAP whose SliceLocation runs against z, one normal."""
    volumes = {
        "P001": _write_series(root / "COVID-19 Cases" / "P001", 1, 1.0),
        "P099": _write_series(root / "COVID-19 Cases" / "P099", 2, 1.0),
        "cap001": _write_series(root / "Cap Cases" / "cap001", 3, -1.0),
        "normal001": _write_series(root / "Normal Cases" / "normal001", 4, 1.0),
    }
    (root / "Index.csv").write_text("Label Index,Diagnosis,Relative Path,Folder/ID\n0,COVID-19,./COVID-19/,P001\n1,CAP,./CAP/,cap001")
    rows = np.zeros((2, 200), dtype=np.int32)
    rows[0, [1, 2, 3]] = 1  # ascending SliceLocation = ascending z
    rows[1, [0, 5]] = 1  # ascending SliceLocation = descending z for cap001
    np.save(root / "Slice-level-labels-updated-1.npy", rows)
    lobes = np.zeros((2, 200, 5))
    lobes[0, [1, 2, 3], 4] = 1
    lobes[1, [0, 5], 0] = 1
    np.save(root / "Lobe-level-labels-updated-1.npy", lobes)
    return volumes


def test_convert_covid_ct_md_full_release_layout(tmp_path: Path) -> None:
    volumes = _release(tmp_path / "COVID-CT-MD")
    out = tmp_path / "Dataset301_CTMD"
    report = convert_covid_ct_md(tmp_path / "COVID-CT-MD", out)
    assert report.skipped == [] and report.converted == ["P001", "P099", "cap001", "normal001"]
    assert verify_dataset(out) == []
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert {case: (e["class"], e["lesion_annotated"]) for case, e in meta["cases"].items()} == {
        "P001": ("covid", False), "P099": ("covid", False), "cap001": ("cap", False), "normal001": ("non_pneumonia", True)}
    assert meta["cases"]["cap001"]["metadata"]["label_index"] == 1
    image, geometry = read_image(out / "imagesTr" / "P001_0000.nii.gz")
    np.testing.assert_array_equal(image, volumes["P001"])
    assert geometry.spacing_zyx_mm == pytest.approx((2.0, 0.7, 0.7))

    p001 = json.loads((out / "sliceLabelsTr" / "P001.json").read_text(encoding="utf-8"))
    assert p001["infection"] == [0, 1, 1, 1, 0, 0, 0, 0] and p001["labelled_by"] == "radiologists"
    assert p001["world_z_mm"] == pytest.approx(p001["slice_location_mm"])
    assert [row[4] for row in p001["lobe_infection"]] == p001["infection"]
    cap = json.loads((out / "sliceLabelsTr" / "cap001.json").read_text(encoding="utf-8"))
    assert cap["infection"] == [0, 0, 1, 0, 0, 0, 0, 1]  # label slices 0 and 5 counted from the top (highest z)
    assert cap["slice_location_mm"] == pytest.approx([300.0 - 2 * z for z in range(SLICES)])
    normal = json.loads((out / "sliceLabelsTr" / "normal001.json").read_text(encoding="utf-8"))
    assert normal["infection"] == [0] * SLICES and normal["labelled_by"] == "diagnosis"
    assert not (out / "sliceLabelsTr" / "P099.json").exists()
    assert read_mask(out / "labelsTr" / "normal001.nii.gz")[0].max() == 0

    before = (out / "dataset.json").read_bytes()
    again = convert_covid_ct_md(tmp_path / "COVID-CT-MD", out)
    assert again.up_to_date == again.converted and (out / "dataset.json").read_bytes() == before


def test_index_contradicting_the_folder_skips_the_case(tmp_path: Path) -> None:
    root = tmp_path / "COVID-CT-MD"
    _write_series(root / "Cap subjects" / "P005", 5, 1.0)
    _write_series(root / "Normal subjects" / "normal002", 6, 1.0)
    (root / "Index.csv").write_text("Label Index,Diagnosis,Relative Path,Folder/ID\n0,COVID-19,./COVID-19/,P005\n")
    np.save(root / "Slice-level-labels-updated-1.npy", np.zeros((1, 200), dtype=np.int32))
    report = convert_covid_ct_md(root, tmp_path / "Dataset302_CTMD")
    assert report.converted == ["normal002"]
    assert report.skipped[0].source_id == "Cap subjects/P005" and "Index.csv says covid" in report.skipped[0].reason


def test_align_slice_labels_by_rank_of_slice_location() -> None:
    row = np.array([1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(align_slice_labels(np.array([-5.0, -3.0, -1.0, 1.0]), row, "x"), [1, 0, 0, 1])
    np.testing.assert_array_equal(align_slice_labels(np.array([1.0, -1.0, -3.0, -5.0]), row, "x"), [1, 0, 0, 1][::-1])
    with pytest.raises(Exception, match="beyond"):
        align_slice_labels(np.array([0.0, 1.0]), row, "x")


@pytest.mark.slow
@pytest.mark.realdata
def test_convert_real_covid_ct_md_sample(test_data: Path, tmp_path: Path) -> None:
    """The three real sample series (400 JPEG-lossless slices): verify, classes, slice labels as in slice_labels.csv."""
    out = tmp_path / "Dataset303_CTMD"
    report = convert_covid_ct_md(test_data / "covid_ct_md", out)
    assert report.skipped == []
    assert verify_dataset(out) == []
    cases = json.loads((out / "dataset.json").read_text(encoding="utf-8"))["cases"]
    assert {case: entry["class"] for case, entry in cases.items()} == {"P002": "covid", "cap002": "cap", "normal001": "non_pneumonia"}
    reference = pd.read_csv(test_data / "covid_ct_md_derived" / "slice_labels.csv")
    for case in cases:
        sidecar = json.loads((out / "sliceLabelsTr" / f"{case}.json").read_text(encoding="utf-8"))
        expected = reference[reference.case == case].sort_values("z_index_native")
        assert len(sidecar["infection"]) == len(expected) == read_image(out / "imagesTr" / f"{case}_0000.nii.gz")[1].shape_zyx[0]
        np.testing.assert_allclose(sidecar["world_z_mm"], expected.slice_location_mm, atol=1e-3)
        np.testing.assert_allclose(sidecar["slice_location_mm"], expected.slice_location_mm, atol=1e-3)
        np.testing.assert_array_equal(sidecar["infection"], expected.infection.fillna(0).astype(int))
    assert sum(json.loads((out / "sliceLabelsTr" / "P002.json").read_text(encoding="utf-8"))["infection"]) == 68
