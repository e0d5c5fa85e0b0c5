"""Build the network and its loss from a plans configuration (docs/formats.md §3, docs/model.md)."""

from __future__ import annotations

from dscovid.model.losses import DeepSCLoss
from dscovid.model.network import DeepSCCOVID
from dscovid.plans.configuration import Configuration


def build_network(configuration: Configuration) -> DeepSCCOVID:
    """The DeepSC-COVID network (or single-task network) of one plans configuration (its ``network`` section)."""
    return DeepSCCOVID(configuration.network)


def build_loss(configuration: Configuration) -> DeepSCLoss:
    """The loss of equation 11 (or the single-task loss) from ``training.loss``, ``training.class_weights`` and the
    network's tasks."""
    return DeepSCLoss(configuration.training.loss, configuration.network)
