"""Losses of section IV-E against hand-computed values, and the configuration of the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_configuration

from dscovid.errors import DscovidError
from dscovid.model import DeepSCLoss, DeepSCOutput, LossConfig, build_loss
from dscovid.model.losses import dice_loss, focal_loss, task_aware_loss, weighted_cross_entropy


def test_dice_hand_computed():
    probability = torch.tensor([[0.9, 0.2, 0.6, 0.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # Sample 0: intersection 1.5, sums 1.7 + 2 -> 1 - (3 + 1) / (3.7 + 1); sample 1: empty and empty -> 0.
    expected = torch.tensor([1 - 4.0 / 4.7, 0.0])
    torch.testing.assert_close(dice_loss(probability, target, smooth=1.0), expected)
    # Without smoothing it is equation 6 exactly.
    assert float(dice_loss(probability[:1], target[:1], smooth=0.0)) == pytest.approx(1 - 3.0 / 3.7)


def test_focal_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    alpha, gamma = 0.25, 2.0
    p = [1 / (1 + math.exp(-z)) for z in (2.0, -1.0, 0.5)]
    terms = [
        -alpha * (1 - p[0]) ** gamma * math.log(p[0]),
        -(1 - alpha) * p[1] ** gamma * math.log(1 - p[1]),
        -(1 - alpha) * p[2] ** gamma * math.log(1 - p[2]),
    ]
    assert float(focal_loss(logits, target, alpha, gamma)) == pytest.approx(sum(terms) / 3, rel=1e-5)
    # gamma = 0, alpha = 0.5 is half the binary cross-entropy.
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert float(focal_loss(logits, target, 0.5, 0.0)) == pytest.approx(0.5 * float(bce), rel=1e-5)


def test_focal_stays_finite_for_saturated_logits():
    logits = torch.tensor([[60.0, -60.0]], requires_grad=True)
    loss = focal_loss(logits, torch.tensor([[0.0, 1.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert float(loss.detach()) > 10


def test_weighted_cross_entropy_matches_torch_sum_over_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 3)
    target = torch.tensor([0, 2, 1, 1, 0])
    weights = [0.5, 1.5, 2.0]
    reference = F.cross_entropy(logits, target, weight=torch.tensor(weights), reduction="sum") / 5
    assert float(weighted_cross_entropy(logits, target, weights)) == pytest.approx(float(reference), rel=1e-6)
    # Batch size 1 (the paper's): the weight still scales the loss (torch's weighted mean would cancel it).
    single = weighted_cross_entropy(logits[1:2], target[1:2], weights)
    assert float(single) == pytest.approx(2.0 * float(F.cross_entropy(logits[1:2], target[1:2])), rel=1e-6)
    assert float(weighted_cross_entropy(logits, target)) == pytest.approx(float(F.cross_entropy(logits, target)))


def test_task_aware_loss_pairs_scales_and_crops_by_geometry():
    """Box = whole volume, evidence at the side outputs' sizes: equation 10 is the η-weighted MSE by scale."""
    torch.manual_seed(0)
    sides = [torch.randn(1, 1, 2, 2, 2), torch.randn(1, 1, 4, 4, 4), torch.randn(1, 1, 8, 8, 8), torch.randn(1, 1, 16, 16, 16)]
    evidence = [torch.randn(1, 1, 8, 8, 8), torch.randn(1, 1, 4, 4, 4), torch.randn(1, 1, 2, 2, 2)]
    box = torch.tensor([[[0.0, 0, 0], [16, 16, 16]]], dtype=torch.float64)
    shape = torch.tensor([[16.0, 16, 16]], dtype=torch.float64)
    eta = (0.25, 0.25, 0.5, 1.0)
    expected = sum(eta[i] * float(((sides[i] - evidence[2 - i]) ** 2).mean()) for i in range(3))
    assert float(task_aware_loss(sides, evidence, box, shape, eta)) == pytest.approx(expected, rel=1e-5)
    single = 0.5 * float(((sides[2] - evidence[0]) ** 2).mean())
    assert float(task_aware_loss(sides, evidence, box, shape, eta, scales=(3,))) == pytest.approx(single, rel=1e-5)
    # A box on one octant reads the evidence of that octant.
    octant = torch.tensor([[[8.0, 0, 8], [8, 8, 8]]], dtype=torch.float64)
    crop = evidence[0][:, :, 4:, :4, 4:]
    expected_octant = 0.5 * float(((sides[1] - crop) ** 2).mean())
    got = task_aware_loss([sides[0], sides[1], sides[1]], evidence, octant, shape, eta, scales=(3,))
    assert float(got) == pytest.approx(expected_octant, rel=1e-5)


def test_normalised_task_aware_loss_by_hand_and_excluded_samples():
    """sigmoid(Ŝ) against relu(V)/max(relu(V)) (max over the whole mask), weighted mean over samples."""
    torch.manual_seed(1)
    sides = [torch.randn(2, 1, 2, 2, 2), torch.randn(2, 1, 4, 4, 4), torch.randn(2, 1, 8, 8, 8), torch.randn(2, 1, 16, 16, 16)]
    evidence = [torch.randn(2, 1, 8, 8, 8) * 50, torch.randn(2, 1, 4, 4, 4) * 50, torch.randn(2, 1, 2, 2, 2) * 50]
    box = torch.tensor([[[0.0, 0, 0], [16, 16, 16]]] * 2, dtype=torch.float64)
    shape = torch.tensor([[16.0, 16, 16]] * 2, dtype=torch.float64)
    eta = (0.25, 0.25, 0.5, 1.0)

    def by_hand(b):
        total = 0.0
        for i in range(3):
            v = evidence[2 - i][b].clamp(min=0)
            v = v / v.max()
            total += eta[i] * float(((torch.sigmoid(sides[i][b]) - v) ** 2).mean())
        return total

    got = task_aware_loss(sides, evidence, box, shape, eta, normalise=True)
    assert float(got) == pytest.approx((by_hand(0) + by_hand(1)) / 2, rel=1e-5)
    only_first = task_aware_loss(sides, evidence, box, shape, eta, normalise=True, sample_weight=torch.tensor([1.0, 0.0]))
    assert float(only_first) == pytest.approx(by_hand(0), rel=1e-5)
    # The scale of the class activations no longer matters.
    scaled = task_aware_loss(sides, [e * 1000 for e in evidence], box, shape, eta, normalise=True)
    assert float(scaled) == pytest.approx(float(got), rel=1e-5)


def test_non_pneumonia_samples_get_no_task_aware_gradient():
    out = _outputs()
    with torch.no_grad():
        out.class_logits[:] = torch.tensor([[5.0, 0, 0], [0, 0, 5.0]])  # predicted covid, non-pneumonia
    terms = DeepSCLoss(LossConfig(lambda_seg=0.0, lambda_cls=0.0))(out, torch.zeros(2, 1, 8, 16, 16), torch.tensor([0, 2]))
    terms.total.backward()
    assert out.side_outputs[0].grad[0].abs().max() > 0
    assert out.side_outputs[0].grad[1].abs().max() == 0


def _outputs(batch: int = 2) -> DeepSCOutput:
    torch.manual_seed(0)
    side_sizes = [(1, 2, 2), (2, 4, 4), (4, 8, 8), (8, 16, 16)]
    return DeepSCOutput(
        lesion_logits=torch.randn(batch, 1, 8, 16, 16, requires_grad=True),
        side_outputs=[torch.randn(batch, 1, *s, requires_grad=True) for s in side_sizes],
        class_logits=torch.randn(batch, 3, requires_grad=True),
        evidence=[torch.randn(batch, 3, *s, requires_grad=True) for s in [(4, 8, 8), (2, 4, 4), (1, 2, 2)]],
        patch_box=torch.tensor([[[0.0, 0, 0], [8, 16, 16]]] * batch, dtype=torch.float64),
        volume_shape=torch.tensor([[16.0, 32, 32]] * batch, dtype=torch.float64),
    )


def test_total_is_equation_11_and_skips_unannotated_segmentation():
    out = _outputs()
    target = (torch.rand(2, 1, 8, 16, 16) > 0.7).float()
    labels = torch.tensor([0, 1])
    config = LossConfig(lambda_seg=2.0, lambda_cls=3.0, lambda_ta=10.0, focal_alpha=0.6, task_aware_exclude_classes=())
    loss = DeepSCLoss(config)
    both = loss(out, target, labels, torch.tensor([True, True]))
    t = both.terms
    assert t["total"] == pytest.approx(2.0 * t["seg"] + 3.0 * t["cls"] + 10.0 * t["ta"], rel=1e-5)
    first_only = loss(out, target, labels, torch.tensor([True, False]))
    with torch.no_grad():
        seg0 = float(
            dice_loss(torch.sigmoid(out.lesion_logits[:1]), target[:1]) + focal_loss(out.lesion_logits[:1], target[:1], 0.6)
        )
    assert first_only.terms["seg"] == pytest.approx(seg0, rel=1e-5)
    first_only.total.backward()
    assert out.lesion_logits.grad[1].abs().max() == 0  # no segmentation gradient from the unannotated sample
    assert out.lesion_logits.grad[0].abs().max() > 0
    assert out.side_outputs[0].grad[1].abs().max() > 0  # the task-aware term still applies to it
    assert out.class_logits.grad[1].abs().max() > 0  # and the classification term
    none = loss(_outputs(), target, labels, torch.tensor([False, False]))
    assert none.terms["seg"] == 0.0
    assert none.terms["total"] == pytest.approx(3.0 * none.terms["cls"] + 10.0 * none.terms["ta"], rel=1e-5)


def test_task_aware_uses_predicted_or_label_class():
    out = _outputs(1)
    predicted = int(out.class_logits.argmax(1))
    label = (predicted + 1) % 3
    terms_pred = DeepSCLoss(LossConfig(task_aware_class="predicted"))(out, torch.zeros(1, 1, 8, 16, 16), torch.tensor([label]))
    terms_label = DeepSCLoss(LossConfig(task_aware_class="label"))(out, torch.zeros(1, 1, 8, 16, 16), torch.tensor([label]))
    expected = float(
        task_aware_loss(
            out.side_outputs, [e[:, predicted : predicted + 1] for e in out.evidence], out.patch_box, out.volume_shape,
            normalise=True, sample_weight=torch.tensor([float(predicted != 2)]),
        ).detach()
    )
    assert terms_pred.terms["ta"] == pytest.approx(expected, rel=1e-5)
    assert terms_label.terms["ta"] != pytest.approx(expected, rel=1e-3)
    assert "ta" not in DeepSCLoss(LossConfig(lambda_ta=0.0))(out, torch.zeros(1, 1, 8, 16, 16), torch.tensor([0])).terms


def test_losses_are_float32_under_bfloat16():
    out = _outputs()
    half = DeepSCOutput(
        lesion_logits=out.lesion_logits.bfloat16(),
        side_outputs=[s.bfloat16() for s in out.side_outputs],
        class_logits=out.class_logits.bfloat16(),
        evidence=[e.bfloat16() for e in out.evidence],
        patch_box=out.patch_box,
        volume_shape=out.volume_shape,
    )
    terms = DeepSCLoss()(half, torch.zeros(2, 1, 8, 16, 16), torch.tensor([0, 1]))
    assert terms.total.dtype == torch.float32


def test_build_loss_reads_training_section_and_refuses_unknown_keys():
    configuration = tiny_configuration(loss={"lambda_ta": 1.0, "task_aware_scales": [3]}, class_weights=(0.5, 1.0, 2.0))
    loss = build_loss(configuration)
    assert loss.config.lambda_ta == 1.0 and loss.config.task_aware_scales == (3,)
    assert loss.config.class_weights == (0.5, 1.0, 2.0)
    with pytest.raises(DscovidError, match=r"training\.loss\.lambda_tA"):
        tiny_configuration(loss={"lambda_tA": 1.0})
    with pytest.raises(DscovidError, match=r"training\.loss\.task_aware_scales"):
        tiny_configuration(loss={"task_aware_scales": [4]})
    with pytest.raises(DscovidError, match="class_weights"):
        tiny_configuration(class_weights=(1.0, 1.0))
    with pytest.raises(DscovidError, match="focal_alpha"):
        tiny_configuration(loss={"focal_alpha": 1.5})


def test_batch_dice_sums_over_the_annotated_samples_and_keeps_gradient_on_empty_patches():
    logits = torch.randn(3, 1, 4, 8, 8, requires_grad=True)
    target = torch.zeros(3, 1, 4, 8, 8)
    target[0, :, 1:3, 2:6, 2:6] = 1  # sample 1 holds no lesion, sample 2 is not annotated
    annotated = torch.tensor([True, True, False])
    per_batch = DeepSCLoss(LossConfig(dice_over="batch", focal_alpha=0.6))
    seg, parts = per_batch.segmentation(logits, target, annotated)
    p = torch.sigmoid(logits.detach())
    intersection = (p[:2] * target[:2]).sum()
    dice = 1 - (2 * intersection + 1) / (p[:2].sum() + target[:2].sum() + 1)
    focal = focal_loss(logits.detach()[:2], target[:2], 0.6).mean()
    assert float(seg) == pytest.approx(float(dice + focal), rel=1e-5)
    assert parts["dice"] == pytest.approx(float(dice), rel=1e-5)
    seg.backward()
    grad = logits.grad
    assert grad[2].abs().max() == 0  # the unannotated sample gets no segmentation gradient
    # The empty patch's Dice gradient: per sample it all but vanishes (saturated at 1), over the batch it does not.
    logits.grad = None
    per_sample = DeepSCLoss(LossConfig(dice_over="sample", lambda_focal=0.0))
    per_sample.segmentation(logits, target, annotated)[0].backward()
    sample_grad = logits.grad[1].abs().mean()
    logits.grad = None
    DeepSCLoss(LossConfig(dice_over="batch", lambda_focal=0.0)).segmentation(logits, target, annotated)[0].backward()
    assert logits.grad[1].abs().mean() > 10 * sample_grad
    with pytest.raises(DscovidError, match="dice_over"):
        LossConfig.from_dict({"dice_over": "voxel"})
