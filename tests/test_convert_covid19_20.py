"""COVID-19-20 challenge converter: CT/seg pairs, unmasked validation cases, masks on another grid refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dataset_conversion.convert_covid19_20 import convert_covid19_20
from dscovid.io.image_io import read_mask
from dscovid.io.validate import verify_dataset


def _write(array: np.ndarray, path: Path, origin=(-150.0, -170.0, -250.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.74, 0.74, 5.0))
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def test_convert_covid19_20(tmp_path: Path) -> None:
    root = tmp_path / "COVID-19-20_v2"
    ct = np.random.default_rng(0).normal(-600, 300, size=(6, 14, 14)).astype(np.float32)  # float CT: rounded to int16
    seg = np.zeros((6, 14, 14), dtype=np.float32)
    seg[3, 5:9, 5:9] = 1.0
    _write(ct, root / "Train" / "volume-covid19-A-0003_ct.nii.gz")
    _write(seg, root / "Train" / "volume-covid19-A-0003_seg.nii.gz")
    _write(ct, root / "Train" / "volume-covid19-A-0011_ct.nii.gz")
    _write(seg, root / "Train" / "volume-covid19-A-0011_seg.nii.gz", origin=(-150.0, -170.0, -240.0))
    _write(ct, root / "Validation" / "volume-covid19-A-0014_ct.nii.gz")
    _write(seg, root / "Train" / "volume-covid19-A-0099_seg.nii.gz")
    out = tmp_path / "Dataset103_C1920"
    report = convert_covid19_20(root, out)
    assert verify_dataset(out) == []
    cases = json.loads((out / "dataset.json").read_text(encoding="utf-8"))["cases"]
    assert {c: (e["class"], e["lesion_annotated"]) for c, e in cases.items()} == {
        "volume-covid19-A-0003": ("covid", True), "volume-covid19-A-0014": ("covid", False)}
    assert cases["volume-covid19-A-0014"]["metadata"]["source_split"] == "Validation"
    reasons = {item.source_id: item.reason for item in report.skipped}
    assert reasons["volume-covid19-A-0011"].startswith("label geometry does not match the image (origin")
    assert "no matching _ct volume" in reasons["volume-covid19-A-0099_seg.nii.gz"]
    label, _ = read_mask(out / "labelsTr" / "volume-covid19-A-0003.nii.gz")
    assert label.sum() == 16
    before = (out / "dataset.json").read_bytes()
    assert convert_covid19_20(root, out).up_to_date == ["volume-covid19-A-0003", "volume-covid19-A-0014"]
    assert (out / "dataset.json").read_bytes() == before
