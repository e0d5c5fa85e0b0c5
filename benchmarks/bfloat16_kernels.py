"""Are this CPU's bfloat16 convolution kernels right? One layer at a time, against float32 on the same inputs.

Two measurements, on whatever CPU runs it:

1. A 3×3×3 convolution (padding 1) at the shapes of the ``3d_cpu`` network's levels and a few around them, run
   ``--repeats`` times on random inputs under bfloat16 autocast: how often its output, input gradient or weight
   gradient is non-finite or more than 5 % (relative L2) from float32's on the same bfloat16-rounded input and
   weights, and the worst error among the finite ones. oneDNN's kernel for each pass is printed as
   ``ONEDNN_VERBOSE`` names it.
2. ``dscovid.model.precision.kernel_faults`` on the planned ``3d_cpu`` and ``3d_paper`` networks (random weights,
   the trainer's probe): every layer whose bfloat16 kernels are wrong, or none; with ``--reference`` also with
   oneDNN switched off (ATen's own bfloat16 kernels): the first layer off by anything at all, and the spread of
   the whole network's parameter gradients against float32 (why the check goes layer by layer).

    python benchmarks/bfloat16_kernels.py
    python benchmarks/bfloat16_kernels.py --repeats 200 --reference
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from dscovid.model import build_loss, build_network, random_inputs
from dscovid.model.precision import cpu_has_native_bfloat16, kernel_faults
from dscovid.plans.presets import preset_configuration

#: (batch, in channels, depth, height, width), out channels, stride: the 3d_cpu subnets' levels and neighbours.
SHAPES = (
    ((2, 8, 16, 24, 24), 16, 2),
    ((2, 16, 8, 24, 24), 16, 1),
    ((2, 32, 4, 6, 6), 64, 2),
    ((2, 64, 4, 6, 6), 64, 1),
    ((2, 64, 3, 3, 3), 64, 1),
    ((2, 64, 2, 3, 3), 64, 1),
    ((2, 64, 2, 6, 6), 64, 1),
    ((1, 64, 2, 3, 3), 64, 1),
    ((2, 32, 2, 6, 6), 32, 1),
    ((2, 16, 2, 6, 6), 16, 1),
)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).norm() / b.norm())


def convolution_errors(shape, out_channels: int, stride: int, repeats: int, seed: int = 0) -> dict[str, list[float]]:
    """Relative errors of the three passes of one convolution, ``repeats`` draws."""
    generator = torch.Generator().manual_seed(seed)
    errors: dict[str, list[float]] = {"output": [], "input gradient": [], "weight gradient": []}
    for _ in range(repeats):
        x = torch.randn(shape, generator=generator)
        w = torch.randn(out_channels, shape[1], 3, 3, 3, generator=generator) / math.sqrt(27 * shape[1])
        xr, wr = (x.bfloat16().float().requires_grad_(True), w.bfloat16().float().requires_grad_(True))
        exact = F.conv3d(xr, wr, stride=stride, padding=1)
        upstream = torch.randn(exact.shape, generator=generator)
        gx, gw = torch.autograd.grad(exact, [xr, wr], upstream)
        xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            approximate = F.conv3d(xa, wa, stride=stride, padding=1)
        ax, aw = torch.autograd.grad(approximate.float(), [xa, wa], upstream)
        errors["output"].append(relative(approximate.float().detach(), exact.detach()))
        errors["input gradient"].append(relative(ax, gx))
        errors["weight gradient"].append(relative(aw, gw))
    return errors


def onednn_kernels(shape, out_channels: int, stride: int) -> str:
    """oneDNN's implementation of each pass of one bfloat16 convolution (a child process with ONEDNN_VERBOSE=1)."""
    code = (f"import torch, torch.nn.functional as F\n"
            f"x = torch.randn{tuple(shape)}.requires_grad_(True)\n"
            f"w = torch.randn({out_channels}, {shape[1]}, 3, 3, 3).requires_grad_(True)\n"
            f"with torch.autocast('cpu', dtype=torch.bfloat16):\n"
            f"    y = F.conv3d(x, w, stride={stride}, padding=1)\n"
            f"y.float().sum().backward()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"ONEDNN_VERBOSE": "1", "PATH": ""}, check=False)
    passes = []
    for line in result.stdout.splitlines():
        fields = line.split(",")
        if len(fields) > 8 and fields[2] == "primitive" and fields[3] == "exec" and fields[5] == "convolution":
            passes.append(f"{fields[7]} {fields[6]}")
    return "; ".join(passes) or "not oneDNN"


def network_probe(name: str, reference: bool) -> None:
    spacing = (1.0, 1.0, 1.0) if name == "3d_cpu" else (1.0, 0.8, 0.8)
    configuration = preset_configuration(name, spacing)
    torch.manual_seed(0)
    network = build_network(configuration).eval()
    patch = list(configuration.segmentation.patch_size_zyx)
    batch = 2 if name == "3d_cpu" else 1
    inputs = random_inputs(configuration, batch)  # the trainer's probe
    for onednn in (True, False) if reference else (True,):
        started = time.perf_counter()
        with torch.backends.mkldnn.flags(enabled=onednn):
            faults = kernel_faults(network, lambda: network(**inputs), torch.bfloat16, "cpu",
                                   tolerance=0.05 if onednn else 0.0)
        label = "oneDNN" if onednn else "ATen (reference; the first layer at all above 0)"
        found = "; ".join(f"{where} ({error:.3g})" for _, where, error in faults[:1 if not onednn else None])
        print(f"{name}, {label}: {found or 'no wrong kernel'} ({time.perf_counter() - started:.1f} s)")
    if reference:
        loss_fn = build_loss(configuration)
        target = (torch.rand(batch, 1, *patch, generator=torch.Generator().manual_seed(1)) > 0.8).float()
        labels = torch.arange(batch) % configuration.network.num_classes
        named = [(n, p) for n, p in network.named_parameters()]

        def gradients(enabled: bool):
            with torch.backends.mkldnn.flags(enabled=False), torch.autocast("cpu", dtype=torch.bfloat16,
                                                                            enabled=enabled):
                total = loss_fn(network(**inputs), target, labels).total
            return torch.autograd.grad(total.float(), [p for _, p in named], allow_unused=True)

        errors = sorted(relative(a, b) for a, b in zip(gradients(True), gradients(False))
                        if a is not None and b is not None and float(b.norm()) > 0)
        print(f"{name}, whole network with ATen's kernels: bfloat16 parameter gradients against float32, median "
              f"{errors[len(errors) // 2]:.3f}, largest {errors[-1]:.3f} over {len(errors)} parameters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--reference", action="store_true", help="also with oneDNN off (ATen's bfloat16 kernels)")
    parser.add_argument("--configurations", nargs="+", default=["3d_cpu", "3d_paper"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, native bfloat16: {cpu_has_native_bfloat16()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    print("| input (B, C, D, H, W) | out, stride | wrong outputs | wrong input gradients | wrong weight gradients "
          "| worst finite weight-gradient error | oneDNN kernels |")
    print("|---|---|---|---|---|---|---|")
    for shape, out_channels, stride in SHAPES:
        errors = convolution_errors(shape, out_channels, stride, args.repeats)
        wrong = {k: sum(e > 0.05 for e in v) for k, v in errors.items()}
        finite = [e for e in errors["weight gradient"] if math.isfinite(e)]
        worst = f"{max(finite):.3g}" if finite else "-"
        print(f"| {shape} | {out_channels}, {stride} | {wrong['output']}/{args.repeats} | "
              f"{wrong['input gradient']}/{args.repeats} | {wrong['weight gradient']}/{args.repeats} | {worst} | "
              f"{onednn_kernels(shape, out_channels, stride)} |", flush=True)
    for name in args.configurations:
        network_probe(name, args.reference)


if __name__ == "__main__":
    main()
