"""The findings head: the paper's lesion findings measured on Ŝ, standardised, and added to the class logits."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_GRID, TINY_PATCH, model_batch, tiny_configuration

from dscovid.errors import DscovidError
from dscovid.model import build_loss, build_network
from dscovid.model.findings_head import FEATURE_NAMES, FindingsHead, erode_in_plane, lesion_findings
from dscovid.model.geometry import paste_box
from dscovid.training.trainers import get_trainer

GRID_SHAPE = (1, 1, 24, 40, 40)


def _region() -> torch.Tensor:
    region = torch.zeros(GRID_SHAPE)
    region[..., 2:22, 4:36, 2:38] = 0.3  # the scaled image: zero outside the lung region
    return region


def _findings(lesion: torch.Tensor, image: torch.Tensor) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, (float(v) for v in lesion_findings(lesion, image)[0])))


def test_erosion_is_in_plane_and_the_grid_edge_counts_as_outside():
    mask = torch.ones(1, 1, 3, 9, 9)
    eroded = erode_in_plane(mask, 2)
    assert eroded[0, 0].sum(dim=(1, 2)).tolist() == [25.0, 25.0, 25.0]  # 5x5 left in every slice, none lost in z
    assert float(eroded[0, 0, 1, 2:7, 2:7].min()) == 1.0
    assert torch.equal(erode_in_plane(mask, 0), mask)


def test_peripheral_and_central_lesions_are_told_apart():
    image = _region()
    peripheral = torch.zeros(GRID_SHAPE)
    peripheral[..., 8:14, 4:7, 10:20] = 1.0  # against the front edge of the region
    central = torch.zeros(GRID_SHAPE)
    central[..., 8:14, 18:21, 15:25] = 1.0
    p, c = _findings(peripheral, image), _findings(central, image)
    assert p["log_lvr"] == pytest.approx(c["log_lvr"])  # same volume
    for name in FEATURE_NAMES:
        if name.startswith("plr_"):
            assert p[name] > c[name] + 0.25, name
    # One-sided lesion against a pair in both halves.
    both = torch.zeros(GRID_SHAPE)
    both[..., 8:14, 18:21, 6:11] = 1.0
    both[..., 8:14, 18:21, 29:34] = 1.0
    assert _findings(both, image)["bilateral"] == pytest.approx(0.5, abs=0.02)
    assert _findings(peripheral, image)["bilateral"] < 0.1


def test_volume_ratio_and_density_follow_the_lesion():
    image = _region()
    lesion = torch.zeros(GRID_SHAPE)
    lesion[..., 6:16, 10:30, 8:30] = 1.0
    dense = image.clone()
    dense[lesion > 0] = 0.9  # consolidation against ground glass at 0.3
    region_cells = 20 * 32 * 36
    f = _findings(lesion, image)
    assert f["log_lvr"] == pytest.approx(float(torch.log(torch.tensor(10 * 20 * 22 / region_cells))), abs=1e-4)
    assert _findings(lesion, dense)["intensity_mean"] > f["intensity_mean"] + 0.5
    empty = _findings(torch.zeros(GRID_SHAPE), image)
    assert all(v == v and abs(v) < 10 for v in empty.values())  # finite without any lesion
    assert empty["log_lvr"] == pytest.approx(float(torch.log(torch.tensor(1e-3))))


def test_running_standardisation_updates_in_training_only_and_is_saved():
    head = FindingsHead(3)
    image = _region().expand(2, -1, -1, -1, -1).clone()
    lesion = torch.zeros_like(image)
    lesion[0, :, 8:14, 4:7, 10:20] = 1.0
    head.train()
    head(lesion, image)
    features = lesion_findings(lesion, image)
    torch.testing.assert_close(head.running_mean, features.mean(0))  # the first update is a plain average
    before = head.running_mean.clone()
    head.eval()
    head(torch.rand_like(lesion), image)
    torch.testing.assert_close(head.running_mean, before)
    assert {"running_mean", "running_square", "updates"} <= set(head.state_dict())
    assert int(head.updates) == 1


def test_joint_network_adds_the_head_and_its_loss_trains_only_the_head():
    torch.manual_seed(0)
    configuration = tiny_configuration({"findings_head": True})
    net = build_network(configuration)
    batch = model_batch()
    out = net(**batch)
    assert out.findings_logits is not None and out.findings_logits.shape == (2, 3)
    # Zero-initialised: the logits start as the paper's, the sum of the evidence masks.
    torch.testing.assert_close(out.class_logits, sum(v.mean(dim=(2, 3, 4)) for v in out.evidence), atol=1e-5,
                               rtol=1e-5)
    loss = build_loss(configuration)
    terms = loss(out, torch.zeros(2, 1, *TINY_PATCH), torch.tensor([0, 1]), None)
    assert "findings" in terms.terms
    # The findings cross-entropy alone: gradient in the head, none in either subnet (Ŝ enters detached).
    net.zero_grad()
    with torch.no_grad():
        net.findings_head.linear.weight.normal_()
    out = net(**batch)
    torch.nn.functional.cross_entropy(out.findings_logits, torch.tensor([0, 1])).backward()
    assert float(net.findings_head.linear.weight.grad.abs().sum()) > 0
    for name, p in net.named_parameters():
        if not name.startswith("findings_head."):
            assert p.grad is None or float(p.grad.abs().sum()) == 0.0, name
    # The inference API gives the same logits as the training forward when handed the classification image.
    net.eval()
    with torch.no_grad():
        out = net(**batch)
        i_cls = net.encode_classification(batch["cls_image"])
        seg = net.segment_patches(batch["seg_patch"], batch["patch_box"], batch["volume_shape"], i_cls)
        seg_on_grid, coverage = paste_box(seg.seg_features, batch["patch_box"], batch["volume_shape"], i_cls.shape[2:])
        logits, _ = net.classify(i_cls, out.lesion_on_grid, seg_on_grid, coverage, batch["cls_image"])
    assert out.lesion_on_grid.shape[2:] == TINY_GRID
    torch.testing.assert_close(logits, out.class_logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="classification image"):
        net.classify(i_cls, out.lesion_on_grid)


def test_single_task_networks_and_the_paper_default_have_no_head():
    assert build_network(tiny_configuration()).findings_head is None
    for tasks in ("segmentation", "classification"):
        assert build_network(tiny_configuration({"findings_head": True, "tasks": tasks})).findings_head is None
    with pytest.raises(DscovidError, match="network.findings_head"):
        build_network(tiny_configuration({"findings_head": "yes"}))
    with pytest.raises(DscovidError, match="training.loss.lambda_findings"):
        build_loss(tiny_configuration(loss={"lambda_findings": -1}))
    assert get_trainer("DeepSCCOVIDTrainer_findings").overrides["network.findings_head"] is True
    assert get_trainer("DeepSCCOVIDTrainer_noFindings").overrides == {"network.findings_head": False}
