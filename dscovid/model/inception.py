"""The 3D inception block (the paper's Fig. 3; the authors' ``stem``), and the plain-convolution ablation."""

from __future__ import annotations

import torch
from torch import nn

from dscovid.model.normalization import make_norm


class InceptionBlock3d(nn.Module):
    """Four parallel branches at stride 2, concatenated, then normalisation and ReLU.

    With ``C`` output channels (paper: 32), as in the authors' ``stem``:

    - b1: 1×1×1 conv, stride 2 → C/4
    - b2: 1×1×1 conv → C/4, 3×3×3 conv stride 2 → C/4
    - b3: 1×1×1 conv → C/4, 3×3×3 conv stride 2 → 3C/8, 3×3×3 conv → 3C/8
    - b4: 3×3×3 average pool (stride 1), 3×3×3 conv stride 2 → C/8

    All convolutions are bias-free (a normalisation follows). Input ``(B, in, D, H, W)`` with even D, H, W; output
    ``(B, C, D/2, H/2, W/2)``.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, norm: str = "group", norm_groups: int = 2) -> None:
        super().__init__()
        if channels % 8:
            raise ValueError(f"inception channels must be a multiple of 8, got {channels}")
        quarter, eighth = channels // 4, channels // 8
        self.branch1 = nn.Conv3d(in_channels, quarter, 1, stride=2, bias=False)
        self.branch2 = nn.Sequential(
            nn.Conv3d(in_channels, quarter, 1, bias=False),
            nn.Conv3d(quarter, quarter, 3, stride=2, padding=1, bias=False),
        )
        self.branch3 = nn.Sequential(
            nn.Conv3d(in_channels, quarter, 1, bias=False),
            nn.Conv3d(quarter, 3 * eighth, 3, stride=2, padding=1, bias=False),
            nn.Conv3d(3 * eighth, 3 * eighth, 3, padding=1, bias=False),
        )
        self.branch4 = nn.Sequential(
            nn.AvgPool3d(3, stride=1, padding=1, count_include_pad=False),
            nn.Conv3d(in_channels, eighth, 3, stride=2, padding=1, bias=False),
        )
        self.norm = make_norm(norm, channels, norm_groups)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return self.act(self.norm(torch.cat(branches, dim=1)))


class PlainStem3d(nn.Module):
    """The paper's ablation: one 3×3×3 convolution with the block's stride and output channels."""

    def __init__(self, in_channels: int = 1, channels: int = 32, norm: str = "group", norm_groups: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, channels, 3, stride=2, padding=1, bias=False)
        self.norm = make_norm(norm, channels, norm_groups)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def make_stem(kind: str, channels: int, norm: str, norm_groups: int) -> nn.Module:
    """``"inception"`` (the paper) or ``"conv"`` (the ablation of Fig. 8)."""
    if kind == "inception":
        return InceptionBlock3d(1, channels, norm, norm_groups)
    if kind == "conv":
        return PlainStem3d(1, channels, norm, norm_groups)
    raise ValueError(f"unknown stem {kind!r}")
