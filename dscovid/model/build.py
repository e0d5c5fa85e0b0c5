"""Build the network and its loss from a plans configuration (docs/formats.md §3, docs/model.md)."""

from __future__ import annotations

import torch

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


def random_inputs(configuration: Configuration, batch: int, generator: torch.Generator | None = None) -> dict:
    """Random keyword inputs of the network with the training shapes: ``batch`` patches of the configuration's patch
    size, each the corner of a volume twice its size, and the classification grid (image and lesion context)."""
    patch = list(configuration.segmentation.patch_size_zyx)
    grid = list(configuration.classification.grid_zyx)
    return {
        "seg_patch": torch.rand(batch, 1, *patch, generator=generator),
        "patch_box": torch.tensor([[[0, 0, 0], patch]] * batch),
        "volume_shape": torch.tensor([[2 * p for p in patch]] * batch),
        "cls_image": torch.rand(batch, 1, *grid, generator=generator),
        "lesion_context": torch.rand(batch, 1, *grid, generator=generator),
    }
