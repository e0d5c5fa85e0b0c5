"""The reduced precision the network runs in, per device (docs/training.md, docs/prediction.md).

Training and prediction run the network under ``torch.autocast`` where the hardware computes faster in a 16-bit
format: float16 on CUDA (with a gradient scaler in training), bfloat16 on a CPU that multiplies bfloat16 natively
(Intel AMX or AVX-512 BF16: oneDNN's convolutions run several times faster there), float32 elsewhere, where
bfloat16 would be emulated and slower. The weights, the optimiser state and every loss term stay float32; the
geometry (``grid_sample``) and the findings head's measurements opt out of autocast themselves.

``DSCOVID_PRECISION=float32`` in the environment turns autocast off on every device (to reproduce a float32 run, or
to compare); ``auto``, the default, is the rule above.

A CPU's bfloat16 kernels can be wrong for particular shapes while being right for most: oneDNN's AVX-512 BF16
backward-weights convolution returns non-finite or wildly wrong weight gradients for maps two voxels deep (seen on
an AMD EPYC of the Zen 4 generation, whose forward pass is right). :func:`kernel_faults` replays each layer of a
network at the shapes the network gives it, under autocast and in float32, so that a trainer can check its own
network on its own CPU before trusting the reduced precision, and :func:`compute_in_float32` takes the layers it
finds out of autocast while the rest of the network keeps the faster kernels.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import types
from collections.abc import Callable

import torch

PRECISION_ENV = "DSCOVID_PRECISION"
CHOICES = ("auto", "float32")


def precision_choice() -> str:
    """``DSCOVID_PRECISION`` (``auto`` when unset); anything else is refused in one line."""
    choice = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{PRECISION_ENV}={os.environ[PRECISION_ENV]!r}: must be one of {', '.join(CHOICES)}")
    return choice


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX-512 BF16)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of the network on ``device``, or None for float32."""
    device = torch.device(device)
    if precision_choice() == "float32":
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return None


def dtype_name(dtype: torch.dtype | None) -> str:
    """``float32`` for None (no autocast), else the dtype's name: ``bfloat16``, ``float16``."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def precision_name(device: torch.device | str) -> str:
    """What the network computes in on ``device`` (for the records)."""
    return dtype_name(autocast_dtype(device))


def autocast(device: torch.device | str):
    """``torch.autocast`` in :func:`autocast_dtype`'s precision, or a no-op context for float32."""
    device = torch.device(device)
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def kernel_faults(
    network: torch.nn.Module,
    run_forward: Callable[[], object],
    dtype: torch.dtype,
    device: torch.device | str,
    tolerance: float = 0.05,
) -> list[tuple[str, str, float]]:
    """The layers of ``network`` whose reduced-precision kernels are wrong on this device, with their errors.

    ``run_forward()`` runs the network once (it is called under ``torch.no_grad`` and autocast to ``dtype``); every
    layer with parameters records the shapes it is called with. Each layer is then replayed alone at each shape on
    random inputs: its output, the gradient of its input and the gradients of its parameters under autocast are
    compared with float32's on the same bfloat16-rounded input and weights, by relative L2 error. Layer by layer
    the comparison is well conditioned (a correct kernel is off by a few thousandths, the rounding of its output),
    where the gradients of a whole untrained network differ by tens of percent in a correct bfloat16 pass. Returns
    one ``(layer, "<layer> <shape> <tensor>", error)`` per faulty layer, its first replay that is non-finite (error
    ``inf``) or beyond ``tolerance``; an empty list when every kernel is right. The network's parameters and
    ``.grad`` are left untouched.
    """
    device = torch.device(device)
    shapes: dict[str, list[tuple[tuple[int, ...], bool]]] = {}
    modules = {name: m for name, m in network.named_modules()
               if next(m.parameters(recurse=False), None) is not None}

    def recorder(name: str):
        def hook(module, inputs, output):
            if inputs and torch.is_tensor(inputs[0]):
                x = inputs[0]
                key = (tuple(x.shape), x.dim() == 5 and not x.is_contiguous()
                       and x.is_contiguous(memory_format=torch.channels_last_3d))
                if key not in shapes.setdefault(name, []):
                    shapes[name].append(key)
        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in modules.items()]
    try:
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=dtype):
            run_forward()
    finally:
        for handle in handles:
            handle.remove()

    generator = torch.Generator().manual_seed(0)
    faults = []
    for name, module in modules.items():
        for shape, channels_last in shapes.get(name, []):
            fault = _replay(module, shape, channels_last, dtype, device, generator, tolerance)
            if fault is not None:
                faults.append((name, f"{name} {list(shape)} {fault[0]}", fault[1]))
                break
    return faults


def _replay(module: torch.nn.Module, shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype,
            device: torch.device, generator: torch.Generator, tolerance: float) -> tuple[str, float] | None:
    """One layer at one input shape, reduced precision against float32: the first wrong tensor and its error."""
    params = dict(module.named_parameters(recurse=False))
    x = torch.randn(shape, generator=generator).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x_rounded = x.to(dtype).float().requires_grad_(True)
    rounded = {k: v.detach().to(dtype).float().requires_grad_(True) for k, v in params.items()}
    exact = torch.func.functional_call(module, rounded, (x_rounded,))
    upstream = torch.randn(exact.shape, generator=generator).to(device)
    exact_grads = torch.autograd.grad(exact, [x_rounded, *rounded.values()], upstream)
    x_reduced = x.clone().requires_grad_(True)
    detached = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.autocast(device_type=device.type, dtype=dtype):
        approximate = torch.func.functional_call(module, detached, (x_reduced,))
    approximate_grads = torch.autograd.grad(approximate.float(), [x_reduced, *detached.values()], upstream)
    pairs = [("output", approximate.float(), exact), ("input gradient", approximate_grads[0], exact_grads[0])]
    pairs += [(f"{k} gradient", a, b) for k, a, b in zip(params, approximate_grads[1:], exact_grads[1:])]
    for what, a, b in pairs:
        a, b = a.detach(), b.detach()
        if not torch.isfinite(a).all():
            return what, math.inf
        scale = float(b.norm())
        error = float((a - b).norm()) / scale if scale > 0 else float(a.norm())
        if error > tolerance:
            return what, error
    return None


def _float32_forward(module: torch.nn.Module, *args, **kwargs):
    """The class's forward with autocast off and floating-point tensor arguments in float32."""
    def up(a):
        return a.float() if torch.is_tensor(a) and a.is_floating_point() else a

    args, kwargs = [up(a) for a in args], {k: up(v) for k, v in kwargs.items()}
    device_type = next((a.device.type for a in [*args, *kwargs.values()] if torch.is_tensor(a)), "cpu")
    with torch.autocast(device_type=device_type, enabled=False):
        return type(module).forward(module, *args, **kwargs)


def compute_in_float32(module: torch.nn.Module) -> None:
    """Make ``module`` compute in float32 even under autocast, its inputs cast up (its gradients then are float32's).

    The instance's ``forward`` becomes a method bound to it: its parameters, state dict and checkpoints are
    unchanged, and a copy of the module computes in float32 too.
    """
    module.forward = types.MethodType(_float32_forward, module)


def computes_in_float32(module: torch.nn.Module) -> bool:
    """Whether :func:`compute_in_float32` took ``module`` out of autocast."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _float32_forward
