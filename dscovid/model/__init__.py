"""The DeepSC-COVID network, its losses, and the geometry between its two branches (docs/model.md)."""

from dscovid.model.build import build_loss, build_network, network_config
from dscovid.model.config import LossConfig, NetworkConfig
from dscovid.model.losses import DeepSCLoss, LossTerms
from dscovid.model.network import DeepSCCOVID, DeepSCOutput, SegmentationResult

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
]
