"""Build the network and its loss from a plans configuration (docs/formats.md §3, docs/model.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from dscovid.errors import DscovidError
from dscovid.model.config import LossConfig, NetworkConfig
from dscovid.model.losses import DeepSCLoss
from dscovid.model.network import DeepSCCOVID

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


def build_network(configuration: Mapping[str, Any]) -> nn.Module:
    """The DeepSC-COVID network (or single-task network) of one plans configuration.

    Parameters
    ----------
    configuration : dict
        A whole entry of ``plans["configurations"]``; reads ``network``, ``segmentation.patch_size_zyx`` and
        ``classification.grid_zyx``.

    Raises
    ------
    DscovidError
        Naming the key when a value is unknown or invalid.
    """
    return DeepSCCOVID(network_config(configuration))


def build_loss(configuration: Mapping[str, Any]) -> DeepSCLoss:
    """The loss of equation 11 (or the single-task loss) from ``training.loss`` and ``training.class_weights``."""
    training = configuration.get("training") or {}
    loss = LossConfig.from_dict(training.get("loss"), training.get("class_weights"))
    net = NetworkConfig.from_dict(configuration.get("network"))
    if loss.class_weights is not None and len(loss.class_weights) != net.num_classes:
        raise DscovidError(
            f"training.class_weights has {len(loss.class_weights)} entries, network.num_classes is {net.num_classes}"
        )
    return DeepSCLoss(loss, net)
