"""The network's precision per device: the rule, the switch, and bfloat16 on the CPU against float32."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import save_fake_model

from dscovid.errors import DscovidError
from dscovid.inference.engine import run_networks
from dscovid.inference.model_loading import load_trained_model
from dscovid.model import build_loss, build_network, precision
from dscovid.plans.presets import preset_configuration
from dscovid.prediction.predict import predict_cases

needs_bfloat16 = pytest.mark.skipif(not precision.cpu_has_native_bfloat16(),
                                    reason="this CPU has no native bfloat16 (AMX or AVX-512 BF16)")


def test_the_rule_per_device(monkeypatch):
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    assert precision.autocast_dtype("cuda") == torch.float16
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)
    assert precision.autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: False)
    assert precision.autocast_dtype("cpu") is None  # emulated bfloat16 would be slower than float32
    assert isinstance(precision.autocast("cpu"), type(precision.contextlib.nullcontext()))


def test_the_environment_switch(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)
    monkeypatch.setenv(precision.PRECISION_ENV, "Float32")
    assert precision.autocast_dtype("cpu") is None and precision.autocast_dtype("cuda") is None
    monkeypatch.setenv(precision.PRECISION_ENV, "auto")
    assert precision.autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv(precision.PRECISION_ENV, "half")
    with pytest.raises(ValueError, match="DSCOVID_PRECISION='half': must be one of auto, float32"):
        precision.autocast_dtype("cpu")


@needs_bfloat16
def test_a_bfloat16_training_step_reaches_every_parameter_with_float32_losses(monkeypatch):
    """Under CPU autocast the convolutions compute in bfloat16, the loss terms stay float32, every parameter gets a
    finite gradient in float32, and the gradients point where float32's do (with the layers this CPU computes
    wrong in bfloat16 taken out of autocast, as the trainer does)."""
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    configuration = preset_configuration("3d_cpu", (1.0, 1.0, 1.0))
    torch.manual_seed(0)
    network = build_network(configuration)
    loss_fn = build_loss(configuration)
    patch, grid = list(configuration.segmentation.patch_size_zyx), list(configuration.classification.grid_zyx)
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "seg_patch": torch.rand(2, 1, *patch, generator=generator),
        "patch_box": torch.tensor([[[p // 2 for p in patch], patch]] * 2),
        "volume_shape": torch.tensor([[3 * p for p in patch]] * 2),
        "cls_image": torch.rand(2, 1, *grid, generator=generator),
        "lesion_context": torch.zeros(2, 1, *grid),
    }
    target = (torch.rand(2, 1, *patch, generator=generator) > 0.9).float()
    labels = torch.tensor([0, 1])

    def gradients(dtype):
        network.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            outputs = network(**inputs)
            result = loss_fn(outputs, target, labels)
        if dtype is not None:
            assert outputs.lesion_logits.dtype == torch.bfloat16
        assert result.total.dtype == torch.float32
        result.total.backward()
        return {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}

    # The trainer's remedy where this CPU computes some layers wrong: those layers in float32 (test_training).
    modules = dict(network.named_modules())
    for name, _, _ in precision.kernel_faults(network, lambda: network(**inputs), torch.bfloat16, "cpu"):
        precision.compute_in_float32(modules[name])
    reference, reduced = gradients(None), gradients(torch.bfloat16)
    assert reduced.keys() == reference.keys()
    for name, grad in reduced.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
    flat_ref = torch.cat([g.flatten() for g in reference.values()])
    flat_bf = torch.cat([reduced[k].flatten() for k in reference])
    assert torch.nn.functional.cosine_similarity(flat_ref, flat_bf, dim=0) > 0.95  # 8-bit mantissa: ~0.99


class _WrongWeightGradient(torch.autograd.Function):
    """A convolution whose weight gradient is off by a factor 3 when it runs in bfloat16: a faulty kernel."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.conv3d(x, weight, padding=1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = torch.nn.grad.conv3d_input(x.shape, weight, grad, padding=1)
        grad_w = torch.nn.grad.conv3d_weight(x, weight.shape, grad, padding=1)
        return grad_x, grad_w * (3.0 if x.dtype == torch.bfloat16 else 1.0)


class _FaultyConv(torch.nn.Conv3d):
    def forward(self, x):
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            with torch.autocast("cpu", enabled=False):
                return _WrongWeightGradient.apply(x.to(dtype), self.weight.to(dtype))
        return _WrongWeightGradient.apply(x, self.weight)


def test_the_kernel_check_names_the_layer_whose_reduced_precision_gradient_is_wrong():
    torch.manual_seed(0)
    healthy = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv3d(8, 8, 3, padding=1), torch.nn.GroupNorm(8, 8))
    x = torch.rand(2, 1, 8, 16, 16)
    assert precision.kernel_faults(healthy, lambda: healthy(x), torch.bfloat16, "cpu") == []
    weights = [p.detach().clone() for p in healthy.parameters()]
    faulty = torch.nn.Sequential(healthy[0], healthy[1], _FaultyConv(8, 8, 3, bias=False), healthy[3],
                                 _FaultyConv(8, 8, 3, bias=False))
    faults = precision.kernel_faults(faulty, lambda: faulty(x), torch.bfloat16, "cpu")
    assert [(name, where) for name, where, _ in faults] == [("2", "2 [2, 8, 8, 16, 16] weight gradient"),
                                                            ("4", "4 [2, 8, 8, 16, 16] weight gradient")]
    assert all(error == pytest.approx(2.0, rel=0.05) for _, _, error in faults)
    assert all(torch.equal(a, b) for a, b in zip(weights, healthy.parameters()))  # nothing trained
    assert all(p.grad is None for p in faulty.parameters())


def test_a_layer_taken_out_of_autocast_computes_float32s_gradient_inside_a_bfloat16_network():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                  _FaultyConv(8, 8, 3, bias=False), torch.nn.Conv3d(8, 2, 1))
    x = torch.rand(2, 1, 8, 16, 16)
    keys = list(network.state_dict())

    def weight_gradient(net):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        return out.dtype, torch.autograd.grad(out.float().square().sum(), net[2].weight)[0]

    wrong_dtype, wrong = weight_gradient(network)
    precision.compute_in_float32(network[2])
    assert precision.computes_in_float32(network[2]) and not precision.computes_in_float32(network[0])
    dtype, fixed = weight_gradient(network)
    reference_net = copy.deepcopy(network)  # the reference: the same network wholly in float32
    reference = torch.autograd.grad(reference_net(x).square().sum(), reference_net[2].weight)[0]
    assert wrong_dtype == dtype == torch.bfloat16  # the layers around it still compute in bfloat16
    assert float((wrong - reference).norm() / reference.norm()) > 1.0
    assert float((fixed - reference).norm() / reference.norm()) < 0.05
    assert list(network.state_dict()) == keys  # checkpoints are unchanged
    assert precision.computes_in_float32(reference_net[2])  # a copy keeps it, bound to the copy
    assert reference_net[2].forward.__self__ is reference_net[2]
    assert precision.kernel_faults(network, lambda: network(x), torch.bfloat16, "cpu") == []
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a keyword argument is cast up as a positional one is
        assert network[2](x=torch.rand(1, 8, 4, 8, 8).bfloat16()).dtype == torch.float32


@needs_bfloat16
def test_bfloat16_prediction_is_float32s_within_a_few_thousandths(tmp_path, monkeypatch):
    """The whole engine (tiles, cross-stitch, classifier, evidence) in bfloat16 gives float32's outputs closely."""
    model = load_trained_model(save_fake_model(tmp_path, folds=(0,)))
    rng = np.random.default_rng(3)
    image = rng.normal(size=(24, 64, 64)).astype(np.float32)
    region = np.zeros(image.shape, np.uint8)
    region[2:20, 8:56, 6:58] = 1
    cls_image = rng.random((32, 64, 64), dtype=np.float32)
    monkeypatch.setenv(precision.PRECISION_ENV, "float32")
    exact = run_networks(model, image, region, cls_image)
    monkeypatch.setenv(precision.PRECISION_ENV, "auto")
    reduced = run_networks(model, image, region, cls_image)
    assert not np.array_equal(exact.lesion_probability, reduced.lesion_probability)  # it did run in bfloat16
    np.testing.assert_allclose(reduced.lesion_probability, exact.lesion_probability, atol=0.02)
    np.testing.assert_allclose(reduced.class_probabilities, exact.class_probabilities, atol=0.02)
    np.testing.assert_allclose(reduced.evidence, exact.evidence, atol=0.05)


def test_a_bad_setting_is_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch):
    model_dir = save_fake_model(tmp_path / "results", folds=(0,))
    inputs = tmp_path / "in"
    inputs.mkdir()
    monkeypatch.setenv(precision.PRECISION_ENV, "fp8")
    with pytest.raises(DscovidError, match="^DSCOVID_PRECISION='fp8': must be one of auto, float32$"):
        predict_cases(model_dir, inputs, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
