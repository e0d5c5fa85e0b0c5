"""The DeepSC-COVID network: shapes, parameter counts, gradient flow, evidence masks, ablations, inference API."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_GRID, TINY_PATCH, TINY_VOLUME, model_batch, tiny_configuration

from dscovid.errors import DscovidError
from dscovid.model import DeepSCCOVID, NetworkConfig, build_loss, build_network
from dscovid.model.evidence import evidence_masks, select_class
from dscovid.model.geometry import composite, paste_box
from dscovid.plans.presets import preset_configuration
from dscovid.training.trainers import DeepSCCOVIDTrainer_paperLiteral

LOG = logging.getLogger(__name__)

def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_configuration_parameter_count():
    net = build_network(preset_configuration("3d_paper", (1.5, 0.8, 0.8)))
    counts = {name: _count(child) for name, child in net.named_children()}
    LOG.info("3d_paper parameters: %d %s", _count(net), counts)
    # The authors' network: stems 0.0084 M each, lesion subnet 4.73 M, classification subnet 3.49 M (8.2 M).
    assert counts["stem_seg"] == counts["stem_cls"] == 8404
    assert counts["lesion_subnet"] == pytest.approx(4.73e6, rel=0.01)
    assert counts["classification_subnet"] == pytest.approx(3.49e6, rel=0.01)
    assert counts["cross_stitch"] == 4
    assert _count(net) == pytest.approx(8.2e6, rel=0.01)


def test_paper_widths_forward_at_reduced_spatial_size():
    configuration = preset_configuration("3d_paper", (1.5, 0.8, 0.8))
    net = build_network(configuration)
    batch = model_batch(1)
    with torch.no_grad():
        out = net(**batch)
    assert out.lesion_logits.shape == (1, 1, *TINY_PATCH)
    assert [tuple(s.shape[2:]) for s in out.side_outputs] == [(1, 2, 2), (2, 4, 4), (4, 8, 8), TINY_PATCH]
    assert out.class_logits.shape == (1, 3)
    assert [tuple(e.shape) for e in out.evidence] == [(1, 3, 4, 8, 8), (1, 3, 2, 4, 4), (1, 3, 1, 2, 2)]
    assert out.lesion_on_grid.shape == (1, 1, *TINY_GRID)


def test_cpu_configuration_shapes_and_loss():
    configuration = preset_configuration("3d_cpu", (4.0, 3.0, 3.0))
    patch, grid = configuration.segmentation.patch_size_zyx, configuration.classification.grid_zyx
    net = build_network(configuration)
    LOG.info("3d_cpu parameters: %d", _count(net))
    assert 100_000 < _count(net) < 2_000_000
    batch = model_batch(2, patch, grid)
    out = net(**batch)
    assert out.lesion_logits.shape == (2, 1, *patch)
    assert out.class_logits.shape == (2, 3)
    assert [tuple(e.shape[2:]) for e in out.evidence] == [tuple(g // 2**k for g in grid) for k in (2, 3, 4)]
    terms = build_loss(configuration)(out, torch.zeros(2, 1, *patch), torch.tensor([0, 2]), torch.tensor([True, True]))
    # The shipped 3d_cpu preset has the findings head, with its own cross-entropy term, and no task-aware loss.
    assert torch.isfinite(terms.total) and set(terms.terms) == {"seg", "dice", "focal", "cls", "findings", "total"}


def _grads(net: torch.nn.Module, loss_config: dict, annotated=(True, True)) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    configuration = tiny_configuration(loss=loss_config)
    batch = model_batch()
    for key in ("seg_patch", "cls_image"):
        batch[key].requires_grad_(True)
    out = net(**batch)
    target = torch.zeros(2, 1, *TINY_PATCH)
    target[:, :, 2:6, 4:12, 4:12] = 1
    terms = build_loss(configuration)(out, target, torch.tensor([0, 1]), torch.tensor(annotated))
    net.zero_grad()
    terms.total.backward()
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in net.named_parameters()}
    grads["input.seg_patch"] = batch["seg_patch"].grad
    grads["input.cls_image"] = batch["cls_image"].grad
    return grads


def _norm(grads: dict, prefix: str) -> float:
    return sum(float(g.abs().sum()) for name, g in grads.items() if name.startswith(prefix))


@pytest.fixture(scope="module")
def tiny_net() -> DeepSCCOVID:
    torch.manual_seed(0)
    return build_network(tiny_configuration())


def test_joint_loss_trains_all_four_cross_stitch_scalars(tiny_net):
    grads = _grads(tiny_net, {})
    for name in ("w_seg1", "w_cls2", "w_seg2", "w_cls1"):
        assert float(grads[f"cross_stitch.{name}"].abs()) > 0, name


def test_task_aware_loss_reaches_both_subnets_and_cross_stitch(tiny_net):
    # The labels (covid, cap) choose the evidence: an untrained net may predict non-pneumonia, which is excluded.
    grads = _grads(tiny_net, {"lambda_seg": 0.0, "lambda_cls": 0.0, "lambda_ta": 1.0, "task_aware_class": "label"})
    assert _norm(grads, "lesion_subnet.") > 0
    assert _norm(grads, "classification_subnet.units.") > 0
    assert _norm(grads, "classification_subnet.linear") > 0
    assert _norm(grads, "cross_stitch.") > 0
    assert _norm(grads, "stem_seg.") > 0 and _norm(grads, "stem_cls.") > 0


def test_classification_loss_reaches_lesion_subnet_through_s_hat(tiny_net):
    grads = _grads(tiny_net, {"lambda_seg": 0.0, "lambda_cls": 1.0, "lambda_ta": 0.0})
    assert _norm(grads, "lesion_subnet.") > 0
    assert _norm(grads, "stem_seg.") > 0
    for name in ("w_seg1", "w_cls2", "w_seg2", "w_cls1"):
        assert float(grads[f"cross_stitch.{name}"].abs()) > 0, name


def test_detached_lesion_map_stops_the_classification_gradient_at_s_hat():
    # the plain cascade's switch: without the cross-stitch the only path from the classifier to the lesion subnet
    # is Ŝ, so detaching it must leave the segmentation part without gradient, and only then
    for detach, reaches in ((False, True), (True, False)):
        torch.manual_seed(0)
        net = build_network(tiny_configuration({"cross_stitch": False, "detach_lesion_map": detach}))
        grads = _grads(net, {"lambda_seg": 0.0, "lambda_cls": 1.0, "lambda_ta": 0.0})
        assert (_norm(grads, "lesion_subnet.") > 0) is reaches and (_norm(grads, "stem_seg.") > 0) is reaches
        assert _norm(grads, "classification_subnet.") > 0 and _norm(grads, "stem_cls.") > 0


def test_classifier_dropout_acts_in_training_only_and_keeps_the_evidence_exact():
    batch = model_batch()
    torch.manual_seed(0)
    net = build_network(tiny_configuration({"classifier_dropout": 0.5}))
    torch.manual_seed(0)
    plain = build_network(tiny_configuration())
    assert net.state_dict().keys() == plain.state_dict().keys()  # no parameter or buffer of its own
    net.train()
    with torch.no_grad():
        first, second = net(**batch).class_logits, net(**batch).class_logits
    assert not torch.allclose(first, second)  # a new mask each pass
    net.eval()
    with torch.no_grad():
        out = net(**batch)
        torch.testing.assert_close(out.class_logits, net(**batch).class_logits)
    # Equation 5 holds at inference: the evidence masks add up to the subnet's logits.
    subnet_logits = out.class_logits - (out.findings_logits if out.findings_logits is not None else 0)
    summed = sum(v.mean(dim=(2, 3, 4)) for v in out.evidence)
    torch.testing.assert_close(summed, subnet_logits, atol=1e-4, rtol=1e-4)


def test_the_lesion_gate_hides_the_image_away_from_the_lesions_from_the_classifier():
    from dscovid.model.classification_subnet import ClassificationSubnet

    torch.manual_seed(0)
    subnet = ClassificationSubnet(16, (8, 8, 8), 4, 3, "instance", lesion_gate=True).eval()
    features = torch.randn(1, 16, 8, 8, 8)
    lesion = torch.zeros(1, 1, 8, 8, 8)
    lesion[..., 2:4, 2:4, 2:4] = 0.9
    lesion.requires_grad_(True)
    logits, _ = subnet(features, lesion)
    far, near = features.clone(), features.clone()
    far[..., 6:, :, :] += 5.0  # two cells beyond the one-cell dilation of the lesion
    near[..., 4, 3, 3] += 5.0  # inside the dilation, outside the lesion: its margin is seen
    with torch.no_grad():
        torch.testing.assert_close(subnet(far, lesion)[0], logits)
        assert not torch.allclose(subnet(near, lesion)[0], logits)
        no_lesion = torch.zeros_like(lesion)
        torch.testing.assert_close(subnet(features, no_lesion)[0], subnet(torch.randn_like(features), no_lesion)[0])
    logits.sum().backward()
    assert lesion.grad.abs().sum() > 0  # the classification loss still reaches Ŝ through the gate
    # The joint network builds it from network.lesion_gate; the classification-only network has no Ŝ to gate by.
    assert build_network(tiny_configuration({"lesion_gate": True})).classification_subnet.lesion_gate
    assert not build_network(tiny_configuration({"lesion_gate": False})).classification_subnet.lesion_gate
    with pytest.raises(DscovidError, match=r"network\.lesion_gate must be true or false; got 1"):
        build_network(tiny_configuration({"lesion_gate": 1}))


def test_segmentation_loss_reaches_classification_stem_via_cross_stitch(tiny_net):
    grads = _grads(tiny_net, {"lambda_seg": 1.0, "lambda_cls": 0.0, "lambda_ta": 0.0})
    assert _norm(grads, "stem_cls.") > 0
    assert _norm(grads, "classification_subnet.") == 0


def test_cross_stitch_reads_the_classification_features_of_the_patch_region(tiny_net):
    """Sample 0's box covers z 4..12 of 40, i.e. stem-grid slices 0.8..2.4 of 8: only slices 0..3 feed it."""
    batch = model_batch()
    i_cls = tiny_net.encode_classification(batch["cls_image"]).detach().requires_grad_(True)
    seg = tiny_net.segment_patches(batch["seg_patch"], batch["patch_box"], batch["volume_shape"], i_cls)
    seg.lesion_logits[0].sum().backward()
    per_slice = i_cls.grad[0].abs().sum(dim=(0, 2, 3))
    assert float(per_slice[:3].sum()) > 0
    assert float(per_slice[4:].sum()) == 0
    assert float(i_cls.grad[1].abs().sum()) == 0  # and only its own scan


def test_unannotated_sample_gets_no_segmentation_gradient(tiny_net):
    grads = _grads(tiny_net, {"lambda_seg": 1.0, "lambda_cls": 0.0, "lambda_ta": 0.0}, annotated=(True, False))
    assert float(grads["input.seg_patch"][0].abs().sum()) > 0
    assert float(grads["input.seg_patch"][1].abs().sum()) == 0
    # The joint loss still trains on it (classification and task-aware terms).
    joint = _grads(tiny_net, {}, annotated=(True, False))
    assert float(joint["input.seg_patch"][1].abs().sum()) > 0


def test_evidence_masks_are_equation_5(tiny_net):
    batch = model_batch()
    with torch.no_grad():
        out = tiny_net(**batch)
        i_cls = tiny_net.encode_classification(batch["cls_image"])
        features = []
        lesion = torch.nn.functional.adaptive_avg_pool3d(out.lesion_on_grid, i_cls.shape[2:])
        embedded = tiny_net.classification_subnet.feature_embed(
            tiny_net.cross_stitch.w_seg2 * _seg_part(tiny_net, batch, i_cls) + tiny_net.cross_stitch.w_cls1 * i_cls
        )
        assert tiny_net.classification_subnet.lesion_gate  # 3d_cpu's: the features at and around the lesions
        gate = torch.nn.functional.max_pool3d(lesion, 3, stride=1, padding=1)
        x = torch.cat([tiny_net.classification_subnet.lesion_embed(lesion), embedded * gate], dim=1)
        for unit in tiny_net.classification_subnet.units:
            x = unit(x)
            features.append(x)
    weight = tiny_net.classification_subnet.linear.weight
    offsets = [0, 8, 24, 56]
    for level in range(3):
        w = weight[:, offsets[level] : offsets[level + 1]]
        by_hand = torch.einsum("bkzyx,jk->bjzyx", features[level], w)
        torch.testing.assert_close(out.evidence[level], by_hand, atol=1e-5, rtol=1e-5)
    # GAP and the bias-free linear layer commute: each logit is the sum of its evidence masks' spatial means.
    torch.testing.assert_close(out.class_logits, sum(v.mean(dim=(2, 3, 4)) for v in out.evidence), atol=1e-5, rtol=1e-5)
    chosen = select_class(out.evidence, torch.tensor([2, 0]))
    torch.testing.assert_close(chosen[1][1, 0], out.evidence[1][1, 0])
    torch.testing.assert_close(chosen[0][0, 0], out.evidence[0][0, 2])
    assert evidence_masks(features, weight)[2].shape == (2, 3, 1, 2, 2)


def _seg_part(net, batch, i_cls):
    seg = net.segment_patches(batch["seg_patch"], batch["patch_box"], batch["volume_shape"], i_cls)
    values, coverage = paste_box(seg.seg_features, batch["patch_box"], batch["volume_shape"], i_cls.shape[2:])
    return composite(values, coverage, i_cls)


def test_inference_api_reproduces_training_forward(tiny_net):
    batch = model_batch()
    with torch.no_grad():
        out = tiny_net(**batch)
        i_cls = tiny_net.encode_classification(batch["cls_image"])
        seg = tiny_net.segment_patches(batch["seg_patch"], batch["patch_box"], batch["volume_shape"], i_cls)
        torch.testing.assert_close(seg.lesion_logits, out.lesion_logits)
        seg_on_grid, coverage = paste_box(seg.seg_features, batch["patch_box"], batch["volume_shape"], i_cls.shape[2:])
        lesion, lesion_cover = paste_box(seg.lesion_probability, batch["patch_box"], batch["volume_shape"], TINY_GRID)
        lesion_on_grid = composite(lesion, lesion_cover, batch["lesion_context"])
        logits, evidence = tiny_net.classify(i_cls, lesion_on_grid, seg_on_grid, coverage)
    torch.testing.assert_close(logits, out.class_logits)
    torch.testing.assert_close(evidence[0], out.evidence[0])
    # One scan's features shared by several patches (sliding window).
    with torch.no_grad():
        shared = tiny_net.segment_patches(batch["seg_patch"], batch["patch_box"], TINY_VOLUME, i_cls[:1])
        alone = tiny_net.segment_patches(batch["seg_patch"][1:], batch["patch_box"][1:], TINY_VOLUME, i_cls[:1])
    torch.testing.assert_close(shared.lesion_logits[1:], alone.lesion_logits, atol=1e-5, rtol=1e-5)


def test_live_patch_replaces_context_inside_the_box(tiny_net):
    batch = model_batch()
    batch["lesion_context"] = torch.full((2, 1, *TINY_GRID), 0.25)
    with torch.no_grad():
        out = tiny_net(**batch)
    grid = out.lesion_on_grid[0, 0]
    # Sample 0: box z 4..12, y 10..26, x 6..22 of (40, 64, 48) → grid cells z 1.6..4.8, y 5..13, x 4..14.67.
    assert float(grid[0, 0, 0]) == pytest.approx(0.25)
    inside = grid[2:4, 6:12, 5:14]
    probability = torch.sigmoid(out.lesion_logits[0, 0])
    assert float(inside.min()) >= float(probability.min()) - 1e-6
    assert float(inside.max()) <= float(probability.max()) + 1e-6
    assert not torch.allclose(inside, torch.full_like(inside, 0.25))


def test_ablation_switches():
    plain = build_network(tiny_configuration({"stem": "conv"}))
    assert plain.stem_seg.__class__.__name__ == "PlainStem3d"
    no_stitch = build_network(tiny_configuration({"cross_stitch": False}))
    assert not hasattr(no_stitch, "cross_stitch")
    batch = model_batch()
    out = no_stitch(**batch)
    assert out.class_logits.shape == (2, 3)
    seg_only = build_network(tiny_configuration({"tasks": "segmentation"}))
    assert not hasattr(seg_only, "classification_subnet") and not hasattr(seg_only, "stem_cls")
    out = seg_only(batch["seg_patch"])
    assert out.class_logits is None and out.lesion_logits.shape == (2, 1, *TINY_PATCH)
    terms = build_loss(tiny_configuration({"tasks": "segmentation"}))(out, torch.zeros(2, 1, *TINY_PATCH))
    assert set(terms.terms) == {"seg", "dice", "focal", "total"}
    cls_only = build_network(tiny_configuration({"tasks": "classification"}))
    assert not hasattr(cls_only, "lesion_subnet") and not hasattr(cls_only, "stem_seg")
    out = cls_only(cls_image=batch["cls_image"])
    assert out.lesion_logits is None and out.class_logits.shape == (2, 3)
    terms = build_loss(tiny_configuration({"tasks": "classification"}))(out, class_index=torch.tensor([1, 2]))
    assert set(terms.terms) == {"cls", "total"}
    # λ_ta = 0 and single-scale are loss options.
    joint = build_network(tiny_configuration())(**batch)
    assert (
        "ta"
        not in build_loss(tiny_configuration(loss={"lambda_ta": 0}))(joint, torch.zeros(2, 1, *TINY_PATCH), torch.tensor([0, 1])).terms
    )
    single = build_loss(tiny_configuration(loss={"task_aware_scales": [3]}))(joint, torch.zeros(2, 1, *TINY_PATCH), torch.tensor([0, 1]))
    multi = build_loss(tiny_configuration())(joint, torch.zeros(2, 1, *TINY_PATCH), torch.tensor([0, 1]))
    assert single.terms["ta"] != pytest.approx(multi.terms["ta"])



def test_the_network_names_the_parts_of_its_parameters():
    net = build_network(tiny_configuration({"findings_head": True}))
    parts = {name: net.task_of(name) for name, _ in net.named_parameters()}  # raises for a parameter of no part
    assert parts["cross_stitch.w_seg1"] == parts["cross_stitch.w_cls2"] == "segmentation"
    assert parts["cross_stitch.w_cls1"] == parts["cross_stitch.w_seg2"] == "classification"
    assert {parts[n] for n in parts if n.startswith(("stem_seg.", "lesion_subnet."))} == {"segmentation"}
    assert {parts[n] for n in parts if n.startswith(("stem_cls.", "classification_subnet.", "findings_head."))} == {
        "classification"}
    by_id = {id(p): n for n, p in net.named_parameters()}
    segmentation = [by_id[id(p)] for p in net.parameters_of(["segmentation", "seg"])]  # lesion_subnet once
    assert segmentation == [n for n in by_id.values() if n.startswith(("stem_seg.", "lesion_subnet."))]
    assert net.parameters_of(["cls"]) == list(net.classification_subnet.parameters())
    seg_only = build_network(tiny_configuration({"tasks": "segmentation"}))
    assert seg_only.parameters_of(["classification"]) == []  # modules the network lacks contribute nothing
    with pytest.raises(KeyError):
        net.parameters_of(["decoder"])

def test_lesion_context_option():
    batch = model_batch()
    net = build_network(tiny_configuration({"lesion_context": "none"}))
    with torch.no_grad():
        out = net(**{**batch, "lesion_context": None})
    assert float(out.lesion_on_grid[0, 0, 0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="lesion_context"):
        build_network(tiny_configuration())(**{**batch, "lesion_context": None})


def test_configuration_errors_name_the_key():
    with pytest.raises(DscovidError, match=r"network\.widths"):
        build_network(tiny_configuration({"widths": [1, 2, 3]}))
    with pytest.raises(DscovidError, match=r"network\.tasks"):
        build_network(tiny_configuration({"tasks": "both"}))
    with pytest.raises(DscovidError, match=r"segmentation\.patch_size_zyx"):
        build_network(tiny_configuration(patch=(12, 16, 16)))
    with pytest.raises(DscovidError, match=r"classification\.grid_zyx"):
        build_network(tiny_configuration(grid=(16, 32, 40)))
    with pytest.raises(DscovidError, match=r"network\.stem_channels"):
        build_network(tiny_configuration({"stem_channels": 12}))
    with pytest.raises(DscovidError, match=r"network\.norm_groups"):
        build_network(tiny_configuration({"norm": "group", "norm_groups": 3}))
    for bad in (1.0, -0.1, True, "0.5", float("nan")):
        with pytest.raises(DscovidError, match=r"network\.classifier_dropout"):
            build_network(tiny_configuration({"classifier_dropout": bad}))
    # The defaults are the paper's network: what the paper-literal trainer makes of the shipped 3d_paper preset.
    paper = DeepSCCOVIDTrainer_paperLiteral.effective_configuration(preset_configuration("3d_paper", (1.5, 0.8, 0.8)))
    assert paper.network == NetworkConfig() and NetworkConfig.from_dict(paper.network.to_dict()) == paper.network
    # Sizes are only checked for the branches that exist.
    build_network(tiny_configuration({"tasks": "classification"}, patch=(12, 16, 16)))


def test_instance_norm_variant_runs():
    net = build_network(tiny_configuration({"norm": "instance"}))
    out = net(**model_batch())
    assert torch.isfinite(out.class_logits).all()


def test_bfloat16_autocast_on_cpu_keeps_losses_float32(tiny_net):
    batch = model_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_net(**batch)
        terms = build_loss(tiny_configuration())(out, torch.zeros(2, 1, *TINY_PATCH), torch.tensor([0, 1]))
    assert terms.total.dtype == torch.float32 and torch.isfinite(terms.total)
    terms.total.backward()
    assert tiny_net.cross_stitch.w_seg1.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_forward_backward(dtype):
    torch.manual_seed(0)
    configuration = tiny_configuration()
    net = build_network(configuration).cuda()
    batch = {k: (v.cuda() if k in ("seg_patch", "cls_image", "lesion_context") else v) for k, v in model_batch().items()}
    with torch.autocast("cuda", dtype=dtype):
        out = net(**batch)
        terms = build_loss(configuration)(out, torch.zeros(2, 1, *TINY_PATCH, device="cuda"), torch.tensor([0, 1], device="cuda"))
    assert out.side_outputs[-1].dtype == dtype  # the convolutions run in reduced precision
    assert out.lesion_logits.dtype in (dtype, torch.float32)  # CUDA autocast upsamples in float32
    assert terms.total.dtype == torch.float32 and torch.isfinite(terms.total)
    terms.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert float(net.cross_stitch.w_cls2.grad.abs()) > 0
    with torch.no_grad():
        reference = build_network(configuration)
        reference.load_state_dict({k: v.cpu() for k, v in net.state_dict().items()})
        cpu_out = reference(**model_batch())
    torch.testing.assert_close(out.class_logits.float().cpu(), cpu_out.class_logits, atol=0.1, rtol=0.1)


def test_instance_norm_matches_torch_and_accepts_one_voxel_maps():
    from dscovid.model.normalization import make_norm

    norm = make_norm("instance", 8, 2)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    reference = torch.nn.InstanceNorm3d(8, affine=True)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, 8, 3, 4, 5)
    torch.testing.assert_close(norm(x), reference(x), atol=1e-5, rtol=1e-5)
    # Batch 1 with a 1x1x1 map (a DDP rank on a tiny grid): torch's own layers raise; a lone value normalises to 0.
    single = torch.randn(1, 8, 1, 1, 1)
    torch.testing.assert_close(norm(single), norm.bias.view(1, 8, 1, 1, 1).detach().expand(1, 8, 1, 1, 1))
