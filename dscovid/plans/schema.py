"""plans.json: its schema, and validation that names the wrong key.

The format is docs/formats.md §3. :func:`validate_plans` checks every key (unknown keys, missing keys, wrong
types, non-positive sizes) and raises one :class:`DscovidError` whose message starts with the key path, e.g.
``configurations.3d_cpu.segmentation.patch_size_zyx: must be 3 positive integers``. The typed objects built from a
valid dictionary, and their defaults, are :mod:`dscovid.plans.configuration`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from dscovid.errors import DscovidError
from dscovid.plans.model_config import LossConfig, NetworkConfig, network_config

_SAFE_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class _Spec:
    """A schema node: ``check(value, path)`` raises a DscovidError naming ``path`` when ``value`` does not fit."""

    def check(self, value: object, path: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _fail(path: str, message: str) -> DscovidError:
    return DscovidError(f"{path}: {message}")


class _Number(_Spec):
    def __init__(self, minimum: float | None = None, maximum: float | None = None, exclusive_minimum: bool = False,
                 integer: bool = False):
        self.minimum, self.maximum, self.exclusive, self.integer = minimum, maximum, exclusive_minimum, integer

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.minimum is not None:
            kind += f" {'>' if self.exclusive else '>='} {self.minimum:g}"
        if self.maximum is not None:
            kind += f" <= {self.maximum:g}"
        return kind

    def check(self, value: object, path: str) -> None:
        ok_type = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise _fail(path, f"must be {self.describe()}, got {value!r}")
        if value != value:  # NaN
            raise _fail(path, "must be a number, got NaN")
        if self.minimum is not None and (value <= self.minimum if self.exclusive else value < self.minimum):
            raise _fail(path, f"must be {self.describe()}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise _fail(path, f"must be {self.describe()}, got {value!r}")


class _Bool(_Spec):
    def check(self, value: object, path: str) -> None:
        if not isinstance(value, bool):
            raise _fail(path, f"must be true or false, got {value!r}")


class _Str(_Spec):
    def __init__(self, choices: Sequence[str] | None = None, identifier: bool = False):
        self.choices, self.identifier = tuple(choices) if choices else None, identifier

    def check(self, value: object, path: str) -> None:
        if not isinstance(value, str):
            raise _fail(path, f"must be a string, got {value!r}")
        if self.choices and value not in self.choices:
            raise _fail(path, f"must be one of {', '.join(self.choices)}, got {value!r}")
        if self.identifier and not _SAFE_IDENTIFIER.match(value):
            raise _fail(path, f"must be a safe name (letters, digits, '_', '-', '.'), got {value!r}")


class _List(_Spec):
    def __init__(self, item: _Spec, length: int | None = None, min_length: int = 0, what: str = ""):
        self.item, self.length, self.min_length, self.what = item, length, min_length, what

    def check(self, value: object, path: str) -> None:
        if not isinstance(value, list):
            raise _fail(path, f"must be a list{' of ' + self.what if self.what else ''}, got {value!r}")
        if self.length is not None and len(value) != self.length:
            raise _fail(path, f"must be {self.length} {self.what or 'values'}, got {len(value)}")
        if len(value) < self.min_length:
            raise _fail(path, f"must hold at least {self.min_length} {self.what or 'values'}, got {len(value)}")
        for index, item in enumerate(value):
            try:
                self.item.check(item, f"{path}[{index}]")
            except DscovidError as error:
                if self.what:  # name the whole key: "must be 3 positive integers" reads better than "[1]: ..."
                    count = f"{self.length} " if self.length else ""
                    raise _fail(path, f"must be {count}{self.what}, got {value!r}") from None
                raise error from None


class _Object(_Spec):
    def __init__(self, required: Mapping[str, _Spec], optional: Mapping[str, _Spec] | None = None,
                 free: bool = False):
        self.required, self.optional, self.free = dict(required), dict(optional or {}), free

    def check(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise _fail(path, f"must be an object, got {type(value).__name__}")
        for key, spec in self.required.items():
            if key not in value:
                raise _fail(_join(path, key), "missing key")
            spec.check(value[key], _join(path, key))
        for key, item in value.items():
            if key in self.required:
                continue
            if key in self.optional:
                self.optional[key].check(item, _join(path, key))
            elif not self.free:
                known = ", ".join(sorted({*self.required, *self.optional}))
                raise _fail(_join(path, key), f"unknown key (known keys: {known})")


class _MapOf(_Spec):
    def __init__(self, item: _Spec, key: _Str | None = None, min_items: int = 1):
        self.item, self.key, self.min_items = item, key, min_items

    def check(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise _fail(path, f"must be an object, got {type(value).__name__}")
        if len(value) < self.min_items:
            raise _fail(path, f"must hold at least {self.min_items} entry")
        for key, item in value.items():
            if self.key is not None:
                self.key.check(key, _join(path, key))
            self.item.check(item, _join(path, key))


class _Window(_Spec):
    def check(self, value: object, path: str) -> None:
        _List(_Number(), length=2, what="numbers").check(value, path)
        if not value[0] < value[1]:
            raise _fail(path, f"must be [low, high] with low < high, got {value!r}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_POSITIVE_INT = _Number(minimum=0, exclusive_minimum=True, integer=True)
_POSITIVE = _Number(minimum=0, exclusive_minimum=True)
_NON_NEGATIVE = _Number(minimum=0)
_FRACTION = _Number(minimum=0, maximum=1)
_SIZE3 = _List(_POSITIVE_INT, length=3, what="positive integers")
_SPACING3 = _List(_POSITIVE, length=3, what="positive numbers (mm)")

class _ModelBlock(_Spec):
    """``network`` or ``training.loss``: validated by the dataclasses the network is built from (one source of truth).

    :class:`dscovid.plans.model_config.NetworkConfig` / ``LossConfig`` name keys as ``network.<key>`` or
    ``training.loss.<key>``; the configuration's path is put in front.
    """

    def __init__(self, which: str):
        self.which = which

    def check(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise _fail(path, f"must be an object, got {type(value).__name__}")
        prefix = path[: -len(self.which)]  # "configurations.3d_cpu." in front of "network"
        try:
            if self.which == "network":
                NetworkConfig.from_dict(value)
            else:
                LossConfig.from_dict(value)
        except DscovidError as error:
            message = re.sub(rf"(?<![\w.])({re.escape(self.which)})\b", lambda m: prefix + m.group(1), str(error))
            raise DscovidError(message) from None


STAGE_SPEC = _Object(
    required={
        "name": _Str(identifier=True),
        "epochs": _POSITIVE_INT,
        "iterations_per_epoch": _POSITIVE_INT,
        "optimizer": _Object(
            required={
                "name": _Str(("adam", "adamw", "sgd")),
                "lr": _POSITIVE,
                "betas": _List(_FRACTION, length=2, what="numbers in [0, 1]"),
                "weight_decay": _NON_NEGATIVE,
            },
        ),
        "schedule": _Str(("linear", "constant", "poly")),
        "trainable": _List(_Str(), min_length=1, what="module names"),
    },
    optional={"tasks": _Str(("joint", "segmentation", "classification", "separate"))},
)

CONFIGURATION_SPEC = _Object(
    required={
        "data_identifier": _Str(identifier=True),
        "preprocessing": _Object(
            required={
                "target_spacing_zyx_mm": _SPACING3,
                "hu_window": _Window(),
                "crop_margin_mm": _NON_NEGATIVE,
                "mask_outside_lung": _Bool(),
                "num_lesion_samples": _Number(minimum=0, integer=True),
            },
            optional={"lung_margin_mm": _NON_NEGATIVE},
        ),
        "segmentation": _Object(required={"patch_size_zyx": _SIZE3}),
        "classification": _Object(required={"grid_zyx": _SIZE3}),
        "network": _ModelBlock("network"),
        "training": _Object(
            required={
                "batch_size": _POSITIVE_INT,
                "class_weights": _List(_NON_NEGATIVE, min_length=2, what="non-negative numbers"),
                "loss": _ModelBlock("training.loss"),
                "stages": _List(STAGE_SPEC, min_length=1),
                "oversample_foreground": _FRACTION,
            },
            optional={"seed": _Number(minimum=0, integer=True), "lesion_context_refresh_epochs": _POSITIVE_INT,
                      "hard_negative_fraction": _FRACTION,
                      "findings_head_lr_scale": _Number(minimum=0, exclusive_minimum=True),
                      "lesion_sampling": _Str(("voxel", "lesion"))},
        ),
        "inference": _Object(
            required={
                "step_fraction": _Number(minimum=0, maximum=1, exclusive_minimum=True),
                "weighting": _Str(("constant", "gaussian")),
                "batch_size": _POSITIVE_INT,
            },
            optional={"mirror_axes": _List(_Number(minimum=0, maximum=2, integer=True), what="axes among 0, 1, 2"),
                      "tile_placement": _Str(("grid", "region", "region_sized"))},
        ),
    },
    # What the planner computed the configuration from (informational; not read by later stages).
    optional={"budget": _Object(required={}, free=True), "description": _Str()},
)

PLANS_SPEC = _Object(
    required={
        "dataset_name": _Str(),
        "plans_name": _Str(identifier=True),
        "dscovid_version": _Str(),
        "class_names": _List(_Str(), min_length=2, what="class names"),
        "configurations": _MapOf(CONFIGURATION_SPEC, key=_Str(identifier=True)),
    },
    optional={
        "original_median_spacing_zyx_mm": _SPACING3,
        "original_median_shape_zyx": _SIZE3,
        "fingerprint_summary": _Object(required={}, free=True),
    },
)


def validate_configuration(configuration: dict, path: str = "configuration") -> None:
    """Check one configuration dictionary; raise a DscovidError naming the first wrong key under ``path``.

    Beyond the schema, the sizes must suit the network (:func:`dscovid.plans.model_config.network_config`: the
    patch divisible by 8, the classification grid by 16) and there must be one class weight per network class.
    """
    CONFIGURATION_SPEC.check(configuration, path)
    try:
        network = network_config(configuration)
    except DscovidError as error:
        message = re.sub(r"(?<![\w.])(segmentation|classification|network)\.", lambda m: f"{path}.{m.group(1)}.",
                         str(error))
        raise DscovidError(message) from None
    weights = configuration["training"]["class_weights"]
    if len(weights) != network.num_classes:
        raise _fail(f"{path}.training.class_weights",
                    f"must hold {network.num_classes} weights (network.num_classes), got {len(weights)}")


def validate_plans(plans: dict) -> None:
    """Check a whole plans dictionary; raise a DscovidError naming the first wrong key path.

    Beyond types and sizes: every configuration must have one class weight per class.
    """
    PLANS_SPEC.check(plans, "")
    n_classes = len(plans["class_names"])
    for name, configuration in plans["configurations"].items():
        validate_configuration(configuration, f"configurations.{name}")
        weights = configuration["training"]["class_weights"]
        if len(weights) != n_classes:
            raise _fail(f"configurations.{name}.training.class_weights",
                        f"must hold {n_classes} weights (one per class), got {len(weights)}")
