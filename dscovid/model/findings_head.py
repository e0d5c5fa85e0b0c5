"""The findings head: the paper's lesion findings (section III-B), measured on Ŝ, as a second opinion on the class.

Section III-B of the paper separates COVID-19 from CAP by four findings of the lesions: how many, how much of the
lung (lesion volume ratio), how dense (HU distribution) and how peripheral (peripheral lesion ratio, equation 1).
The classification subnet only sees Ŝ through 1×1 convolutions at its stem resolution followed by global average
pooling, which loses exactly where a lesion lies relative to the pleura. This head measures the findings on the
classification grid, differentiably in Ŝ, and adds a linear term per class to the subnet's logits:

    logits = Σ evidence (equation 5) + W_f · findings(Ŝ, I) + b_f

It is off by default (the paper's network); ``network.findings_head: true`` turns it on. It needs Ŝ, so only the
joint network has it. Ŝ enters detached: the head judges the segmentation, it does not train it.

The measurements (all from the classification grid: ``I`` the scaled image, zero outside the lung region, Ŝ the
lesion probability):

- ``log_lvr``: log of ΣŜ / Σ region (lesion volume ratio), floored at 1e-3;
- ``plr_d``: share of ΣŜ within ``d`` in-plane cells of the region's edge, for ``d`` = 2, 4, 8, 16 % of the grid
  width (the PLR curve of Fig. 1 g over a few thicknesses, eroding in-plane as equation 1);
- ``intensity_mean`` and ``intensity_std``: of I weighted by Ŝ (ground glass against consolidation);
- ``spread``: Ŝ-weighted spatial standard deviation, in grid widths (scattered against focal lesions);
- ``bilateral``: the smaller lung half's share of ΣŜ (0 one-sided, 0.5 even).

Every ratio has a small prior mass ``ε`` (0.1 % of the region) at the region's own value, so a scan without
lesions gives finite, stable features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Peripheral depths as fractions of the classification grid's in-plane width.
PERIPHERAL_FRACTIONS = (0.02, 0.04, 0.08, 0.16)
FEATURE_NAMES = ("log_lvr", *(f"plr_{int(f * 100)}pct" for f in PERIPHERAL_FRACTIONS),
                 "intensity_mean", "intensity_std", "spread", "bilateral")
_REGION_THRESHOLD = 1e-3


def erode_in_plane(mask: torch.Tensor, cells: int) -> torch.Tensor:
    """Binary erosion of (B, 1, N, H, W) by a (2·cells + 1)² square in each axial plane (outside counts as empty)."""
    if cells <= 0:
        return mask
    k = 2 * cells + 1
    inverse = 1.0 - mask
    inverse = F.max_pool3d(inverse, (1, k, 1), stride=1, padding=(0, cells, 0))
    inverse = F.max_pool3d(inverse, (1, 1, k), stride=1, padding=(0, 0, cells))
    # max_pool pads with -inf, so the border of the grid would not erode: treat outside the grid as empty.
    eroded = 1.0 - inverse
    eroded[..., :cells, :] = 0.0
    eroded[..., -cells:, :] = 0.0
    eroded[..., :, :cells] = 0.0
    eroded[..., :, -cells:] = 0.0
    return eroded


def lesion_findings(lesion: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The findings vector (B, len(FEATURE_NAMES)) of Ŝ ``lesion`` and ``image`` (both (B, 1, N, H, W)), float32."""
    lesion, image = lesion.float(), image.float()
    region = (image > _REGION_THRESHOLD).float()
    s = lesion * region
    dims = (1, 2, 3, 4)
    region_sum = region.sum(dims).clamp(min=1.0)
    eps = 1e-3 * region_sum
    total = s.sum(dims)
    weight = total + eps

    def weighted_mean(values: torch.Tensor) -> torch.Tensor:
        prior = (values * region).sum(dims) / region_sum
        return ((s * values).sum(dims) + eps * prior) / weight

    features = [torch.log((total / region_sum).clamp(min=1e-3))]
    width = image.shape[-1]
    for fraction in PERIPHERAL_FRACTIONS:
        cells = max(1, round(fraction * width))
        features.append(weighted_mean(region - erode_in_plane(region, cells)))
    mean = weighted_mean(image)
    variance = weighted_mean(image * image) - mean * mean
    features += [mean, variance.clamp(min=0.0).sqrt()]
    n, h, w = image.shape[2:]
    axes = [torch.linspace(0.0, 1.0, size, device=image.device) for size in (n, h, w)]
    spread_sq = torch.zeros_like(total)
    for axis, coordinate in enumerate(axes):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = -1
        c = coordinate.view(shape).expand_as(image)
        m = weighted_mean(c)
        spread_sq = spread_sq + (weighted_mean(c * c) - m * m).clamp(min=0.0)
    features.append(spread_sq.sqrt())
    left = (s[..., : w // 2].sum(dims) + 0.5 * eps) / weight
    features.append(torch.minimum(left, 1.0 - left))
    return torch.stack(features, dim=1)


class FindingsHead(nn.Module):
    """``W_f · z + b_f``, z the findings of :func:`lesion_findings` standardised by running statistics.

    The findings have unrelated scales (log ratios around -5, shares in [0, 1]); a plain linear layer on them
    barely moved at the fine-tuning learning rate. Training updates a running mean and mean square of each
    finding (a cumulative average for the first 1/momentum steps, then an exponential one), and every forward
    standardises with them; they are buffers, so they travel in the checkpoint. Weights start at zero: the
    untrained head adds nothing to the paper's logits.
    """

    def __init__(self, num_classes: int = 3, momentum: float = 0.01) -> None:
        super().__init__()
        count = len(FEATURE_NAMES)
        self.momentum = momentum
        self.linear = nn.Linear(count, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("running_mean", torch.zeros(count))
        self.register_buffer("running_square", torch.ones(count))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def standardise(self, findings: torch.Tensor) -> torch.Tensor:
        """Update the running statistics (in training) and standardise ``findings`` (B, F) with them."""
        if self.training:
            with torch.no_grad():
                rate = max(self.momentum, 1.0 / float(self.updates + 1))
                self.running_mean.lerp_(findings.mean(0), rate)
                self.running_square.lerp_((findings * findings).mean(0), rate)
                self.updates += 1
        variance = (self.running_square - self.running_mean ** 2).clamp(min=1e-4)
        return (findings - self.running_mean) / variance.sqrt()

    def forward(self, lesion_on_grid: torch.Tensor, cls_image: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) from Ŝ on the classification grid (detached) and the classification image."""
        with torch.autocast(device_type=cls_image.device.type, enabled=False):
            return self.linear(self.standardise(lesion_findings(lesion_on_grid.detach(), cls_image)))
