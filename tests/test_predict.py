"""dscovid_predict end to end with a randomly initialised model saved as a trained fold folder.

The model is built with ``build_network`` from the 3d_cpu preset (planned by the real planner) and saved the way the
trainer saves ``checkpoint_final.pt``, so no training is needed. Random weights make the lesion mask arbitrary, but
every property checked here holds for any weights: output geometry identical to the input's, the mask inside the
lung and equal to the thresholded probability, reports consistent with the mask, failures named.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import CHEST_FINGERPRINT, save_fake_model
from untrained_model import save_untrained_model

from dataset_conversion import synthetic
from dscovid import __version__
from dscovid.cli.predict import main as predict_main
from dscovid.errors import DscovidError
from dscovid.inference.engine import run_networks
from dscovid.inference.model_loading import load_trained_model
from dscovid.io.dataset import CLASS_NAMES
from dscovid.io.image_io import Geometry, read_image, write_image
from dscovid.io.scans import Scan
from dscovid.measurements.findings import (
    lesion_count,
    lesion_hu_statistics,
    lesion_volume_ratio,
    lung_involvement,
    peripheral_lesion_ratio,
)
from dscovid.measurements.severity import severity_score
from dscovid.model.findings_head import FEATURE_NAMES
from dscovid.model.precision import precision_name
from dscovid.prediction.export import drop_small_lesions, export_case
from dscovid.prediction.inputs import load_case
from dscovid.prediction.predict import predict_cases
from dscovid.preprocessing.preprocessor import original_crop_slices, restore_to_original
from dscovid.results.model_folder import available_folds, find_model_folder

TRAINER, CONFIGURATION = "DeepSCCOVIDTrainer", "3d_cpu"


def _rotation(axis: int, degrees: float) -> np.ndarray:
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def synthetic_oblique_case() -> tuple[np.ndarray, Geometry]:
    """A small synthetic chest CT (int16 HU) whose direction matrix is oblique (rotated 17° and 6°)."""
    case = synthetic.generate_case(seed=7, index=1, scale=0.5)
    direction = _rotation(2, 17.0) @ _rotation(0, 6.0) @ case.geometry.direction_matrix
    geometry = Geometry(case.geometry.shape_zyx, case.geometry.spacing_zyx_mm, (12.5, -30.25, 101.0),
                        tuple(float(v) for v in direction.ravel()))
    return case.image_hu, geometry


def _assert_same_geometry(path: Path, expected: Geometry) -> None:
    image = sitk.ReadImage(str(path))
    actual = Geometry.of(image)
    assert actual.shape_zyx == expected.shape_zyx, path
    # NIfTI stores spacing and origin as float32: identical up to float32 rounding (6e-8 relative, 3e-5 mm at 500 mm).
    np.testing.assert_allclose(actual.spacing_zyx_mm, expected.spacing_zyx_mm, rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(actual.origin_xyz_mm, expected.origin_xyz_mm, rtol=1e-7, atol=5e-5)
    np.testing.assert_allclose(actual.direction, expected.direction, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_fake_model(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def oblique_run(model_dir, tmp_path_factory):
    """One prediction of the oblique synthetic case with probabilities saved."""
    image, geometry = synthetic_oblique_case()
    inputs = tmp_path_factory.mktemp("inputs")
    write_image(image, geometry, inputs / "oblique_0000.nii.gz")
    output = tmp_path_factory.mktemp("predictions")
    summary = predict_cases(model_dir, inputs, output, device="cpu", save_probabilities=True, progress=False)
    return summary, output, geometry, inputs


def test_every_output_has_the_input_geometry_and_the_mask_lies_in_the_lung(oblique_run):
    summary, output, geometry, _ = oblique_run
    assert summary["failed"] == []
    assert [c["case"] for c in summary["cases"]] == ["oblique"]
    files = ["oblique.nii.gz", "oblique_evidence.nii.gz", "oblique_lesion_prob.nii.gz", "oblique_lung.nii.gz"]
    for name in files:
        _assert_same_geometry(output / name, geometry)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "oblique.nii.gz")))
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "oblique_lung.nii.gz")))
    probability = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "oblique_lesion_prob.nii.gz")))
    evidence = sitk.ReadImage(str(output / "oblique_evidence.nii.gz"))
    assert mask.dtype == np.uint8 and lung.dtype == np.uint8
    assert evidence.GetPixelID() == sitk.sitkFloat32 and probability.dtype == np.float32
    assert set(np.unique(mask)) <= {0, 1}
    assert lung.sum() > 0.05 * lung.size  # the lungs were found in the oblique scan
    assert not (mask & (1 - lung)).any(), "lesion voxels outside the lung"
    np.testing.assert_array_equal(mask, ((probability >= 0.5) & (lung == 1)).astype(np.uint8))
    assert np.isfinite(sitk.GetArrayViewFromImage(evidence)).all()
    # Nothing else (no temporary files) in the output folder.
    assert sorted(p.name for p in output.iterdir()) == sorted(files + ["predictions.csv", "predictions.json", "records"])


def test_predictions_json_and_csv_follow_the_format(oblique_run, model_dir):
    summary, output, geometry, _ = oblique_run
    stored = json.loads((output / "predictions.json").read_text(encoding="utf-8"))
    assert stored == summary
    assert stored["dscovid_version"] == __version__
    assert stored["model_dir"] == str(model_dir.resolve())
    assert stored["configuration"] == CONFIGURATION and stored["trainer"] == TRAINER
    assert stored["folds"] == ["0", "1"]
    assert stored["class_names"] == list(CLASS_NAMES)
    entry = stored["cases"][0]
    assert set(entry["probabilities"]) == set(CLASS_NAMES)
    assert math.isclose(sum(entry["probabilities"].values()), 1.0, abs_tol=1e-5)
    assert entry["predicted_class"] == max(entry["probabilities"], key=entry["probabilities"].get)
    assert set(entry["timing_s"]) == {"read", "preprocess", "network", "export"}
    assert entry["files"]["mask"] == "oblique.nii.gz" and entry["files"]["evidence"] == "oblique_evidence.nii.gz"
    assert 0 < entry["tiles"]["run"] <= entry["tiles"]["total"]
    # The report is measured on the written mask, in physical units.
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "oblique.nii.gz")))
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "oblique_lung.nii.gz")))
    voxel_ml = float(np.prod(geometry.spacing_zyx_mm)) / 1000.0
    assert math.isclose(entry["lesion_volume_ml"], mask.sum() * voxel_ml, rel_tol=1e-6)  # NIfTI keeps float32 spacing
    assert math.isclose(entry["lung_volume_ml"], (mask | lung).sum() * voxel_ml, rel_tol=1e-6)
    if mask.any():
        assert entry["lesion_count"] >= 1 and 0 < entry["lesion_volume_ratio"] <= 1
        assert entry["lesion_hu_mean"] is not None
    rows = (output / "predictions.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].split(",")[:5] == ["case", "predicted_class", "p_covid", "p_cap", "p_non_pneumonia"]
    assert len(rows) == 2 and rows[1].startswith("oblique,")


def test_lung_restriction_gives_the_whole_volume_result_inside_the_lung(model_dir):
    model = load_trained_model(model_dir, folds=["0"])
    rng = np.random.default_rng(0)
    image = rng.random((36, 140, 150), dtype=np.float32)
    lung = np.zeros(image.shape, np.uint8)
    lung[2:9, 5:30, 6:40] = 1  # touches only some tiles
    cls_image = rng.random((32, 64, 64), dtype=np.float32)
    # On the volume grid the restricted tiles are a subset of the whole volume's, so the lung gets the same values.
    tiling = {"step_fraction": 1.0, "weighting": "constant", "placement": "grid"}
    restricted = run_networks(model, image, lung, cls_image, **tiling)
    everywhere = run_networks(model, image, np.ones_like(lung), cls_image, **tiling)
    assert restricted.tiles_run < restricted.tiles_total == everywhere.tiles_run
    inside = lung == 1
    np.testing.assert_allclose(restricted.lesion_probability[inside], everywhere.lesion_probability[inside], atol=1e-5)
    assert (restricted.lesion_probability[~inside] == 0).all()
    assert restricted.class_probabilities.shape == (3,) and restricted.evidence.shape == image.shape
    overlapping = run_networks(model, image, lung, cls_image, step_fraction=0.5, weighting="gaussian", placement="grid")
    assert overlapping.tiles_run > restricted.tiles_run
    assert np.isfinite(overlapping.lesion_probability).all()
    # Tiles fitted to the lung (the presets' inference.tile_placement): no more tiles, every lung voxel predicted.
    straddling = np.zeros_like(lung)
    straddling[10:20, 40:60, 40:60] = 1  # on 8 tiles of the grid, inside one 16×48×48 tile
    inside = straddling == 1
    on_grid = run_networks(model, image, straddling, cls_image, **tiling)
    fitted = run_networks(model, image, straddling, cls_image, step_fraction=1.0, weighting="constant",
                          placement="region")
    assert fitted.tiles_run == 1 and on_grid.tiles_run == 8
    assert (fitted.lesion_probability[inside] > 0).all() and (fitted.lesion_probability[~inside] == 0).all()


def test_the_crop_box_export_gives_the_whole_grid_result(model_dir, oblique_run, tmp_path):
    """The export resamples, thresholds and measures on the crop box only: the same mask and report as on the whole
    grid (the original direction is oblique, so the box is permuted and flipped), and the evidence stored as uint8
    codes reads back within half a code of the float map, exactly 0 outside the box."""
    _, _, _, inputs = oblique_run
    model = load_trained_model(model_dir)
    loaded = load_case(Scan("oblique", inputs / "oblique_0000.nii.gz"), model.preprocessing)
    output = run_networks(model, loaded.image, loaded.region_preprocessed, loaded.cls_image)
    entry = export_case(loaded, output, tmp_path, list(CLASS_NAMES))

    properties, geometry = loaded.properties, loaded.geometry
    probability = restore_to_original(output.lesion_probability, properties, is_mask=False)
    region = restore_to_original(loaded.region_preprocessed, properties, is_mask=True)
    lesion = ((probability >= 0.5) & ((loaded.lung != 0) | (region != 0))).astype(np.uint8)
    lung = np.maximum(loaded.lung, lesion)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "oblique.nii.gz")))
    np.testing.assert_array_equal(written, lesion)
    assert 0 < lesion.sum() < lesion.size  # random weights: some lesion, not everywhere
    hu = lesion_hu_statistics(loaded.image_hu, lesion)
    involvement = lung_involvement(lesion, lung, geometry)
    whole_grid = {
        "lesion_count": lesion_count(lesion),
        "lesion_volume_ratio": lesion_volume_ratio(lesion, lung),
        "peripheral_lesion_ratio": peripheral_lesion_ratio(lesion, lung, geometry.spacing_zyx_mm, 10.0),
        "lesion_hu_mean": hu["mean"], "lesion_hu_std": hu["std"],
        "left_lung_involvement": involvement["left"]["ratio"], "right_lung_involvement": involvement["right"]["ratio"],
        **severity_score(lesion, lung, geometry),
    }
    assert {key: entry[key] for key in whole_grid} == whole_grid

    evidence = restore_to_original(output.evidence, properties, is_mask=False)
    stored = sitk.ReadImage(str(tmp_path / "oblique_evidence.nii.gz"))
    assert stored.GetPixelID() == sitk.sitkFloat32  # the NIfTI scaling is applied by the reader
    read_back = sitk.GetArrayFromImage(stored)
    half_code = (max(evidence.max(), 0.0) - min(evidence.min(), 0.0)) / 508
    assert np.abs(read_back - evidence).max() <= half_code * (1 + 1e-3)
    outside = np.ones(evidence.shape, bool)
    outside[original_crop_slices(properties)] = False
    assert outside.any() and (read_back[outside] == 0).all()


def _write_failing_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "unreadable_0000.nii.gz").write_bytes(b"\x1f\x8b not really a gzip file")
    nan = np.full((12, 20, 20), -1000.0, np.float32)
    nan[3, 4, 5] = np.nan
    write_image(nan, Geometry((12, 20, 20), (2.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                folder / "nan.mha")  # not .nii.gz: ITK's NIfTI reader turns NaN into 0
    not_hu = np.random.default_rng(1).integers(0, 255, (12, 20, 20)).astype(np.uint8)
    write_image(not_hu, Geometry((12, 20, 20), (2.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                folder / "not_hu_0000.nii.gz")


def _check_failures(output: Path, expected: dict[str, str], good: str) -> None:
    summary = json.loads((output / "predictions.json").read_text(encoding="utf-8"))
    reasons = {f["case"]: f["reason"] for f in summary["failed"]}
    assert set(reasons) == set(expected)
    for name, words in expected.items():
        assert words in reasons[name].lower(), (name, reasons[name])
    assert [c["case"] for c in summary["cases"]] == [good]
    for name in expected:  # nothing written for a failed case
        assert not list(output.glob(f"{name}*")), name
    assert not [p for p in output.iterdir() if p.name.startswith(".")]
    assert (output / f"{good}.nii.gz").exists()


def test_failing_cases_are_named_and_the_others_finish(model_dir, oblique_run, tmp_path, capsys):
    inputs = tmp_path / "in"
    _write_failing_inputs(inputs)
    shutil.copy(oblique_run[3] / "oblique_0000.nii.gz", inputs / "good_0000.nii.gz")
    output = tmp_path / "out"
    status = predict_main(["-i", str(inputs), "-o", str(output), "-m", str(model_dir), "-f", "0", "-q",
                           "--device", "cpu"])
    assert status == 1
    assert "3 case(s) failed" in capsys.readouterr().err
    _check_failures(output, {"unreadable": "unreadable", "nan": "nan", "not_hu": "hounsfield"}, good="good")


@pytest.mark.realdata
def test_real_failing_inputs_2d_and_no_lungs(model_dir, oblique_run, test_data, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(oblique_run[3] / "oblique_0000.nii.gz", inputs / "good_0000.nii.gz")
    output = tmp_path / "out"
    status = predict_main(["-i", str(inputs), str(test_data / "pydicom" / "CT_small.dcm"),
                           str(test_data / "totalsegmentator" / "example_ct_sm.nii.gz"),
                           "-o", str(output), "-m", str(model_dir), "-f", "0", "-q", "--device", "cpu"])
    assert status == 1
    _check_failures(output, {"CT_small": "2d", "example_ct_sm": "no lung"}, good="good")


@pytest.mark.realdata
def test_real_chest_ct_keeps_its_geometry(model_dir, test_data, tmp_path):
    source = test_data / "covid_ct_md_derived" / "P002_ct_2p5mm.nii.gz"
    if not source.exists():
        pytest.skip(f"{source} not available")
    _, geometry = read_image(source)
    output = tmp_path / "out"
    summary = predict_cases(model_dir, source, output, folds=["0"], device="cpu", save_probabilities=True,
                            progress=False)
    assert summary["failed"] == []
    entry = summary["cases"][0]
    name = entry["case"]
    for file in entry["files"].values():
        _assert_same_geometry(output / file, geometry)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"{name}.nii.gz")))
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"{name}_lung.nii.gz")))
    assert not (mask & (1 - lung)).any()
    assert 2000 < entry["lung_volume_ml"] < 9000  # an adult's lungs
    assert entry["tiles"]["run"] <= entry["tiles"]["total"]


@pytest.mark.slow
@pytest.mark.realdata
def test_real_dicom_series_keeps_its_geometry(model_dir, test_data, tmp_path):
    series = test_data / "covid_ct_md" / "COVID-19 subjects" / "P002"
    if not series.is_dir():
        pytest.skip(f"{series} not available")
    _, geometry = read_image(series)
    output = tmp_path / "out"
    summary = predict_cases(model_dir, series.parent, output, folds=["0"], device="cpu", progress=False)
    assert summary["failed"] == [] and [c["case"] for c in summary["cases"]] == ["P002"]
    for file in summary["cases"][0]["files"].values():
        _assert_same_geometry(output / file, geometry)


def test_output_of_another_model_is_refused_unless_overwrite(model_dir, oblique_run, tmp_path):
    _, output, _, inputs = oblique_run
    target = tmp_path / "out"
    shutil.copytree(output, target)
    (target / "oblique_montage.png").write_bytes(b"an earlier run's --png")
    with pytest.raises(DscovidError, match="another model"):
        predict_cases(model_dir, inputs, target, folds=["1"], device="cpu", progress=False)
    summary = predict_cases(model_dir, inputs, target, folds=["1"], device="cpu", progress=False, overwrite=True)
    assert summary["folds"] == ["1"] and [c["case"] for c in summary["cases"]] == ["oblique"]
    # The earlier run's probability files (not asked for now) are gone with it.
    assert not (target / "oblique_lesion_prob.nii.gz").exists()
    assert not (target / "oblique_montage.png").exists()  # nor is an old montage left beside the new mask
    # Another sliding-window step changes the predictions: not mixed either.
    with pytest.raises(DscovidError, match="another model or setting"):
        predict_cases(model_dir, inputs, target, folds=["1"], device="cpu", progress=False, step_fraction=1.0)


def test_disable_tta_runs_each_fold_once_and_is_not_mixed_with_mirrored_runs(model_dir, oblique_run, tmp_path):
    """``--disable-tta`` writes the unmirrored network's probability, records the axes it used, and a folder of
    mirrored predictions is not extended with it."""
    _, mirrored_output, _, inputs = oblique_run
    mirrored = json.loads((mirrored_output / "predictions.json").read_text(encoding="utf-8"))
    assert mirrored["mirror_axes"] == [2] and mirrored["precision"] == precision_name("cpu")
    target = tmp_path / "once"
    status = predict_main(["-i", str(inputs), "-o", str(target), "-m", str(model_dir), "-q", "--device", "cpu",
                           "--disable-tta", "--save-probabilities"])
    assert status == 0
    summary = json.loads((target / "predictions.json").read_text(encoding="utf-8"))
    assert summary["mirror_axes"] == [] and summary["mirroring"] is False
    model = load_trained_model(model_dir)
    loaded = load_case(Scan("oblique", inputs / "oblique_0000.nii.gz"), model.preprocessing)
    once = run_networks(model, loaded.image, loaded.region_preprocessed, loaded.cls_image, mirror_axes=[])
    expected = restore_to_original(once.lesion_probability, loaded.properties, is_mask=False)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(target / "oblique_lesion_prob.nii.gz")))
    np.testing.assert_allclose(written, expected, atol=1e-6)
    both = sitk.GetArrayFromImage(sitk.ReadImage(str(mirrored_output / "oblique_lesion_prob.nii.gz")))
    assert not np.allclose(written, both, atol=1e-3)
    with pytest.raises(DscovidError, match="another model or setting .*mirroring False"):
        predict_cases(model_dir, inputs, target, device="cpu", progress=False)


def test_another_tile_placement_is_another_run(model_dir, oblique_run, tmp_path):
    """``--tile-placement`` other than the model's own is recorded in the run's identity: predictions of the two
    placements are never mixed in one folder; naming the model's own placement is the same run as naming none."""
    _, default_output, _, inputs = oblique_run
    model = load_trained_model(model_dir)
    own = model.inference.tile_placement
    other = "region_sized" if own != "region_sized" else "region"
    target = tmp_path / "sized"
    assert predict_main(["-i", str(inputs), "-o", str(target), "-m", str(model_dir), "-q", "--device", "cpu",
                         "--tile-placement", other]) == 0
    summary = json.loads((target / "predictions.json").read_text(encoding="utf-8"))
    assert summary["tile_placement"] == other and (target / "oblique.nii.gz").exists()
    for placement in (None, own):
        with pytest.raises(DscovidError, match=f"another model or setting .*tile_placement {other}"):
            predict_cases(model_dir, inputs, target, device="cpu", progress=False, tile_placement=placement)
    with pytest.raises(DscovidError, match="another model or setting(?!.*tile_placement)"):
        predict_cases(model_dir, inputs, default_output, device="cpu", progress=False, tile_placement=other)
    # The model's own placement claims the default run's folder as the same run (part 1 of 2 holds no case here).
    predict_cases(model_dir, inputs, default_output, device="cpu", progress=False, tile_placement=own,
                  num_parts=2, part_id=1)
    with pytest.raises(DscovidError, match="tile placement must be one of"):
        predict_cases(model_dir, inputs, tmp_path / "bad", device="cpu", progress=False, tile_placement="lungs")
    assert not (tmp_path / "bad").exists()


def test_test_time_mirroring_averages_the_flipped_pass_flipped_back(model_dir):
    model = load_trained_model(model_dir, folds=["0"])
    rng = np.random.default_rng(1)
    image = rng.random((20, 50, 60), dtype=np.float32)
    region = np.zeros(image.shape, np.uint8)
    region[3:17, 5:45, 4:50] = 1  # not symmetric: the flipped pass runs other tiles
    cls_image = rng.random((32, 64, 64), dtype=np.float32)
    plain = run_networks(model, image, region, cls_image, mirror_axes=[])
    flipped = run_networks(model, image[:, :, ::-1].copy(), region[:, :, ::-1].copy(), cls_image[:, :, ::-1].copy(),
                           mirror_axes=[])
    both = run_networks(model, image, region, cls_image, mirror_axes=[2])
    np.testing.assert_allclose(both.lesion_probability,
                               (plain.lesion_probability + flipped.lesion_probability[:, :, ::-1]) / 2, atol=1e-5)
    np.testing.assert_allclose(both.class_probabilities,
                               (plain.class_probabilities + flipped.class_probabilities) / 2, atol=1e-5)
    assert not np.allclose(plain.lesion_probability, both.lesion_probability)


@pytest.mark.parametrize("trainer", [TRAINER, "DeepSCCOVIDTrainer_crossStitch"])
def test_the_channels_last_predictor_gives_the_default_layout_result(trainer, tmp_path, monkeypatch):
    """On the CPU the loaded folds keep their 5D weights channels-last (faster 3D convolutions); the lesion map and
    the class probabilities must be those of the same weights in PyTorch's default layout, with and without the
    cross-stitch (whose stitched stem features feed the classifier)."""
    from dscovid.planning.planner import plan_experiment

    monkeypatch.setenv("DSCOVID_PRECISION", "float32")  # bfloat16 would round each layout's sums differently
    plans = plan_experiment(CHEST_FINGERPRINT, "Dataset997_Layout", list(CLASS_NAMES), presets=[CONFIGURATION])
    model = load_trained_model(save_untrained_model(tmp_path, plans, CONFIGURATION, trainer, (0,), seed=100),
                               folds=["0"])
    network = model.networks[0]
    assert network.uses_cross_stitch == (trainer != TRAINER)
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in network.parameters() if p.dim() == 5)
    rng = np.random.default_rng(3)
    image = rng.random((20, 50, 60), dtype=np.float32)
    region = np.zeros(image.shape, np.uint8)
    region[3:17, 5:45, 4:50] = 1
    cls_image = rng.random((32, 64, 64), dtype=np.float32)
    channels_last = run_networks(model, image, region, cls_image, mirror_axes=[2])
    network.to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in network.parameters())
    default = run_networks(model, image, region, cls_image, mirror_axes=[2])
    assert np.abs(channels_last.lesion_probability - default.lesion_probability).max() < 1e-4
    np.testing.assert_allclose(channels_last.class_probabilities, default.class_probabilities, atol=1e-5)
    assert channels_last.lesion_probability.max() > 0.0  # the region was predicted, not left empty


@pytest.mark.parametrize("trainer", [TRAINER, "DeepSCCOVIDTrainer_crossStitch"])
def test_tiles_one_per_call_give_the_batched_result(trainer, tmp_path, monkeypatch):
    """The tile batch is a memory and speed setting only: run one tile per network call, the lesion map and the
    class probabilities must be those of the configuration's batch of tiles, whose short last batch the CPU pads
    with copies (the norms are per sample, and the copies' outputs and stem features are dropped)."""
    from dscovid.planning.planner import plan_experiment

    monkeypatch.setenv("DSCOVID_PRECISION", "float32")
    plans = plan_experiment(CHEST_FINGERPRINT, "Dataset996_Batch", list(CLASS_NAMES), presets=[CONFIGURATION])
    model = load_trained_model(save_untrained_model(tmp_path, plans, CONFIGURATION, trainer, (0,), seed=7),
                               folds=["0"])
    assert model.inference.batch_size > 1  # otherwise this test compares a run with itself
    rng = np.random.default_rng(5)
    image = rng.random((20, 90, 80), dtype=np.float32)
    region = np.zeros(image.shape, np.uint8)
    region[2:18, 5:80, 4:44] = 1
    cls_image = rng.random((32, 64, 64), dtype=np.float32)
    one = run_networks(model, image, region, cls_image, mirror_axes=[], batch_size=1)
    network, calls = model.networks[0], []
    segment = network.segment_patches
    monkeypatch.setattr(network, "segment_patches", lambda patches, *a: calls.append(len(patches)) or segment(patches, *a))
    batched = run_networks(model, image, region, cls_image, mirror_axes=[], batch_size=model.inference.batch_size)
    assert one.tiles_run % model.inference.batch_size == 1  # the last batch is a short one
    # ... which the CPU fills up with copies of its last tile (a single small tile takes the slow convolution)
    assert calls == [model.inference.batch_size] * (one.tiles_run // model.inference.batch_size + 1)
    assert np.abs(one.lesion_probability - batched.lesion_probability).max() < 1e-5
    np.testing.assert_allclose(one.class_probabilities, batched.class_probabilities, atol=1e-6)
    assert one.lesion_probability.max() > 0.0


@pytest.mark.parametrize("trainer", [TRAINER, "DeepSCCOVIDTrainer_crossStitch"])
def test_tiles_sized_to_the_region_run_the_network_and_its_cross_stitch(trainer, tmp_path, monkeypatch):
    """``region_sized`` hands the network tiles of other in-plane sizes than its patch (each a multiple of its
    downsampling, never smaller than the patch): the lesion subnet, the cross-stitch's boxes and the stem features
    it stitches for the classifier must take them, and every region voxel must be predicted."""
    from dscovid.planning.planner import plan_experiment

    monkeypatch.setenv("DSCOVID_PRECISION", "float32")
    plans = plan_experiment(CHEST_FINGERPRINT, "Dataset995_Sized", list(CLASS_NAMES), presets=[CONFIGURATION])
    model = load_trained_model(save_untrained_model(tmp_path, plans, CONFIGURATION, trainer, (0,), seed=11),
                               folds=["0"])
    patch = model.patch_size_zyx
    rng = np.random.default_rng(6)
    image = rng.random((2 * patch[0], 3 * patch[1], 4 * patch[2]), dtype=np.float32)
    region = np.zeros(image.shape, np.uint8)
    deep, wide = patch[1] + patch[1] // 6, patch[2] // 2 - 3  # a little deeper than a patch, narrower than one
    region[2:-2, 4 : 4 + deep, 3 : 3 + wide] = 1
    region[2:-2, 9 : 9 + deep, -3 - wide : -3] = 1
    cls_image = rng.random((32, 64, 64), dtype=np.float32)
    network, shapes = model.networks[0], []
    segment = network.segment_patches
    monkeypatch.setattr(network, "segment_patches",
                        lambda patches, *a: shapes.append(tuple(patches.shape[2:])) or segment(patches, *a))
    fixed = run_networks(model, image, region, cls_image, mirror_axes=[], placement="region")
    fixed_voxels, shapes[:] = sum(int(np.prod(s)) for s in shapes), []
    sized = run_networks(model, image, region, cls_image, mirror_axes=[], placement="region_sized")
    assert set(shapes) != {tuple(patch)} and all(s[0] == patch[0] and s[1] % 8 == 0 and s[2] % 8 == 0 for s in shapes)
    assert all(s[1] >= patch[1] and s[2] >= patch[2] for s in shapes)
    assert sum(int(np.prod(s)) for s in shapes) < fixed_voxels
    inside = region == 1
    assert (sized.lesion_probability[inside] > 0).all() and (sized.lesion_probability[~inside] == 0).all()
    assert np.isclose(sized.class_probabilities.sum(), 1.0) and sized.evidence.shape == image.shape
    assert np.isfinite(fixed.lesion_probability).all() and fixed.tiles_run > sized.tiles_run


def test_the_cpu_runs_large_tiles_one_per_call_and_small_tiles_in_batches():
    """On the CPU a call's convolution outputs stay within the limit: the paper's 24×256×256 tiles (about 1 GB each
    in float32) go one per call, the small 3d_cpu tiles keep the configured batch (a single small tile takes
    PyTorch's slow convolution); on a GPU the configured batch stays."""
    from dscovid.inference.engine import CPU_CALL_ACTIVATION_BYTES, tile_activation_bytes, tile_batch_size
    from dscovid.planning.planner import plan_experiment
    from dscovid.plans.configuration import Plans

    plans = Plans.from_dict(plan_experiment(CHEST_FINGERPRINT, "Dataset996_Batch", list(CLASS_NAMES),
                                            presets=["3d_paper", "3d_cpu"]))
    paper, cpu = plans.configuration("3d_paper"), plans.configuration("3d_cpu")
    assert paper.segmentation.patch_size_zyx == (24, 256, 256) and paper.inference.batch_size == 2
    # the 32-channel full-resolution end alone: three maps of 32 channels over 24×256×256 voxels
    assert tile_activation_bytes(paper) > 3 * 32 * 24 * 256 * 256 * 4 > CPU_CALL_ACTIVATION_BYTES
    assert tile_batch_size(paper, torch.device("cpu")) == 1
    assert tile_batch_size(paper, torch.device("cuda")) == 2
    assert 2 * tile_activation_bytes(cpu) < CPU_CALL_ACTIVATION_BYTES
    assert tile_batch_size(cpu, torch.device("cpu")) == cpu.inference.batch_size > 1


def test_model_folder_and_fold_lookup(model_dir):
    results = model_dir.parent.parent
    assert find_model_folder(results, "Dataset999_Fake") == model_dir
    assert find_model_folder(results, "999", CONFIGURATION, TRAINER) == model_dir
    with pytest.raises(DscovidError, match="no trained model"):
        find_model_folder(results, "Dataset999_Fake", "3d_paper")
    assert available_folds(model_dir) == ["0", "1"]
    with pytest.raises(DscovidError, match="trained folds: 0, 1"):
        load_trained_model(model_dir, folds=[5])
    with pytest.raises(DscovidError, match="not '3d_paper'"):
        predict_cases(model_dir, model_dir, model_dir, configuration="3d_paper", device="cpu")


def test_a_case_failing_during_export_leaves_no_file_and_keeps_the_earlier_result(model_dir, oblique_run, tmp_path,
                                                                                    monkeypatch):
    _, output, _, inputs = oblique_run
    target = tmp_path / "out"
    shutil.copytree(output, target)  # an earlier run of the same model: its files for the case are not touched
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file() and p.name.startswith("oblique")}

    def broken_report(*args, **kwargs):
        raise DscovidError("report exploded")

    monkeypatch.setattr("dscovid.prediction.export.lesion_report", broken_report)
    summary = predict_cases(model_dir, inputs, target, device="cpu", progress=False)
    assert [(f["case"], f["reason"], f["earlier_result_kept"]) for f in summary["failed"]] == \
        [("oblique", "report exploded", True)]
    assert [c["case"] for c in summary["cases"]] == ["oblique"]  # the earlier result, still whole
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file() and p.name.startswith("oblique")} == before
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_model_with_the_findings_head_predicts_with_its_term(tmp_path):
    from dscovid.planning.planner import plan_experiment

    plans = plan_experiment(CHEST_FINGERPRINT, "Dataset998_Findings", list(CLASS_NAMES), presets=[CONFIGURATION])
    plans["configurations"][CONFIGURATION]["network"]["findings_head"] = True
    folder = save_untrained_model(tmp_path, plans, CONFIGURATION, TRAINER, (0,), seed=100)
    model = load_trained_model(folder, folds=["0"])
    head = model.networks[0].findings_head
    assert head is not None
    rng = np.random.default_rng(2)
    image = rng.random((20, 50, 60), dtype=np.float32)
    region = np.zeros(image.shape, np.uint8)
    region[3:17, 5:45, 4:50] = 1
    cls_image = rng.random((32, 64, 64), dtype=np.float32)
    before = run_networks(model, image, region, cls_image, mirror_axes=[]).class_probabilities
    with torch.no_grad():
        head.linear.bias.copy_(torch.tensor([0.0, 0.0, 4.0]))  # the head's term favours non-pneumonia
    output = run_networks(model, image, region, cls_image, mirror_axes=[])
    assert output.class_probabilities[2] > before[2] + 0.2
    np.testing.assert_allclose(output.findings_term, [0.0, 0.0, 4.0], atol=1e-6)  # zero weights: the bias alone
    assert set(output.findings) == set(FEATURE_NAMES) and all(np.isfinite(list(output.findings.values())))
    # ... and predictions.json says what the head added.
    case_image, geometry = synthetic_oblique_case()
    write_image(case_image, geometry, tmp_path / "in" / "case_0000.nii.gz")
    summary = predict_cases(folder, tmp_path / "in", tmp_path / "out", device="cpu", progress=False)
    entry = summary["cases"][0]["findings_head"]
    assert entry["logit_term"] == {c: 0.0 for c in CLASS_NAMES}  # the saved head is untrained: zero weights
    assert set(entry["measurements"]) == set(FEATURE_NAMES)
    assert json.loads((tmp_path / "out" / "predictions.json").read_text(encoding="utf-8"))["cases"][0]["findings_head"]


def test_a_case_without_predicted_lesion_is_recorded_with_null_measurements(model_dir, oblique_run, tmp_path,
                                                                            monkeypatch):
    # No lesion found: HU mean and sd, the peripheral ratio and some zone shares are NaN, which strict JSON refuses.
    import dscovid.prediction.predict as predict_module

    def nothing_found(*args, **kwargs):
        output = run_networks(*args, **kwargs)
        output.lesion_probability[...] = 0.0
        return output

    monkeypatch.setattr(predict_module, "run_networks", nothing_found)
    _, _, _, inputs = oblique_run
    summary = predict_cases(model_dir, inputs, tmp_path / "out", device="cpu", progress=False)
    assert summary["failed"] == [] and [c["case"] for c in summary["cases"]] == ["oblique"]
    entry = json.loads((tmp_path / "out" / "predictions.json").read_text(encoding="utf-8"))["cases"][0]
    assert entry["lesion_volume_ml"] == 0 and entry["lesion_hu_mean"] is None
    assert (tmp_path / "out" / "oblique.nii.gz").exists()


def test_drop_small_lesions_counts_26_connected_components_in_ml():
    lesion = np.zeros((8, 8, 8), dtype=bool)
    lesion[1:4, 1:4, 1:4] = True  # 27 voxels
    lesion[4, 4, 4] = True  # touches the cube's corner: the same 26-connected component
    lesion[6, 6, 0] = True  # alone
    spacing = (2.0, 1.0, 0.5)  # 1 mm³ per voxel: 0.001 ml
    assert drop_small_lesions(lesion.copy(), spacing, 0.0).sum() == 29
    kept = drop_small_lesions(lesion.copy(), spacing, 0.0275)
    assert kept.sum() == 28 and not kept[6, 6, 0] and kept[4, 4, 4]
    assert drop_small_lesions(lesion.copy(), spacing, 0.0285).sum() == 0


def test_min_lesion_volume_drops_the_small_components_of_the_written_mask(model_dir, oblique_run, tmp_path):
    """The post-processing gives the default run's mask without its components below the volume, the report measured
    on what is kept, the setting in the header, and a folder of another setting is not mixed with it."""
    _, default_output, geometry, inputs = oblique_run
    default_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(default_output / "oblique.nii.gz"))).astype(bool)
    from scipy import ndimage

    labels, count = ndimage.label(default_mask, np.ones((3, 3, 3), bool))
    volumes_ml = np.sort(np.bincount(labels.ravel())[1:]) * float(np.prod(geometry.spacing_zyx_mm)) / 1000
    assert count >= 2 and volumes_ml[0] < volumes_ml[-1]  # random weights: components of several sizes
    threshold = float(volumes_ml[-1] + volumes_ml[volumes_ml < volumes_ml[-1]].max()) / 2  # only the largest stay
    target = tmp_path / "out"
    summary = predict_cases(model_dir, inputs, target, device="cpu", progress=False, min_lesion_ml=threshold)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(target / "oblique.nii.gz")))
    expected = drop_small_lesions(default_mask.copy(), geometry.spacing_zyx_mm, threshold)
    np.testing.assert_array_equal(written, expected.astype(np.uint8))
    assert 0 < written.sum() < default_mask.sum()
    assert summary["min_lesion_ml"] == threshold and summary["cases"][0]["lesion_count"] < count
    with pytest.raises(DscovidError, match="another model or setting .*min_lesion_ml"):
        predict_cases(model_dir, inputs, target, device="cpu", progress=False)
    with pytest.raises(DscovidError, match="minimum lesion volume"):
        predict_cases(model_dir, inputs, tmp_path / "bad", device="cpu", progress=False, min_lesion_ml=-1.0)
    assert not (tmp_path / "bad").exists()  # refused before the output folder is made
