"""Planner and plans.json: presets, target spacing, budget, class weights, and validation naming the key."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from dscovid.errors import DscovidError
from dscovid.planning.budget import estimate
from dscovid.planning.planner import (
    class_weights,
    fit_voxel_budget,
    median_target_spacing,
    plan_configuration,
    plan_experiment,
)
from dscovid.plans.configuration import Configuration, Plans, load_plans
from dscovid.plans.presets import available_presets, load_preset
from dscovid.plans.schema import validate_plans
from dscovid.training.trainers import TRAINERS, DeepSCCOVIDTrainer_paperLiteral

CLASSES = ["covid", "cap", "non_pneumonia"]


def fingerprint(spacings, lung_box_mm=(250.0, 200.0, 300.0), counts=(10, 5, 5)):
    """A pooled fingerprint as the extractor writes it (only the keys the planner reads)."""
    spacings = np.asarray(spacings, dtype=float)
    boxes = [[int(round(b / s)) for b, s in zip(lung_box_mm, row)] for row in spacings]
    return {"pooled": {
        "num_cases": len(spacings),
        "class_counts": dict(zip(CLASSES, counts)),
        "spacings_zyx_mm": spacings.tolist(),
        "median_spacing_zyx_mm": np.median(spacings, axis=0).tolist(),
        "median_shape_zyx": np.median(boxes, axis=0).tolist(),
        "lung_box_shapes_zyx": boxes,
        "median_lung_box_mm_zyx": list(lung_box_mm),
    }}


@pytest.fixture(scope="module")
def thin_and_thick():
    thin = plan_experiment(fingerprint([[1.0, 0.7, 0.7]] * 5), "Dataset001_Thin", CLASSES)
    thick = plan_experiment(fingerprint([[5.0, 0.8, 0.8]] * 4 + [[2.5, 0.8, 0.8]]), "Dataset002_Thick", CLASSES)
    return thin, thick


def test_shipped_presets_load_by_name():
    assert {"3d_paper", "3d_cpu"} <= set(available_presets())
    paper = load_preset("3d_paper")
    assert paper["segmentation"]["patch_size_zyx"] == [24, 256, 256]
    assert paper["classification"]["num_slices"] == 48
    assert paper["preprocessing"]["hu_window"] == [-1400, 200]
    with pytest.raises(DscovidError, match="no plans preset named 'nope'"):
        load_preset("nope")


def test_paper_configuration_follows_the_paper(thin_and_thick):
    thin, _ = thin_and_thick
    paper = thin["configurations"]["3d_paper"]
    assert paper["preprocessing"]["target_spacing_zyx_mm"] == [1.0, 0.7, 0.7]  # the data's in-plane resolution
    assert paper["segmentation"]["patch_size_zyx"] == [24, 256, 256]
    assert paper["classification"]["grid_zyx"] == [48, 256, 256]
    first, second = paper["training"]["stages"]
    assert first["optimizer"]["lr"] == 1e-3 and second["optimizer"]["lr"] == 1e-4
    assert first["optimizer"]["betas"] == [0.9, 0.999] and first["schedule"] == second["schedule"] == "linear"
    assert paper["training"]["loss"]["lambda_ta"] == 10.0
    assert paper["training"]["class_weights"] == pytest.approx([20 / 30, 20 / 15, 20 / 15])


def test_every_trainer_variant_gives_a_valid_configuration_of_every_preset(thin_and_thick):
    # A variant's override of a misspelt or mistyped key would otherwise reach the network or the predictor unchecked:
    # the effective configuration is validated again when it is built.
    for plans in thin_and_thick:
        for configuration in Plans.from_dict(plans).configurations.values():
            for trainer in TRAINERS.values():
                effective = trainer.effective_configuration(configuration)
                assert effective.network.tasks == trainer.tasks


def test_an_override_that_breaks_the_configuration_is_refused(thin_and_thick):
    configuration = Plans.from_dict(thin_and_thick[0]).configuration("3d_cpu")
    with pytest.raises(DscovidError, match=r"configurations\.3d_cpu\.network\.stem must be one of"):
        configuration.with_overrides({"network.stem": "resnet"})
    with pytest.raises(DscovidError, match=r"configurations\.3d_cpu\.training\.loss\.lambda_tA"):
        configuration.with_overrides({"training.loss.lambda_tA": 1.0})
    with pytest.raises(DscovidError, match="configuration has no section 'trainer'"):
        configuration.with_overrides({"trainer.lr": 1.0})


def test_paper_literal_variant_changes_only_what_the_paper_does_differently(thin_and_thick):
    paper = Plans.from_dict(thin_and_thick[0]).configuration("3d_paper").to_dict()
    literal = DeepSCCOVIDTrainer_paperLiteral.effective_configuration(
        Configuration.from_dict("3d_paper", paper)).to_dict()
    assert literal["network"] == {**paper["network"], "tasks": "joint", "lesion_context": "ground_truth"}
    assert literal["training"] == {**paper["training"], "hard_negative_fraction": 0.0}
    assert literal["inference"] == {**paper["inference"], "step_fraction": 1.0, "weighting": "constant",
                                    "batch_size": 1, "mirror_axes": []}
    assert literal["preprocessing"] == paper["preprocessing"]  # the cache is shared: the margin stays
    # the shipped preset departs from the paper in exactly these keys
    assert (paper["network"]["lesion_context"], paper["training"]["hard_negative_fraction"],
            paper["inference"]["step_fraction"], paper["inference"]["mirror_axes"]) == ("prediction", 0.5, 0.5, [2])


def test_different_spacings_give_different_plans(thin_and_thick):
    thin, thick = thin_and_thick
    for name in ("3d_paper", "3d_cpu"):
        a, b = thin["configurations"][name], thick["configurations"][name]
        assert a["preprocessing"]["target_spacing_zyx_mm"] != b["preprocessing"]["target_spacing_zyx_mm"]
    # Thick slices: 5 mm is > 3x the in-plane spacing and the lung spans few slices, so nnU-Net's rule takes the
    # 10th percentile of the z spacings.
    thick_z = thick["configurations"]["3d_paper"]["preprocessing"]["target_spacing_zyx_mm"][0]
    assert thick_z == pytest.approx(np.percentile([5, 5, 5, 5, 2.5], 10))
    # 250 mm of lung at 1 mm is 250+ slices: the paper's 48-slice grid; at 3.5 mm it is ~77 slices, still 48.
    assert thick["configurations"]["3d_paper"]["segmentation"]["patch_size_zyx"][0] == 24


def test_small_volumes_clip_patch_and_grid_to_the_lung_box():
    plans = plan_experiment(fingerprint([[2.5, 2.5, 2.5]] * 3, lung_box_mm=(100.0, 80.0, 120.0)), "Dataset003_Small",
                            CLASSES)
    paper = plans["configurations"]["3d_paper"]
    # Lung box + 2 x 10 mm margin at 2.5 mm: 48 x 40 x 56 voxels.
    assert paper["segmentation"]["patch_size_zyx"] == [24, 40, 56]
    assert paper["classification"]["grid_zyx"] == [48, 48, 64]


def test_cpu_configuration_fits_its_budgets(thin_and_thick):
    thin, _ = thin_and_thick
    cpu = thin["configurations"]["3d_cpu"]
    budget = cpu["budget"]
    spacing = cpu["preprocessing"]["target_spacing_zyx_mm"]
    assert np.prod(np.round(np.asarray([270.0, 220.0, 320.0]) / spacing)) <= budget["max_case_voxels"]  # + margins
    figures = estimate(cpu["segmentation"]["patch_size_zyx"], cpu["classification"]["grid_zyx"], cpu["network"],
                       cpu["training"]["batch_size"])
    seconds = figures.flops_per_iteration / (budget["cpu_gflops"] * 1e9) * budget["planned_iterations"]
    assert seconds <= budget["time_budget_s"] * 1.1
    assert budget["planned_iterations"] >= budget["min_iterations"] * 0.9
    assert figures.memory_bytes <= budget["memory_target_gb"] * 1e9


def test_smaller_memory_target_gives_smaller_batch_then_smaller_patch():
    preset = load_preset("3d_paper")
    fp = fingerprint([[1.0, 0.7, 0.7]] * 3)
    sizes = {}
    for target in (40.0, 11.0, 4.0, 2.0):
        preset["budget"]["memory_target_gb"] = target
        configuration = plan_configuration(copy.deepcopy(preset), fp, CLASSES)
        sizes[target] = (configuration["training"]["batch_size"], configuration["segmentation"]["patch_size_zyx"])
        assert configuration["budget"]["estimated_memory_gb"] <= target
    assert sizes[40.0][0] > sizes[11.0][0] >= 1
    assert np.prod(sizes[2.0][1]) < np.prod(sizes[4.0][1]) <= np.prod(sizes[11.0][1])


def test_target_spacing_rules():
    assert median_target_spacing([[1, 1, 1], [2, 1, 1], [3, 1, 1]], [[100, 200, 200]] * 3) == [2.0, 1.0, 1.0]
    spacing = fit_voxel_budget([5.0, 0.7, 0.7], [250.0, 200.0, 300.0], 100_000)
    assert np.prod(np.round(np.asarray([250.0, 200.0, 300.0]) / spacing)) <= 100_000
    assert spacing[1] > 0.7 * 3  # the fine in-plane axes were coarsened first...
    assert spacing[0] >= 5.0  # ...the coarse z axis is never refined
    assert class_weights({"covid": 6, "cap": 3, "non_pneumonia": 0}, CLASSES) == [0.5, 1.0, 1.0]


def test_overwrite_target_spacing():
    plans = plan_experiment(fingerprint([[1.0, 0.7, 0.7]] * 3), "Dataset001_X", CLASSES, presets=["3d_cpu"],
                            override_spacing=[3.0, 2.0, 2.0])
    assert plans["configurations"]["3d_cpu"]["preprocessing"]["target_spacing_zyx_mm"] == [3.0, 2.0, 2.0]
    with pytest.raises(DscovidError, match="--overwrite-target-spacing"):
        plan_experiment(fingerprint([[1.0, 0.7, 0.7]]), "Dataset001_X", CLASSES, override_spacing=[3.0, 0.0, 2.0])


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["segmentation"].__setitem__("patch_size_zyx", [16, -64, 64]),
     "configurations.3d_cpu.segmentation.patch_size_zyx: must be 3 positive integers"),
    (lambda c: c["segmentation"].__setitem__("patch_size_zyx", [16, 64]),
     "configurations.3d_cpu.segmentation.patch_size_zyx: must be 3 positive integers"),
    (lambda c: c["classification"].__setitem__("grid_zyx", [24, 64, 64]),
     "configurations.3d_cpu.classification.grid_zyx must be three positive integers divisible by 16"),
    (lambda c: c["preprocessing"].pop("hu_window"), "configurations.3d_cpu.preprocessing.hu_window: missing key"),
    (lambda c: c["preprocessing"].__setitem__("hu_window", [200, -1400]),
     "configurations.3d_cpu.preprocessing.hu_window: must be [low, high]"),
    (lambda c: c["preprocessing"].__setitem__("target_spacing_zyx_mm", [1.0, "a", 1.0]),
     "configurations.3d_cpu.preprocessing.target_spacing_zyx_mm"),
    (lambda c: c["training"].__setitem__("batch_size", 0), "configurations.3d_cpu.training.batch_size: must be"),
    (lambda c: c["training"].__setitem__("batch_sise", 2), "configurations.3d_cpu.training.batch_sise: unknown key"),
    (lambda c: c["training"].__setitem__("lesion_sampling", "component"),
     "configurations.3d_cpu.training.lesion_sampling: must be one of voxel, lesion"),
    (lambda c: c["training"]["stages"][1]["optimizer"].__setitem__("lr", "fast"),
     "configurations.3d_cpu.training.stages[1].optimizer.lr: must be a number"),
    (lambda c: c["network"].__setitem__("stem_chanels", 8), "configurations.3d_cpu.network.stem_chanels"),
    (lambda c: c["network"].__setitem__("stem", "resnet"), "configurations.3d_cpu.network.stem must be one of"),
    (lambda c: c["training"]["loss"].__setitem__("lambda_ta", -1), "configurations.3d_cpu.training.loss.lambda_ta"),
    (lambda c: c["training"].__setitem__("class_weights", [1.0, 1.0]), "configurations.3d_cpu.training.class_weights"),
    (lambda c: c.__setitem__("inference", []), "configurations.3d_cpu.inference: must be an object"),
])
def test_invalid_plans_are_refused_naming_the_key(thin_and_thick, edit, key):
    plans = copy.deepcopy(thin_and_thick[0])
    edit(plans["configurations"]["3d_cpu"])
    with pytest.raises(DscovidError) as error:
        validate_plans(plans)
    assert key in str(error.value)
    assert "\n" not in str(error.value)


def test_load_plans_names_the_file_and_round_trips(tmp_path, thin_and_thick):
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(thin_and_thick[0]))
    plans = load_plans(path)
    configuration = plans.configuration("3d_cpu")
    assert configuration.data_identifier == "3d_cpu" and len(configuration.segmentation.patch_size_zyx) == 3
    assert configuration.preprocessing.hu_window == (-1400.0, 200.0)
    assert Plans.from_dict(plans.to_dict()) == plans  # every section survives the JSON form
    broken = copy.deepcopy(thin_and_thick[0])
    del broken["class_names"]
    path.write_text(json.dumps(broken))
    with pytest.raises(DscovidError, match=rf"{path}: class_names: missing key"):
        load_plans(path)
    path.write_text("{not json")
    with pytest.raises(DscovidError, match="not valid JSON"):
        load_plans(path)
    with pytest.raises(DscovidError, match="configuration '3d_gpu' is not in the plans"):
        plans.configuration("3d_gpu")


def test_optional_keys_take_their_defaults_from_the_dataclasses(thin_and_thick):
    data = copy.deepcopy(thin_and_thick[0]["configurations"]["3d_cpu"])
    for section, key in (("preprocessing", "lung_margin_mm"), ("training", "seed"),
                         ("training", "hard_negative_fraction"), ("training", "lesion_sampling"),
                         ("inference", "mirror_axes"),
                         ("inference", "tile_placement")):
        data[section].pop(key, None)
    configuration = Configuration.from_dict("3d_cpu", data)
    assert configuration.preprocessing.lung_margin_mm == 0.0 and configuration.training.seed == 12345
    assert configuration.training.hard_negative_fraction == 0.0
    assert configuration.training.lesion_sampling == "voxel"
    assert (configuration.inference.mirror_axes, configuration.inference.tile_placement) == ((), "grid")
    assert configuration.to_dict()["inference"]["tile_placement"] == "grid"  # written out for the user to see


def test_planned_configurations_build_the_network(thin_and_thick):
    from dscovid.model import build_loss, build_network

    for plans in thin_and_thick:
        for configuration in Plans.from_dict(plans).configurations.values():
            network = build_network(configuration)
            build_loss(configuration)
            assert sum(p.numel() for p in network.parameters()) > 0
