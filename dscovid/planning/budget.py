"""The budget model the planner sizes configurations with (memory for the GPU preset, time for the CPU preset).

Like nnU-Net, nothing is run: the DeepSC-COVID network (docs/model.md) is described as a list of convolutions (output
voxels, input and output channels, kernel size) for one segmentation patch and one classification grid, and

- **memory** (bytes) = ``batch × 4 bytes × ACTIVATION_FACTOR × Σ conv output elements + 16 bytes × parameters``
  (float32 activations kept for the backward pass, plus weights, their gradient and Adam's two moments).
  :data:`ACTIVATION_FACTOR` is calibrated on the measured peak memory of a float32 3d_paper training step
  (docs/preprocessing.md §2): the normalisation and activation outputs cost more copies of each
  convolution output; mixed precision needs less, so float32 is the conservative plan;
- **compute** (floating-point operations per training iteration) = ``batch × 3 × Σ 2 · k³ · C_in · C_out · voxels``
  (forward, plus about twice that for the backward pass).

The estimate is deliberately simple; its only use is to compare sizes against a target: a GPU memory target for
``3d_paper``, a wall-clock budget at an assumed effective CPU throughput for ``3d_cpu``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dscovid.model.conv_layers import network_layers

ACTIVATION_FACTOR = 1.7
BYTES_PER_ELEMENT = 4


@dataclass(frozen=True)
class Estimate:
    """Budget figures of one configuration at a batch size."""

    memory_bytes: float
    flops_per_iteration: float
    parameters: int

    def to_dict(self) -> dict:
        return {"estimated_memory_gb": round(self.memory_bytes / 1e9, 3),
                "estimated_gflops_per_iteration": round(self.flops_per_iteration / 1e9, 3),
                "estimated_parameters": int(self.parameters)}


def estimate(patch_zyx: Sequence[int], grid_zyx: Sequence[int], network: Mapping, batch_size: int) -> Estimate:
    """Training memory (bytes) and compute (FLOP per iteration) of the network at ``batch_size``."""
    layers = network_layers(patch_zyx, grid_zyx, network)
    elements = sum(layer.voxels * layer.out_channels for layer in layers)
    parameters = sum(layer.parameters for layer in layers)
    memory = batch_size * BYTES_PER_ELEMENT * ACTIVATION_FACTOR * elements + 16 * parameters
    flops = batch_size * 3.0 * sum(layer.flops for layer in layers)
    return Estimate(float(memory), float(flops), int(parameters))
