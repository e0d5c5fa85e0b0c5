"""The connected components the lesion report and the small-lesion removal use: SciPy's components, faster."""

import numpy as np
import pytest
from scipy import ndimage

from dscovid.measurements.components import label
from dscovid.measurements.findings import STRUCTURE_26, lesion_components, lesion_count
from dscovid.prediction.export import drop_small_lesions

SCIPY_STRUCTURES = {6: ndimage.generate_binary_structure(3, 1), 18: ndimage.generate_binary_structure(3, 2),
                    26: STRUCTURE_26}


def _same_partition(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Both label arrays put the same voxels together (numbering aside) and agree on the background."""
    if not np.array_equal(ours == 0, theirs == 0):
        return False
    pairs = np.unique(np.stack([ours[ours > 0], theirs[theirs > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_label_finds_scipys_components(connectivity):
    rng = np.random.default_rng(connectivity)
    for trial in range(12):
        shape = tuple(int(v) for v in rng.integers(1, 30, 3))
        # Sparse noise joins only through edges and corners: where 6-, 18- and 26-connectivity differ.
        mask = rng.random(shape) < (0.08 if trial % 2 else 0.3)
        ours, count = label(mask.astype(np.uint8) * 7, connectivity)  # any non-zero value is foreground
        theirs, expected = ndimage.label(mask, SCIPY_STRUCTURES[connectivity])
        assert count == expected
        assert ours.dtype == np.uint32 and ours.shape == mask.shape
        assert _same_partition(ours, theirs)
        # Numbered in the same order as SciPy (first voxel in C order): callers that break ties by label agree.
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_finds_scipys_components_in_2d(connectivity):
    rng = np.random.default_rng(connectivity)
    for _ in range(10):
        mask = rng.random(tuple(int(v) for v in rng.integers(1, 60, 2))) < 0.3
        ours, count = label(mask, connectivity)
        theirs, expected = ndimage.label(mask, ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2))
        assert count == expected and _same_partition(ours, theirs)
        if connectivity == 4:  # numbered in the same order too (the lung mask's per-slice labels use 4)
            assert np.array_equal(ours, theirs)


def test_label_edge_cases():
    assert label(np.zeros((3, 4, 5), bool))[1] == 0
    full, count = label(np.ones((3, 4, 5), bool), 6)
    assert count == 1 and np.all(full == 1)
    assert label(np.zeros((0, 4, 5), bool))[1] == 0
    corners = np.zeros((2, 2, 2), bool)
    corners[0, 0, 0] = corners[1, 1, 1] = True
    assert label(corners, 26)[1] == 1 and label(corners, 18)[1] == 2 and label(corners, 6)[1] == 2
    with pytest.raises(ValueError, match="connectivity"):
        label(corners, 8)
    with pytest.raises(ValueError, match="2D or 3D"):
        label(np.ones((2, 2, 2, 2), bool))
    with pytest.raises(ValueError, match="connectivity of a 2D mask"):
        label(np.ones((4, 4), bool), 26)


def test_lesion_measurements_and_small_lesion_removal_on_a_realistic_mask():
    """The report's count and components and the small-lesion removal, against SciPy on blobs of many sizes."""
    rng = np.random.default_rng(3)
    mask = ndimage.binary_dilation(rng.random((40, 96, 96)) < 0.0015, iterations=2)
    mask |= ndimage.binary_dilation(rng.random((40, 96, 96)) < 0.0004, iterations=5)
    spacing = (2.0, 0.8, 0.8)
    labels, count = ndimage.label(mask, STRUCTURE_26)
    assert count > 20
    assert lesion_count(mask) == count
    sizes = np.bincount(labels.ravel())[1:]
    assert [c.voxels for c in lesion_components(mask, spacing)] == sorted(sizes.tolist(), reverse=True)
    min_ml = float(np.median(sizes)) * np.prod(spacing) / 1000.0
    kept = drop_small_lesions(mask.astype(np.uint8), spacing, min_ml)
    expected = np.isin(labels, 1 + np.flatnonzero(sizes * np.prod(spacing) / 1000.0 >= min_ml))
    assert np.array_equal(kept != 0, expected)
