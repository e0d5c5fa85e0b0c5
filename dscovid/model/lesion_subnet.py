"""The 3D lesion subnet (the paper's Fig. 4): a U-Net with four side outputs fused by equation 3."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dscovid.model.normalization import make_norm


def conv_norm_relu(in_channels: int, out_channels: int, norm: str, norm_groups: int) -> nn.Sequential:
    """3×3×3 convolution, normalisation, ReLU (the authors' ``LUConv``, with a batch-independent norm)."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
        make_norm(norm, out_channels, norm_groups),
        nn.ReLU(inplace=True),
    )


class LesionSubnet(nn.Module):
    """U-Net over the L-features with three down and three up transitions and four side outputs.

    With input channels ``C0`` (the stem's, paper 32) and ``widths = (w1, w2, w3)`` (paper 64, 128, 256), for
    L-features of shape ``(B, C0, d, h, w)`` (half the patch size ``(2d, 2h, 2w)``):

    ===========  ==================================  ===============  =================
    unit         channels                            shape            side output
    ===========  ==================================  ===============  =================
    down 1       C0 → w1/2 → w1 (skip), max-pool    d                 -
    down 2       w1 → w2/2 → w2 (skip), max-pool    d/2               -
    down 3       w2 → w3/2 → w3 (context features)  d/4               Ŝ1 (patch / 8)
    up 1         deconv w3, + skip w2 → w2 → w2     d/2               Ŝ2 (patch / 4)
    up 2         deconv w2, + skip w1 → w1 → w1     d                 Ŝ3 (patch / 2)
    up 3         deconv w1, no skip → C0 → C0       2d (patch size)   Ŝ4 (patch)
    ===========  ==================================  ===============  =================

    Each side output is a 1×1×1 convolution to one lesion logit. Equation 3 fuses them:
    ``Ŝ = sigmoid(Σ_i η_i · UP(Ŝ_i, 2^(4-i)))`` with trilinear upscaling. The forward returns the fused *logits*
    (the sigmoid is taken where it is needed, so the losses can use the numerically stable log-sigmoid).
    """

    def __init__(
        self,
        in_channels: int = 32,
        widths: Sequence[int] = (64, 128, 256),
        side_output_weights: Sequence[float] = (0.25, 0.25, 0.5, 1.0),
        norm: str = "group",
        norm_groups: int = 2,
    ) -> None:
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        c0 = int(in_channels)
        self.eta = tuple(float(e) for e in side_output_weights)
        if len(self.eta) != 4:
            raise ValueError("side_output_weights needs four values (η1..η4)")

        def pair(cin: int, cmid: int, cout: int) -> nn.Sequential:
            return nn.Sequential(conv_norm_relu(cin, cmid, norm, norm_groups), conv_norm_relu(cmid, cout, norm, norm_groups))

        self.down1 = pair(c0, w1 // 2, w1)
        self.down2 = pair(w1, w2 // 2, w2)
        self.down3 = pair(w2, w3 // 2, w3)
        self.deconv1 = nn.ConvTranspose3d(w3, w3, 2, stride=2)
        self.up1 = pair(w3 + w2, w2, w2)
        self.deconv2 = nn.ConvTranspose3d(w2, w2, 2, stride=2)
        self.up2 = pair(w2 + w1, w1, w1)
        self.deconv3 = nn.ConvTranspose3d(w1, w1, 2, stride=2)
        self.up3 = pair(w1, c0, c0)
        self.side_outputs = nn.ModuleList([nn.Conv3d(c, 1, 1) for c in (w3, w2, w1, c0)])

    def forward(self, l_features: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Segment one batch of L-features.

        Parameters
        ----------
        l_features : (B, C0, d, h, w)
            With d, h, w divisible by 4.

        Returns
        -------
        fused_logits : (B, 1, 2d, 2h, 2w)
            The argument of the sigmoid in equation 3.
        side_outputs : list of four tensors
            Ŝ1..Ŝ4 logits, shapes ``(B, 1, d/4·2^(i-1), ...)``: patch/8, patch/4, patch/2, patch.
        """
        skip1 = self.down1(l_features)
        skip2 = self.down2(F.max_pool3d(skip1, 2))
        context = self.down3(F.max_pool3d(skip2, 2))
        up1 = self.up1(torch.cat([self.deconv1(context), skip2], dim=1))
        up2 = self.up2(torch.cat([self.deconv2(up1), skip1], dim=1))
        up3 = self.up3(self.deconv3(up2))
        sides = [head(x) for head, x in zip(self.side_outputs, (context, up1, up2, up3))]
        size = sides[-1].shape[2:]
        fused = sum(
            eta * (s if s.shape[2:] == size else F.interpolate(s, size=size, mode="trilinear", align_corners=False))
            for eta, s in zip(self.eta, sides)
        )
        return fused, sides
