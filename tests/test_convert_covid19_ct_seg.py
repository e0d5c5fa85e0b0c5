"""COVID-19-CT-Seg converter: Zenodo and Kaggle naming, lung masks binarised, Radiopaedia cases not in HU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dataset_conversion.convert_covid19_ct_seg import canonical_name, convert_covid19_ct_seg
from dscovid.io.image_io import read_mask
from dscovid.io.validate import verify_dataset

SHAPE = (6, 12, 12)


def _write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _case(seed: int, hu: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ct = rng.integers(-1024, 300, SHAPE) if hu else rng.integers(0, 256, SHAPE)
    lung = np.zeros(SHAPE, np.uint8)
    lung[1:5, 2:10, 1:5] = 1  # left
    lung[1:5, 2:10, 7:11] = 2  # right
    infection = np.zeros(SHAPE, np.uint8)
    infection[2:4, 4:6, 2:4] = 1
    return ct.astype(np.int16 if hu else np.float32), lung, infection


def _zenodo(root: Path) -> None:
    for name, seed, hu in [("coronacases_001", 1, True), ("radiopaedia_4_85506_1", 2, False)]:
        ct, lung, infection = _case(seed, hu)
        _write(ct, root / "COVID-19-CT-Seg_20cases" / f"{name}.nii.gz")
        _write(lung, root / "Lung_Mask" / f"{name}.nii.gz")
        _write(infection, root / "Infection_Mask" / f"{name}.nii.gz")


def test_zenodo_layout_skips_not_hu_unless_kept(tmp_path: Path) -> None:
    root = tmp_path / "COVID-19-CT-Seg"
    _zenodo(root)
    out = tmp_path / "Dataset104_MaSeg"
    report = convert_covid19_ct_seg(root, out)
    assert report.converted == ["coronacases_001"] and report.intensity_unit == "HU"
    assert report.skipped[0].source_id == "radiopaedia_4_85506_1"
    assert "are not Hounsfield units" in report.skipped[0].reason and "--keep-not-hu" in report.skipped[0].reason
    assert verify_dataset(out) == []
    lung, _ = read_mask(out / "lungsTr" / "coronacases_001.nii.gz")
    assert lung.max() == 1 and lung.sum() == 2 * 4 * 8 * 4
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["cases"]["coronacases_001"]["lesion_annotated"] is True and meta["intensity_unit"] == "HU"

    kept = tmp_path / "Dataset105_MaSegAll"
    report = convert_covid19_ct_seg(root, kept, keep_not_hu=True)
    assert report.converted == ["coronacases_001", "radiopaedia_4_85506_1"] and report.skipped == []
    meta = json.loads((kept / "dataset.json").read_text(encoding="utf-8"))
    assert meta["intensity_unit"] == "not_HU"
    assert meta["cases"]["radiopaedia_4_85506_1"]["metadata"]["intensity_unit"] == "not_HU"
    assert meta["cases"]["radiopaedia_4_85506_1"]["metadata"]["source_site"] == "Radiopaedia"
    assert verify_dataset(kept) == []


def test_kaggle_naming_and_combined_mask(tmp_path: Path) -> None:
    root = tmp_path / "covid19-ct-scans"
    ct, lung, infection = _case(3, True)
    _write(ct, root / "ct_scans" / "radiopaedia_org_covid-19-pneumonia-14_85914_0-dcm.nii")
    _write(np.where(infection > 0, 3, lung).astype(np.uint8),
           root / "lung_and_infection_mask" / "radiopaedia_14_85914_0.nii")
    _write(ct, root / "ct_scans" / "coronacases_org_002.nii")
    _write(infection, root / "infection_mask" / "coronacases_002.nii")
    (root / "metadata.csv").write_text(
        "ct_scan,lung_mask,infection_mask,lung_and_infection_mask\n"
        "../input/covid19-ct-scans/ct_scans/radiopaedia_org_covid-19-pneumonia-14_85914_0-dcm.nii,,,"
        "../input/covid19-ct-scans/lung_and_infection_mask/radiopaedia_14_85914_0.nii\n"
        "../input/covid19-ct-scans/ct_scans/coronacases_org_002.nii,,../input/covid19-ct-scans/infection_mask/coronacases_002.nii,\n"
    )
    out = tmp_path / "Dataset106_MaKaggle"
    report = convert_covid19_ct_seg(root, out)
    assert report.converted == ["coronacases_002", "radiopaedia_14_85914_0"], report.summary_lines()
    assert verify_dataset(out) == []
    label, _ = read_mask(out / "labelsTr" / "radiopaedia_14_85914_0.nii.gz")
    np.testing.assert_array_equal(label, infection)
    assert read_mask(out / "lungsTr" / "radiopaedia_14_85914_0.nii.gz")[0].sum() == (lung > 0).sum()
    assert not (out / "lungsTr" / "coronacases_002.nii.gz").exists()


def test_canonical_names() -> None:
    assert canonical_name("radiopaedia_org_covid-19-pneumonia-14_85914_0-dcm.nii") == "radiopaedia_14_85914_0"
    assert canonical_name("coronacases_org_001.nii") == "coronacases_001"
    assert canonical_name("radiopaedia_4_85506_1.nii.gz") == "radiopaedia_4_85506_1"
