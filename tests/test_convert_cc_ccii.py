"""CC-CCII converter: PNG/JPG slices stacked in numeric order, documented intensity and spacing, not HU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_conversion.convert_cc_ccii import convert_cc_ccii
from dscovid.io.image_io import read_image, read_mask
from dscovid.io.validate import verify_dataset


def _scan(folder: Path, slices: int, size=(16, 20), ending=".png", seed: int = 0) -> np.ndarray:
    folder.mkdir(parents=True)
    volume = np.random.default_rng(seed).integers(0, 256, size=(slices, *size)).astype(np.uint8)
    for index in range(slices):
        # Numbered 1..N without padding, so a text sort would put 10 before 2.
        Image.fromarray(volume[index]).save(folder / f"{index + 1}{ending}")
    return volume


def test_convert_cc_ccii(tmp_path: Path) -> None:
    root = tmp_path / "CC-CCII"
    ncp = _scan(root / "NCP" / "1021" / "3132", 12, seed=1)
    _scan(root / "CP" / "1500" / "4001", 4, ending=".jpg", seed=2)
    normal = _scan(root / "Normal" / "2001" / "77", 3, seed=3)
    _scan(root / "NCP" / "1022" / "3140", 1, seed=4)
    _scan(root / "CP" / "1501" / "4002", 3, seed=5)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "CP" / "1501" / "4002" / "4.png")
    _scan(root / "Normal" / "2002" / "78", 3, seed=6)
    (root / "unzip_filenames.csv").write_text("zip_file,label,patient_id,scan_id,n_slice\nNormal-1.zip,CP,2002,78,3\n")
    out = tmp_path / "Dataset107_CCCII"
    report = convert_cc_ccii(root, out)
    assert verify_dataset(out) == []
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["intensity_unit"] == "not_HU" and "lung window" in meta["cc_ccii_assumptions"]["intensity"]
    assert {c: (e["class"], e["lesion_annotated"]) for c, e in meta["cases"].items()} == {
        "CP_1500_4001": ("cap", False), "NCP_1021_3132": ("covid", False), "Normal_2001_77": ("non_pneumonia", True)}
    reasons = {item.source_id: item.reason for item in report.skipped}
    assert "a 3D scan needs at least 2" in reasons["NCP/1022/3140"]
    assert "slices differ in size" in reasons["CP/1501/4002"]
    assert reasons["Normal/2002/78"] == "unzip_filenames.csv says CP but the scan lies in Normal/"

    image, geometry = read_image(out / "imagesTr" / "NCP_1021_3132_0000.nii.gz", check_hu=False)
    np.testing.assert_array_equal(image, np.rint(-1350 + ncp.astype(np.float32) * 1500 / 255))
    assert geometry.spacing_zyx_mm == pytest.approx((25.0, 350 / 20, 350 / 20))
    assert meta["cases"]["NCP_1021_3132"]["metadata"]["last_slice"] == "12.png"
    assert read_mask(out / "labelsTr" / "Normal_2001_77.nii.gz")[0].max() == 0

    raw = tmp_path / "Dataset108_CCCIIraw"
    convert_cc_ccii(root, raw, intensity="raw", spacing_zyx_mm=(5.0, 0.7, 0.7))
    image, geometry = read_image(raw / "imagesTr" / "Normal_2001_77_0000.nii.gz", check_hu=False)
    np.testing.assert_array_equal(image, normal)
    assert geometry.spacing_zyx_mm == pytest.approx((5.0, 0.7, 0.7))

    before = (out / "dataset.json").read_bytes()
    assert convert_cc_ccii(root, out).up_to_date == sorted(meta["cases"])
    assert (out / "dataset.json").read_bytes() == before
