"""The cross-stitch unit (equation 2): four learnable scalars mixing the two tasks' features."""

from __future__ import annotations

import torch
from torch import nn


class CrossStitch(nn.Module):
    """``F_seg = w_seg1 * I_seg + w_cls2 * I_cls`` and ``F_cls = w_seg2 * I_seg + w_cls1 * I_cls``.

    The inputs are already dimension-matched (``dscovid.model.geometry`` maps each task's features onto the other's
    region and resolution). The authors' code leaves the scalars uninitialised (``torch.Tensor(1)``) and never steps
    two of them; here they start at a mix that keeps each task mostly its own (``self_weight``, ``other_weight``),
    and receive gradients from every loss that depends on them.
    """

    def __init__(self, self_weight: float = 0.9, other_weight: float = 0.1) -> None:
        super().__init__()
        self.w_seg1 = nn.Parameter(torch.tensor(float(self_weight)))
        self.w_cls2 = nn.Parameter(torch.tensor(float(other_weight)))
        self.w_seg2 = nn.Parameter(torch.tensor(float(other_weight)))
        self.w_cls1 = nn.Parameter(torch.tensor(float(self_weight)))

    def segmentation(self, i_seg: torch.Tensor, i_cls_on_patch: torch.Tensor) -> torch.Tensor:
        """L-features ``F_seg``: segmentation features ``(B, C, ...)`` mixed with classification features there."""
        return self.w_seg1 * i_seg + self.w_cls2 * i_cls_on_patch

    def classification(self, i_cls: torch.Tensor, i_seg_on_grid: torch.Tensor) -> torch.Tensor:
        """C-features ``F_cls``: classification features mixed with segmentation features on the same grid."""
        return self.w_seg2 * i_seg_on_grid + self.w_cls1 * i_cls

    def forward(
        self, i_seg: torch.Tensor, i_cls_on_patch: torch.Tensor, i_cls: torch.Tensor, i_seg_on_grid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs of equation 2: ``(F_seg, F_cls)``."""
        return self.segmentation(i_seg, i_cls_on_patch), self.classification(i_cls, i_seg_on_grid)
