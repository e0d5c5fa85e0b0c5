"""The folder evaluator and ``dscovid_evaluate`` on small hand-made prediction and reference folders."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from dscovid.cli.evaluate import main as evaluate_main
from dscovid.errors import DscovidError
from dscovid.evaluation.evaluate import evaluate_folder
from dscovid.evaluation.metrics import segmentation_metrics
from dscovid.io.dataset import make_dataset_json, write_json_atomic
from dscovid.io.image_io import Geometry, write_image

SHAPE = (8, 20, 22)
GEOMETRY = Geometry(SHAPE, (2.5, 0.8, 0.8), (-10.0, 5.0, 100.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
CLASSES = ["covid", "cap", "non_pneumonia"]


def _box(z0, z1, y0, y1, x0, x1):
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[z0:z1, y0:y1, x0:x1] = 1
    return mask


CASES = {
    #            class            reference                  prediction                 probabilities
    "case_a": ("covid", _box(2, 6, 4, 12, 4, 12), _box(2, 6, 5, 12, 4, 13), (0.8, 0.1, 0.1)),
    "case_b": ("cap", _box(3, 5, 8, 16, 10, 18), _box(3, 5, 8, 14, 10, 18), (0.6, 0.3, 0.1)),
    "case_c": ("non_pneumonia", _box(0, 0, 0, 0, 0, 0), _box(0, 0, 0, 0, 0, 0), (0.1, 0.1, 0.8)),
    "case_d": ("non_pneumonia", _box(0, 0, 0, 0, 0, 0), _box(4, 5, 1, 3, 1, 3), (0.2, 0.2, 0.6)),
}


def _predictions_json(names):
    entries = []
    for name in names:
        probabilities = dict(zip(CLASSES, CASES[name][3]))
        entries.append({"case": name, "predicted_class": max(probabilities, key=probabilities.get),
                        "probabilities": probabilities, "files": {"mask": f"{name}.nii.gz"}})
    return {"class_names": CLASSES, "cases": entries, "failed": []}


@pytest.fixture
def folders(tmp_path):
    """A raw dataset (imagesTr is not needed by the evaluator) and a prediction folder for all four cases."""
    raw = tmp_path / "Dataset900_Eval"
    pred = tmp_path / "pred"
    for name, (_, reference, prediction, _) in CASES.items():
        write_image(reference, GEOMETRY, raw / "labelsTr" / f"{name}.nii.gz")
        write_image(prediction, GEOMETRY, pred / f"{name}.nii.gz")
        write_image(prediction.astype(np.float32), GEOMETRY, pred / f"{name}_evidence.nii.gz")
    cases = {name: {"class": CASES[name][0], "lesion_annotated": True} for name in CASES}
    write_json_atomic(make_dataset_json("Dataset900_Eval", cases), raw / "dataset.json")
    write_json_atomic(_predictions_json(CASES), pred / "predictions.json")
    return raw, pred


def test_summary_matches_the_metrics_case_by_case(folders):
    raw, pred = folders
    summary = evaluate_folder(pred, raw)
    per_case = {row["case"]: row for row in summary["segmentation"]["per_case"]}
    assert sorted(per_case) == sorted(CASES)
    for name, (_, reference, prediction, _) in CASES.items():
        expected = segmentation_metrics(prediction, reference, GEOMETRY.spacing_zyx_mm)
        for key in ("dsc", "nsd", "hd95", "rmsd", "specificity"):
            value = per_case[name][key]
            assert (value is None and math.isnan(expected[key])) or value == pytest.approx(expected[key]), (name, key)
        assert per_case[name]["class"] == CASES[name][0]
    # Means skip undefined values and say how many cases were used.
    mean, n = summary["segmentation"]["mean"], summary["segmentation"]["n"]
    dscs = [segmentation_metrics(p, r, GEOMETRY.spacing_zyx_mm)["dsc"] for _, r, p, _ in CASES.values()]
    assert mean["dsc"] == pytest.approx(np.mean(dscs)) and n["dsc"] == 4
    assert n["hd95"] == 3  # case_d has a false positive on an empty reference: HD95 undefined
    assert summary["segmentation"]["lesion_cases"]["n"]["dsc"] == 2
    assert summary["segmentation"]["by_class"]["non_pneumonia"]["mean"]["dsc"] == pytest.approx(0.5)
    # Classification: case_b (cap) is predicted covid.
    classification = summary["classification"]
    assert classification["accuracy"] == pytest.approx(0.75)
    assert classification["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 0, 2]]
    assert classification["per_class"]["cap"]["sensitivity"] == 0.0
    on_disk = json.loads((pred / "summary.json").read_text(encoding="utf-8"))
    assert on_disk == summary


def test_outputs_csv_and_figures(folders):
    raw, pred = folders
    evaluate_folder(pred, raw, pred / "eval" / "summary.json")
    for name in ("summary.json", "summary_cases.csv", "summary_roc.png", "summary_confusion.png"):
        assert (pred / "eval" / name).stat().st_size > 0, name
    with open(pred / "eval" / "summary_cases.csv") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert rows["case_b"]["predicted_class"] == "covid" and float(rows["case_b"]["p_cap"]) == pytest.approx(0.3)
    assert rows["case_d"]["hd95"] == ""  # undefined is an empty cell
    assert float(rows["case_c"]["dsc"]) == 1.0


def test_mask_folder_reference_with_dataset_json_and_lung_roi(folders, tmp_path):
    raw, pred = folders
    lungs = tmp_path / "lungs"
    for name in CASES:
        write_image(_box(0, 8, 0, 20, 0, 11), GEOMETRY, lungs / f"{name}.nii.gz")
    summary = evaluate_folder(pred, raw / "labelsTr", tmp_path / "s.json", dataset_json=raw / "dataset.json",
                              lung_dir=lungs, plots=False)
    assert summary["specificity_region"] == "lung mask"
    row = next(r for r in summary["segmentation"]["per_case"] if r["case"] == "case_d")
    roi = _box(0, 8, 0, 20, 0, 11)
    reference, prediction = CASES["case_d"][1], CASES["case_d"][2]
    assert row["specificity"] == pytest.approx(
        segmentation_metrics(prediction, reference, GEOMETRY.spacing_zyx_mm, roi=roi)["specificity"]
    )
    # Without a dataset.json only segmentation is evaluated.
    assert evaluate_folder(pred, raw / "labelsTr", tmp_path / "t.json", plots=False)["classification"] is None


def test_raw_dataset_reference_evaluates_only_the_predicted_cases(folders):
    raw, pred = folders
    (pred / "case_c.nii.gz").unlink()
    (pred / "case_d.nii.gz").unlink()
    write_json_atomic(_predictions_json(["case_a", "case_b"]), pred / "predictions.json")
    summary = evaluate_folder(pred, raw, plots=False)
    assert summary["num_cases"] == 2 and summary["classification"]["n"] == 2


def test_segmentation_only_predictions_are_evaluated_without_classification(folders):
    raw, pred = folders
    predictions = _predictions_json(CASES)
    for entry in predictions["cases"]:
        entry["predicted_class"] = entry["probabilities"] = None  # what a SegmentationTrainer model writes
    write_json_atomic(predictions, pred / "predictions.json")
    summary = evaluate_folder(pred, raw, plots=False)
    assert summary["classification"] is None and summary["segmentation"]["mean"]["dsc"] >= 0
    predictions["cases"][0]["probabilities"] = dict(zip(CLASSES, CASES["case_a"][3]))  # mixed: still an error
    write_json_atomic(predictions, pred / "predictions.json")
    with pytest.raises(DscovidError, match="has no probability"):
        evaluate_folder(pred, raw, plots=False)


def test_missing_prediction_is_an_error_listing_the_cases(folders):
    raw, pred = folders
    (pred / "case_b.nii.gz").unlink()
    (pred / "case_d.nii.gz").unlink()
    with pytest.raises(DscovidError, match="no predicted mask for case.*case_b, case_d"):
        evaluate_folder(pred, raw / "labelsTr")


def test_mismatched_geometry_is_an_error_naming_the_case(folders):
    raw, pred = folders
    moved = Geometry(SHAPE, GEOMETRY.spacing_zyx_mm, (0.0, 0.0, 0.0), GEOMETRY.direction)
    write_image(CASES["case_a"][2], moved, pred / "case_a.nii.gz")
    with pytest.raises(DscovidError, match="case case_a.*not on the reference grid.*origin"):
        evaluate_folder(pred, raw)


def test_parallel_workers_give_the_same_summary(folders, tmp_path):
    raw, pred = folders
    serial = evaluate_folder(pred, raw, tmp_path / "a.json", plots=False)
    parallel = evaluate_folder(pred, raw, tmp_path / "b.json", plots=False, num_processes=2)
    assert serial["segmentation"] == parallel["segmentation"]


def test_command_line(folders, tmp_path, capsys):
    raw, pred = folders
    out = tmp_path / "cli" / "summary.json"
    assert evaluate_main(["-ref", str(raw), "-pred", str(pred), "-o", str(out), "--nsd-tolerance", "2", "-q"]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["nsd_tolerance_mm"] == 2.0
    assert "accuracy" in capsys.readouterr().out
    assert evaluate_main(["-ref", str(tmp_path / "nowhere"), "-pred", str(pred)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("dscovid_evaluate: error:") and "nowhere" in error and "\n" not in error


# ---------------------------------------------------------------- cross-validation summary (Table II)


def _fold_summary(dsc, nsd, rmsd, accuracy, auc):
    return {
        "segmentation": {"mean": {"dsc": 0.0}, "lesion_cases": {"mean": {
            "dsc": dsc, "sensitivity": 0.8, "specificity": 0.99, "nsd": nsd, "rmsd": rmsd}}},
        "classification": {"accuracy": accuracy, "macro": {"sensitivity": 0.9, "specificity": 0.95, "f1": 0.85,
                                                           "auc": auc}},
    }


@pytest.fixture
def results_root(tmp_path):
    root = tmp_path / "results"
    dataset = root / "Dataset007_Cv"
    folds = {
        "DeepSCTrainer__3d_cpu": [(0.70, 0.60, 3.0, 0.90, 0.95), (0.80, 0.70, 5.0, 0.80, None)],
        "LesionOnlyTrainer__3d_cpu": [(0.60, 0.50, 4.0, 0.70, 0.80)],
        "DeepSCTrainer__3d_fullres": [(0.90, 0.90, 1.0, 1.0, 1.0)],
    }
    for folder, values in folds.items():
        for fold, value in enumerate(values):
            write_json_atomic(_fold_summary(*value), dataset / folder / f"fold_{fold}" / "validation" / "summary.json")
    (dataset / "DeepSCTrainer__3d_cpu" / "fold_2").mkdir()  # a fold still training: no summary yet
    return root


def test_cv_summary_table(results_root):
    from dscovid.evaluation.cv_summary import collect_cv_summary, format_csv, format_markdown

    rows = collect_cv_summary(results_root / "Dataset007_Cv", configuration="3d_cpu")
    assert [(r.trainer, r.folds) for r in rows] == [("DeepSCTrainer", [0, 1]), ("LesionOnlyTrainer", [0])]
    mean, std, count = rows[0].mean_std("segmentation", "dsc")
    assert (mean, std, count) == (pytest.approx(0.75), pytest.approx(0.05), 2)
    assert rows[0].mean_std("classification", "auc") == (pytest.approx(0.95), 0.0, 1)  # the null fold is skipped
    markdown = format_markdown(rows)
    line = next(line for line in markdown.splitlines() if line.startswith("| DeepSCTrainer"))
    assert "| 75.00 (5.00) |" in line and "| 4.00 (1.00) |" in line and "| 85.00 (5.00) |" in line
    table = list(csv.DictReader(format_csv(rows).splitlines()))
    assert float(table[1]["segmentation_dsc_mean"]) == pytest.approx(0.6)
    assert table[0]["classification_auc_n"] == "1"
    ordered = collect_cv_summary(results_root / "Dataset007_Cv", trainers=["LesionOnlyTrainer", "DeepSCTrainer"])
    assert [(r.trainer, r.configuration) for r in ordered] == [
        ("LesionOnlyTrainer", "3d_cpu"), ("DeepSCTrainer", "3d_cpu"), ("DeepSCTrainer", "3d_fullres")]


def test_cv_summary_command(results_root, tmp_path, capsys, monkeypatch):
    from dscovid.cli.cv_summary import main as cv_main

    monkeypatch.setenv("DSCOVID_results", str(results_root))
    assert cv_main(["-d", "7", "-c", "3d_cpu", "-o", str(tmp_path / "table")]) == 0
    assert "DeepSCTrainer" in capsys.readouterr().out
    assert (tmp_path / "table" / "cv_summary_3d_cpu.md").is_file()
    assert (tmp_path / "table" / "cv_summary_3d_cpu.csv").is_file()
    assert cv_main(["-d", "7", "-tr", "NoSuchTrainer"]) == 1
    assert "NoSuchTrainer" in capsys.readouterr().err
    monkeypatch.delenv("DSCOVID_results")
    assert cv_main(["-d", "7"]) == 1
    assert "DSCOVID_results" in capsys.readouterr().err
