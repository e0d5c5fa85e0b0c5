"""Shared fixtures. Real CT files come from DSCOVID_TEST_DATA (``make test`` points it at ../shared/testdata)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dscovid.plans.configuration import Configuration
from dscovid.plans.presets import preset_configuration

# Tests share two cores with everything else on the machine; one thread keeps them predictable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The folder of real CT test files, or skip the test when it is not available."""
    value = os.environ.get("DSCOVID_TEST_DATA")
    if not value:
        pytest.skip("DSCOVID_TEST_DATA is not set (real CT test data not available)")
    folder = Path(value)
    if not folder.is_dir():
        pytest.skip(f"DSCOVID_TEST_DATA={value} is not a folder")
    return folder


# ------------------------------------------------------------------------------------- model configurations

#: Patch, classification grid and volume of the tiny networks the model tests build (all divisible as the network
#: needs: the patch by 8, the grid by 16).
TINY_PATCH = (8, 16, 16)
TINY_GRID = (16, 32, 32)
TINY_VOLUME = (40, 64, 48)
_TINY_NETWORK = {"segmentation_widths": [8, 16, 32], "classification_widths": [8, 16, 32], "findings_head": False}


def tiny_configuration(network: dict | None = None, loss: dict | None = None, patch=TINY_PATCH, grid=TINY_GRID,
                       class_weights=(1.0, 2.0, 0.5)) -> Configuration:
    """The shipped 3d_cpu preset with narrower widths, no findings head, a tiny patch and grid, unequal class weights,
    and the given ``network`` and ``training.loss`` keys changed (validated as any configuration)."""
    overrides = {"segmentation.patch_size_zyx": list(patch), "classification.grid_zyx": list(grid),
                 "training.class_weights": list(class_weights)}
    overrides |= {f"network.{key}": value for key, value in {**_TINY_NETWORK, **(network or {})}.items()}
    overrides |= {f"training.loss.{key}": value for key, value in (loss or {}).items()}
    return preset_configuration("3d_cpu", (2.0, 2.0, 2.0)).with_overrides(overrides)


def model_batch(batch: int = 2, patch=TINY_PATCH, grid=TINY_GRID, seed: int = 0) -> dict:
    """Network inputs for ``batch`` samples: random patches in two boxes of a TINY_VOLUME scan, a random grid."""
    generator = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[[4, 10, 6], list(patch)], [[36, -4, 40], list(patch)]][:batch])
    return {
        "seg_patch": torch.rand(batch, 1, *patch, generator=generator),
        "patch_box": boxes,
        "volume_shape": torch.tensor([TINY_VOLUME] * batch),
        "cls_image": torch.rand(batch, 1, *grid, generator=generator),
        "lesion_context": (torch.rand(batch, 1, *grid, generator=generator) > 0.8).float(),
    }
