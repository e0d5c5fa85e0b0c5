"""The DeepSC-COVID network, its losses, and the geometry between its two branches (docs/model.md)."""

from dscovid.model.build import build_loss, build_network, random_inputs
from dscovid.model.losses import DeepSCLoss, LossTerms
from dscovid.model.network import DeepSCCOVID, DeepSCOutput, SegmentationResult
from dscovid.plans.model_config import LossConfig, NetworkConfig, network_config

__all__ = [
    "DeepSCCOVID",
    "DeepSCLoss",
    "DeepSCOutput",
    "LossConfig",
    "LossTerms",
    "NetworkConfig",
    "SegmentationResult",
    "build_loss",
    "build_network",
    "network_config",
    "random_inputs",
]
