"""The demo (dscovid/demo), its report, the per-case montage (dscovid/prediction/montage.py) and ``dscovid_predict --png``.

Fast tests check each part on small hand-made or tiny synthetic inputs; the end-to-end run of ``run_demo`` on a few
tiny cases (and its second, reusing run) is marked slow.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from conftest import save_fake_model

from dataset_conversion import synthetic
from dscovid.errors import DscovidError
from dscovid.io.dataset import make_dataset_json, write_json_atomic
from dscovid.io.image_io import Geometry, write_image
from dscovid.prediction.montage import montage_file_name, render_montage, select_slices

CLASSES = ["covid", "cap", "non_pneumonia"]


def _phantom(shape=(12, 40, 48)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A body with two lungs, a lesion in the patient's right lung only (asymmetric), and an evidence blob."""
    z, y, x = np.indices(shape)
    image = np.full(shape, -1000, dtype=np.int16)
    body = ((y - 20) / 17.0) ** 2 + ((x - 24) / 21.0) ** 2 <= 1
    image[body] = 40
    right_lung = ((y - 20) / 12.0) ** 2 + ((x - 14) / 7.0) ** 2 <= 1  # low x = patient's right (LPS)
    left_lung = ((y - 20) / 12.0) ** 2 + ((x - 34) / 7.0) ** 2 <= 1
    image[right_lung | left_lung] = -850
    lesion = (((y - 24) / 3.0) ** 2 + ((x - 12) / 3.0) ** 2 <= 1) & (z >= 3) & (z <= 6)
    image[lesion] = -600
    evidence = np.exp(-(((y - 24) / 5.0) ** 2 + ((x - 12) / 5.0) ** 2)).astype(np.float32) * (z >= 2)
    return image, lesion.astype(np.uint8), evidence


# ------------------------------------------------------------------------------------------------ montage


def test_select_slices_covers_separate_lesion_groups_and_takes_the_largest_slice_of_each():
    weight = np.zeros((20, 8, 8))
    weight[2:5, :6, :6] = 1  # a big lesion at the top
    weight[3, :8, :8] = 1  # its largest slice
    weight[15, :2, :2] = 1  # a small one far below
    chosen = select_slices(weight, 2)
    assert chosen[0] == 3
    assert len(chosen) == 2 and chosen[1] >= 10  # the small distant lesion gets its own panel
    assert select_slices(np.zeros((5, 4, 4)), 3) == []
    assert len(select_slices(weight, 10)) <= 4  # never more slices than hold weight


def test_montage_title_names_the_findings_heads_share_of_the_predicted_class():
    from dscovid.prediction.montage import _title

    report = {"lesion_count": 3, "lesion_volume_ml": 10.0,
              "findings_head": {"logit_term": {"covid": 0.83, "cap": -0.5, "non_pneumonia": -0.3}}}
    title, details = _title("c", "covid", {"covid": 0.9}, "cap", report)
    assert "(WRONG)" in title and details.endswith("findings head +0.83 to its logit")
    assert "findings head" not in _title("c", "covid", {"covid": 0.9}, None, {"lesion_count": 3})[1]


def test_montage_looks_the_same_whatever_the_stored_orientation(tmp_path):
    image, lesion, evidence = _phantom()
    spacing = (3.0, 2.0, 2.0)
    identity = Geometry(image.shape, spacing, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    # The same patient stored with x and z reversed: flipped arrays and a direction with -1 on those axes.
    flipped = Geometry(image.shape, spacing, (94.0, 0.0, 33.0), (-1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0))
    kwargs = dict(case="c", predicted_class="covid", probabilities={"covid": 0.8, "cap": 0.1, "non_pneumonia": 0.1})
    first = render_montage(image, identity, lesion, tmp_path / "a.png", evidence=evidence, reference=lesion, **kwargs)

    def flip(a):
        return np.ascontiguousarray(a[::-1, :, ::-1])

    second = render_montage(flip(image), flipped, flip(lesion), tmp_path / "b.png", evidence=flip(evidence),
                            reference=flip(lesion), **kwargs)
    a, b = matplotlib.image.imread(first), matplotlib.image.imread(second)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)
    # Radiological view: the lesion (patient's right) is drawn on the left half of the picture (red outline pixels).
    red = (a[..., 0] > 0.9) & (a[..., 1] < 0.35) & (a[..., 2] < 0.35)
    columns = np.flatnonzero(red.any(axis=0))
    assert columns.size and np.median(columns % (a.shape[1] // 4)) < a.shape[1] // 8


def test_montage_refuses_arrays_of_another_shape(tmp_path):
    image, lesion, _ = _phantom()
    geometry = Geometry(image.shape, (3.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    with pytest.raises(DscovidError, match="prediction has shape"):
        render_montage(image, geometry, lesion[:-1], tmp_path / "x.png", case="c")
    assert not list(tmp_path.iterdir())


def test_montage_without_lesion_or_evidence_still_draws_lung_slices(tmp_path):
    image, lesion, _ = _phantom()
    geometry = Geometry(image.shape, (3.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    path = render_montage(image, geometry, np.zeros_like(lesion), tmp_path / "n.png", case="n",
                          predicted_class="non_pneumonia", true_class="non_pneumonia")
    assert matplotlib.image.imread(path).shape[0] > 100


# ------------------------------------------------------------------------------------------------ dscovid_predict --png


def test_predict_png_writes_one_montage_per_predicted_case(tmp_path):
    from dscovid.cli.predict import main as predict_main

    model_dir = save_fake_model(tmp_path / "results", folds=(0,), dataset="Dataset998_Png")
    case = synthetic.generate_case(seed=3, index=0, scale=0.3)
    write_image(case.image_hu, case.geometry, tmp_path / "in" / "scan_0000.nii.gz")
    out = tmp_path / "out"
    status = predict_main(["-i", str(tmp_path / "in"), "-o", str(out), "-m", str(model_dir), "--device", "cpu",
                           "--png", "-q"])
    assert status == 0
    png = out / montage_file_name("scan")
    assert png.is_file() and matplotlib.image.imread(png).shape[1] > 300


# ------------------------------------------------------------------------------------------------ report


def _fake_evaluated_test_set(root: Path) -> tuple[Path, Path]:
    """Three tiny cases with reference and predicted masks, predictions.json, and the real evaluator's output."""
    from dscovid.evaluation.evaluate import evaluate_folder

    image, lesion, evidence = _phantom()
    geometry = Geometry(image.shape, (3.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    raw, predictions = root / "raw" / "Dataset997_Tiny", root / "predictions"
    truth = {"t0": "covid", "t1": "cap", "t2": "non_pneumonia"}
    probabilities = {"t0": [0.7, 0.2, 0.1], "t1": [0.6, 0.3, 0.1], "t2": [0.1, 0.1, 0.8]}  # t1 is misclassified
    entries = []
    for case, class_name in truth.items():
        reference = lesion if class_name != "non_pneumonia" else np.zeros_like(lesion)
        predicted = np.roll(reference, 1, axis=2)
        write_image(image, geometry, raw / "imagesTr" / f"{case}_0000.nii.gz")
        write_image(reference, geometry, raw / "labelsTr" / f"{case}.nii.gz")
        write_image(predicted, geometry, predictions / f"{case}.nii.gz")
        write_image(evidence, geometry, predictions / f"{case}_evidence.nii.gz")
        p = dict(zip(CLASSES, probabilities[case]))
        entries.append({"case": case, "predicted_class": max(p, key=p.get), "probabilities": p, "lesion_count": 1,
                        "files": {"mask": f"{case}.nii.gz", "evidence": f"{case}_evidence.nii.gz"},
                        "timing_s": {"read": 0.1, "network": 0.4}})
    write_json_atomic(make_dataset_json(raw.name, {c: {"class": k, "lesion_annotated": True} for c, k in truth.items()}),
                      raw / "dataset.json")
    write_json_atomic({"class_names": CLASSES, "cases": entries, "failed": []}, predictions / "predictions.json")
    evaluate_folder(predictions, raw, root / "evaluation" / "summary.json")
    return raw, predictions


def test_report_shows_table_ii_metrics_and_links_only_existing_pngs(tmp_path):
    from dscovid.demo.html_report import write_report
    from dscovid.prediction.montage import save_montages

    raw, predictions = _fake_evaluated_test_set(tmp_path)
    fold = tmp_path / "fold_0"
    fold.mkdir()
    matplotlib.image.imsave(fold / "progress.png", np.zeros((4, 4, 3)))
    entries = json.loads((predictions / "predictions.json").read_text(encoding="utf-8"))["cases"]
    save_montages(predictions, entries, {e["case"]: raw / "imagesTr" / f"{e['case']}_0000.nii.gz" for e in entries},
                  reference_paths={e["case"]: raw / "labelsTr" / f"{e['case']}.nii.gz" for e in entries},
                  true_classes={"t0": "covid", "t1": "cap", "t2": "non_pneumonia"},
                  output_dir=tmp_path / "report" / "montages", progress=False)
    report = write_report(tmp_path / "report", tmp_path / "evaluation" / "summary.json",
                          predictions / "predictions.json", fold, tmp_path / "report" / "montages",
                          settings={"training cases": 3})
    text = report.read_text(encoding="utf-8")
    sources = re.findall(r"<img src='([^']+)'", text)
    assert {"roc.png", "confusion.png", "progress.png"} <= set(sources)
    assert sum(s.startswith("montages/") for s in sources) == 3
    for source in sources:
        assert (report.parent / source).is_file(), source
    assert "http" not in text and "<script" not in text  # offline: nothing external
    summary = json.loads((tmp_path / "evaluation" / "summary.json").read_text(encoding="utf-8"))
    dice = summary["segmentation"]["lesion_cases"]["mean"]["dsc"]
    assert 0 < dice < 1
    assert f"{100 * dice:.1f}" in text  # the DSC column, in percent
    assert f"{100 * summary['classification']['accuracy']:.1f}" in text  # 2 of 3 right: 66.7
    for header in ("DSC (%)", "NSD (%)", "RMSD (mm)", "Accuracy (%)", "F1-score (%)", "AUC (%)"):
        assert header in text
    for name in CLASSES:
        assert f"class {name}" in text  # per-class segmentation rows
    assert text.count("class='wrong'") == 1  # t1


# ------------------------------------------------------------------------------------------------ reuse checks


def test_generated_dataset_is_reused_only_with_the_same_settings(tmp_path):
    from dscovid.demo.pipeline import _generate, _synthetic_is_complete

    folder = tmp_path / "Dataset001_Synthetic"
    assert _generate(folder, 1, 0, 0, 0.2, 1) != ""
    assert _synthetic_is_complete(folder, 1, 0, 0, 0.2) is None
    assert _generate(folder, 1, 0, 0, 0.2, 1) == ""  # reused, nothing rewritten
    assert "seed" in _synthetic_is_complete(folder, 1, 5, 0, 0.2)
    assert "n_cases" in _synthetic_is_complete(folder, 2, 0, 0, 0.2)
    (folder / "dataset.json").touch()  # rewritten since it was verified
    assert _synthetic_is_complete(folder, 1, 0, 0, 0.2) == "not verified yet"
    # A variant of the same seed and size is not the demo's dataset.
    from dataset_conversion.synthetic import generate_dataset

    generate_dataset(folder, 1, 0, scale=0.2, variant="thick_noisy")
    assert "variant" in _synthetic_is_complete(folder, 1, 0, 0, 0.2)


def test_demo_command_refuses_bad_sizes_in_one_line(tmp_path, capsys):
    from dscovid.cli.demo import main

    assert main(["-o", str(tmp_path / "d"), "--cases", "1"]) == 1
    assert main(["-o", str(tmp_path / "d"), "--epochs-scale", "0"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("dscovid_demo: error:") for line in errors)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_demo_end_to_end_then_a_second_run_reuses_everything(tmp_path):
    from dscovid.demo import run_demo

    out = tmp_path / "demo"
    first = run_demo(out, cases=6, test_cases=3, num_processes=1, scale=0.3, epochs=1, iterations_per_epoch=2,
                     progress=False)
    fold = out / "results" / "Dataset001_Synthetic" / "DeepSCCOVIDTrainer__3d_cpu" / "fold_0"
    expected = [
        out / "raw" / "Dataset001_Synthetic" / "dataset.json",
        out / "raw" / "Dataset002_SyntheticTest" / "dataset.json",
        out / "preprocessed" / "Dataset001_Synthetic" / "plans.json",
        fold / "checkpoint_final.pt", fold / "progress.png",
        out / "predictions" / "predictions.json",
        out / "evaluation" / "summary.json", out / "evaluation" / "summary_roc.png",
        out / "report" / "report.html", out / "demo_stages.json",
    ]
    for path in expected:
        assert path.is_file(), path
    test_cases = json.loads((out / "raw" / "Dataset002_SyntheticTest" / "dataset.json").read_text(encoding="utf-8"))["cases"]
    train_cases = json.loads((out / "raw" / "Dataset001_Synthetic" / "dataset.json").read_text(encoding="utf-8"))["cases"]
    assert sorted(test_cases) == ["case_1000", "case_1001", "case_1002"] and not set(test_cases) & set(train_cases)
    assert first.summary["classification"]["n"] == 3
    text = first.report.read_text(encoding="utf-8")
    for source in re.findall(r"<img src='([^']+)'", text):
        assert (first.report.parent / source).is_file(), source
    assert text.count("montages/") == 3 and "DSC (%)" in text and "Accuracy (%)" in text
    assert all(record.status == "done" for record in first.stages)

    checkpoint_time = (fold / "checkpoint_final.pt").stat().st_mtime_ns
    predictions_time = (out / "predictions" / "predictions.json").stat().st_mtime_ns
    second = run_demo(out, cases=6, test_cases=3, num_processes=1, scale=0.3, epochs=1, iterations_per_epoch=2,
                      progress=False)
    # Every stage but the report reused, nothing written again (rather than a wall-clock bound on the rerun).
    assert [r.status for r in second.stages[:-1]] == ["reused"] * (len(second.stages) - 1)
    assert (fold / "checkpoint_final.pt").stat().st_mtime_ns == checkpoint_time
    assert (out / "predictions" / "predictions.json").stat().st_mtime_ns == predictions_time
    assert second.summary == first.summary
