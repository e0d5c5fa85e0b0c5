"""A tiny preprocessed cache written directly in the docs/formats.md §2 format, and tests of reading and sampling it.

``make_cache`` is imported by the other training tests; it does not need the preprocessing code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dscovid.errors import DscovidError
from dscovid.training.data import list_cache_cases
from dscovid.training.sampling import choose_start, crop, forced_lesion_flags

CLASS_NAMES = ["covid", "cap", "non_pneumonia"]


def _ellipsoid(shape, centre, radii):
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + ((xx - centre[2]) / radii[2]) ** 2 <= 1


def to_grid(volume: np.ndarray, grid_zyx) -> np.ndarray:
    """The classification-grid resampling of docs/formats.md §4."""
    tensor = torch.from_numpy(volume.astype(np.float32))[None, None]
    return F.interpolate(tensor, size=tuple(grid_zyx), mode="trilinear", align_corners=False)[0, 0].numpy()


def make_case(rng: np.random.Generator, class_index: int, shape=(20, 40, 40), grid=(16, 16, 16), annotated=True):
    """Two lungs; COVID lesions peripheral and bright, CAP lesions central and darker, non-pneumonia none."""
    z, y, x = shape
    lung = _ellipsoid(shape, (z / 2, y / 2, x * 0.3), (z * 0.45, y * 0.4, x * 0.2))
    lung |= _ellipsoid(shape, (z / 2, y / 2, x * 0.7), (z * 0.45, y * 0.4, x * 0.2))
    image = np.where(lung, 0.25 + 0.03 * rng.standard_normal(shape), 0.0).astype(np.float32)
    lesion = np.zeros(shape, dtype=bool)
    if class_index != 2:
        for _ in range(int(rng.integers(1, 3))):
            side = 0.3 if rng.random() < 0.5 else 0.7
            if class_index == 0:  # peripheral
                centre = (rng.uniform(0.3, 0.7) * z, y * 0.5, x * (side + (0.12 if side > 0.5 else -0.12)))
            else:
                centre = (rng.uniform(0.3, 0.7) * z, y * 0.5, x * side)
            radius = rng.uniform(0.12, 0.2)
            lesion |= _ellipsoid(shape, centre, (z * radius, y * radius, x * radius * 0.7))
        lesion &= lung
    image[lesion] = 0.75 if class_index == 0 else 0.55
    lesion_u8 = lesion.astype(np.uint8) if annotated else np.zeros(shape, np.uint8)
    locations = np.argwhere(lesion_u8 > 0)
    return {
        "image": image,
        "lesion": lesion_u8,
        "lung": lung.astype(np.uint8),
        "region": lung.astype(np.uint8),
        "cls_image": to_grid(image, grid),
        "cls_lesion": to_grid(lesion_u8.astype(np.float32), grid),
    }, locations


def make_plans(dataset_name: str, patch=(8, 16, 16), grid=(16, 16, 16), epochs=(2, 2), iterations=4) -> dict:
    """A shrunk CPU configuration in the plans.json format (docs/formats.md §3)."""
    stage = {"epochs": 1, "iterations_per_epoch": iterations, "schedule": "linear",
             "optimizer": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0}}
    configuration = {
        "data_identifier": "3d_cpu",
        "preprocessing": {"target_spacing_zyx_mm": [2.0, 1.5, 1.5], "hu_window": [-1400, 200], "crop_margin_mm": 5.0,
                          "mask_outside_lung": True, "num_lesion_samples": 10000},
        "segmentation": {"patch_size_zyx": list(patch)},
        "classification": {"grid_zyx": list(grid)},
        "network": {"stem": "inception", "stem_channels": 8, "segmentation_widths": [4, 8, 8],
                    "classification_widths": [4, 8, 8], "lesion_channels": 4,
                    "side_output_weights": [0.25, 0.25, 0.5, 1.0], "cross_stitch": True, "tasks": "joint",
                    "norm_groups": 2},
        "training": {
            "batch_size": 2, "class_weights": [1.0, 1.0, 1.0], "oversample_foreground": 0.5,
            "loss": {"lambda_seg": 1.0, "lambda_cls": 1.0, "lambda_ta": 10.0, "lambda_dice": 1.0, "lambda_focal": 1.0,
                     "focal_alpha": 0.75, "focal_gamma": 2.0, "task_aware_scales": [1, 2, 3]},
            "stages": [
                {**stage, "name": "pretrain", "epochs": epochs[0], "tasks": "separate", "trainable": ["all"]},
                {**stage, "name": "finetune", "epochs": epochs[1], "tasks": "joint", "trainable": ["all"],
                 "optimizer": {**stage["optimizer"], "lr": 1e-4}},
            ],
        },
        "inference": {"step_fraction": 1.0, "weighting": "constant", "batch_size": 2},
    }
    return {"dataset_name": dataset_name, "plans_name": "dscovidPlans", "dscovid_version": "0.1.0",
            "class_names": CLASS_NAMES, "configurations": {"3d_cpu": configuration}}


def make_cache(root: Path, n_cases: int = 12, seed: int = 0, name: str = "Dataset900_Tiny", plans: dict | None = None,
               shape=(20, 40, 40), unannotated: tuple[str, ...] = ()) -> Path:
    """Write ``root/<name>/`` with dataset.json, plans.json, a fingerprint and ``3d_cpu/<case>.npz/.json``."""
    rng = np.random.default_rng(seed)
    dataset_dir = Path(root) / name
    plans = plans or make_plans(name)
    grid = plans["configurations"]["3d_cpu"]["classification"]["grid_zyx"]
    data_dir = dataset_dir / "3d_cpu"
    data_dir.mkdir(parents=True, exist_ok=True)
    cases = {}
    for index in range(n_cases):
        case = f"case_{index:04d}"
        class_index = index % 3
        annotated = case not in unannotated
        arrays, locations = make_case(rng, class_index, shape=shape, grid=grid, annotated=annotated)
        np.savez(data_dir / f"{case}.npz", **arrays)
        properties = {"case": case, "class_name": CLASS_NAMES[class_index], "class_index": class_index,
                      "lesion_annotated": annotated, "lesion_locations_zyx": locations[:10000].tolist(),
                      "shape_after_resampling_zyx": list(shape)}
        (data_dir / f"{case}.json").write_text(json.dumps(properties))
        cases[case] = {"class": CLASS_NAMES[class_index], "lesion_annotated": annotated}
    dataset_json = {"name": name, "channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1},
                    "file_ending": ".nii.gz", "numTraining": n_cases,
                    "classes": {n: i for i, n in enumerate(CLASS_NAMES)}, "cases": cases}
    (dataset_dir / "dataset.json").write_text(json.dumps(dataset_json))
    (dataset_dir / "plans.json").write_text(json.dumps(plans))
    (dataset_dir / "dataset_fingerprint.json").write_text(json.dumps({"cases": {}}))
    return dataset_dir


def test_cache_lists_cases_with_both_files(tmp_path):
    dataset_dir = make_cache(tmp_path, n_cases=4)
    (dataset_dir / "3d_cpu" / "case_0003.npz").unlink()  # an interrupted write leaves one file without the other
    cases = list_cache_cases(dataset_dir / "3d_cpu")
    assert sorted(cases) == ["case_0000", "case_0001", "case_0002"]
    arrays = cases["case_0000"].load()
    assert arrays["image"].shape == (20, 40, 40) and arrays["cls_image"].shape == (16, 16, 16)
    assert cases["case_0000"].stratum().lesion_voxels == arrays["lesion"].sum() > 0


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(DscovidError, match="run dscovid_plan_and_preprocess"):
        list_cache_cases(tmp_path / "nope")


def test_forced_patches_contain_lesion_and_crop_pads_with_zero():
    rng = np.random.default_rng(0)
    volume = np.zeros((10, 30, 30), dtype=np.uint8)
    volume[2:4, 25:28, 1:3] = 1
    locations = np.argwhere(volume)
    for _ in range(50):
        start = choose_start(volume.shape, (16, 8, 8), locations, True, rng)
        patch = crop(volume, start, (16, 8, 8))
        assert patch.shape == (16, 8, 8) and patch.sum() > 0
        assert start[0] <= 0 and start[0] + 16 >= 10  # the short axis is covered entirely
    assert forced_lesion_flags(2, 0.33) == [False, True]
    assert forced_lesion_flags(3, 0.0) == [False, False, False]
