"""The patch ↔ classification-grid mapping (docs/formats.md §4): impulses land where they should."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dscovid.errors import DscovidError
from dscovid.model.geometry import box_coverage, paste_box, sample_box, stitch_boxes


def _argmax_zyx(volume: torch.Tensor) -> tuple[int, ...]:
    flat = int(volume.flatten().argmax())
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), volume.shape))


@pytest.mark.parametrize(
    "start",
    [(6, 10, 12), (0, 0, 0), (12, 22, 26), (-3, -5, 4), (10, 20, 30)],
    ids=["centre", "corner", "far-edge", "partly-outside-low", "partly-outside-high"],
)
def test_impulse_identity_scale_round_trip(start):
    """Grid == volume: an impulse at patch voxel p lands on grid voxel start + p, and comes back."""
    volume = (20, 32, 40)
    size = (8, 10, 12)
    patch = torch.zeros(1, 1, *size)
    inside = [
        p for p in [(3, 4, 5), (0, 0, 0), (7, 9, 11), (5, 8, 2)] if all(0 <= s + q < v for s, q, v in zip(start, p, volume))
    ]
    assert inside
    box = [[list(start), list(size)]]
    for p in inside:
        patch.zero_()
        patch[0, 0, p[0], p[1], p[2]] = 1.0
        values, coverage = paste_box(patch, box, volume, volume)
        target = tuple(s + q for s, q in zip(start, p))
        assert _argmax_zyx(values[0, 0]) == target
        assert values[0, 0][target] == pytest.approx(1.0, abs=1e-4)
        assert float(values.sum()) == pytest.approx(1.0, abs=1e-3)
        back = sample_box(values, box, volume, size)
        assert _argmax_zyx(back[0, 0]) == p
        assert back[0, 0][p] == pytest.approx(1.0, abs=1e-4)
    # Coverage counts exactly the part of the box inside the volume.
    overlap = 1
    for s, n, v in zip(start, size, volume):
        overlap *= max(0, min(s + n, v) - max(s, 0))
    assert float(coverage.sum()) == pytest.approx(overlap)
    assert set(coverage.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("n_slices", [8, 12, 24, 48])
@pytest.mark.parametrize("start_z", [0, 16, 40, 44, -8])
def test_impulse_on_coarser_grid_several_n(n_slices, start_z):
    """Volume 96×64×64 on a grid (N, 32, 32): a block filling one grid cell lands on that cell, for several N."""
    volume = (96, 64, 64)
    grid = (n_slices, 32, 32)
    cell = (96 // n_slices, 2, 2)
    size = (max(24, cell[0] * 2), 32, 32)
    start = (start_z, 30, 2)
    # The grid cell whose voxels the block fills: choose one inside both the box and the volume.
    target = None
    for gz in range(n_slices):
        z0 = gz * cell[0]
        if z0 >= max(start[0], 0) and z0 + cell[0] <= min(start[0] + size[0], volume[0]):
            target = (gz, 20, 3)
            break
    assert target is not None
    patch = torch.zeros(1, 1, *size)
    local = [t * c - s for t, c, s in zip(target, cell, start)]
    patch[0, 0, local[0] : local[0] + cell[0], local[1] : local[1] + 2, local[2] : local[2] + 2] = 1.0
    box = [[list(start), list(size)]]
    values, coverage = paste_box(patch, box, volume, grid)
    assert _argmax_zyx(values[0, 0]) == target
    assert values[0, 0][target] == pytest.approx(1.0, abs=1e-4)
    assert float(values.sum()) == pytest.approx(1.0, abs=1e-3)
    # Back to the patch at half resolution: the maximum falls inside the block.
    half = tuple(s // 2 for s in size)
    back = sample_box(values, box, volume, half)
    peak = _argmax_zyx(back[0, 0])
    assert all(lo // 2 <= q < (lo + c) // 2 + 1 for q, lo, c in zip(peak, local, cell))
    # Coverage: inside-volume part of the box, in grid cells.
    expected = 1.0
    for s, n, v, g in zip(start, size, volume, grid):
        expected *= max(0, min(s + n, v) - max(s, 0)) * g / v
    assert float(coverage.sum()) == pytest.approx(expected, rel=1e-5)


def test_sample_box_matches_interpolate_for_whole_volume_box():
    """A box equal to the whole volume reproduces F.interpolate(align_corners=False), the cls_image contract."""
    torch.manual_seed(0)
    grid = torch.rand(2, 3, 6, 8, 10)
    out = sample_box(grid, [[[0, 0, 0], [30, 40, 50]]] * 2, [30, 40, 50], (12, 16, 20))
    reference = F.interpolate(grid, size=(12, 16, 20), mode="trilinear", align_corners=False)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_sample_box_downsampling_is_area_average():
    """Sampling a box spanning many grid cells into few averages them (a lone impulse is not lost)."""
    grid = torch.zeros(1, 1, 16, 16, 16)
    grid[0, 0, 5, 6, 7] = 1.0
    out = sample_box(grid, [[[0, 0, 0], [16, 16, 16]]], [16, 16, 16], (4, 4, 4))
    assert float(out.sum()) * 64 == pytest.approx(1.0, abs=1e-5)
    assert _argmax_zyx(out[0, 0]) == (1, 1, 1)


def test_batch_of_different_boxes_and_volumes():
    """Each sample uses its own box and volume shape."""
    patch = torch.zeros(2, 1, 4, 4, 4)
    patch[:, 0, 1, 2, 3] = 1.0
    boxes = [[[0, 0, 0], [4, 4, 4]], [[4, 8, 0], [4, 4, 4]]]
    shapes = [[8, 16, 16], [16, 16, 8]]
    values, coverage = paste_box(patch, boxes, shapes, (8, 16, 8))
    assert _argmax_zyx(values[0, 0]) == (1, 2, 1)  # x halves: 3 -> 1 (16 voxels on 8 cells)
    assert _argmax_zyx(values[1, 0]) == (2, 10, 3)  # z halves: 5 -> 2; y 8+2; x 3
    assert float(coverage[0].sum()) == pytest.approx(4 * 4 * 2)
    assert float(coverage[1].sum()) == pytest.approx(2 * 4 * 4)


def test_stitch_boxes_tiles_cover_the_volume():
    """Non-overlapping tiles stitched onto the grid reproduce the volume's area-downsampled map."""
    torch.manual_seed(1)
    volume = torch.rand(1, 1, 16, 24, 24)
    tiles, boxes = [], []
    for z in (0, 8):
        for y in (0, 8, 16):
            for x in (0, 8, 16):
                tiles.append(volume[0, :, z : z + 8, y : y + 8, x : x + 8])
                boxes.append([[z, y, x], [8, 8, 8]])
    total, weight = stitch_boxes(torch.stack(tiles), boxes, (16, 24, 24), (8, 12, 12))
    stitched = total / weight.clamp(min=1e-6)
    torch.testing.assert_close(weight, torch.ones_like(weight))
    torch.testing.assert_close(stitched, F.avg_pool3d(volume, 2), atol=1e-5, rtol=1e-5)


def test_fractional_coverage_at_unaligned_box():
    coverage = box_coverage([[[1, 0, 0], [2, 4, 4]]], [8, 4, 4], (2, 1, 1))
    assert coverage.flatten().tolist() == pytest.approx([0.5, 0.0])


def test_bad_boxes_are_refused():
    with pytest.raises(DscovidError, match="patch_box"):
        paste_box(torch.zeros(2, 1, 4, 4, 4), [[[0, 0, 0], [4, 4, 4]]] * 3, [8, 8, 8], (4, 4, 4))
    with pytest.raises(DscovidError, match="positive"):
        sample_box(torch.zeros(1, 1, 4, 4, 4), [[[0, 0, 0], [0, 4, 4]]], [8, 8, 8], (4, 4, 4))
