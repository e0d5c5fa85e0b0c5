"""The DeepSC-COVID network as a list of convolutions: what the planner's budget model and the predictor's tile
batch count (``dscovid.planning.budget``, ``dscovid.inference.engine.tile_batch_size``), without building it.

Each convolution is its output voxels, input and output channels and kernel size, for one segmentation patch and
one classification grid at batch 1 (docs/model.md gives the shapes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvLayer:
    """One convolution: ``voxels`` output voxels, ``in_channels`` → ``out_channels``, cubic ``kernel``."""

    name: str
    voxels: int
    in_channels: int
    out_channels: int
    kernel: int = 3

    @property
    def parameters(self) -> int:
        return self.kernel**3 * self.in_channels * self.out_channels

    @property
    def flops(self) -> float:
        return 2.0 * self.parameters * self.voxels


def _voxels(shape: Sequence[int], factor: int) -> int:
    return int(np.prod([max(1, int(np.ceil(s / factor))) for s in shape]))


def _stem(prefix: str, shape: Sequence[int], channels: int) -> list[ConvLayer]:
    """The 3D inception block (four branches, stride 2): three 1×1×1 reductions at full size, the rest at 1/2."""
    full, half = _voxels(shape, 1), _voxels(shape, 2)
    quarter, eighth = max(1, channels // 4), max(1, channels // 8)
    wide = channels - 2 * quarter - eighth
    return [
        ConvLayer(f"{prefix}.b1", half, 1, quarter, 1),
        ConvLayer(f"{prefix}.b2a", full, 1, quarter, 1),
        ConvLayer(f"{prefix}.b2b", half, quarter, quarter, 3),
        ConvLayer(f"{prefix}.b3a", full, 1, quarter, 1),
        ConvLayer(f"{prefix}.b3b", half, quarter, wide, 3),
        ConvLayer(f"{prefix}.b3c", half, wide, wide, 3),
        ConvLayer(f"{prefix}.b4", half, 1, eighth, 3),
    ]


def segmentation_layers(patch_zyx: Sequence[int], network: Mapping) -> list[ConvLayer]:
    """The convolutions of the segmentation branch (stem and lesion subnet) for one patch."""
    c0 = int(network["stem_channels"])
    s1, s2, s3 = (int(v) for v in network["segmentation_widths"])
    p = patch_zyx
    return _stem("stem_seg", p, c0) + [
        ConvLayer("seg.down1a", _voxels(p, 2), c0, c0), ConvLayer("seg.down1b", _voxels(p, 2), c0, s1),
        ConvLayer("seg.down2a", _voxels(p, 4), s1, s1), ConvLayer("seg.down2b", _voxels(p, 4), s1, s2),
        ConvLayer("seg.down3a", _voxels(p, 8), s2, s2), ConvLayer("seg.down3b", _voxels(p, 8), s2, s3),
        ConvLayer("seg.up2t", _voxels(p, 4), s3, s2, 2),
        ConvLayer("seg.up2a", _voxels(p, 4), 2 * s2, s2), ConvLayer("seg.up2b", _voxels(p, 4), s2, s2),
        ConvLayer("seg.up1t", _voxels(p, 2), s2, s1, 2),
        ConvLayer("seg.up1a", _voxels(p, 2), 2 * s1, s1), ConvLayer("seg.up1b", _voxels(p, 2), s1, s1),
        ConvLayer("seg.up0t", _voxels(p, 1), s1, c0, 2),
        ConvLayer("seg.up0a", _voxels(p, 1), c0, c0), ConvLayer("seg.up0b", _voxels(p, 1), c0, c0),
    ] + [ConvLayer(f"seg.side{i}", _voxels(p, 1), w, 1, 1) for i, w in enumerate((s3, s2, s1, c0))]


def network_layers(patch_zyx: Sequence[int], grid_zyx: Sequence[int], network: Mapping) -> list[ConvLayer]:
    """The convolutions of the joint network for one patch and one classification grid (batch 1)."""
    c0 = int(network["stem_channels"])
    k1, k2, k3 = (int(v) for v in network["classification_widths"])
    lesion_channels = int(network.get("lesion_channels", c0 // 2))
    tasks = network.get("tasks", "joint")
    layers: list[ConvLayer] = []
    if tasks in ("joint", "segmentation"):
        layers += segmentation_layers(patch_zyx, network)
    if tasks in ("joint", "classification"):
        g = grid_zyx
        layers += _stem("stem_cls", g, c0)
        layers += [ConvLayer("cls.lesion_in", _voxels(g, 2), 1, lesion_channels, 1),
                   ConvLayer("cls.features_in", _voxels(g, 2), c0, c0 - lesion_channels, 1)]
        previous = c0
        for level, (width, factor) in enumerate(((k1, 2), (k2, 4), (k3, 8)), start=1):
            voxels = _voxels(g, factor)
            layers += [ConvLayer(f"cls.res{level}a", voxels, previous, width),
                       ConvLayer(f"cls.res{level}b", voxels, width, width),
                       ConvLayer(f"cls.res{level}skip", voxels, previous, width, 1)]
            previous = width
    return layers
