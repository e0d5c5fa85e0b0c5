"""dscovid_predict on DICOM series: the SEG and SR beside the NIfTI outputs, the --dicom switch, refusals.

A randomly initialised model (as in test_predict.py) predicts real COVID-CT-MD slices; whatever its lesion mask, the
SEG read back with highdicom must be the written NIfTI masks voxel for voxel, and the SR must say what the JSON says.
"""

from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import save_fake_model
from dicom_helpers import (
    FLIPPED,
    OBLIQUE,
    copy_series,
    dciodvfy_findings,
    measurement_groups,
    rewrite_series,
    same_values,
    series_folder,
)

from dscovid.cli.predict import main as predict_main
from dscovid.io.dicom_series import read_source_series
from dscovid.io.image_io import Geometry, read_image, write_image
from dscovid.prediction.predict import predict_cases

pytestmark = pytest.mark.realdata

#: 20 slices through the middle of each chest (both lungs in view). 40 mm of a chest is not a whole chest CT: the
#: predictor refuses such a slab unless told to accept implausible scans (docs/reliability.md), which these tests do.
MIDDLE = {"normal001": slice(60, 80), "P002": slice(50, 70)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_fake_model(tmp_path_factory.mktemp("results"), folds=(0,))


@pytest.fixture(scope="module")
def inputs(test_data, tmp_path_factory):
    """normal001's middle slices turned upside down (a flipped series) and P002's middle slices as they are (no UIDs)."""
    folder = tmp_path_factory.mktemp("inputs")
    rewrite_series(series_folder(test_data, "normal001"), folder / "normal001", turn=FLIPPED, slices=MIDDLE["normal001"])
    copy_series(series_folder(test_data, "P002"), folder / "P002", MIDDLE["P002"])
    return folder


def _nifti(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def check_seg_is_the_nifti_masks(output, name, series) -> hd.seg.Segmentation:
    """The SEG of a predicted case, read back per source instance, equals its NIfTI lesion and lung masks."""
    _, geometry = read_image(series)
    source = read_source_series(series, geometry)
    seg = hd.seg.segread(output / f"{name}_seg.dcm")
    pixels = seg.get_pixels_by_source_instance(source.sop_instance_uids, segment_numbers=[1, 2],
                                               assert_missing_frames_are_empty=True)
    lesion = _nifti(output / f"{name}.nii.gz")
    np.testing.assert_array_equal(pixels[..., 0], lesion)
    lung_file = output / f"{name}_lung.nii.gz"
    if lung_file.exists():
        np.testing.assert_array_equal(pixels[..., 1], _nifti(lung_file))
    else:
        assert not (lesion.astype(bool) & ~pixels[..., 1].astype(bool)).any()  # the lung segment holds the lesion
    assert seg.FrameOfReferenceUID == source.frame_of_reference_uid
    return seg


def check_sr_says_what_the_json_says(output, entry):
    report = pydicom.dcmread(output / entry["files"]["dicom_sr"])
    groups = measurement_groups(report)
    seg = pydicom.dcmread(output / entry["files"]["dicom_seg"])
    assert {g["instance"] for g in groups.values()} == {seg.SOPInstanceUID}
    lesion, lung = groups[1]["measurements"], groups[2]["measurements"]
    assert same_values([lesion[("SCT", "118565006", None)][0]], [entry["lesion_volume_ml"]])
    assert same_values([lesion[("99DSCOVID", "LESCOUNT", None)][0]], [entry["lesion_count"]])
    assert same_values([lung[("SCT", "118565006", None)][0]], [entry["lung_volume_ml"]])
    assert same_values([lung[("99DSCOVID", "SEVSCORE", None)][0]], [entry["severity_score"]])
    assert same_values([lung[("99DSCOVID", f"P-{c}".upper(), None)][0] for c in entry["probabilities"]],
                       [100 * p for p in entry["probabilities"].values()])
    assert groups[2]["evaluations"][("99DSCOVID", "MOSMEDCAT")] == entry["mosmed_category"]
    return report


def test_a_dicom_series_gets_its_seg_and_sr_by_default_and_an_unreferenceable_one_is_skipped(model_dir, inputs, tmp_path):
    output = tmp_path / "out"
    summary = predict_cases(model_dir, inputs, output, folds=["0"], device="cpu", save_probabilities=True,
                            progress=False, accept_implausible=True)
    assert summary["failed"] == []
    entries = {e["case"]: e for e in summary["cases"]}
    normal = entries["normal001"]
    assert normal["files"]["dicom_seg"] == "normal001_seg.dcm" and normal["files"]["dicom_sr"] == "normal001_sr.dcm"
    assert 0 <= normal["severity_score"] <= 24 and normal["mosmed_category"].startswith("CT-")
    check_seg_is_the_nifti_masks(output, "normal001", inputs / "normal001")
    check_sr_says_what_the_json_says(output, normal)
    for file in ("normal001_seg.dcm", "normal001_sr.dcm"):
        errors, warnings = dciodvfy_findings(output / file)
        assert errors == [] and warnings == [], file
    # P002's anonymisation blanked its UIDs: its NIfTI outputs are there, no DICOM ones, and the entry says why.
    anonymised = entries["P002"]
    assert "dicom_seg" not in anonymised["files"] and not list(output.glob("P002*.dcm"))
    assert "SOP Instance UID empty in 20 of 20 files" in anonymised["dicom_skipped"]
    assert (output / "P002.nii.gz").exists()
    stored = json.loads((output / "predictions.json").read_text(encoding="utf-8"))
    assert stored["cases"][1]["files"] == normal["files"]
    header = (output / "predictions.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert {"severity_score", "mosmed_category", "right_upper_zone_score", "left_lower_zone_score"} <= set(header)


def test_dicom_switch_required_fails_the_unreferenceable_case_and_no_dicom_writes_none(model_dir, inputs, tmp_path,
                                                                                      capsys):
    output = tmp_path / "required"
    status = predict_main(["-i", str(inputs), "-o", str(output), "-m", str(model_dir), "-q", "--device", "cpu",
                           "--dicom", "--accept-implausible"])
    assert status == 1 and "1 case(s) failed: P002" in capsys.readouterr().err
    summary = json.loads((output / "predictions.json").read_text(encoding="utf-8"))
    assert "cannot be referenced" in summary["failed"][0]["reason"]
    assert not list(output.glob("P002*"))  # a failed case leaves nothing, its NIfTI included
    assert (output / "normal001_seg.dcm").exists() and (output / "normal001_sr.dcm").exists()
    output = tmp_path / "none"
    assert predict_main(["-i", str(inputs / "normal001"), "-o", str(output), "-m", str(model_dir), "-q",
                         "--device", "cpu", "--no-dicom", "--accept-implausible"]) == 0
    assert not list(output.glob("*.dcm")) and (output / "normal001.nii.gz").exists()


def test_dicom_switch_refuses_nifti_input_in_one_line(model_dir, tmp_path, capsys):
    write_image(np.full((8, 16, 16), -1000, np.int16),
                Geometry((8, 16, 16), (2.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                tmp_path / "in" / "scan_0000.nii.gz")
    status = predict_main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(model_dir), "-q",
                           "--device", "cpu", "--dicom"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(error) == 1
    assert "scan_0000.nii.gz" in error[0] and "--dicom needs DICOM series input" in error[0]
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_a_failing_sr_leaves_no_seg_behind(model_dir, inputs, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("SR exploded")

    monkeypatch.setattr("dscovid.prediction.dicom_export.build_report", broken)
    output = tmp_path / "out"
    summary = predict_cases(model_dir, inputs / "normal001", output, device="cpu", progress=False,
                            accept_implausible=True)
    assert [(f["case"], f["reason"]) for f in summary["failed"]] == [("normal001", "RuntimeError: SR exploded")]
    assert sorted(p.name for p in output.iterdir()) == ["predictions.csv", "predictions.json", "records"]


@pytest.mark.slow
def test_the_three_real_series_and_an_oblique_one_end_to_end(model_dir, test_data, tmp_path):
    """Whole series: normal001 as it is, P002 and cap002 given the UIDs their anonymisation blanked, normal001 oblique.

    dciodvfy finds no error in any SEG or SR, and each SEG is its NIfTI masks voxel for voxel.
    """
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "normal001").symlink_to(series_folder(test_data, "normal001"), target_is_directory=True)
    for name in ("P002", "cap002"):
        rewrite_series(series_folder(test_data, name), inputs / name, salt=name)
    rewrite_series(series_folder(test_data, "normal001"), inputs / "oblique", turn=OBLIQUE, salt="oblique")
    output = tmp_path / "out"
    summary = predict_cases(model_dir, inputs, output, device="cpu", save_probabilities=True, progress=False,
                            dicom=True)
    assert summary["failed"] == []
    for entry in summary["cases"]:
        name = entry["case"]
        check_seg_is_the_nifti_masks(output, name, inputs / name)
        check_sr_says_what_the_json_says(output, entry)
        for file in (entry["files"]["dicom_seg"], entry["files"]["dicom_sr"]):
            errors, warnings = dciodvfy_findings(output / file)
            assert errors == [] and warnings == [], (file, errors[:3], warnings[:3])
