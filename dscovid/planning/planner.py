"""The planner: dataset fingerprint + presets + budget → plans.json (docs/formats.md §3, docs/preprocessing.md).

Per preset it decides

- the **target spacing**: nnU-Net's rule (per-axis median; an anisotropic axis takes the 10th percentile of its
  spacings, never finer than the other axes). ``keep_in_plane`` (3d_paper) keeps that median in-plane
  resolution of the data; ``fit_voxel_budget`` (3d_cpu) then coarsens the finest axes first until the median lung
  box plus its crop margins holds at most ``budget.max_case_voxels`` voxels;
- the **segmentation patch** and **classification grid**: the preset's sizes, clipped to the median lung box at the
  target spacing, rounded up to a multiple of ``budget.patch_divisor`` (8) / ``budget.grid_divisor`` (16), the
  factors by which the network downsamples each input (``dscovid.plans.model_config``);
- the **batch size and training length** from the budget model (:mod:`.budget`): the largest batch that fits
  ``memory_target_gb`` (the patch shrinks first if even batch 1 does not fit); for ``cpu_time`` presets the number
  of iterations that fit ``time_budget_s`` at ``cpu_gflops``;
- the **class weights**: inverse class frequencies ``n / (C · n_c)`` from the fingerprint's class counts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from dscovid import __version__
from dscovid.errors import DscovidError
from dscovid.planning.budget import estimate
from dscovid.plans.presets import load_preset
from dscovid.plans.schema import validate_plans

log = logging.getLogger(__name__)

#: nnU-Net's anisotropy threshold: an axis whose spacing is more than this times the others' is "anisotropic".
ANISOTROPY_THRESHOLD = 3.0
DEFAULT_PRESETS = ("3d_paper", "3d_cpu")


def median_target_spacing(spacings_zyx_mm: Sequence[Sequence[float]], shapes_zyx: Sequence[Sequence[int]]) -> list[float]:
    """nnU-Net's full-resolution target spacing (per-axis median with the anisotropy rule), z, y, x in mm."""
    spacings = np.asarray(spacings_zyx_mm, dtype=float)
    shapes = np.asarray(shapes_zyx, dtype=float)
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    anisotropic = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    few_slices = median_shape[worst] * ANISOTROPY_THRESHOLD < min(median_shape[others])
    if anisotropic and few_slices:
        target[worst] = max(float(np.percentile(spacings[:, worst], 10)), float(max(target[others])))
    return [float(v) for v in target]


def fit_voxel_budget(spacing_zyx_mm: Sequence[float], extent_zyx_mm: Sequence[float], max_voxels: int) -> list[float]:
    """Coarsen ``spacing_zyx_mm`` (finest axes first, 5% steps) until ``extent / spacing`` holds ≤ ``max_voxels``."""
    spacing = np.asarray(spacing_zyx_mm, dtype=float).copy()
    extent = np.asarray(extent_zyx_mm, dtype=float)
    for _ in range(1000):
        if np.prod(np.maximum(1.0, np.round(extent / spacing))) <= max_voxels:
            break
        # Axes within 1.5x of the finest grow together, so an anisotropic scan first becomes near-isotropic.
        grow = spacing <= spacing.min() * 1.5
        spacing[grow] *= 1.05
    return [float(round(v, 4)) for v in spacing]


def _round_up(value: float, divisor: int) -> int:
    return max(divisor, int(math.ceil(value / divisor)) * divisor)


def class_weights(class_counts: Mapping[str, int], class_names: Sequence[str]) -> list[float]:
    """Inverse class frequencies ``n / (C · n_c)`` (1 for a class with no case, with a warning)."""
    counts = [int(class_counts.get(name, 0)) for name in class_names]
    total = sum(counts)
    weights = []
    for name, count in zip(class_names, counts):
        if count == 0:
            log.warning("class %r has no training case; its weight is set to 1", name)
            weights.append(1.0)
        else:
            weights.append(round(total / (len(class_names) * count), 6))
    return weights


def _target_spacing(preset: dict, pooled: Mapping, override: Sequence[float] | None) -> list[float]:
    if override is not None:
        if len(override) != 3 or any(float(v) <= 0 for v in override):
            raise DscovidError(f"--overwrite-target-spacing must be 3 positive numbers (z y x mm), got {list(override)}")
        return [float(v) for v in override]
    spacing = median_target_spacing(pooled["spacings_zyx_mm"], pooled["lung_box_shapes_zyx"])
    rule = preset["preprocessing"].get("spacing_rule", "keep_in_plane")
    if rule == "keep_in_plane":
        return spacing
    if rule == "fit_voxel_budget":
        margin = 2 * float(preset["preprocessing"]["crop_margin_mm"])  # the crop is the lung box plus its margin
        extent = [float(v) + margin for v in pooled["median_lung_box_mm_zyx"]]
        return fit_voxel_budget(spacing, extent, int(preset["budget"]["max_case_voxels"]))
    raise DscovidError(f"preset {preset['name']}: preprocessing.spacing_rule: unknown rule {rule!r} "
                       "(known: keep_in_plane, fit_voxel_budget)")


def _shrink_to_memory(patch: list[int], grid: list[int], network: dict, target_bytes: float,
                      divisor: int) -> tuple[list[int], int]:
    """Shrink the largest patch axis (in ``divisor`` steps) until batch 1 fits the memory target."""
    while estimate(patch, grid, network, 1).memory_bytes > target_bytes:
        axis = int(np.argmax(patch))
        if patch[axis] <= divisor:
            raise DscovidError(f"even a {'x'.join(map(str, patch))} patch does not fit the memory target of "
                               f"{target_bytes / 1e9:.1f} GB; raise budget.memory_target_gb")
        patch[axis] -= divisor
    return patch, 1


def _shrink_to_time(patch: list[int], grid: list[int], network: dict, batch_size: int, budget: Mapping,
                    throughput: float, patch_divisor: int, grid_divisor: int) -> tuple[list[int], list[int]]:
    """Shrink patch or grid (whichever saves more compute) until ``min_iterations`` fit ``time_budget_s``."""
    wanted = int(budget.get("min_iterations", 0))
    seconds = float(budget["time_budget_s"])

    def iterations(p: list[int], g: list[int]) -> float:
        return seconds * throughput / estimate(p, g, network, batch_size).flops_per_iteration

    while iterations(patch, grid) < wanted:
        candidates = []
        axis = int(np.argmax(patch))
        if patch[axis] > 2 * patch_divisor:
            candidates.append(([*patch[:axis], patch[axis] - patch_divisor, *patch[axis + 1:]], grid))
        axis = int(np.argmax(grid))
        if grid[axis] > 2 * grid_divisor:
            candidates.append((patch, [*grid[:axis], grid[axis] - grid_divisor, *grid[axis + 1:]]))
        if not candidates:
            log.warning("even the smallest patch and grid do not give %d iterations in %.0f s", wanted, seconds)
            break
        patch, grid = max(candidates, key=lambda pg: iterations(*pg))
    return patch, grid


def plan_configuration(preset: dict, fingerprint: Mapping, class_names: Sequence[str],
                       override_spacing: Sequence[float] | None = None) -> dict:
    """One configuration dictionary (docs/formats.md §3) from a preset and a dataset fingerprint."""
    pooled = fingerprint["pooled"]
    budget = dict(preset["budget"])
    patch_divisor = int(budget.get("patch_divisor", 8))
    grid_divisor = int(budget.get("grid_divisor", 16))
    spacing = _target_spacing(preset, pooled, override_spacing)
    margin = float(preset["preprocessing"]["crop_margin_mm"])
    box_mm = np.asarray(pooled["median_lung_box_mm_zyx"], dtype=float) + 2 * margin
    median_shape = box_mm / np.asarray(spacing)

    patch = [min(int(p), _round_up(s, patch_divisor))
             for p, s in zip(preset["segmentation"]["patch_size_zyx"], median_shape)]
    n_slices = min(int(preset["classification"]["num_slices"]), _round_up(median_shape[0], grid_divisor))
    in_plane = [min(int(p), _round_up(s, grid_divisor))
                for p, s in zip(preset["classification"]["in_plane_yx"], median_shape[1:])]
    grid = [n_slices, *in_plane]
    network = dict(preset["network"])
    network["num_classes"] = len(class_names)
    training = {key: value for key, value in preset["training"].items()}
    training["class_weights"] = class_weights(pooled["class_counts"], class_names)

    memory_target = float(budget["memory_target_gb"]) * 1e9
    patch, batch_size = _shrink_to_memory(patch, grid, network, memory_target, patch_divisor)
    if budget["kind"] == "gpu_memory":
        limit = int(budget.get("max_batch_size", 1))
        while batch_size < limit and estimate(patch, grid, network, batch_size + 1).memory_bytes <= memory_target:
            batch_size += 1
    elif budget["kind"] == "cpu_time":
        batch_size = int(training["batch_size"])
        while batch_size > 1 and estimate(patch, grid, network, batch_size).memory_bytes > memory_target:
            batch_size -= 1
    else:
        raise DscovidError(f"preset {preset['name']}: budget.kind must be gpu_memory or cpu_time, got {budget['kind']!r}")
    training["batch_size"] = batch_size
    figures = estimate(patch, grid, network, batch_size)

    if budget["kind"] == "cpu_time":
        throughput = float(budget["cpu_gflops"]) * 1e9
        patch, grid = _shrink_to_time(patch, grid, network, batch_size, budget, throughput,
                                      patch_divisor, grid_divisor)
        figures = estimate(patch, grid, network, batch_size)
        seconds_per_iteration = figures.flops_per_iteration / throughput
        total = max(2, int(float(budget["time_budget_s"]) / seconds_per_iteration))
        share = float(budget.get("pretrain_share", 0.6))
        stages = []
        for stage, iterations in zip(training["stages"], (total * share, total * (1 - share))):
            stage = dict(stage)
            per_epoch = int(stage["iterations_per_epoch"])
            stage["epochs"] = max(1, int(round(iterations / per_epoch)))
            stages.append(stage)
        training["stages"] = stages + [dict(s) for s in training["stages"][len(stages):]]
        budget["estimated_seconds_per_iteration"] = round(seconds_per_iteration, 4)
        budget["planned_iterations"] = sum(s["epochs"] * s["iterations_per_epoch"] for s in training["stages"])

    budget.update(figures.to_dict())
    budget["median_lung_box_voxels_zyx"] = [int(round(v)) for v in median_shape]
    preprocessing = {key: value for key, value in preset["preprocessing"].items() if key != "spacing_rule"}
    preprocessing["target_spacing_zyx_mm"] = [round(v, 5) for v in spacing]
    budget["spacing_rule"] = "override" if override_spacing is not None else preset["preprocessing"].get("spacing_rule")
    return {
        "data_identifier": preset["name"],
        "description": preset.get("description", ""),
        "preprocessing": preprocessing,
        "segmentation": {"patch_size_zyx": patch},
        "classification": {"grid_zyx": grid},
        "network": network,
        "training": training,
        "inference": dict(preset["inference"]),
        "budget": budget,
    }


def plan_experiment(
    fingerprint: Mapping,
    dataset_name: str,
    class_names: Sequence[str],
    presets: Sequence[str] = DEFAULT_PRESETS,
    override_spacing: Sequence[float] | None = None,
    plans_name: str = "dscovidPlans",
) -> dict:
    """The plans dictionary for a dataset: one configuration per preset (by name or JSON path), validated."""
    pooled = fingerprint["pooled"]
    configurations = {}
    for preset_name in presets:
        preset = load_preset(preset_name)
        configurations[preset["name"]] = plan_configuration(preset, fingerprint, class_names, override_spacing)
    plans = {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "dscovid_version": __version__,
        "class_names": list(class_names),
        "original_median_spacing_zyx_mm": [float(v) for v in pooled["median_spacing_zyx_mm"]],
        "original_median_shape_zyx": [int(v) for v in pooled["median_shape_zyx"]],
        "fingerprint_summary": {
            "num_cases": int(pooled["num_cases"]),
            "class_counts": dict(pooled["class_counts"]),
            "median_lung_box_mm_zyx": list(pooled["median_lung_box_mm_zyx"]),
        },
        "configurations": configurations,
    }
    validate_plans(plans)
    return plans
