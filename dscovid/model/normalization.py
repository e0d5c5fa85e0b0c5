"""Normalisation layers that do not depend on the batch (batch sizes here are 1 or 2)."""

from __future__ import annotations

import torch
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
        return ChannelNorm(channels)
    raise ValueError(f"unknown normalisation {kind!r}")


class ChannelNorm(nn.GroupNorm):
    """Affine instance normalisation (GroupNorm with one channel per group) that accepts 1-voxel feature maps.

    torch refuses to normalise a single value per group in training (InstanceNorm3d and GroupNorm both raise); a
    single value normalises to 0, so the output is the bias. Very small grids reach 1×1×1 at the deepest level.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(num_groups=channels, num_channels=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0, 0].numel() == 1:
            # x and the weight stay in the graph (times zero): every input and parameter gets a (zero) gradient,
            # as DistributedDataParallel and the trainer's gradient routing expect.
            shape = (1, -1, *([1] * (x.dim() - 2)))
            return x * 0 + (self.bias.view(shape) + self.weight.view(shape) * 0).to(x.dtype)
        return super().forward(x)
