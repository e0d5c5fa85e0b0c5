"""The post-processing chosen on held-out predictions (dscovid_find_postprocessing) and applied by the predictor.

A randomly initialised model (conftest.save_fake_model) predicts three small synthetic scans into its fold's
``validation/`` folder as the trainer's final validation does, with its lesion probability replaced by cubes of
several sizes (random weights call most of the lung lesion, one component). The references are then made from
those predictions: for two scans, the predicted mask without its smaller components (so the small ones are false
alarms), for the third an empty mask (a lesion-free scan). So the right volume is known without training.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_fake_model
from scipy import ndimage

import dscovid.prediction.predict as predict_module
from dataset_conversion import synthetic
from dscovid.cli.find_postprocessing import main as find_main
from dscovid.errors import DscovidError
from dscovid.inference.engine import run_networks
from dscovid.io.dataset import make_dataset_json, write_json_atomic
from dscovid.io.image_io import Geometry, read_mask, write_image
from dscovid.measurements.findings import STRUCTURE_26
from dscovid.prediction.export import drop_small_lesions
from dscovid.prediction.postprocessing import (
    POSTPROCESSING_FILE,
    CaseJob,
    choose_min_lesion_ml,
    find_postprocessing,
    score_case,
)
from dscovid.prediction.predict import predict_cases

DATASET = "Dataset997_PostProcessing"


def _dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    total = int(prediction.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & reference).sum()) / total


def _component_volumes_ml(mask: np.ndarray, spacing) -> np.ndarray:
    labels, _ = ndimage.label(mask, STRUCTURE_26)
    return np.bincount(labels.ravel())[1:] * float(np.prod(spacing)) / 1000.0


def test_each_candidates_scores_are_those_of_the_mask_the_predictor_would_write(tmp_path):
    rng = np.random.default_rng(4)
    geometry = Geometry((12, 30, 26), (3.0, 0.9, 1.3), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    prediction = ndimage.binary_dilation(rng.random(geometry.shape_zyx) > 0.985, iterations=1)
    prediction |= rng.random(geometry.shape_zyx) > 0.995  # specks: one-voxel components
    reference = np.zeros(geometry.shape_zyx, bool)
    reference[3:8, 5:20, 4:15] = True
    write_image(prediction.astype(np.uint8), geometry, tmp_path / "p.nii.gz")
    write_image(reference.astype(np.uint8), geometry, tmp_path / "r.nii.gz")
    spacing = read_mask(tmp_path / "p.nii.gz")[1].spacing_zyx_mm  # float32 in the file: volumes as read back
    volumes = np.unique(_component_volumes_ml(prediction, spacing))
    assert len(volumes) >= 3
    candidates = (0.0, float(volumes[0]), float((volumes[0] + volumes[1]) / 2), float(volumes[-1]), 1e6)
    row = score_case(CaseJob("c", tmp_path / "p.nii.gz", tmp_path / "r.nii.gz", candidates))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    assert row["reference_ml"] == pytest.approx(reference.sum() * voxel_ml)
    for k, threshold in enumerate(candidates):  # candidates equal to a component's volume: the edge is the same
        kept = drop_small_lesions(prediction.copy(), spacing, threshold)
        assert row["dice"][k] == pytest.approx(_dice(kept, reference), abs=1e-12), threshold
        assert row["kept_ml"][k] == pytest.approx(kept.sum() * voxel_ml), threshold
    assert row["kept_ml"][-1] == 0 and row["dice"][-1] == 0


def _row(reference_ml, dice, kept_ml):
    return {"case": "x", "reference_ml": reference_ml, "dice": dice, "kept_ml": kept_ml}


def test_the_choice_costs_no_lesion_dice_and_removes_the_most_false_alarms():
    candidates = (0.0, 1.0, 2.0, 5.0)
    rows = [
        _row(10.0, [0.80, 0.80, 0.81, 0.79], [12, 12, 11, 9]),  # 5 ml removes a true lesion
        _row(20.0, [0.70, 0.70, 0.70, 0.72], [20, 20, 20, 19]),
        _row(0.0, [0.0, 0.0, 1.0, 1.0], [3.0, 2.5, 0.0, 0.0]),  # lesion-free: a 3 ml false alarm of two pieces
        _row(0.0, [0.0, 0.0, 0.0, 1.0], [4.0, 4.0, 4.0, 0.0]),
    ]
    result = choose_min_lesion_ml(rows, candidates)
    table = {row["min_lesion_ml"]: row for row in result["candidates"]}
    assert table[5.0]["false_alarm_cases"] == 0 and table[5.0]["lesion_dice"] == pytest.approx(0.755)
    assert table[0.0]["lesion_dice"] == pytest.approx(0.75) and table[2.0]["lesion_dice"] == pytest.approx(0.755)
    # 5 ml leaves no false alarm, but its Dice (0.755) equals 2 ml's and beats none: allowed, and fewest alarms.
    assert result["min_lesion_ml"] == 5.0
    rows[1]["dice"][3] = 0.70  # now 5 ml costs lesion Dice (0.745 < 0.75): refused; 2 ml removes one alarm
    assert choose_min_lesion_ml(rows, candidates)["min_lesion_ml"] == 2.0
    rows[2]["kept_ml"][2] = 2.5  # 2 ml no longer removes anything that 1 ml does not: the smaller volume wins
    rows[2]["kept_ml"][1] = 2.5
    assert choose_min_lesion_ml(rows, candidates)["min_lesion_ml"] == 1.0
    no_lesion_free = choose_min_lesion_ml(rows[:2], candidates)
    assert no_lesion_free["min_lesion_ml"] == 0.0 and no_lesion_free["lesion_free_cases"] == 0


@contextlib.contextmanager
def cubes_of_several_sizes():
    """The predictor with a network whose lesion probability is cubes of 1 to 4 voxels on a lattice."""

    def network(*args, **kwargs):
        output = run_networks(*args, **kwargs)
        pattern = np.zeros(output.lesion_probability.shape, np.float32)
        for k, (z, y, x) in enumerate(np.ndindex(*(n // 7 for n in pattern.shape))):
            size = 1 + k % 4
            pattern[7 * z:7 * z + size, 7 * y:7 * y + size, 7 * x:7 * x + size] = 0.9
        output.lesion_probability = pattern
        return output

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict_module, "run_networks", network)
        yield


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """A fake model whose fold 0 has a final validation of three scans, and the raw dataset of their references."""
    results = tmp_path_factory.mktemp("results")
    model_dir = save_fake_model(results, folds=(0,), dataset=DATASET)
    raw = tmp_path_factory.mktemp("raw") / DATASET
    names = []
    for index in range(3):
        case = synthetic.generate_case(seed=11, index=index, scale=0.5)
        names.append(f"case_{index}")
        write_image(case.image_hu, case.geometry, raw / "imagesTr" / f"case_{index}_0000.nii.gz")
    validation = model_dir / "fold_0" / "validation"
    with cubes_of_several_sizes():
        predict_cases(model_dir, raw / "imagesTr", validation, folds=["0"], device="cpu", progress=False,
                      min_lesion_ml=0.0)
    cut = []
    for k, name in enumerate(names):
        predicted, geometry = read_mask(validation / f"{name}.nii.gz")
        volumes = np.sort(_component_volumes_ml(predicted, geometry.spacing_zyx_mm))
        assert len(np.unique(volumes)) >= 4, "the cubes should give components of several sizes"
        if k == 2:
            reference = np.zeros_like(predicted)
        else:  # the larger half of the components is "the lesion", the smaller ones false alarms
            threshold = float(volumes[len(volumes) // 2])
            reference = drop_small_lesions(predicted.astype(bool), geometry.spacing_zyx_mm, threshold)
            cut.append(threshold)
        write_image(reference.astype(np.uint8), geometry, raw / "labelsTr" / f"{name}.nii.gz")
    classes = {names[0]: "covid19", names[1]: "cap", names[2]: "non_pneumonia"}
    write_json_atomic(make_dataset_json(DATASET, {n: {"class": c} for n, c in classes.items()}), raw / "dataset.json")
    return model_dir, raw, names, min(cut)


def _expected_choice(model_dir: Path, raw: Path, names, candidates) -> float:
    """The rule of the module, computed with the predictor's own drop_small_lesions on each candidate."""
    table = []
    for threshold in candidates:
        dice, alarms, alarm_voxels = [], 0, 0
        for name in names:
            reference, geometry = read_mask(raw / "labelsTr" / f"{name}.nii.gz")
            predicted, _ = read_mask(model_dir / "fold_0" / "validation" / f"{name}.nii.gz")
            kept = drop_small_lesions(predicted.astype(bool), geometry.spacing_zyx_mm, threshold)
            if reference.any():
                dice.append(_dice(kept, reference.astype(bool)))
            else:
                alarms += bool(kept.any())
                alarm_voxels += int(kept.sum())
        table.append((threshold, np.mean(dice), alarms, alarm_voxels))
    allowed = [row for row in table if row[1] >= table[0][1] - 1e-9]
    return min(allowed, key=lambda row: (row[2], row[3], row[0]))[0]


def test_the_volume_chosen_on_the_validation_is_what_the_predictor_applies(validated, tmp_path, capsys, caplog):
    with cubes_of_several_sizes():
        _chosen_and_applied(validated, tmp_path, capsys, caplog)


def _chosen_and_applied(validated, tmp_path, capsys, caplog):
    model_dir, raw, names, smallest_lesion_ml = validated
    candidates = (0.0, smallest_lesion_ml / 8, smallest_lesion_ml / 2, smallest_lesion_ml * 0.999,
                  smallest_lesion_ml * 4)
    expected = _expected_choice(model_dir, raw, names, candidates)
    assert 0 < expected < smallest_lesion_ml  # some false alarm goes, no lesion does
    assert find_main(["-m", str(model_dir), "--reference", str(raw), "--candidates", *map(str, candidates[1:]),
                      "-np", "1", "-q"]) == 0
    assert f"minimum lesion volume {expected:g} ml; written to" in capsys.readouterr().out
    chosen = json.loads((model_dir / POSTPROCESSING_FILE).read_text(encoding="utf-8"))
    assert chosen["min_lesion_ml"] == pytest.approx(expected)
    assert chosen["chosen_on"]["cases"] == 3 and chosen["chosen_on"]["lesion_free_cases"] == 1

    # By default the predictor applies it: the validation mask without its components below the volume.
    out = tmp_path / "default"
    summary = predict_cases(model_dir, raw / "imagesTr" / f"{names[0]}_0000.nii.gz", out, device="cpu",
                            progress=False)
    assert summary["min_lesion_ml"] == pytest.approx(expected)
    written, geometry = read_mask(out / f"{names[0]}.nii.gz")
    validation, _ = read_mask(model_dir / "fold_0" / "validation" / f"{names[0]}.nii.gz")
    np.testing.assert_array_equal(written, drop_small_lesions(validation.copy(), geometry.spacing_zyx_mm, expected))
    assert written.sum() < validation.sum()
    # --min-lesion-ml 0 turns it off.
    summary = predict_cases(model_dir, raw / "imagesTr" / f"{names[0]}_0000.nii.gz", tmp_path / "off",
                            device="cpu", progress=False, min_lesion_ml=0.0)
    assert summary["min_lesion_ml"] == 0.0
    np.testing.assert_array_equal(read_mask(tmp_path / "off" / f"{names[0]}.nii.gz")[0], validation)

    # Retrained weights: the choice no longer applies, and the user is told.
    checkpoint = model_dir / "fold_0" / "checkpoint_final.pt"
    saved = checkpoint.read_bytes()
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    first = next(iter(state["network_weights"]))
    state["network_weights"][first] = state["network_weights"][first] + 0.01
    torch.save(state, checkpoint)
    try:
        capsys.readouterr()
        with caplog.at_level(logging.WARNING):
            summary = predict_cases(model_dir, raw / "imagesTr" / f"{names[0]}_0000.nii.gz", tmp_path / "stale",
                                    device="cpu", progress=False)
        assert summary["min_lesion_ml"] == 0.0
        # The CLI run above configured logging to stderr (run_command), which replaces pytest's capture handler.
        logged = caplog.text + capsys.readouterr().err
        assert "chosen for other weights" in logged and "dscovid_find_postprocessing again" in logged
    finally:
        checkpoint.write_bytes(saved)


def test_predictions_that_cannot_choose_are_refused_in_one_line(validated, tmp_path, capsys):
    model_dir, raw, names, smallest_lesion_ml = validated
    cut = tmp_path / "cut"
    predict_cases(model_dir, raw / "imagesTr", cut, device="cpu", progress=False, min_lesion_ml=smallest_lesion_ml)
    with pytest.raises(DscovidError, match="without post-processing"):
        find_postprocessing(model_dir, raw, predictions=[cut], write=False)
    other = save_fake_model(tmp_path / "other_results", folds=(0,), dataset=DATASET)
    with pytest.raises(DscovidError, match="holds predictions of the model in"):
        find_postprocessing(other, raw, predictions=[model_dir / "fold_0" / "validation"], write=False)
    both = [model_dir / "fold_0" / "validation", tmp_path / "cut"]
    assert find_main(["-m", str(model_dir), "--reference", str(raw), "--predictions", *map(str, both)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "without post-processing" in error[0]
    assert find_main(["-m", str(other), "--reference", str(raw)]) == 1
    assert "no fold has a final validation" in capsys.readouterr().err
    assert find_main(["-m", str(model_dir), "--reference", str(raw), "--candidates", "nan"]) == 1
    assert "candidate volumes must be 0 or more ml, got nan" in capsys.readouterr().err
    assert not (other / POSTPROCESSING_FILE).exists()
