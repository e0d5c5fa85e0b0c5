"""The classification subnet (the paper's Fig. 5): Ŝ with the C-features, three residual encoder units, equation 4."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dscovid.model.normalization import make_norm


class EncoderUnit3d(nn.Module):
    """Residual 3D encoder unit (the authors' ``BasicBlock``).

    ``h = conv_s2(x)``; ``y = ReLU(norm(conv(ReLU(norm(h)))) + h)``: the shortcut is taken after the strided
    convolution, so no projection is needed when the channels change. Output ``(B, out, ceil(D/2), ...)``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "group", norm_groups: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels, norm_groups)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv1(x)
        y = self.norm2(self.conv2(F.relu(self.norm1(shortcut))))
        return F.relu(y + shortcut)


class ClassificationSubnet(nn.Module):
    """Ŝ and C-features → three encoder units → GAP of each, concatenated → one linear layer (equation 4).

    Parameters
    ----------
    in_channels : int
        Channels of the C-features (the stem's, paper 32).
    widths : (w1, w2, w3)
        Encoder unit widths (paper 64, 128, 256; the GAP vector has w1 + w2 + w3 = 448 entries).
    lesion_channels : int
        Channels the lesion map is embedded to before concatenation (paper code: 16, with the C-features reduced to
        ``in_channels - lesion_channels``). 0 builds the classification-only network of Table II (no Ŝ input).
    num_classes : int
        K (3: covid, cap, non_pneumonia).
    dropout : float
        Dropout on the pooled vector before the linear layer, in training only (0: none, as the paper).
    lesion_gate : bool
        Multiply the embedded C-features by the lesion map on their grid, dilated by one cell (a 3×3×3 maximum), so
        that the subnet sees the image only at and around the lesions (not in the paper; needs ``lesion_channels``).

    The linear layer has no bias, as equation 4 is written; the evidence masks (equation 5) then add up exactly to
    the logits.
    """

    def __init__(
        self,
        in_channels: int = 32,
        widths: Sequence[int] = (64, 128, 256),
        lesion_channels: int = 16,
        num_classes: int = 3,
        norm: str = "group",
        norm_groups: int = 2,
        dropout: float = 0.0,
        lesion_gate: bool = False,
    ) -> None:
        super().__init__()
        self.dropout = float(dropout)
        self.uses_lesion = lesion_channels > 0
        self.lesion_gate = bool(lesion_gate) and self.uses_lesion
        if self.uses_lesion:
            if not 0 < lesion_channels < in_channels:
                raise ValueError("lesion_channels must be between 0 and the stem channels")
            self.lesion_embed = nn.Conv3d(1, lesion_channels, 1)
            self.feature_embed = nn.Conv3d(in_channels, in_channels - lesion_channels, 1)
        else:
            self.feature_embed = nn.Conv3d(in_channels, in_channels, 1)
        channels = [in_channels, *(int(w) for w in widths)]
        self.units = nn.ModuleList([EncoderUnit3d(channels[i], channels[i + 1], norm, norm_groups) for i in range(len(widths))])
        self.linear = nn.Linear(sum(channels[1:]), num_classes, bias=False)

    def forward(
        self, c_features: torch.Tensor, lesion_on_grid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Classify.

        Parameters
        ----------
        c_features : (B, C0, n/2, h/2, w/2)
            C-features at the stem resolution of the classification grid.
        lesion_on_grid : (B, 1, n, h, w) or None
            Lesion probability on the classification grid (Ŝ inside the patch box, context outside); required when
            the subnet was built with ``lesion_channels > 0``.

        Returns
        -------
        logits : (B, K)
            Softmax of these is equation 4.
        encoder_features : three tensors (B, w_l, n/2^(l+1), ...)
            F_e1..F_e3, for the evidence masks.
        """
        x = self.feature_embed(c_features)
        if self.uses_lesion:
            if lesion_on_grid is None:
                raise ValueError("this classification subnet needs the lesion map on the classification grid")
            lesion = lesion_on_grid.to(c_features.dtype)
            if lesion.shape[2:] != c_features.shape[2:]:
                # Area average: the lesion fraction of each feature cell.
                lesion = F.adaptive_avg_pool3d(lesion, c_features.shape[2:])
            if self.lesion_gate:
                x = x * F.max_pool3d(lesion, 3, stride=1, padding=1)
            x = torch.cat([self.lesion_embed(lesion), x], dim=1)
        features = []
        for unit in self.units:
            x = unit(x)
            features.append(x)
        pooled = torch.cat([f.mean(dim=(2, 3, 4)) for f in features], dim=1)
        if self.dropout > 0:
            pooled = F.dropout(pooled, self.dropout, self.training)
        return self.linear(pooled), features
