"""Dataset fingerprint: per-case geometry, lung box, HU statistics, findings, and the shared lung-mask cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_raw_dataset, rotation_direction, small_plans

from dscovid.errors import DscovidError
from dscovid.fingerprint.extractor import FINGERPRINT_FILE, extract_fingerprint, intensity_statistics
from dscovid.io.dataset import load_raw_dataset
from dscovid.io.image_io import read_mask
from dscovid.preprocessing.preprocessor import preprocess_dataset


def test_fingerprint_per_case_and_pooled(tmp_path):
    flipped = rotation_direction((-1, 1, -1), 0.0, (1, 0, 2))
    folder = make_raw_dataset(tmp_path / "raw", [
        {"class": "covid", "spacing": (2.5, 1.5, 1.2)},
        {"class": "covid", "spacing": (2.5, 1.5, 1.2), "direction": flipped},
        {"class": "cap", "spacing": (3.0, 1.4, 1.4)},
        {"class": "non_pneumonia"},
    ])
    fingerprint = extract_fingerprint(load_raw_dataset(folder), tmp_path / "pre", progress=False)
    on_disk = json.loads((tmp_path / "pre" / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    assert on_disk["pooled"]["class_counts"] == {"covid": 2, "cap": 1, "non_pneumonia": 1}
    cases = fingerprint["cases"]
    # The flipped/permuted scan (x index axis along world y, y along x) has its spacing permuted on the canonical grid,
    # and its lung box in mm agrees with the unflipped scan with the same voxels.
    assert cases["case_001"]["axis_codes"] == "ALI"
    assert cases["case_001"]["canonical_spacing_zyx_mm"] == pytest.approx([2.5, 1.2, 1.5])
    assert cases["case_000"]["axis_codes"] == "LPS"
    box0, box1 = cases["case_000"]["lung_box_mm_zyx"], cases["case_001"]["lung_box_mm_zyx"]
    assert np.allclose(box1, [box0[0], box0[2], box0[1]])
    lung, _ = read_mask(folder / "lungsTr" / "case_000.nii.gz")
    z = np.flatnonzero(lung.any(axis=(1, 2)))
    assert cases["case_000"]["lung_box_mm_zyx"][0] == pytest.approx((z[-1] - z[0] + 1) * 2.5)
    assert -900 < cases["case_000"]["hu_lung"]["median"] < -800
    assert -500 < cases["case_000"]["hu_lesion"]["mean"] < -400
    assert cases["case_000"]["findings"]["lesion_count"] >= 1
    assert 0 < cases["case_000"]["findings"]["lesion_volume_ratio"] < 1
    assert len(cases["case_000"]["findings"]["plr"]["ratio"]) == len(fingerprint["peripheral_thicknesses_mm"])
    assert cases["case_003"]["findings"]["lesion_count"] == 0
    pooled = on_disk["pooled"]
    assert pooled["median_spacing_zyx_mm"] == pytest.approx([2.5, 1.45, 1.45])  # canonical axes
    assert pooled["hu_lesion"]["voxels"] > 0 and pooled["hu_lung"]["median"] < -800
    assert set(pooled["findings_per_class"]) == {"covid", "cap", "non_pneumonia"}
    assert pooled["findings_per_class"]["non_pneumonia"]["peripheral_lesion_ratio"]["mean"][1] is None  # NaN→null


def test_intensity_statistics_match_numpy():
    values = np.random.default_rng(0).normal(-700, 100, 5000)
    stats = intensity_statistics(values)
    assert stats["mean"] == pytest.approx(values.mean()) and stats["std"] == pytest.approx(values.std())
    assert stats["percentile_99_5"] == pytest.approx(np.percentile(values, 99.5))
    assert intensity_statistics(np.zeros(0))["voxels"] == 0


def test_lung_masks_are_segmented_once_and_reused_by_the_preprocessor(tmp_path, monkeypatch):
    folder = make_raw_dataset(tmp_path / "raw", [{"class": "covid"}, {"class": "cap"}])
    reference = {p.name: read_mask(p)[0] for p in (folder / "lungsTr").iterdir()}
    shutil.rmtree(folder / "lungsTr")
    calls = []

    def fake_segment_lungs(image_hu, spacing_zyx_mm, direction=None):
        calls.append(image_hu.shape)
        # The phantom's lungs are the only voxels near -850 HU; lesions are inside them.
        return ((image_hu < -700) & (image_hu > -950)).astype(np.uint8) | (np.abs(image_hu + 450) < 60)

    import dscovid.preprocessing.lung as lung

    monkeypatch.setattr(lung, "segment_lungs", fake_segment_lungs)
    out = tmp_path / "pre" / folder.name
    dataset = load_raw_dataset(folder)
    extract_fingerprint(dataset, out, progress=False)
    assert len(calls) == 2 and len(list((out / "lung_masks").glob("*.npz"))) == 2
    preprocess_dataset(dataset, out, small_plans(), ["3d_test"], progress=False)
    assert len(calls) == 2  # the preprocessor read the cache
    with np.load(out / "3d_test" / "case_000.npz") as data:
        assert data["lung"].any()
    assert len(reference) == 2


def test_a_scan_without_lung_is_an_error_naming_the_case(tmp_path, monkeypatch):
    folder = make_raw_dataset(tmp_path / "raw", [{"class": "covid", "name": "pelvis"}])
    shutil.rmtree(folder / "lungsTr")
    import dscovid.preprocessing.lung as lung

    monkeypatch.setattr(lung, "segment_lungs", lambda image, spacing, direction=None: np.zeros(image.shape, np.uint8))
    with pytest.raises(DscovidError, match="pelvis: no lung found"):
        extract_fingerprint(load_raw_dataset(folder), tmp_path / "pre", progress=False)
