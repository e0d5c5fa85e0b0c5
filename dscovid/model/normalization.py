"""Normalisation layers that do not depend on the batch (batch sizes here are 1 or 2)."""

from __future__ import annotations

from torch import nn


def make_norm(kind: str, channels: int, groups: int) -> nn.Module:
    """GroupNorm with ``groups`` groups (``kind="group"``) or instance normalisation (``kind="instance"``).

    The authors' lesion subnet uses a BatchNorm that always normalises with the statistics of the current batch,
    even at test time, with batch size 1: its output then depends on the other voxels of the same patch in a way
    that differs between training (random patches) and inference (sliding window). GroupNorm and InstanceNorm behave
    the same in training and inference and at any batch size.
    """
    if kind == "group":
        return nn.GroupNorm(num_groups=groups, num_channels=channels)
    if kind == "instance":
        # Instance normalisation written as GroupNorm with one channel per group: the same arithmetic as an affine
        # InstanceNorm3d, but it also accepts the 1-voxel feature maps of very small grids instead of raising.
        return nn.GroupNorm(num_groups=channels, num_channels=channels)
    raise ValueError(f"unknown normalisation {kind!r}")
