"""DICOM-SEG and TID 1500 SR of real series: identity, voxel round trip (also flipped and oblique), read-back, dciodvfy.

The series are the real COVID-CT-MD chest CTs of DSCOVID_TEST_DATA. Two of them (P002, cap002) were anonymised by
blanking their SOP Instance and Frame of Reference UIDs and replacing the study and series UIDs by UUID strings: no
DICOM object can reference them, and dscovid refuses to (tested). The writers are tested on copies that the tests
give a valid identity (pixel data and geometry untouched), and on turned copies (flipped, oblique).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_helpers import (
    FLIPPED,
    OBLIQUE,
    dciodvfy_findings,
    measurement_groups,
    rewrite_series,
    same_values,
    series_folder,
)

from dscovid.errors import DscovidError
from dscovid.io import dicom_content as content
from dscovid.io.dicom_content import ModelIdentity
from dscovid.io.dicom_seg import build_segmentation, write_segmentation
from dscovid.io.dicom_series import read_source_series
from dscovid.io.dicom_sr import build_report, write_report
from dscovid.io.image_io import read_image
from dscovid.io.strict_json import json_safe
from dscovid.prediction.lesion_report import lesion_report

pytestmark = pytest.mark.realdata

MODEL = ModelIdentity("DeepSCCOVIDTrainer", "3d_cpu", ("0", "1"), plans="dscovidPlans", dataset="Dataset999_Fake")
CLASSES = ["covid", "cap", "non_pneumonia"]
#: 20 slices through the middle of normal001's chest: both lungs, small enough for the default suite.
MIDDLE = slice(60, 80)


def structured_masks(image_hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A "lung" (air inside the body box) and a "lesion" (its left-front part on some slices) with no symmetry:
    any flip of rows, columns or slices, or a shifted frame, changes them."""
    lung = (image_hu < -400).astype(np.uint8)
    lung[:, :60] = lung[:, -60:] = 0
    lung[:, :, :40] = lung[:, :, -40:] = 0
    lesion = np.zeros_like(lung)
    z = lung.shape[0]
    lesion[z // 4: z // 2, 150:260, 280:400] = lung[z // 4: z // 2, 150:260, 280:400]
    lesion[z // 2, 200:210, 100:330] = 1  # a bar on one slice, partly outside the "lung"
    return lesion, lung


def _write_seg(folder, tmp_path, name="seg.dcm"):
    image, geometry = read_image(folder)
    source = read_source_series(folder, geometry)
    lesion, lung = structured_masks(image)
    segmentation = build_segmentation(source, lesion, lung, MODEL)
    path = write_segmentation(segmentation, tmp_path / name)
    return image, geometry, source, lesion, lung, path


def test_an_anonymised_series_without_uids_is_refused_in_one_line(test_data):
    folder = series_folder(test_data, "P002")
    with pytest.raises(DscovidError) as error:
        read_source_series(folder)
    message = str(error.value)
    assert "\n" not in message and str(folder) in message
    assert "SOP Instance UID empty in 133 of 133 files" in message
    assert "Frame of Reference UID empty" in message and "is not a DICOM UID" in message


def test_the_source_identity_follows_the_volume_order(test_data, tmp_path):
    folder = rewrite_series(series_folder(test_data, "normal001"), tmp_path / "series", slices=MIDDLE)
    _, geometry = read_image(folder)
    source = read_source_series(folder, geometry)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in source.headers])
    normal = geometry.direction_matrix[:, 2]
    assert np.all(np.diff(positions @ normal) > 0)  # slice k is the k-th along the normal
    assert len(set(source.sop_instance_uids)) == len(source.headers) == geometry.shape_zyx[0]
    # Files named in reverse: the volume order is not the folder order.
    assert [p.name for p in source.files] == sorted((p.name for p in source.files), reverse=True)
    # A volume of another size is refused, not silently referenced.
    from dscovid.io.image_io import Geometry

    other = Geometry((geometry.shape_zyx[0] + 1, *geometry.shape_zyx[1:]), geometry.spacing_zyx_mm,
                     geometry.origin_xyz_mm, geometry.direction)
    with pytest.raises(DscovidError, match="files for a volume of"):
        read_source_series(folder, other)


@pytest.mark.parametrize("turn", [None, FLIPPED, OBLIQUE], ids=["axial", "flipped", "oblique"])
def test_seg_read_back_is_the_mask_frame_by_frame_on_the_source_grid(test_data, tmp_path, turn):
    folder = rewrite_series(series_folder(test_data, "normal001"), tmp_path / "series", turn=turn, slices=MIDDLE)
    image, geometry, source, lesion, lung, path = _write_seg(folder, tmp_path)
    if turn is not None:
        expected_direction = turn @ np.eye(3)
        assert np.allclose(geometry.direction_matrix[:, :2], expected_direction[:, :2], atol=1e-6)
    seg = hd.seg.segread(path)
    # Identity: the source's study, frame of reference and series, every frame pointing at its source instance.
    assert seg.StudyInstanceUID == source.study_instance_uid
    assert seg.FrameOfReferenceUID == source.frame_of_reference_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.series_instance_uid
    assert seg.SegmentationType == "BINARY"
    labels = {int(s.SegmentNumber): (s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                                     s.SegmentedPropertyCategoryCodeSequence[0].CodeValue) for s in seg.SegmentSequence}
    assert labels == {1: ("Lesion", "52988006", "49755003"), 2: ("Lung", "39607008", "91723000")}
    # Voxels: frame k of each segment is slice k of the mask (empty frames left out and read back as zeros).
    pixels = seg.get_pixels_by_source_instance(source.sop_instance_uids, segment_numbers=[1, 2],
                                               assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(pixels[..., 0], lesion)
    np.testing.assert_array_equal(pixels[..., 1], lung | lesion)
    assert int(seg.NumberOfFrames) < 2 * geometry.shape_zyx[0]  # the lesion's empty frames are not stored
    # Geometry: each stored frame lies where the volume puts its slice, with the volume's orientation.
    index_of = {uid: k for k, uid in enumerate(source.sop_instance_uids)}
    world = geometry.index_to_world_matrix()
    orientation = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                   .ImageOrientationPatient]
    np.testing.assert_allclose(orientation, np.concatenate([geometry.direction_matrix[:, 0],
                                                            geometry.direction_matrix[:, 1]]), atol=1e-6)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = index_of[uid]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, (world @ [k, 0, 0, 1])[:3], atol=1e-4)
    errors, warnings = dciodvfy_findings(path)
    assert errors == [] and warnings == []


def test_sr_holds_every_measurement_referencing_the_seg_segments(test_data, tmp_path):
    folder = rewrite_series(series_folder(test_data, "normal001"), tmp_path / "series", slices=MIDDLE)
    image, geometry, source, lesion, lung, seg_path = _write_seg(folder, tmp_path)
    entry = json_safe({"case": "normal001", "predicted_class": "cap",
                       "probabilities": {"covid": 0.25, "cap": 0.7, "non_pneumonia": 0.05},
                       **lesion_report(image, lesion, lung, geometry)})
    seg = pydicom.dcmread(seg_path)
    path = write_report(build_report(source, seg, entry, MODEL, CLASSES, 10.0), tmp_path / "sr.dcm")
    report = pydicom.dcmread(path)
    assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert report.StudyInstanceUID == source.study_instance_uid
    assert report.CompletionFlag == "COMPLETE" and report.VerificationFlag == "UNVERIFIED"
    groups = measurement_groups(report)
    assert set(groups) == {1, 2} and {g["instance"] for g in groups.values()} == {seg.SOPInstanceUID}
    lesion_group, lung_group = groups[1]["measurements"], groups[2]["measurements"]
    expected_lesion = {
        ("SCT", "118565006", None): (entry["lesion_volume_ml"], "ml"),
        ("99DSCOVID", "LESCOUNT", None): (entry["lesion_count"], "{lesions}"),
        ("99DSCOVID", "LVR", None): (100 * entry["lesion_volume_ratio"], "%"),
        ("99DSCOVID", "PLR", None): (100 * entry["peripheral_lesion_ratio"], "%"),
        ("SCT", "373098007", None): (entry["lesion_hu_mean"], "[hnsf'U]"),
        ("SCT", "386136009", None): (entry["lesion_hu_std"], "[hnsf'U]"),
    }
    assert set(lesion_group) == set(expected_lesion)
    for key, (value, unit) in expected_lesion.items():
        assert lesion_group[key][1] == unit and same_values([lesion_group[key][0]], [value]), key
    right, left = content.SIDES["right"].value, content.SIDES["left"].value
    expected_lung = {
        ("SCT", "118565006", None): entry["lung_volume_ml"],
        ("99DSCOVID", "P-COVID", None): 25.0, ("99DSCOVID", "P-CAP", None): 70.0,
        ("99DSCOVID", "P-NON_PNEUMONIA", None): 5.0,
        ("99DSCOVID", "LUNGINV", ("39607008", right)): 100 * entry["right_lung_involvement"],
        ("99DSCOVID", "LUNGINV", ("39607008", left)): 100 * entry["left_lung_involvement"],
        ("99DSCOVID", "SEVSCORE", None): entry["severity_score"],
    }
    for zone, values in entry["severity_zones"].items():
        side, part = zone.split("_")
        site = (content.ZONE_SITES[part].value, content.SIDES[side].value)
        expected_lung[("99DSCOVID", "ZONESCORE", site)] = values["score"]
        expected_lung[("99DSCOVID", "ZONEINV", site)] = 100 * values["involvement"]
    assert set(lung_group) == set(expected_lung)
    for key, value in expected_lung.items():
        assert same_values([lung_group[key][0]], [value]), key
    assert groups[2]["evaluations"] == {("DCM", "121071"): "385093006",  # Finding: community acquired pneumonia
                                        ("99DSCOVID", "MOSMEDCAT"): entry["mosmed_category"]}
    # The model's identity, in every group.
    for group in groups.values():
        assert group["algorithm"][("DCM", "111001")][0] == "dscovid DeepSC-COVID"
        parameters = group["algorithm"][("DCM", "111002")]
        assert {"trainer=DeepSCCOVIDTrainer", "configuration=3d_cpu", "folds=0,1", "checkpoint=checkpoint_final.pt",
                "plans=dscovidPlans", "dataset=Dataset999_Fake", "peripheral_thickness_mm=10"} <= set(parameters)
    errors, warnings = dciodvfy_findings(path)
    assert errors == [] and warnings == []


def test_a_case_without_lesion_gets_an_empty_lesion_segment_and_a_report_without_lesion_statistics(test_data, tmp_path):
    """A non-pneumonia case: the lesion segment has no frame, the SR still references it and leaves out what needs a
    lesion (peripheral ratio, HU statistics)."""
    folder = rewrite_series(series_folder(test_data, "normal001"), tmp_path / "series", slices=MIDDLE)
    image, geometry = read_image(folder)
    source = read_source_series(folder, geometry)
    _, lung = structured_masks(image)
    lesion = np.zeros_like(lung)
    seg_path = write_segmentation(build_segmentation(source, lesion, lung, MODEL), tmp_path / "seg.dcm")
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(source.sop_instance_uids, segment_numbers=[1, 2],
                                               assert_missing_frames_are_empty=True)
    assert not pixels[..., 0].any() and np.array_equal(pixels[..., 1], lung)
    entry = json_safe({"case": "normal001", "predicted_class": "non_pneumonia",
                       "probabilities": {"covid": 0.1, "cap": 0.1, "non_pneumonia": 0.8},
                       **lesion_report(image, lesion, lung, geometry)})
    path = write_report(build_report(source, pydicom.dcmread(seg_path), entry, MODEL, CLASSES, 10.0), tmp_path / "sr.dcm")
    groups = measurement_groups(pydicom.dcmread(path))
    assert set(groups[1]["measurements"]) == {("SCT", "118565006", None), ("99DSCOVID", "LESCOUNT", None),
                                              ("99DSCOVID", "LVR", None)}
    assert groups[1]["measurements"][("99DSCOVID", "LESCOUNT", None)][0] == 0
    assert groups[2]["evaluations"] == {("DCM", "121071"): "NONPNEUMONIA", ("99DSCOVID", "MOSMEDCAT"): "CT-0"}
    assert groups[2]["measurements"][("99DSCOVID", "SEVSCORE", None)][0] == 0
    for file in (seg_path, path):
        errors, warnings = dciodvfy_findings(file)
        assert errors == [] and warnings == [], file
