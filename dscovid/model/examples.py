"""Example configurations of the model's keys, for the planner to copy and for tests and benchmarks.

Only the keys this package reads are filled in (``segmentation``, ``classification``, ``network``, and
``training.batch_size``, ``training.loss``, ``training.class_weights``); a real plans configuration has more.
"""

from __future__ import annotations

import copy
from typing import Any

from dscovid.errors import DscovidError


def example_configuration(name: str) -> dict[str, Any]:
    """A fresh dictionary for ``"3d_paper"`` (the paper's sizes and widths) or ``"3d_cpu"`` (small, for CPUs)."""
    loss = {
        "lambda_seg": 1.0,
        "lambda_cls": 1.0,
        "lambda_ta": 10.0,
        "lambda_dice": 1.0,
        "lambda_focal": 1.0,
        "focal_alpha": 0.75,
        "focal_gamma": 2.0,
        "dice_smooth": 1.0,
        "task_aware_scales": [1, 2, 3],
        "task_aware_class": "predicted",
    }
    paper_network = {
        "tasks": "joint",
        "stem": "inception",
        "stem_channels": 32,
        "cross_stitch": True,
        "cross_stitch_init": [0.9, 0.1],
        "segmentation_widths": [64, 128, 256],
        "classification_widths": [64, 128, 256],
        "lesion_channels": 16,
        "side_output_weights": [0.25, 0.25, 0.5, 1.0],
        "norm": "instance",
        "norm_groups": 2,
        "num_classes": 3,
        "lesion_context": "ground_truth",
        "seg_to_cls_fill": "classification",
    }
    if name == "3d_paper":
        return copy.deepcopy(
            {
                "segmentation": {"patch_size_zyx": [24, 256, 256]},
                "classification": {"grid_zyx": [48, 256, 256]},
                "network": paper_network,
                "training": {"batch_size": 1, "loss": loss, "class_weights": [1.0, 1.0, 1.0]},
            }
        )
    if name == "3d_cpu":
        network = dict(
            paper_network,
            stem_channels=8,
            segmentation_widths=[16, 32, 64],
            classification_widths=[16, 32, 64],
            lesion_channels=4,
        )
        return copy.deepcopy(
            {
                "segmentation": {"patch_size_zyx": [16, 48, 48]},
                "classification": {"grid_zyx": [32, 64, 64]},
                "network": network,
                "training": {"batch_size": 2, "loss": loss, "class_weights": [1.0, 1.0, 1.0]},
            }
        )
    raise DscovidError(f"no example configuration {name!r} (known: 3d_paper, 3d_cpu)")
