"""Shared fixtures. Real CT files come from DSCOVID_TEST_DATA (``make test`` points it at ../shared/testdata)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
