"""Slice-level evaluation: hand-counted confusion, undefined ratios, and the folder-level function."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dscovid.errors import DscovidError
from dscovid.evaluation.slice_level import evaluate_slice_labels, slice_level_metrics
from dscovid.io.dataset import make_dataset_json, write_json_atomic
from dscovid.io.image_io import Geometry, write_image


def test_slice_level_metrics_against_hand_counts() -> None:
    mask = np.zeros((6, 4, 4), dtype=np.uint8)
    mask[0, 1, 1] = 1  # predicted positive, reference positive: TP
    mask[2, 0, 0] = 1  # predicted positive, reference negative: FP
    mask[3, :2, :2] = 1  # TP with 4 voxels
    labels = [1, 1, 0, 1, 0, 0]  # slice 1 is missed: FN; slices 4 and 5 are TN
    result = slice_level_metrics(mask, labels)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (2, 1, 2, 1)
    assert result["sensitivity"] == pytest.approx(2 / 3) and result["specificity"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(4 / 6) and result["slices"] == 6
    strict = slice_level_metrics(mask, labels, min_voxels=2)
    assert (strict["tp"], strict["fp"], strict["fn"]) == (1, 0, 2)


def test_undefined_ratios_are_none_and_bad_input_refused() -> None:
    clean = slice_level_metrics(np.zeros((3, 2, 2)), [0, 0, 0])
    assert clean["sensitivity"] is None and clean["specificity"] == 1.0
    with pytest.raises(ValueError, match="3 slice labels for a mask of 4 slices"):
        slice_level_metrics(np.zeros((4, 2, 2)), [0, 1, 0])
    with pytest.raises(ValueError, match="0 or 1"):
        slice_level_metrics(np.zeros((2, 2, 2)), [0, 2])


def _dataset(root: Path, geometry: Geometry) -> Path:
    cases = {"P1": {"class": "covid", "lesion_annotated": False}, "N1": {"class": "non_pneumonia", "lesion_annotated": True}}
    for case in cases:
        write_image(np.full(geometry.shape_zyx, -1000, np.int16), geometry, root / "imagesTr" / f"{case}_0000.nii.gz")
    write_json_atomic(make_dataset_json(root.name, cases), root / "dataset.json")
    write_json_atomic({"infection": [0, 1, 1, 0], "labelled_by": "radiologists"}, root / "sliceLabelsTr" / "P1.json")
    write_json_atomic({"infection": [0, 0, 0, 0], "labelled_by": "diagnosis"}, root / "sliceLabelsTr" / "N1.json")
    return root


def test_evaluate_slice_labels_over_a_prediction_folder(tmp_path: Path) -> None:
    geometry = Geometry((4, 5, 5), (2.0, 0.7, 0.7), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    raw = _dataset(tmp_path / "Dataset401_Slices", geometry)
    predictions = tmp_path / "pred"
    p1 = np.zeros(geometry.shape_zyx, np.uint8)
    p1[1, 2, 2] = p1[3, 2, 2] = 1
    write_image(p1, geometry, predictions / "P1.nii.gz")
    n1 = np.zeros(geometry.shape_zyx, np.uint8)
    n1[0, 0, 0] = 1
    write_image(n1, geometry, predictions / "N1.nii.gz")
    result = evaluate_slice_labels(predictions, raw)
    assert result["cases"]["P1"]["tp"] == 1 and result["cases"]["P1"]["fn"] == 1 and result["cases"]["P1"]["fp"] == 1
    assert result["cases"]["N1"]["specificity"] == pytest.approx(0.75) and result["cases"]["N1"]["class"] == "non_pneumonia"
    assert result["pooled"]["tn"] == 1 + 3 and result["pooled"]["sensitivity"] == pytest.approx(0.5)
    assert result["pooled_radiologists"]["slices"] == 4
    json.dumps(result)  # the result goes into summary.json as is

    (predictions / "N1.nii.gz").unlink()
    assert evaluate_slice_labels(predictions, raw)["missing_predictions"] == ["N1"]
    shifted = Geometry((4, 5, 5), (2.0, 0.7, 0.7), (0.0, 0.0, 10.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(n1, shifted, predictions / "N1.nii.gz")
    with pytest.raises(DscovidError, match="not on the grid"):
        evaluate_slice_labels(predictions, raw)


def test_dataset_without_slice_labels_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "Dataset402_None"
    write_json_atomic(make_dataset_json(root.name, {}), root / "dataset.json")
    with pytest.raises(DscovidError, match="no slice labels"):
        evaluate_slice_labels(tmp_path, root)


def test_evaluate_folder_adds_the_slice_level_check(tmp_path: Path) -> None:
    from dscovid.evaluation.evaluate import evaluate_folder

    geometry = Geometry((4, 5, 5), (2.0, 0.7, 0.7), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    raw = _dataset(tmp_path / "Dataset403_Slices", geometry)
    write_image(np.zeros(geometry.shape_zyx, np.uint8), geometry, raw / "labelsTr" / "N1.nii.gz")
    predictions = tmp_path / "pred"
    p1 = np.zeros(geometry.shape_zyx, np.uint8)
    p1[1, 2, 2] = p1[2, 2, 2] = 1
    write_image(p1, geometry, predictions / "P1.nii.gz")
    write_image(np.zeros(geometry.shape_zyx, np.uint8), geometry, predictions / "N1.nii.gz")
    summary = evaluate_folder(predictions, raw, cases=["P1", "N1"], plots=False)
    pooled = summary["slice_level"]["pooled"]
    assert (pooled["tp"], pooled["fp"], pooled["tn"], pooled["fn"]) == (2, 0, 6, 0)
    assert json.loads((predictions / "summary.json").read_text(encoding="utf-8"))["slice_level"]["pooled"]["sensitivity"] == 1.0
