"""Shared fixtures. Real CT files come from DSCOVID_TEST_DATA (``make test`` points it at ../shared/testdata)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from untrained_model import save_untrained_model

from dscovid.io.dataset import CLASS_NAMES, make_dataset_json, write_json_atomic
from dscovid.io.image_io import Geometry, write_image
from dscovid.planning.planner import plan_experiment
from dscovid.plans.configuration import Configuration, Plans
from dscovid.plans.presets import preset_configuration

# Tests share two cores with everything else on the machine; one thread keeps them predictable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_logging():
    """Undo a command's ``logging.basicConfig`` (run_command) after each test: its handler writes to the test's
    captured stderr, which is closed once the test ends."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The folder of real CT test files, or skip the test when it is not available."""
    value = os.environ.get("DSCOVID_TEST_DATA")
    if not value:
        pytest.skip("DSCOVID_TEST_DATA is not set (real CT test data not available)")
    folder = Path(value)
    if not folder.is_dir():
        pytest.skip(f"DSCOVID_TEST_DATA={value} is not a folder")
    return folder


# ------------------------------------------------------------------------------------- model configurations

#: Patch, classification grid and volume of the tiny networks the model tests build (all divisible as the network
#: needs: the patch by 8, the grid by 16).
TINY_PATCH = (8, 16, 16)
TINY_GRID = (16, 32, 32)
TINY_VOLUME = (40, 64, 48)
#: The paper's parts that 3d_cpu leaves out (inception stem, task-aware loss) are on: the model tests cover the
#: paper's network, which 3d_paper trains.
_TINY_NETWORK = {"segmentation_widths": [8, 16, 32], "classification_widths": [8, 16, 32], "findings_head": False,
                 "stem": "inception", "cross_stitch": True}
_TINY_LOSS = {"lambda_ta": 10.0}


def tiny_configuration(network: dict | None = None, loss: dict | None = None, patch=TINY_PATCH, grid=TINY_GRID,
                       class_weights=(1.0, 2.0, 0.5)) -> Configuration:
    """The shipped 3d_cpu preset with narrower widths, no findings head, the paper's inception stem, cross-stitch unit
    and task-aware loss, a tiny patch and grid, unequal class weights, and the given ``network`` and ``training.loss`` keys changed
    (validated as any configuration)."""
    overrides = {"segmentation.patch_size_zyx": list(patch), "classification.grid_zyx": list(grid),
                 "training.class_weights": list(class_weights)}
    overrides |= {f"network.{key}": value for key, value in {**_TINY_NETWORK, **(network or {})}.items()}
    overrides |= {f"training.loss.{key}": value for key, value in {**_TINY_LOSS, **(loss or {})}.items()}
    return preset_configuration("3d_cpu", (2.0, 2.0, 2.0)).with_overrides(overrides)


def model_batch(batch: int = 2, patch=TINY_PATCH, grid=TINY_GRID, seed: int = 0) -> dict:
    """Network inputs for ``batch`` samples: random patches in two boxes of a TINY_VOLUME scan, a random grid."""
    generator = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[[4, 10, 6], list(patch)], [[36, -4, 40], list(patch)]][:batch])
    return {
        "seg_patch": torch.rand(batch, 1, *patch, generator=generator),
        "patch_box": boxes,
        "volume_shape": torch.tensor([TINY_VOLUME] * batch),
        "cls_image": torch.rand(batch, 1, *grid, generator=generator),
        "lesion_context": (torch.rand(batch, 1, *grid, generator=generator) > 0.8).float(),
    }


# ------------------------------------------------------------------------ tiny raw datasets (the preprocessor's)


def rotation_direction(flip_xyz=(1, 1, 1), angle_deg: float = 0.0, permute=(0, 1, 2)) -> tuple[float, ...]:
    """A direction matrix: columns permuted and flipped, then rotated by ``angle_deg`` about world z."""
    a = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    columns = np.eye(3)[:, list(permute)] * np.asarray(flip_xyz)[None, :]
    return tuple((rotation @ columns).reshape(-1).tolist())


def phantom(shape_zyx=(28, 56, 48), seed: int = 0, lesion_radius: float = 0.22, n_lesions: int = 2):
    """(image HU, lung, lesion): a body at 40 HU, two lung ellipsoids at -850 HU, spherical lesions at -450 HU.

    Sizes are fractions of the array, so the structures scale with the shape.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    image = np.full(shape_zyx, -1000.0, dtype=np.float32)
    body = (y / 0.9) ** 2 + (x / 0.95) ** 2 <= 1
    image[body] = 40.0
    lung = np.zeros(shape_zyx, dtype=np.uint8)
    for cx in (-0.45, 0.45):
        lung |= (((z / 0.85) ** 2 + (y / 0.6) ** 2 + ((x - cx) / 0.35) ** 2) <= 1).astype(np.uint8)
    image[lung > 0] = -850.0
    lesion = np.zeros(shape_zyx, dtype=np.uint8)
    for index in range(n_lesions):
        cx = -0.45 if index % 2 == 0 else 0.45
        centre = (rng.uniform(-0.3, 0.3), rng.uniform(-0.2, 0.2), cx)
        ball = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= lesion_radius**2
        lesion |= (ball & (lung > 0)).astype(np.uint8)
    image[lesion > 0] = -450.0
    image += rng.normal(0, 10, shape_zyx).astype(np.float32)
    return image.astype(np.int16), lung, lesion


def make_raw_dataset(root: Path, specs: list[dict], name: str = "Dataset900_Tiny") -> Path:
    """Write a raw dataset; each spec: ``class``, ``shape``, ``spacing``, optional ``direction``, ``seed``."""
    folder = root / name
    cases = {}
    for index, spec in enumerate(specs):
        case = spec.get("name", f"case_{index:03d}")
        image, lung, lesion = phantom(spec.get("shape", (28, 56, 48)), seed=spec.get("seed", index))
        if spec["class"] == "non_pneumonia":
            lesion[:] = 0
            image[lung > 0] = -850
        geometry = Geometry(tuple(image.shape), tuple(spec.get("spacing", (2.5, 1.5, 1.5))),
                            tuple(spec.get("origin", (-30.0, 10.0, 100.0))),
                            tuple(spec.get("direction", np.eye(3).reshape(-1).tolist())))
        write_image(image, geometry, folder / "imagesTr" / f"{case}_0000.nii.gz")
        write_image(lesion, geometry, folder / "labelsTr" / f"{case}.nii.gz")
        write_image(lung, geometry, folder / "lungsTr" / f"{case}.nii.gz")
        cases[case] = {"class": spec["class"], "lesion_annotated": True}
    write_json_atomic(make_dataset_json(name, cases), folder / "dataset.json")
    return folder


def small_configuration(spacing=(2.0, 2.0, 2.0), grid=(16, 32, 32), margin=4.0) -> Configuration:
    """The shipped 3d_cpu preset at ``spacing``, named ``3d_test``, with a small grid, crop margin and lesion sample
    and no lung margin."""
    configuration = preset_configuration("3d_cpu", spacing).with_overrides({
        "data_identifier": "3d_test", "classification.grid_zyx": list(grid), "preprocessing.crop_margin_mm": margin,
        "preprocessing.num_lesion_samples": 500, "preprocessing.lung_margin_mm": 0.0})
    return dataclasses.replace(configuration, name="3d_test")


def small_plans(configuration: Configuration | None = None) -> Plans:
    configuration = configuration or small_configuration()
    return Plans("Dataset900_Tiny", "dscovidPlans", "0.1.0", ("covid", "cap", "non_pneumonia"),
                 {configuration.name: configuration})


# ----------------------------------------------------------- a tiny preprocessed cache (docs/formats.md §2)




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
    """The shipped 3d_cpu preset in the plans.json format (docs/formats.md §3), shrunk for the trainer tests.

    Only what a tiny cache of ``make_cache`` needs changes: the patch, grid and widths, the two stages' epochs and
    iterations (their tasks, optimisers and learning rates stay the preset's), equal class weights, a crop margin
    and spacing that fit 20×40×40 volumes, and the reference lesion map as the classifier's context outside the
    patch: the preset's predicted context is the prediction of the network being trained, noise after a few dozen
    iterations (``test_prediction_context_is_the_networks_own_cached_map_in_the_joint_stage`` tests it on its own).
    Everything else (losses, findings head, hard negatives, inference) is the shipped setting, so the trainer tests
    follow the preset when it changes.
    """
    preset = preset_configuration("3d_cpu", (2.0, 1.5, 1.5))
    stages = [{**stage.to_dict(), "epochs": count, "iterations_per_epoch": iterations}
              for stage, count in zip(preset.training.stages, epochs)]
    configuration = preset.with_overrides({
        "preprocessing.crop_margin_mm": 5.0,
        "segmentation.patch_size_zyx": list(patch),
        "classification.grid_zyx": list(grid),
        "network.segmentation_widths": [4, 8, 8],
        "network.classification_widths": [4, 8, 8],
        "training.class_weights": [1.0, 1.0, 1.0],
        "training.stages": stages,
        "network.lesion_context": "ground_truth",
    })
    return {"dataset_name": dataset_name, "plans_name": "dscovidPlans", "dscovid_version": "0.1.0",
            "class_names": list(CLASS_NAMES), "configurations": {"3d_cpu": configuration.to_dict()}}


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


# ---------------------------------------------------------------------------- an untrained model folder


# A fingerprint like the real chest CT data's (about 0.8 mm in-plane, 2.5 mm slices); the planner turns the 3d_cpu
# preset into a configuration from it (coarse spacing so that a case fits its voxel budget: fast tests).
CHEST_FINGERPRINT = {
    "pooled": {
        "median_lung_box_mm_zyx": [250.0, 300.0, 350.0],
        "class_counts": {"covid": 4, "cap": 3, "non_pneumonia": 3},
        "median_spacing_zyx_mm": [2.5, 0.8, 0.8],
        "median_shape_zyx": [120, 512, 512],
        "num_cases": 10,
        "spacings_zyx_mm": [[2.5, 0.8, 0.8]] * 10,
        "lung_box_shapes_zyx": [[100, 375, 437]] * 10,
    }
}


def save_fake_model(results: Path, folds=(0, 1), dataset: str = "Dataset999_Fake") -> Path:
    """A ``DeepSCCOVIDTrainer__3d_cpu`` model folder with randomly initialised folds, checkpoints as the trainer
    writes them (the 3d_cpu preset planned for :data:`CHEST_FINGERPRINT`)."""
    plans = plan_experiment(CHEST_FINGERPRINT, dataset, list(CLASS_NAMES), presets=["3d_cpu"])
    return save_untrained_model(results, plans, "3d_cpu", "DeepSCCOVIDTrainer", folds, seed=100)
