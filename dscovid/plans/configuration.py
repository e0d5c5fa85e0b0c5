"""The plans as typed objects: one frozen dataclass per section, built from a validated dictionary.

``load_plans(path)`` gives a :class:`Plans`; ``plans.configuration("3d_cpu")`` one :class:`Configuration`, whose
sections are :class:`PreprocessingConfig`, :class:`SegmentationConfig`, :class:`ClassificationConfig`,
:class:`~dscovid.plans.model_config.NetworkConfig`, :class:`TrainingConfig` (with
:class:`~dscovid.plans.model_config.LossConfig` and one :class:`StageConfig` per stage) and
:class:`InferenceConfig`. An optional key's default is the field's default here and nowhere else; every object is
checked by :mod:`dscovid.plans.schema` when it is built (:meth:`Configuration.from_dict`), so a configuration
changed by a trainer's overrides is checked again. ``to_dict()`` gives the JSON form back, every default written
out.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dscovid.errors import DscovidError
from dscovid.io.dataset import read_json
from dscovid.plans.model_config import LossConfig, NetworkConfig
from dscovid.plans.schema import validate_configuration, validate_plans


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _plain(value: Any) -> Any:
    """Tuples as lists, at any depth (the JSON form)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _section_dict(section: Any) -> dict:
    return {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}


@dataclass(frozen=True)
class PreprocessingConfig:
    """``preprocessing``: how a scan becomes the arrays the network sees (docs/preprocessing.md)."""

    target_spacing_zyx_mm: tuple[float, float, float]
    hu_window: tuple[float, float]
    """HU mapped linearly onto [0, 1], clipped outside."""
    crop_margin_mm: float
    """Margin around the lung's bounding box kept by the crop."""
    mask_outside_lung: bool
    num_lesion_samples: int
    """Lesion voxel locations stored per case for the sampler."""
    lung_margin_mm: float = 0.0
    """How far beyond the lung mask the image is kept when ``mask_outside_lung`` (0: the lung only, the paper)."""

    @classmethod
    def from_dict(cls, values: Mapping) -> PreprocessingConfig:
        return cls(_floats(values["target_spacing_zyx_mm"]), _floats(values["hu_window"]),
                   float(values["crop_margin_mm"]), bool(values["mask_outside_lung"]),
                   int(values["num_lesion_samples"]), float(values.get("lung_margin_mm", cls.lung_margin_mm)))


@dataclass(frozen=True)
class SegmentationConfig:
    """``segmentation``: the lesion subnet's training patch."""

    patch_size_zyx: tuple[int, int, int]


@dataclass(frozen=True)
class ClassificationConfig:
    """``classification``: the grid the whole lung region is resampled onto for the classifier."""

    grid_zyx: tuple[int, int, int]


@dataclass(frozen=True)
class OptimizerConfig:
    """``training.stages[i].optimizer``."""

    name: str
    """``adam``, ``adamw`` or ``sgd`` (momentum 0.99, Nesterov: nnU-Net's)."""
    lr: float
    betas: tuple[float, float]
    weight_decay: float


@dataclass(frozen=True)
class StageConfig:
    """``training.stages[i]``: one training stage (:mod:`dscovid.training.schedule`)."""

    name: str
    epochs: int
    iterations_per_epoch: int
    optimizer: OptimizerConfig
    schedule: str
    """``linear`` (the paper), ``poly`` (nnU-Net) or ``constant``."""
    trainable: tuple[str, ...]
    """``all``, or names of the network's parameter groups (``dscovid.model.network.MODULE_GROUPS``)."""
    tasks: str = "joint"
    """How the stage's loss is formed: ``separate`` (each part by its own task's loss), ``joint`` (equation 11),
    or one task."""

    @classmethod
    def from_dict(cls, values: Mapping) -> StageConfig:
        optimizer = values["optimizer"]
        return cls(str(values["name"]), int(values["epochs"]), int(values["iterations_per_epoch"]),
                   OptimizerConfig(str(optimizer["name"]), float(optimizer["lr"]), _floats(optimizer["betas"]),
                                   float(optimizer["weight_decay"])),
                   str(values["schedule"]), tuple(str(v) for v in values["trainable"]),
                   str(values.get("tasks", cls.tasks)))

    def to_dict(self) -> dict:
        return _section_dict(self) | {"optimizer": _section_dict(self.optimizer)}


@dataclass(frozen=True)
class TrainingConfig:
    """``training``: batches, loss, stages and the sampling of training patches (docs/training.md)."""

    batch_size: int
    class_weights: tuple[float, ...]
    """ξ of equation 9, one per class."""
    loss: LossConfig
    """``training.loss``, with ``class_weights`` filled in."""
    stages: tuple[StageConfig, ...]
    oversample_foreground: float
    """Fraction of the patches forced onto a lesion."""
    seed: int = 12345
    """The run's seed when ``dscovid_train --seed`` does not give one."""
    lesion_context_refresh_epochs: int = 10
    """Epochs between two refreshes of the predicted lesion context (``network.lesion_context: prediction``)."""
    hard_negative_fraction: float = 0.0
    """Fraction of the patches not forced onto a lesion that are centred on a mined false positive."""
    findings_head_lr_scale: float = 1.0
    """The findings head learns at this multiple of the stage's learning rate."""
    lesion_sampling: str = "voxel"
    """Where a patch forced onto a lesion lands: ``"voxel"`` on a lesion voxel drawn uniformly (nnU-Net's rule),
    ``"lesion"`` on a lesion drawn uniformly, then one of its voxels (small lesions as often as large ones)."""

    @classmethod
    def from_dict(cls, values: Mapping) -> TrainingConfig:
        return cls(
            batch_size=int(values["batch_size"]),
            class_weights=_floats(values["class_weights"]),
            loss=LossConfig.from_dict(values["loss"], values["class_weights"]),
            stages=tuple(StageConfig.from_dict(stage) for stage in values["stages"]),
            oversample_foreground=float(values["oversample_foreground"]),
            seed=int(values.get("seed", cls.seed)),
            lesion_context_refresh_epochs=int(values.get("lesion_context_refresh_epochs",
                                                         cls.lesion_context_refresh_epochs)),
            hard_negative_fraction=float(values.get("hard_negative_fraction", cls.hard_negative_fraction)),
            findings_head_lr_scale=float(values.get("findings_head_lr_scale", cls.findings_head_lr_scale)),
            lesion_sampling=str(values.get("lesion_sampling", cls.lesion_sampling)),
        )

    def to_dict(self) -> dict:
        return _section_dict(self) | {"loss": self.loss.to_dict(), "stages": [s.to_dict() for s in self.stages]}


@dataclass(frozen=True)
class InferenceConfig:
    """``inference``: the sliding window of prediction (docs/prediction.md)."""

    step_fraction: float
    """Tile step as a fraction of the patch: 1.0 no overlap (the paper), 0.5 half overlap."""
    weighting: str
    """``constant`` or ``gaussian`` weighting of overlapping tiles."""
    batch_size: int
    mirror_axes: tuple[int, ...] = ()
    """Volume axes (0 z, 1 y, 2 x) also predicted mirrored and averaged (test-time augmentation)."""
    tile_placement: str = "grid"
    """``grid`` (nnU-Net's even grid over the whole volume), ``region`` (fitted to the lung region) or ``region_sized``
    (fitted to it in size too)."""

    @classmethod
    def from_dict(cls, values: Mapping) -> InferenceConfig:
        return cls(float(values["step_fraction"]), str(values["weighting"]), int(values["batch_size"]),
                   _ints(values.get("mirror_axes", cls.mirror_axes)),
                   str(values.get("tile_placement", cls.tile_placement)))


@dataclass(frozen=True)
class Configuration:
    """One configuration of a plans file (``plans["configurations"][name]``), every section typed.

    ``Configuration.from_dict(name, data)`` validates (errors name ``configurations.<name>.<key>``);
    :meth:`to_dict` gives the JSON form back; :meth:`with_overrides` a validated copy with dotted keys changed.
    """

    name: str
    data_identifier: str
    """The cache folder of the preprocessed data (``<preprocessed dataset>/<data_identifier>/``)."""
    preprocessing: PreprocessingConfig
    segmentation: SegmentationConfig
    classification: ClassificationConfig
    network: NetworkConfig
    training: TrainingConfig
    inference: InferenceConfig
    description: str = ""
    budget: Mapping[str, Any] = field(default_factory=dict)
    """What the planner computed the configuration from (informational; no stage reads it)."""

    @classmethod
    def from_dict(cls, name: str, data: Mapping) -> Configuration:
        data = json.loads(json.dumps(data))  # a private copy: later changes to the caller's dictionary do not leak in
        validate_configuration(data, f"configurations.{name}")
        return cls(
            name=name,
            data_identifier=str(data["data_identifier"]),
            preprocessing=PreprocessingConfig.from_dict(data["preprocessing"]),
            segmentation=SegmentationConfig(_ints(data["segmentation"]["patch_size_zyx"])),
            classification=ClassificationConfig(_ints(data["classification"]["grid_zyx"])),
            network=NetworkConfig.from_dict(data["network"]),
            training=TrainingConfig.from_dict(data["training"]),
            inference=InferenceConfig.from_dict(data["inference"]),
            description=str(data.get("description", cls.description)),
            budget=dict(data.get("budget", {})),
        )

    def to_dict(self) -> dict:
        """The configuration as plans.json holds it (lists for tuples, every default written out)."""
        result = {
            "data_identifier": self.data_identifier,
            "description": self.description,
            "preprocessing": _section_dict(self.preprocessing),
            "segmentation": _section_dict(self.segmentation),
            "classification": _section_dict(self.classification),
            "network": self.network.to_dict(),
            "training": self.training.to_dict(),
            "inference": _section_dict(self.inference),
        }
        if self.budget:
            result["budget"] = _plain(dict(self.budget))
        return result

    def with_overrides(self, overrides: Mapping[str, object]) -> Configuration:
        """A copy with dotted keys set (``{"network.cross_stitch": False}``), validated again.

        Raises
        ------
        DscovidError
            When a key names no existing section, or the changed configuration is not valid.
        """
        data = self.to_dict()
        for key, value in overrides.items():
            *parents, last = key.split(".")
            node = data
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise DscovidError(f"configuration has no section {part!r} (setting {key})")
                node = node[part]
            node[last] = _plain(value)
        return Configuration.from_dict(self.name, data)

    def preprocessing_key(self) -> dict:
        """The part of the configuration that determines the preprocessed arrays (cache staleness)."""
        return {"preprocessing": _section_dict(self.preprocessing), "grid_zyx": list(self.classification.grid_zyx)}


@dataclass(frozen=True)
class Plans:
    """A whole plans file (docs/formats.md §3): the dataset, its class names and one :class:`Configuration` per name."""

    dataset_name: str
    plans_name: str
    dscovid_version: str
    class_names: tuple[str, ...]
    configurations: Mapping[str, Configuration]
    original_median_spacing_zyx_mm: tuple[float, float, float] | None = None
    original_median_shape_zyx: tuple[int, int, int] | None = None
    fingerprint_summary: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Mapping) -> Plans:
        """Validate a plans dictionary (errors name the key path) and type it."""
        data = json.loads(json.dumps(data))
        validate_plans(data)
        spacing, shape = data.get("original_median_spacing_zyx_mm"), data.get("original_median_shape_zyx")
        return cls(
            dataset_name=str(data["dataset_name"]),
            plans_name=str(data["plans_name"]),
            dscovid_version=str(data["dscovid_version"]),
            class_names=tuple(str(name) for name in data["class_names"]),
            configurations={name: Configuration.from_dict(name, values)
                            for name, values in data["configurations"].items()},
            original_median_spacing_zyx_mm=_floats(spacing) if spacing is not None else None,
            original_median_shape_zyx=_ints(shape) if shape is not None else None,
            fingerprint_summary=data.get("fingerprint_summary"),
        )

    def configuration(self, name: str) -> Configuration:
        """The configuration ``name``; the error lists the available ones."""
        if name not in self.configurations:
            known = ", ".join(sorted(self.configurations)) or "none"
            raise DscovidError(f"configuration {name!r} is not in the plans (available: {known})")
        return self.configurations[name]

    def with_configuration(self, configuration: Configuration) -> Plans:
        """A copy in which ``configuration`` replaces (or adds) the configuration of its name."""
        return dataclasses.replace(self, configurations={**self.configurations, configuration.name: configuration})

    def to_dict(self) -> dict:
        """The plans as plans.json holds them."""
        result = {"dataset_name": self.dataset_name, "plans_name": self.plans_name,
                  "dscovid_version": self.dscovid_version, "class_names": list(self.class_names)}
        if self.original_median_spacing_zyx_mm is not None:
            result["original_median_spacing_zyx_mm"] = list(self.original_median_spacing_zyx_mm)
        if self.original_median_shape_zyx is not None:
            result["original_median_shape_zyx"] = list(self.original_median_shape_zyx)
        if self.fingerprint_summary is not None:
            result["fingerprint_summary"] = _plain(dict(self.fingerprint_summary))
        result["configurations"] = {name: c.to_dict() for name, c in self.configurations.items()}
        return result


def load_plans(path: str | os.PathLike) -> Plans:
    """Read and validate a plans file; errors name the file and the key."""
    path = Path(path)
    data = read_json(path, "plans file not found")
    try:
        return Plans.from_dict(data)
    except DscovidError as error:
        raise DscovidError(f"{path}: {error}") from None
