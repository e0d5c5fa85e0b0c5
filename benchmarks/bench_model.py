"""Speed of the DeepSC-COVID network per patch, against the machine's matrix-product speed.

Prints one table row per configuration and batch size: forward and forward+backward (with the loss of equation 11)
seconds per patch, FLOPs per patch (``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products;
grid sampling and elementwise work are not counted), the achieved GFLOP/s, and the GFLOP/s of a float32 2048×2048
matrix product measured in the same run, with the ratio.

    python benchmarks/bench_model.py                       # both shipped presets on the CPU
    python benchmarks/bench_model.py --device cuda --amp   # on a GPU, with bfloat16 autocast
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dscovid.model import build_loss, build_network
from dscovid.plans.configuration import Configuration
from dscovid.plans.presets import preset_configuration


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Float32 matrix-product speed (the reference for the hardware limit)."""
    a = torch.rand(size, size, device=device)
    b = torch.rand(size, size, device=device)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def make_batch(configuration: Configuration, batch: int, device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    patch = list(configuration.segmentation.patch_size_zyx)
    grid = list(configuration.classification.grid_zyx)
    volume = [max(3 * p, g) for p, g in zip(patch, grid)]
    inputs = {
        "seg_patch": torch.rand(batch, 1, *patch, device=device),
        "patch_box": torch.tensor([[[p // 2 for p in patch], patch]] * batch),
        "volume_shape": torch.tensor([volume] * batch),
        "cls_image": torch.rand(batch, 1, *grid, device=device),
        "lesion_context": torch.zeros(batch, 1, *grid, device=device),
    }
    target = (torch.rand(batch, 1, *patch, device=device) > 0.9).float()
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    return inputs, target, labels


def measure(name: str, batch: int, device: torch.device, repeats: int, amp: bool, forward_only: bool = False) -> dict:
    configuration = preset_configuration(name, (1.0, 1.0, 1.0))  # the preset's own patch and grid
    net = build_network(configuration).to(device)
    loss_fn = build_loss(configuration)
    inputs, target, labels = make_batch(configuration, batch, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def forward() -> None:
        with torch.no_grad(), autocast:
            net(**inputs)

    def step() -> None:
        with autocast:
            out = net(**inputs)
            total = loss_fn(out, target, labels).total
        net.zero_grad(set_to_none=True)
        total.backward()

    counter = FlopCounterMode(display=False)
    with counter:
        forward()
    forward_flops = counter.get_total_flops()
    step_flops = float("nan")
    if not forward_only:
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        step_flops = counter.get_total_flops()

    timings = {"step": float("nan")}
    for label, fn in (("forward", forward), ("step", step))[: 1 if forward_only else 2]:
        fn()  # warm-up (cuDNN autotuning, allocator)
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        timings[label] = (time.perf_counter() - start) / repeats / batch
    return {
        "config": name,
        "batch": batch,
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "fwd_s": timings["forward"],
        "step_s": timings["step"],
        "fwd_gflop": forward_flops / batch / 1e9,
        "step_gflop": step_flops / batch / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="+", default=["3d_cpu", "3d_paper"])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (3d_paper on a CPU uses 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (losses stay float32)")
    parser.add_argument("--forward-only", action="store_true", help="skip forward+backward (slow for 3d_paper on CPUs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = matmul_gflops(device)
    header = (
        f"{'config':9} {'batch':>5} {'params M':>8} {'fwd s/patch':>11} {'f+b s/patch':>11} {'fwd GFLOP':>9} "
        f"{'f+b GFLOP':>9} {'fwd GFLOP/s':>11} {'f+b GFLOP/s':>11} {'fwd/matmul':>10} {'f+b/matmul':>10}"
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; amp: {args.amp}; float32 matmul 2048x2048: {reference:.1f} GFLOP/s")
    print(header)
    for config in args.configs:
        batch_size = preset_configuration(config, (1.0, 1.0, 1.0)).training.batch_size
        repeats = 1 if (config == "3d_paper" and device.type == "cpu") else args.repeats
        for batch in sorted({1, batch_size}):
            r = measure(config, batch, device, repeats, args.amp, args.forward_only)
            fwd_rate = r["fwd_gflop"] / r["fwd_s"]
            step_rate = r["step_gflop"] / r["step_s"]
            print(
                f"{r['config']:9} {r['batch']:>5} {r['params_M']:>8.3f} {r['fwd_s']:>11.4f} {r['step_s']:>11.4f} "
                f"{r['fwd_gflop']:>9.2f} {r['step_gflop']:>9.2f} {fwd_rate:>11.1f} {step_rate:>11.1f} "
                f"{fwd_rate / reference:>10.3f} {step_rate / reference:>10.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
