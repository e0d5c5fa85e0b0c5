"""The sliding-window engine: exact against whole-image application and against MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dscovid.inference.sliding_window import (
    MAX_TILE_SCALE,
    fitted_starts,
    gaussian_importance_map,
    plan_tile_boxes,
    plan_tiles,
    sized_spans,
    sliding_window_predict,
    tile_starts,
)


def _voxelwise_net(channels_in: int = 2, channels_out: int = 3, seed: int = 0) -> torch.nn.Module:
    """A network whose output at a voxel depends only on that voxel: tiling must not change anything."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(channels_in, 4, kernel_size=1),
        torch.nn.Tanh(),
        torch.nn.Conv3d(4, channels_out, kernel_size=1),
    ).eval()


def _conv_net(channels_in: int = 1, channels_out: int = 2, seed: int = 0) -> torch.nn.Module:
    """A random 3×3×3 conv stack: its output near a tile border depends on the tiling."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(channels_in, 4, kernel_size=3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(4, 4, kernel_size=3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(4, channels_out, kernel_size=3, padding=1),
    ).eval()


def test_tile_starts_cover_the_axis_and_end_at_the_border():
    assert tile_starts(10, 4, 4) == [0, 4, 6]
    assert tile_starts(12, 4, 4) == [0, 4, 8]
    assert tile_starts(12, 4, 2) == [0, 2, 4, 6, 8]
    assert tile_starts(3, 4, 4) == [0]
    assert tile_starts(4, 4, 2) == [0]
    for length in range(1, 40):
        for patch in (1, 3, 4, 7):
            for step in range(1, patch + 1):
                starts = tile_starts(length, patch, step)
                covered = np.zeros(max(length, patch), bool)
                for start in starts:
                    covered[start : start + patch] = True
                assert covered[:length].all()
                assert starts == sorted(set(starts))
                assert max(starts) + patch == max(length, patch)


@pytest.mark.parametrize("shape", [(3, 5, 4), (9, 17, 11), (4, 6, 5), (13, 7, 19)])
@pytest.mark.parametrize("step_fraction", [1.0, 0.5])
@pytest.mark.parametrize("weighting", ["constant", "gaussian"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_voxelwise_network_equals_whole_image(shape, step_fraction, weighting, batch_size):
    net = _voxelwise_net()
    image = torch.randn((2,) + shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(image[None])[0]
    result = sliding_window_predict(
        net, image, patch_size=(4, 6, 5), step_fraction=step_fraction, weighting=weighting, batch_size=batch_size
    )
    assert result.shape == (3,) + shape
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


def test_batches_never_exceed_batch_size_and_every_tile_runs_once():
    net = _voxelwise_net()
    image = torch.randn(2, 9, 17, 11)
    seen = []

    def counting(batch):
        seen.append(batch.shape[0])
        return net(batch)

    sliding_window_predict(counting, image, (4, 6, 5), step_fraction=0.5, batch_size=4)
    assert max(seen) <= 4
    assert sum(seen) == len(plan_tiles((9, 17, 11), (4, 6, 5), 0.5))


@pytest.mark.parametrize("step_fraction", [1.0, 0.5])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("shape", [(16, 24, 20), (8, 36, 30)])
def test_conv_network_matches_monai(step_fraction, batch_size, shape):
    monai_inferers = pytest.importorskip("monai.inferers")
    net = _conv_net()
    image = torch.randn((1,) + shape, generator=torch.Generator().manual_seed(2))
    patch = (8, 12, 10)
    ours = sliding_window_predict(net, image, patch, step_fraction=step_fraction, batch_size=batch_size)
    with torch.no_grad():
        theirs = monai_inferers.sliding_window_inference(
            image[None], roi_size=patch, sw_batch_size=batch_size, predictor=net,
            overlap=1.0 - step_fraction, mode="constant",
        )[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # The tiling really matters for this network: applying it to the whole image gives something else.
    with torch.no_grad():
        whole = net(image[None])[0]
    assert (ours - whole).abs().max() > 1e-3


def test_conv_network_matches_monai_on_an_uneven_size():
    """Tile placement (last tile shifted to the border) is MONAI's, also when the size is not a multiple."""
    monai_inferers = pytest.importorskip("monai.inferers")
    net = _conv_net()
    image = torch.randn(1, 11, 29, 23, generator=torch.Generator().manual_seed(3))
    ours = sliding_window_predict(net, image, (8, 12, 10), step_fraction=0.5, batch_size=2)
    with torch.no_grad():
        theirs = monai_inferers.sliding_window_inference(image[None], (8, 12, 10), 2, net, overlap=0.5)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_gaussian_weighting_favours_tile_centres():
    weight = gaussian_importance_map((8, 12, 10))
    assert weight.shape == (8, 12, 10)
    assert weight.min() > 0
    assert torch.isclose(weight.max(), torch.tensor(1.0))
    # Symmetric about the centre (σ = patch / 8 along each axis).
    torch.testing.assert_close(weight, weight.flip(0).flip(1).flip(2))
    assert weight[4, 6, 5] > weight[0, 6, 5] > 0
    # With a conv network and overlap, Gaussian and constant blending differ near tile borders.
    net = _conv_net()
    image = torch.randn(1, 16, 24, 20)
    constant = sliding_window_predict(net, image, (8, 12, 10), 0.5, "constant")
    gaussian = sliding_window_predict(net, image, (8, 12, 10), 0.5, "gaussian")
    assert (constant - gaussian).abs().max() > 1e-4


def test_bounding_box_region_skips_tiles_and_leaves_zero():
    net = _voxelwise_net()
    image = torch.randn(2, 12, 24, 20)
    box = ((5, 7), (2, 5), (11, 14))
    calls = []

    def counting(batch):
        calls.append(batch.shape[0])
        return net(batch)

    result = sliding_window_predict(counting, image, (4, 6, 5), region=box, batch_size=8)
    with torch.no_grad():
        whole = net(image[None])[0]
    # Tiles (z: 4..8, y: 0..6, x: 10..15) run: the box is inside them, so it gets the exact values.
    torch.testing.assert_close(result[:, 4:8, 0:6, 10:15], whole[:, 4:8, 0:6, 10:15], atol=1e-5, rtol=1e-5)
    assert sum(calls) == len(plan_tiles((12, 24, 20), (4, 6, 5), 1.0, box)) == 1
    untouched = torch.ones(12, 24, 20, dtype=torch.bool)
    untouched[4:8, 0:6, 10:15] = False
    assert (result[:, untouched] == 0).all()


@pytest.mark.parametrize("step_fraction", [1.0, 0.5])
def test_mask_region_predicts_every_masked_voxel(step_fraction):
    net = _voxelwise_net()
    shape = (14, 30, 26)
    image = torch.randn((2,) + shape)
    rng = np.random.default_rng(4)
    mask = np.zeros(shape, bool)
    mask[2:5, 3:9, 4:8] = True  # one blob
    mask[tuple(rng.integers(0, s, 5) for s in shape)] = True  # scattered voxels
    result = sliding_window_predict(net, image, (4, 6, 5), step_fraction, region=mask, batch_size=5)
    with torch.no_grad():
        whole = net(image[None])[0]
    torch.testing.assert_close(result[:, mask], whole[:, mask], atol=1e-5, rtol=1e-5)
    run = len(plan_tiles(shape, (4, 6, 5), step_fraction, mask))
    assert run < len(plan_tiles(shape, (4, 6, 5), step_fraction))
    # Voxels outside every run tile are exactly 0; a boolean tensor works the same as an array.
    same = sliding_window_predict(net, image, (4, 6, 5), step_fraction, region=torch.from_numpy(mask), batch_size=5)
    torch.testing.assert_close(same, result)
    assert (result == 0).any()


def test_fitted_starts_cover_the_range_evenly_and_stay_inside_the_axis():
    assert fitted_starts(10, 14, 40, 8, 8) == [8]  # one tile, centred on the range
    assert fitted_starts(0, 3, 40, 8, 8) == [0]  # shifted inside the axis
    assert fitted_starts(5, 25, 40, 8, 8) == [3, 11, 19]  # 3 tiles at the full step, centred
    assert fitted_starts(2, 9, 6, 8, 8) == [0]  # an axis shorter than the patch: one padded tile
    for length in range(1, 30):
        for patch in (1, 3, 4, 7):
            for step in range(1, patch + 1):
                for start in range(length):
                    for stop in range(start + 1, length + 1):
                        starts = fitted_starts(start, stop, length, patch, step)
                        covered = np.zeros(max(length, patch), bool)
                        for s in starts:
                            covered[s : s + patch] = True
                        assert covered[start:stop].all()
                        assert min(starts) >= 0 and max(starts) + patch <= max(length, patch)
                        assert len(starts) <= len(tile_starts(length, patch, step))


@pytest.mark.parametrize("step_fraction", [1.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bridged", [False, True])
def test_region_placement_covers_every_masked_voxel_with_fewer_tiles(step_fraction, seed, bridged):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(10, 40)), int(rng.integers(20, 60)), int(rng.integers(30, 80)))
    mask = np.zeros(shape, bool)
    for _ in range(3):  # a few blobs, like two lungs and an island
        corner = [int(rng.integers(0, s - 3)) for s in shape]
        size = [int(rng.integers(2, max(3, s // 3))) for s in shape]
        mask[tuple(slice(c, c + n) for c, n in zip(corner, size))] = True
    if bridged:  # a thin strip across that joins them, as a margin joins the lungs: the pieces come from erosion
        row = int(rng.integers(0, shape[1] - 2))
        mask[:, row : row + 2, :] = True
    patch = (6, 16, 16)
    corners = plan_tiles(shape, patch, step_fraction, mask, placement="region")
    covered = np.zeros(shape, bool)
    for corner in corners:
        assert all(0 <= c and (c + p <= n or c == 0) for c, p, n in zip(corner, patch, shape))
        covered[tuple(slice(c, c + p) for c, p in zip(corner, patch))] = True
        assert mask[tuple(slice(c, c + p) for c, p in zip(corner, patch))].any()  # no empty tile is run
    assert covered[mask].all()
    assert len(corners) == len(set(corners))
    assert len(corners) <= len(plan_tiles(shape, patch, step_fraction, mask)) + 2


def test_region_placement_fits_one_tile_per_lung_where_the_grid_needs_more():
    # Two "lungs" 20 voxels wide in x, 24 apart: a 24-wide grid over the 64-wide box needs 3 tiles per row,
    # the fitted tiles one per lung; in y the lungs are 20 deep, so one row instead of the grid's 2.
    shape = (12, 30, 64)
    mask = np.zeros(shape, bool)
    mask[:, 5:25, 0:20] = True
    mask[:, 5:25, 44:64] = True
    patch = (12, 24, 24)
    grid = plan_tiles(shape, patch, 1.0, mask)
    fitted = plan_tiles(shape, patch, 1.0, mask, placement="region")
    assert len(grid) == 6 and len(fitted) == 2
    net = _voxelwise_net()
    image = torch.randn((2,) + shape)
    result = sliding_window_predict(net, image, patch, 1.0, region=mask, placement="region")
    with torch.no_grad():
        whole = net(image[None])[0]
    torch.testing.assert_close(result[:, mask], whole[:, mask], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="placement"):
        plan_tiles(shape, patch, 1.0, mask, placement="lungs")


def test_region_placement_splits_lungs_that_the_margin_joined():
    # Two lungs 20 deep, one 10 voxels further back than the other, grown by a margin that meets between them
    # (a bridge 4 voxels wide): one piece 30 deep and 44 wide, 2 × 2 tiles as one box; eroded, it falls apart
    # into the two lungs again, one tile each (the bridge goes to the nearer lung, so it is covered too).
    shape = (12, 40, 48)
    mask = np.zeros(shape, bool)
    mask[:, 2:22, 0:21] = True
    mask[:, 12:32, 25:46] = True
    mask[:, 14:18, 21:25] = True
    patch = (12, 24, 24)
    fitted = plan_tiles(shape, patch, 1.0, mask, placement="region")
    assert len(fitted) == 2
    covered = np.zeros(shape, bool)
    for corner in fitted:
        covered[tuple(slice(c, c + p) for c, p in zip(corner, patch))] = True
    assert covered[mask].all()


def test_sized_spans_cover_the_range_with_the_overlap_asked_for():
    for length in (20, 50, 97, 300):
        for patch in (16, 24, 48, 64):
            largest = int(1.25 * patch)
            for step_fraction in (1.0, 0.5):
                for start in range(0, length - 1, 7):
                    for stop in range(start + 1, length + 1, 11):
                        spans = sized_spans(start, stop, length, step_fraction, 8, patch, largest)
                        sizes = {size for _, size in spans}
                        assert len(sizes) == 1
                        size = sizes.pop()
                        assert size % 8 == 0 and size <= largest // 8 * 8 or len(spans) == 1
                        assert size >= min(patch, -(-length // 8) * 8)
                        covered = np.zeros(length, bool)
                        for first, _ in spans:
                            assert first >= 0 and (first + size <= length or first == 0)
                            covered[first : first + size] = True
                        assert covered[start:stop].all()
                        firsts = [first for first, _ in spans]
                        # consecutive tiles overlap by at least 1 - step_fraction of their size
                        assert all(b - a <= step_fraction * size + 1e-9 for a, b in zip(firsts, firsts[1:]))


@pytest.mark.parametrize("step_fraction", [1.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bridged", [False, True])
def test_sized_placement_covers_every_masked_voxel_with_tiles_a_little_larger(step_fraction, seed, bridged):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(10, 40)), int(rng.integers(40, 90)), int(rng.integers(50, 110)))
    mask = np.zeros(shape, bool)
    for _ in range(3):
        corner = [int(rng.integers(0, s - 3)) for s in shape]
        size = [int(rng.integers(2, max(3, s // 2))) for s in shape]
        mask[tuple(slice(c, c + n) for c, n in zip(corner, size))] = True
    if bridged:
        row = int(rng.integers(0, shape[1] - 2))
        mask[:, row : row + 2, :] = True
    patch = (6, 24, 24)
    tiles = plan_tile_boxes(shape, patch, step_fraction, mask, placement="region_sized")
    covered = np.zeros(shape, bool)
    for corner, size in tiles:
        assert size[0] == patch[0] and all(s % 8 == 0 for s in size[1:])
        assert all(p <= s <= MAX_TILE_SCALE * p for s, p in zip(size[1:], patch[1:]))  # never less than the patch
        assert size[1] * size[2] <= MAX_TILE_SCALE * patch[1] * patch[2]  # one call's memory, bounded
        assert all(0 <= c and (c + p <= n or c == 0) for c, p, n in zip(corner, size, shape))
        box = tuple(slice(c, c + p) for c, p in zip(corner, size))
        covered[box] = True
        assert mask[box].any()
    assert covered[mask].all()
    fixed = plan_tile_boxes(shape, patch, step_fraction, mask, placement="region")
    assert len(tiles) <= len(fixed)


def test_sized_placement_runs_one_longer_tile_where_the_patch_needs_two():
    # Two "lungs" 36 deep and 14 wide: the 32×32 patch needs two rows of tiles per lung; sized, one tile of 40 × 32
    # each (36 rounded up to 8, within 1.25 × 32), 1,280 in-plane voxels instead of 2 × 1,024.
    shape = (12, 50, 64)
    mask = np.zeros(shape, bool)
    mask[:, 6:42, 2:16] = True
    mask[:, 6:42, 46:60] = True
    patch = (12, 32, 32)
    assert len(plan_tiles(shape, patch, 1.0, mask, placement="region")) == 4
    tiles = plan_tile_boxes(shape, patch, 1.0, mask, placement="region_sized")
    assert [size for _, size in tiles] == [(12, 40, 32)] * 2
    net = _voxelwise_net()
    image = torch.randn((2,) + shape)
    with torch.no_grad():
        whole = net(image[None])[0]
    for step_fraction, weighting in ((1.0, "constant"), (0.5, "gaussian")):
        sizes = []

        def recording(batch, sizes=sizes):
            sizes.append(tuple(batch.shape[2:]))
            return net(batch)

        result = sliding_window_predict(recording, image, patch, step_fraction, weighting, batch_size=3, region=mask,
                                        placement="region_sized")
        torch.testing.assert_close(result[:, mask], whole[:, mask], atol=1e-5, rtol=1e-5)
        assert {size for size in sizes} != {patch}


def test_sized_placement_batches_tiles_of_one_size_and_hands_each_its_box():
    rng = np.random.default_rng(3)
    shape = (20, 70, 90)
    mask = np.zeros(shape, bool)
    mask[2:18, 5:60, 4:30] = True
    mask[5:20, 20:45, 50:88] = True
    mask[0:6, 60:70, 40:50] = True
    image = torch.from_numpy(rng.standard_normal((1,) + shape).astype(np.float32))
    received = []

    def by_box(batch, boxes):
        assert len({tuple(size) for _, size in boxes.tolist()}) == 1
        for patch, (start, size) in zip(batch, boxes.tolist()):
            assert tuple(patch.shape[1:]) == tuple(size)
            z, y, x = start
            expected = image[:, z : z + size[0], y : y + size[1], x : x + size[2]]
            assert torch.equal(patch[:, : expected.shape[1], : expected.shape[2], : expected.shape[3]], expected)
            received.append((tuple(start), tuple(size)))
        return batch

    result = sliding_window_predict(by_box, image, (8, 32, 32), 0.5, "gaussian", batch_size=2, region=mask,
                                    with_boxes=True, placement="region_sized")
    assert sorted(received) == sorted(plan_tile_boxes(shape, (8, 32, 32), 0.5, mask, placement="region_sized"))
    assert len({size for _, size in received}) > 1
    torch.testing.assert_close(result[:, mask], image[:, mask])


def test_empty_region_gives_zeros_of_the_right_shape():
    net = _voxelwise_net()
    image = torch.randn(2, 6, 8, 7)
    result = sliding_window_predict(net, image, (4, 6, 5), region=np.zeros((6, 8, 7), bool))
    assert result.shape == (3, 6, 8, 7)
    assert (result == 0).all()


def test_float64_image_and_output_device_none_keep_float32_accumulators():
    net = _voxelwise_net().double()
    image = torch.randn(2, 7, 9, 6, dtype=torch.float64)
    result = sliding_window_predict(net, image, (4, 6, 5), output_device=None)
    assert result.dtype == torch.float32 and result.device == image.device
    torch.testing.assert_close(result, net(image[None])[0].float().detach(), atol=1e-5, rtol=1e-5)


def test_wrong_output_shape_and_bad_arguments_are_refused():
    image = torch.randn(1, 8, 8, 8)
    with pytest.raises(ValueError, match="predict_fn returned"):
        sliding_window_predict(lambda b: b[:, :, :2], image, (4, 4, 4))
    with pytest.raises(ValueError, match="step_fraction"):
        sliding_window_predict(lambda b: b, image, (4, 4, 4), step_fraction=0.0)
    with pytest.raises(ValueError, match="weighting"):
        sliding_window_predict(lambda b: b, image, (4, 4, 4), weighting="linear")
    with pytest.raises(ValueError, match="region mask shape"):
        plan_tiles((8, 8, 8), (4, 4, 4), region=np.ones((8, 8, 7), bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_network_with_cpu_accumulators(monkeypatch):
    # cuDNN would otherwise run float32 convolutions in TF32 (10-bit mantissa): 1e-3 differences from the CPU.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    net = _conv_net().cuda()
    image = torch.randn(1, 16, 24, 20)
    on_gpu = sliding_window_predict(net, image, (8, 12, 10), 0.5, device="cuda", batch_size=4)
    on_gpu_accumulated = sliding_window_predict(net, image.cuda(), (8, 12, 10), 0.5, batch_size=4, output_device=None)
    on_cpu = sliding_window_predict(net.cpu(), image, (8, 12, 10), 0.5, batch_size=4)
    assert on_gpu.device.type == "cpu" and on_gpu_accumulated.device.type == "cuda"
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(on_gpu_accumulated.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


def test_with_boxes_hands_each_patch_its_box():
    image = torch.randn(1, 9, 17, 11)
    received = []

    def by_box(batch, boxes):
        received.extend(boxes.tolist())
        for patch, (start, size) in zip(batch, boxes.tolist()):
            z, y, x = start
            expected = image[:, z : z + size[0], y : y + size[1], x : x + size[2]]
            assert torch.equal(patch[:, : expected.shape[1], : expected.shape[2], : expected.shape[3]], expected)
        return batch

    result = sliding_window_predict(by_box, image, (4, 6, 5), step_fraction=0.5, batch_size=3, with_boxes=True)
    torch.testing.assert_close(result, image)
    assert sorted(tuple(start) for start, _ in received) == sorted(plan_tiles((9, 17, 11), (4, 6, 5), 0.5))
    assert all(size == [4, 6, 5] for _, size in received)
