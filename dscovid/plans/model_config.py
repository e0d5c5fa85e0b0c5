"""The ``network`` and ``training.loss`` keys of a plans configuration, as validated dataclasses.

Every key has the paper's value as its default; ``from_dict`` refuses unknown keys and bad values with a
:class:`~dscovid.errors.DscovidError` that names the key (``network.<key>`` or ``training.loss.<key>``).
:func:`network_config` also checks the sizes the network must work with (``PATCH_DIVISOR``, ``GRID_DIVISOR``).
The network (:mod:`dscovid.model`) is built from these; the plans validator checks them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dscovid.errors import DscovidError

TASKS = ("joint", "segmentation", "classification")
STEMS = ("inception", "conv")
NORMS = ("group", "instance")
LESION_CONTEXTS = ("ground_truth", "prediction", "none")
DICE_OVER = ("sample", "batch")
SEG_TO_CLS_FILLS = ("classification", "zeros")
TASK_AWARE_CLASSES = ("predicted", "label")


def _check_choice(prefix: str, key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise DscovidError(f"{prefix}.{key} must be one of {', '.join(choices)}; got {value!r}")


def _check_number(prefix: str, key: str, value: Any, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise DscovidError(f"{prefix}.{key} must be a number >= {minimum}; got {value!r}")


def _check_int_list(prefix: str, key: str, value: Any, length: int, minimum: int = 1) -> None:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != length
        or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in value)
    ):
        raise DscovidError(f"{prefix}.{key} must be a list of {length} integers >= {minimum}; got {value!r}")


def _build(cls: type, values: Mapping[str, Any] | None, prefix: str) -> Any:
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise DscovidError(f"unknown key {prefix}.{key} (known: {', '.join(sorted(known))})")
    instance = cls(**values)
    instance.validate()
    return instance


@dataclass(frozen=True)
class NetworkConfig:
    """``configuration["network"]``: the architecture and its ablation switches (docs/model.md)."""

    tasks: str = "joint"
    """``joint`` (DeepSC-COVID), ``segmentation`` (Table II "w/o Cls."), ``classification`` ("w/o Seg.")."""
    stem: str = "inception"
    """``inception`` (3D inception block) or ``conv`` (plain 3×3×3 convolution, Fig. 8 ablation)."""
    stem_channels: int = 32
    cross_stitch: bool = True
    """False removes the cross-stitch unit (each task keeps its own stem features; Fig. 8 ablation)."""
    cross_stitch_init: tuple[float, float] = (0.9, 0.1)
    """Initial (self, other) weights of equation 2."""
    segmentation_widths: tuple[int, int, int] = (64, 128, 256)
    classification_widths: tuple[int, int, int] = (64, 128, 256)
    lesion_channels: int = 16
    """Channels Ŝ is embedded to before it is concatenated with the C-features."""
    side_output_weights: tuple[float, float, float, float] = (0.25, 0.25, 0.5, 1.0)
    """η1..η4 of equations 3 and 10."""
    norm: str = "instance"
    norm_groups: int = 2
    num_classes: int = 3
    lesion_context: str = "ground_truth"
    """What stands for Ŝ outside the training patch: ``ground_truth`` (cls_lesion), ``prediction``, ``none``."""
    seg_to_cls_fill: str = "classification"
    """What stands for the segmentation stem features outside the patch: ``classification`` or ``zeros``."""
    detach_lesion_map: bool = False
    """Ŝ enters the classifier without its gradient: the classification loss no longer trains the lesion subnet
    (with ``cross_stitch`` off and ``lambda_ta`` 0 the two tasks are then a plain cascade trained side by side)."""
    classifier_dropout: float = 0.0
    """Dropout on the pooled features before the classifier's linear layer while training (0: none, the paper)."""
    lesion_gate: bool = False
    """The classification subnet sees its stem features only where Ŝ marks lesion: the features are multiplied by Ŝ
    pooled onto their grid and dilated by one cell, so anatomy away from the lesions cannot tell scans apart. Not in
    the paper; only the joint network has Ŝ (the classification-only network ignores it)."""
    findings_head: bool = False
    """Add the findings head (``dscovid.model.findings_head``): a linear term per class over the paper's lesion
    findings measured on Ŝ. Not in the paper; only the joint network has it (single-task networks ignore it)."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> NetworkConfig:
        """Build from ``configuration["network"]``; unknown keys and bad values raise DscovidError."""
        values = dict(values or {})
        for key in ("cross_stitch_init", "segmentation_widths", "classification_widths", "side_output_weights"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return _build(cls, values, "network")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (lists instead of tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        p = "network"
        _check_choice(p, "tasks", self.tasks, TASKS)
        _check_choice(p, "stem", self.stem, STEMS)
        _check_choice(p, "norm", self.norm, NORMS)
        _check_choice(p, "lesion_context", self.lesion_context, LESION_CONTEXTS)
        _check_choice(p, "seg_to_cls_fill", self.seg_to_cls_fill, SEG_TO_CLS_FILLS)
        for key in ("cross_stitch", "findings_head", "detach_lesion_map", "lesion_gate"):
            if not isinstance(getattr(self, key), bool):
                raise DscovidError(f"{p}.{key} must be true or false; got {getattr(self, key)!r}")
        _check_number(p, "classifier_dropout", self.classifier_dropout)
        if not self.classifier_dropout < 1:  # NaN too
            raise DscovidError(f"{p}.classifier_dropout must be below 1 (1 drops every feature); got {self.classifier_dropout!r}")
        _check_int_list(p, "stem_channels", [self.stem_channels], 1, minimum=8)
        if self.stem_channels % 8:
            raise DscovidError(f"{p}.stem_channels must be a multiple of 8 (inception branch split); got {self.stem_channels}")
        _check_int_list(p, "segmentation_widths", self.segmentation_widths, 3, minimum=2)
        _check_int_list(p, "classification_widths", self.classification_widths, 3, minimum=1)
        if any(w % 2 for w in self.segmentation_widths):
            raise DscovidError(f"{p}.segmentation_widths must be even; got {list(self.segmentation_widths)}")
        _check_int_list(p, "num_classes", [self.num_classes], 1, minimum=2)
        _check_int_list(p, "norm_groups", [self.norm_groups], 1, minimum=1)
        if self.norm == "group":
            widths = [self.stem_channels, *self.segmentation_widths, *self.classification_widths]
            widths += [w // 2 for w in self.segmentation_widths]
            bad = [w for w in widths if w % self.norm_groups]
            if bad:
                raise DscovidError(f"{p}.norm_groups={self.norm_groups} does not divide the channel counts {sorted(set(bad))}")
        if (
            isinstance(self.lesion_channels, bool)
            or not isinstance(self.lesion_channels, int)
            or not 0 < self.lesion_channels < self.stem_channels
        ):
            raise DscovidError(
                f"{p}.lesion_channels must be an integer between 1 and stem_channels - 1; got {self.lesion_channels!r}"
            )
        if len(self.cross_stitch_init) != 2:
            raise DscovidError(f"{p}.cross_stitch_init must be [self, other]; got {list(self.cross_stitch_init)}")
        for value in self.cross_stitch_init:
            _check_number(p, "cross_stitch_init", value, minimum=-10.0)
        if len(self.side_output_weights) != 4:
            raise DscovidError(f"{p}.side_output_weights must hold four values; got {list(self.side_output_weights)}")
        for value in self.side_output_weights:
            _check_number(p, "side_output_weights", value)


@dataclass(frozen=True)
class LossConfig:
    """``configuration["training"]["loss"]``: the weights of equations 8 and 11 and the focal parameters."""

    lambda_seg: float = 1.0
    lambda_cls: float = 1.0
    lambda_ta: float = 10.0
    """λ_ta of equation 11 (paper's best 10; 0 removes the task-aware loss)."""
    lambda_findings: float = 1.0
    """Weight of the cross-entropy of the findings head's logits alone (only with ``network.findings_head``): it
    keeps the head a classifier in its own right while the subnet's logits fit the training cases."""
    lambda_dice: float = 1.0
    lambda_focal: float = 1.0
    focal_alpha: float = 0.75
    """α of equation 7: weight of the lesion term (lesions are the minority)."""
    focal_gamma: float = 2.0
    dice_smooth: float = 1.0
    """Added to numerator and denominator of equation 6; makes an empty target push Ŝ to zero."""
    dice_over: str = "sample"
    """The sums of equation 6 run over each ``sample`` (then averaged) or over the whole ``batch`` (nnU-Net's
    batch Dice). Per sample, a patch without lesion scores 1 - smooth / (ΣŜ + smooth): saturated near 1 for any
    visible false positive, so its gradient all but vanishes and only the focal term (weight 1 - α) fights false
    positives there. Over the batch, the false positives of such a patch enlarge the denominator of a Dice that
    the lesion patches keep meaningful."""
    task_aware_scales: tuple[int, ...] = (1, 2, 3)
    """Which side outputs Ŝi enter equation 10; ``[3]`` is the single-scale ablation of Table III."""
    task_aware_class: str = "predicted"
    """Evidence masks of the ``predicted`` class (equation 5) or of the ``label``."""
    task_aware_normalise: bool = True
    """Compare sigmoid(Ŝi) with the evidence mask rescaled to [0, 1] (ReLU, divided by its maximum over the scan),
    instead of raw logits with raw class activations, whose scales are unrelated: unnormalised, λ_ta·L_ta dwarfs
    the other terms at the start of fine-tuning and pushes the classification loss up (docs/model.md)."""
    task_aware_exclude_classes: tuple[int, ...] = (2,)
    """Samples whose chosen class is one of these get no task-aware term: the evidence of non-pneumonia (index 2)
    points at healthy lung, which the lesion subnet must not be pulled towards."""
    class_weights: tuple[float, ...] | None = field(default=None)
    """ξ of equation 9, one per class (from ``training.class_weights``); None means all 1."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, class_weights: Sequence[float] | None = None) -> LossConfig:
        """Build from ``configuration["training"]["loss"]`` and ``configuration["training"]["class_weights"]``."""
        values = dict(values or {})
        if "class_weights" in values:
            raise DscovidError("unknown key training.loss.class_weights (class weights live in training.class_weights)")
        for key in ("task_aware_scales", "task_aware_exclude_classes"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        if class_weights is not None:
            if not isinstance(class_weights, (list, tuple)):
                raise DscovidError(f"training.class_weights must be a list of numbers; got {class_weights!r}")
            for w in class_weights:
                _check_number("training", "class_weights", w)
            values["class_weights"] = tuple(float(w) for w in class_weights)
        return _build(cls, values, "training.loss")

    def to_dict(self) -> dict[str, Any]:
        """``training.loss`` as plans.json holds it (lists instead of tuples; the class weights live elsewhere)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if k != "class_weights"}

    def validate(self) -> None:
        p = "training.loss"
        for key in ("lambda_seg", "lambda_cls", "lambda_ta", "lambda_findings", "lambda_dice", "lambda_focal",
                    "focal_gamma", "dice_smooth"):
            _check_number(p, key, getattr(self, key))
        _check_number(p, "focal_alpha", self.focal_alpha)
        if self.focal_alpha > 1:
            raise DscovidError(f"{p}.focal_alpha must be in [0, 1]; got {self.focal_alpha}")
        scales = self.task_aware_scales
        if (
            not isinstance(scales, (list, tuple))
            or len(scales) == 0
            or len(set(scales)) != len(scales)
            or any(s not in (1, 2, 3) for s in scales)
        ):
            raise DscovidError(f"{p}.task_aware_scales must be distinct values among 1, 2, 3; got {scales!r}")
        _check_choice(p, "task_aware_class", self.task_aware_class, TASK_AWARE_CLASSES)
        _check_choice(p, "dice_over", self.dice_over, DICE_OVER)
        if not isinstance(self.task_aware_normalise, bool):
            raise DscovidError(f"{p}.task_aware_normalise must be true or false; got {self.task_aware_normalise!r}")
        excluded = self.task_aware_exclude_classes
        if not isinstance(excluded, (list, tuple)) or any(not isinstance(c, int) or c < 0 for c in excluded):
            raise DscovidError(f"{p}.task_aware_exclude_classes must be a list of class indices; got {excluded!r}")


PATCH_DIVISOR = 8  # stem stride 2 and two U-Net poolings
GRID_DIVISOR = 16  # stem stride 2 and three strided encoder units


def _sizes(configuration: Mapping[str, Any], section: str, key: str, divisor: int) -> list[int]:
    try:
        value = configuration[section][key]
    except (KeyError, TypeError):
        raise DscovidError(f"configuration has no {section}.{key}") from None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % divisor for v in value)
    ):
        raise DscovidError(f"{section}.{key} must be three positive integers divisible by {divisor}; got {value!r}")
    return [int(v) for v in value]


def network_config(configuration: Mapping[str, Any]) -> NetworkConfig:
    """Validated ``configuration["network"]`` (with the sizes it must work with checked too)."""
    config = NetworkConfig.from_dict(configuration.get("network"))
    if config.tasks != "classification":
        _sizes(configuration, "segmentation", "patch_size_zyx", PATCH_DIVISOR)
    if config.tasks != "segmentation":
        _sizes(configuration, "classification", "grid_zyx", GRID_DIVISOR)
    return config
