"""Build the network and its loss from a plans configuration (docs/formats.md §3, docs/model.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from dscovid.errors import DscovidError
from dscovid.model.losses import DeepSCLoss
from dscovid.model.network import DeepSCCOVID
from dscovid.plans.model_config import LossConfig, NetworkConfig, network_config


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
