"""The losses of section IV-E: Dice + focal (equations 6-8), weighted cross-entropy (9), task-aware (10), total (11).

All terms are computed in float32 whatever the autocast precision of the network, and every term is
back-propagated (the authors' code computes its task-aware loss but never back-propagates it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dscovid.model.evidence import select_class
from dscovid.model.geometry import sample_box
from dscovid.model.network import DeepSCOutput
from dscovid.plans.model_config import LossConfig, NetworkConfig


def dice_loss(probability: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per sample, equation 6 with smoothing.

    ``1 - (2 Σ Ŝ·S + smooth) / (Σ Ŝ + Σ S + smooth)`` over all voxels of each sample.

    Parameters
    ----------
    probability, target : (B, ...) tensors in [0, 1]

    Returns
    -------
    (B,) float32 tensor
    """
    p = probability.float().flatten(1)
    t = target.float().flatten(1)
    return 1.0 - (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss per sample, equation 7, averaged over voxels.

    ``-α (1-Ŝ)^γ S log Ŝ - (1-α) Ŝ^γ (1-S) log(1-Ŝ)`` with ``Ŝ = sigmoid(logits)``; the logarithms are taken as
    log-sigmoids of the logits, which stay finite where Ŝ rounds to 0 or 1.

    Parameters
    ----------
    logits, target : (B, ...) tensors (target in [0, 1])

    Returns
    -------
    (B,) float32 tensor
    """
    z = logits.float().flatten(1)
    t = target.float().flatten(1)
    p = torch.sigmoid(z)
    loss = -alpha * (1 - p) ** gamma * t * F.logsigmoid(z) - (1 - alpha) * p**gamma * (1 - t) * F.logsigmoid(-z)
    return loss.mean(1)


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, class_weights: Sequence[float] | torch.Tensor | None = None
) -> torch.Tensor:
    """Equation 9 averaged over the batch: ``mean_b ξ_{y_b} · (-log p̂_{y_b})``.

    The mean divides by the batch size, not by the sum of the weights as ``F.cross_entropy(weight=...)`` does: with
    the paper's batch size of 1 that normalisation would cancel the weights altogether.

    Parameters
    ----------
    logits : (B, K)
    target : (B,) long
    class_weights : (K,) ξ, or None for all 1

    Returns
    -------
    float32 scalar
    """
    per_sample = F.cross_entropy(logits.float(), target.long(), reduction="none")
    if class_weights is not None:
        weights = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
        per_sample = per_sample * weights[target.long()]
    return per_sample.mean()


def task_aware_loss(
    side_outputs: Sequence[torch.Tensor],
    evidence: Sequence[torch.Tensor],
    patch_box: torch.Tensor,
    volume_shape: torch.Tensor,
    eta: Sequence[float] = (0.25, 0.25, 0.5, 1.0),
    scales: Sequence[int] = (1, 2, 3),
    normalise: bool = False,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Equation 10: ``Σ_i η_i · mean((Ŝ_i - CROP(V_i))²)`` over the chosen scales.

    The pairs go by scale, as in the authors' code: Ŝ1 (patch/8, from the U-Net's context features) with the
    deepest evidence mask V3, Ŝ2 (patch/4) with V2, Ŝ3 (patch/2) with the shallowest V1. CROP is the true mapping
    of ``geometry.sample_box``: each evidence mask is sampled over the patch box at its side output's resolution.
    The squared distance is averaged over voxels, so λ_ta does not depend on the patch size.

    Parameters
    ----------
    side_outputs : Ŝ1..Ŝ4 logits (B, 1, ...) (Ŝ4 is not used)
    evidence : V1..V3 of one class per sample, (B, 1, z_l, y_l, x_l), uncropped
    patch_box : (B, 2, 3); volume_shape : (B, 3)
    eta : η1..η4; scales : which i in {1, 2, 3} enter the sum
    normalise : compare ``sigmoid(Ŝ_i)`` with ``relu(V_i) / max(relu(V_i))`` (maximum over the whole uncropped
        mask, per sample), both in [0, 1], instead of the raw values
    sample_weight : (B,) weights of the samples (0 removes a sample); the result is the weighted mean

    Returns
    -------
    float32 scalar
    """
    batch = side_outputs[0].shape[0]
    weight = side_outputs[0].new_ones(batch, dtype=torch.float32) if sample_weight is None else sample_weight.float()
    total = side_outputs[0].new_zeros(batch, dtype=torch.float32)
    for scale in scales:
        side = side_outputs[scale - 1].float()
        mask = evidence[3 - scale].float()
        if normalise:
            side = torch.sigmoid(side)
            mask = torch.relu(mask)
            mask = mask / mask.flatten(1).amax(1).clamp(min=1e-6).view(-1, *([1] * (mask.dim() - 1)))
        cropped = sample_box(mask, patch_box, volume_shape, side.shape[2:])
        total = total + eta[scale - 1] * ((side - cropped) ** 2).flatten(1).mean(1)
    # Weighted mean over samples; multiplying keeps excluded samples in the graph (DistributedDataParallel).
    return (total * weight).sum() / weight.sum().clamp(min=1.0)


@dataclass
class LossTerms:
    """The total loss (to back-propagate) and each term as a float, for the log."""

    total: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)


class DeepSCLoss(nn.Module):
    """Equation 11: ``λ_seg L_seg + λ_cls L_cls + λ_ta L_ta`` for the joint network, or the single-task loss.

    Samples whose lesions were not annotated (``lesion_annotated[b]`` False) contribute no segmentation term; they
    still contribute to the classification and task-aware terms.
    """

    def __init__(self, loss_config: LossConfig | None = None, network_config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.config = loss_config or LossConfig()
        self.network_config = network_config or NetworkConfig()

    def segmentation(
        self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Equation 8 over the annotated samples (mean over them; zero, still connected to the graph, if none)."""
        c = self.config
        target = target.reshape(logits.shape)
        mask = torch.ones(logits.shape[0], device=logits.device) if annotated is None else annotated.to(logits.device).float()
        probability = torch.sigmoid(logits.float())
        focal = focal_loss(logits, target, c.focal_alpha, c.focal_gamma)
        count = mask.sum()
        # Multiplying by the mask (rather than indexing) keeps the graph connected for DistributedDataParallel.
        if c.dice_over == "batch":
            weight = mask.view(-1, *[1] * (probability.ndim - 1))
            batch_dice = dice_loss((probability * weight).reshape(1, -1), (target.float() * weight).reshape(1, -1),
                                   c.dice_smooth)[0] * (count > 0).float()
            dice = batch_dice.expand(logits.shape[0])  # one value, reported per sample for the terms below
            seg = c.lambda_dice * batch_dice + c.lambda_focal * (focal * mask).sum() / count.clamp(min=1.0)
        else:
            dice = dice_loss(probability, target, c.dice_smooth)
            seg = ((c.lambda_dice * dice + c.lambda_focal * focal) * mask).sum() / count.clamp(min=1.0)
        n = max(float(count), 1.0)
        dice, focal = dice.detach(), focal.detach()
        return seg, {"dice": float((dice * mask).sum()) / n, "focal": float((focal * mask).sum()) / n}

    def findings(self, outputs: DeepSCOutput, class_index: torch.Tensor) -> torch.Tensor | None:
        """The findings head's own weighted cross-entropy (unweighted by λ_findings), or None without a head."""
        if outputs.findings_logits is None or self.config.lambda_findings <= 0:
            return None
        return weighted_cross_entropy(outputs.findings_logits, class_index, self.config.class_weights)

    def forward(
        self,
        outputs: DeepSCOutput,
        lesion_target: torch.Tensor | None = None,
        class_index: torch.Tensor | None = None,
        lesion_annotated: torch.Tensor | None = None,
    ) -> LossTerms:
        """Combine the terms.

        Parameters
        ----------
        outputs : DeepSCOutput from the network's forward
        lesion_target : (B, 1, pz, py, px) in [0, 1], the patch's lesion mask (segmentation tasks)
        class_index : (B,) long, the label (classification tasks)
        lesion_annotated : (B,) bool, or None for all annotated
        """
        c = self.config
        eta = self.network_config.side_output_weights
        terms: dict[str, float] = {}
        total = None
        if outputs.lesion_logits is not None:
            seg, parts = self.segmentation(outputs.lesion_logits, lesion_target, lesion_annotated)
            terms.update(seg=float(seg.detach()), **parts)
            total = c.lambda_seg * seg
        if outputs.class_logits is not None:
            cls = weighted_cross_entropy(outputs.class_logits, class_index, c.class_weights)
            terms["cls"] = float(cls.detach())
            total = c.lambda_cls * cls if total is None else total + c.lambda_cls * cls
        findings = self.findings(outputs, class_index)
        if findings is not None:
            terms["findings"] = float(findings.detach())
            total = total + c.lambda_findings * findings
        if outputs.lesion_logits is not None and outputs.class_logits is not None and c.lambda_ta > 0:
            if c.task_aware_class == "predicted":
                chosen = outputs.class_logits.detach().argmax(1)
            else:
                chosen = class_index
            evidence = select_class(outputs.evidence, chosen)
            included = torch.ones_like(chosen, dtype=torch.float32)
            for excluded in c.task_aware_exclude_classes:
                included = included * (chosen != excluded).float()
            ta = task_aware_loss(
                outputs.side_outputs, evidence, outputs.patch_box, outputs.volume_shape, eta, c.task_aware_scales,
                normalise=c.task_aware_normalise, sample_weight=included,
            )
            terms["ta"] = float(ta.detach())
            total = total + c.lambda_ta * ta
        if total is None:
            raise ValueError("the network produced neither a lesion map nor class logits")
        terms["total"] = float(total.detach())
        return LossTerms(total, terms)
