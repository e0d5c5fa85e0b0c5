"""Sliding-window inference over a 3D volume: tile, run the network on batches of patches, blend.

The lesion subnet is trained on patches (paper: 24×256×256 voxels) and applied to a whole scan by
tiling it. The paper tiles without overlap (``step_fraction=1.0``); overlapping tiles with Gaussian
blending (``step_fraction=0.5``, ``weighting="gaussian"``) are the nnU-Net default.

Tile placement follows MONAI's ``dense_patch_slices``: along an axis of length ``L`` with patch size
``p`` and step ``s``, tiles start at ``0, s, 2s, ...`` and the last tile is shifted back so that it ends
exactly at the border. An axis shorter than the patch gets one tile, padded at its end with
``pad_value`` and cropped afterwards. With the same step, the tiles (and therefore the blended output
with constant weighting) are the same as MONAI's.

``placement="region"`` fits the tiles to a region mask instead (the lung): slabs of ``pz`` slices over the
region's z extent, and in each slab tiles laid over the slab's own in-plane extent of the region, or over each of
its in-plane pieces (each lung) when that takes fewer tiles, centred on them. The pieces are the connected ones,
or, where a margin grown around the lungs joins them into one, the pieces that reappear when the footprint is
eroded, each voxel given to the nearest. With large patches this is what makes the lung restriction pay: the
paper's 24×256×256 tiles over a 444-voxel-wide lung box need 2 tiles in x everywhere on the volume grid, but one
per lung, and one in y wherever the lung (with its margin) is shallower than 256 voxels.

``placement="region_sized"`` lets a tile grow where the patch would need two: each piece of a slab gets the
fewest tiles that cover it, each at least the patch along an in-plane axis and at most ``MAX_TILE_SCALE`` × it, in
all at most ``MAX_TILE_SCALE`` × the patch's in-plane voxels, and each as small as covering allows within that (a
multiple of ``size_multiple``, the network's total downsampling). A lung 269 voxels deep then takes one tile of
272 × 256 instead of two of 256 × 256. The network is convolutional and the image is 0 outside the region, so a
larger tile sees what two would; what changes is its instance normalisation, whose statistics are the tile's. Tiles
are never made smaller than the patch: shrunk to the region, they changed a trained network's output
(docs/prediction.md, the engine).

Memory stays bounded: the only full-size tensors are the output accumulator ``(K, Z, Y, X)`` and the
weight map ``(Z, Y, X)`` (both float32); patches are cut from the image one batch at a time and padding
is applied per patch, never to the whole volume.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage

from dscovid.parallel import progress_bar

log = logging.getLogger(__name__)

#: A region given as a bounding box: one ``(start, stop)`` pair of voxel indices per axis (z, y, x).
BoundingBox = Sequence[tuple[int, int]]

WEIGHTINGS = ("constant", "gaussian")
PLACEMENTS = ("grid", "region", "region_sized")

#: ``region_sized``: the longest tile along an in-plane axis, as a multiple of the patch's size along it.
MAX_TILE_SCALE = 1.25
#: A tile: its start corner and its size, ``(z, y, x)`` each.
Tile = tuple[tuple[int, int, int], tuple[int, int, int]]


def tile_step(patch: int, step_fraction: float) -> int:
    """The distance in voxels between consecutive tile starts (at least 1), as MONAI computes it."""
    if not 0.0 < step_fraction <= 1.0:
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction}")
    # The small epsilon keeps e.g. 0.3 * 10 = 3.0000000000000004 and 0.29 * 100 = 28.999999999999996 both exact.
    return max(1, int(patch * step_fraction + 1e-9))


def tile_starts(length: int, patch: int, step: int) -> list[int]:
    """Start indices of the tiles along one axis.

    Parameters
    ----------
    length : number of voxels along the axis.
    patch : tile size along the axis.
    step : distance between tile starts (see :func:`tile_step`).

    Returns
    -------
    Sorted, distinct start indices; the last tile ends at ``length`` (or at ``patch`` when the axis is
    shorter than the patch, in which case the only start is 0 and the tile is padded).
    """
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch, step))
    starts.append(length - patch)
    return starts


def fitted_starts(start: int, stop: int, length: int, patch: int, step: int) -> list[int]:
    """Tile starts along one axis that cover ``[start, stop)`` of an axis of ``length`` voxels.

    The fewest tiles at ``step`` that span the range, spread evenly and centred on it (so the range's ends get
    context on both sides where the axis allows), then shifted to lie inside the axis; an axis shorter than the
    patch gets the single start 0 (the tile is padded).
    """
    if length <= patch:
        return [0]
    count = 1 + max(0, -(-(stop - start - patch) // step))
    first = start - ((count - 1) * step + patch - (stop - start)) // 2
    return sorted({min(max(first + k * step, 0), length - patch) for k in range(count)})


def sized_spans(start: int, stop: int, length: int, step_fraction: float, multiple: int, smallest: int,
                largest: int) -> list[tuple[int, int]]:
    """``(start, size)`` of tiles of one size that cover ``[start, stop)`` of an axis of ``length`` voxels.

    The fewest tiles no larger than ``largest`` that cover the range while consecutive tiles overlap by at least
    ``1 - step_fraction`` of their size; their size the smallest that does, rounded up to ``multiple`` and at least
    ``smallest`` (never more than the axis, rounded up, which is then padded). Spread evenly and centred on the
    range, then shifted to lie inside the axis, as :func:`fitted_starts`.
    """

    def round_up(value: int) -> int:
        return -(-value // multiple) * multiple

    extent = stop - start
    largest = max(multiple, largest // multiple * multiple)
    count = 1
    while True:
        size = round_up(math.ceil(extent / (1.0 + (count - 1) * step_fraction) - 1e-9))
        if size <= largest:
            break
        count += 1
    size = min(max(size, round_up(smallest)), round_up(length))
    if count == 1 or length <= size:
        firsts = [start - (size - extent) // 2]
    else:
        firsts = [start + round(k * (extent - size) / (count - 1)) for k in range(count)]
    return sorted({(min(max(first, 0), max(length - size, 0)), size) for first in firsts})


def _sized_piece(box: tuple[slice, slice], shape_yx: tuple[int, int], patch_yx: tuple[int, int],
                 step_fraction: float, multiple: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The y and x spans of one piece's tiles: along each axis at least the patch and at most ``MAX_TILE_SCALE`` ×
    it, and in all at most ``MAX_TILE_SCALE`` × the patch's in-plane voxels (one call's memory)."""
    limits = [int(MAX_TILE_SCALE * p) for p in patch_yx]
    while True:
        spans = [sized_spans(b.start, b.stop, n, step_fraction, multiple, p, limit)
                 for b, n, p, limit in zip(box, shape_yx, patch_yx, limits)]
        sizes = [axis[0][1] for axis in spans]
        if sizes[0] * sizes[1] <= MAX_TILE_SCALE * patch_yx[0] * patch_yx[1] or limits == list(patch_yx):
            return spans[0], spans[1]
        longer = int(sizes[1] - patch_yx[1] > sizes[0] - patch_yx[0])
        limits[longer] = max(patch_yx[longer], sizes[longer] - multiple)


#: Erosion depths (in-plane voxels) at which a slab's footprint is tried for pieces that a margin joined.
SPLIT_DEPTHS = (4, 8, 16, 32, 64)


def _piece_labelings(footprint: np.ndarray) -> Iterator[np.ndarray]:
    """Ways to cut a slab's in-plane footprint into pieces, each a label map over the footprint.

    First its 8-connected pieces. Then, since the region is the lung grown by a margin, which can join the two
    lungs into one piece across the mediastinum, the pieces that reappear when the footprint is eroded
    (``SPLIT_DEPTHS``), every footprint voxel given to the nearest of them: the lungs apart again, with their
    margins. Every labeling labels every footprint voxel, so tiles fitted to its pieces cover the footprint.
    """
    connectivity = np.ones((3, 3), dtype=bool)
    yield ndimage.label(footprint, structure=connectivity)[0]
    depth = ndimage.distance_transform_cdt(footprint, metric="chessboard")
    for erosion in SPLIT_DEPTHS:
        cores, count = ndimage.label(depth > erosion, structure=connectivity)
        if count < 2:
            if count == 0:
                return
            continue
        nearest = ndimage.distance_transform_edt(cores == 0, return_distances=False, return_indices=True)
        yield np.where(footprint, cores[nearest[0], nearest[1]], 0)


def _fitted_corners(mask: np.ndarray, patch_size: tuple[int, int, int], step: tuple[int, int, int]):
    """Tile corners fitted to a boolean mask, slab by slab (see the module docstring)."""
    shape_zyx = mask.shape
    along_z = np.flatnonzero(mask.any(axis=(1, 2)))
    if along_z.size == 0:
        return []
    corners: set[tuple[int, int, int]] = set()
    for z in fitted_starts(int(along_z[0]), int(along_z[-1]) + 1, shape_zyx[0], patch_size[0], step[0]):
        footprint = mask[z : z + patch_size[0]].any(axis=0)
        if not footprint.any():
            continue
        # One grid over the slab's whole footprint, or one per piece (each lung): the fewest tiles.
        options = [_tiles_over(footprint.astype(np.int32), footprint, shape_zyx, patch_size, step)]
        options += [_tiles_over(pieces, footprint, shape_zyx, patch_size, step)
                    for pieces in _piece_labelings(footprint)]
        chosen = min(options, key=len)
        corners.update((z, y, x) for y, x in chosen if mask[z : z + patch_size[0], y : y + patch_size[1],
                                                             x : x + patch_size[2]].any())
    return sorted(corners)


def _tiles_over(pieces: np.ndarray, footprint: np.ndarray, shape_zyx: tuple[int, int, int],
                patch_size: tuple[int, int, int], step: tuple[int, int, int]) -> set[tuple[int, int]]:
    """In-plane tile corners fitted to each labelled piece's bounding box, keeping those that touch the footprint."""
    tiles = set()
    for box in ndimage.find_objects(pieces):
        if box is None:
            continue
        ys = fitted_starts(box[0].start, box[0].stop, shape_zyx[1], patch_size[1], step[1])
        xs = fitted_starts(box[1].start, box[1].stop, shape_zyx[2], patch_size[2], step[2])
        tiles.update((y, x) for y in ys for x in xs if footprint[y : y + patch_size[1], x : x + patch_size[2]].any())
    return tiles


def _sized_tiles(mask: np.ndarray, patch_size: tuple[int, int, int], step_fraction: float,
                 multiple: int) -> list[Tile]:
    """Tiles fitted in place and in-plane size to a boolean mask, slab by slab (see the module docstring)."""
    shape_zyx = mask.shape
    along_z = np.flatnonzero(mask.any(axis=(1, 2)))
    if along_z.size == 0:
        return []
    pz = patch_size[0]
    tiles: set[Tile] = set()
    for z in fitted_starts(int(along_z[0]), int(along_z[-1]) + 1, shape_zyx[0], pz, tile_step(pz, step_fraction)):
        slab = mask[z : z + pz]
        footprint = slab.any(axis=0)
        if not footprint.any():
            continue
        options = []
        for pieces in (footprint.astype(np.int32), *_piece_labelings(footprint)):
            option = set()
            for box in ndimage.find_objects(pieces):
                if box is None:
                    continue
                ys, xs = _sized_piece(box, shape_zyx[1:], patch_size[1:], step_fraction, multiple)
                option.update(((y, ty), (x, tx)) for y, ty in ys for x, tx in xs
                              if footprint[y : y + ty, x : x + tx].any())
            options.append(option)
        # The fewest voxels run (with large tiles, the time of the network).
        chosen = min(options, key=lambda option: sum(ty * tx for (_, ty), (_, tx) in option))
        tiles.update(((z, y, x), (pz, ty, tx)) for (y, ty), (x, tx) in chosen
                     if slab[:, y : y + ty, x : x + tx].any())
    return sorted(tiles)


def plan_tiles(
    shape_zyx: Sequence[int],
    patch_size: Sequence[int],
    step_fraction: float = 1.0,
    region: np.ndarray | torch.Tensor | BoundingBox | None = None,
    placement: str = "grid",
    size_multiple: int = 8,
) -> list[tuple[int, int, int]]:
    """The start corners of :func:`plan_tile_boxes`' tiles (for ``"region_sized"`` their sizes differ)."""
    return [corner for corner, _ in plan_tile_boxes(shape_zyx, patch_size, step_fraction, region, placement,
                                                    size_multiple)]


def plan_tile_boxes(
    shape_zyx: Sequence[int],
    patch_size: Sequence[int],
    step_fraction: float = 1.0,
    region: np.ndarray | torch.Tensor | BoundingBox | None = None,
    placement: str = "grid",
    size_multiple: int = 8,
) -> list[Tile]:
    """All tiles ``(corner, size)`` of a volume, keeping only those that touch ``region``.

    Parameters
    ----------
    shape_zyx : the volume's shape ``(Z, Y, X)``.
    patch_size : tile size ``(pz, py, px)`` in voxels.
    step_fraction : tile step as a fraction of the patch size (1.0: no overlap, 0.5: half overlap).
    region : None (all tiles), a boolean mask of shape ``(Z, Y, X)`` (tiles with no True voxel are
        skipped) or a bounding box ``((z0, z1), (y0, y1), (x0, x1))`` with exclusive stops (tiles not
        intersecting it are skipped).
    placement : ``"grid"``: MONAI's tiles over the whole volume; ``"region"``: tiles fitted to a region mask,
        slab by slab and piece by piece (every region voxel is still covered; fewer tiles with large patches);
        ``"region_sized"``: the same with each tile's in-plane size fitted to its piece (see the module docstring).
        A bounding box or no region always uses the grid.
    size_multiple : ``"region_sized"`` only: tile sizes are multiples of it (the network's total downsampling).

    Returns
    -------
    ``((z, y, x), (pz, py, px))`` per tile, corners in raster order (z slowest); the size is ``patch_size`` except
    with ``"region_sized"``.
    """
    shape_zyx = tuple(int(v) for v in shape_zyx)
    patch_size = tuple(int(v) for v in patch_size)
    if len(shape_zyx) != 3 or len(patch_size) != 3:
        raise ValueError(f"expected 3D shape and patch size, got {shape_zyx} and {patch_size}")
    if min(patch_size) < 1:
        raise ValueError(f"patch size must be positive, got {patch_size}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    per_axis = [
        tile_starts(length, patch, tile_step(patch, step_fraction))
        for length, patch in zip(shape_zyx, patch_size)
    ]
    corners = list(itertools.product(*per_axis))
    if region is None:
        return [(corner, patch_size) for corner in corners]
    if _is_bounding_box(region):
        box = [(int(a), int(b)) for a, b in region]
        return [
            (corner, patch_size)
            for corner in corners
            if all(start < stop and c < stop and c + p > start for c, p, (start, stop) in zip(corner, patch_size, box))
        ]
    mask = region.detach().cpu().numpy() if isinstance(region, torch.Tensor) else np.asarray(region)
    if mask.shape != shape_zyx:
        raise ValueError(f"region mask shape {mask.shape} does not match the image shape {shape_zyx}")
    mask = mask.astype(bool, copy=False)
    if placement == "region":
        return [(corner, patch_size)
                for corner in _fitted_corners(mask, patch_size, tuple(tile_step(p, step_fraction) for p in patch_size))]
    if placement == "region_sized":
        return _sized_tiles(mask, patch_size, step_fraction, size_multiple)
    # Project the mask onto coarse per-tile checks: first which z-ranges hold anything at all, so that the
    # (cheap) per-tile test runs only where a slab is not empty.
    slab_any = {z: bool(mask[z : z + patch_size[0]].any()) for z in per_axis[0]}
    kept = []
    for z, y, x in corners:
        if slab_any[z] and mask[z : z + patch_size[0], y : y + patch_size[1], x : x + patch_size[2]].any():
            kept.append(((z, y, x), patch_size))
    return kept


def _is_bounding_box(region: object) -> bool:
    if isinstance(region, (np.ndarray, torch.Tensor)):
        return False
    try:
        return len(region) == 3 and all(len(pair) == 2 for pair in region)  # type: ignore[arg-type]
    except TypeError:
        return False


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """A separable Gaussian weight over one patch, 1 at the centre, σ = ``sigma_scale`` × patch size per axis.

    Returns
    -------
    float32 tensor ``(pz, py, px)``; strictly positive (values that underflow are raised to the smallest
    positive one, as nnU-Net does, so that every voxel of a tile keeps some weight).
    """
    axes = []
    for size in patch_size:
        sigma = max(sigma_scale * size, 1e-6)
        centre = (size - 1) / 2.0
        coordinates = torch.arange(size, dtype=torch.float64) - centre
        axes.append(torch.exp(-0.5 * (coordinates / sigma) ** 2))
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weight = (weight / weight.max()).float()
    positive = weight[weight > 0]
    floor = positive.min() if positive.numel() else torch.tensor(1.0)
    return torch.clamp(weight, min=float(floor))


def _batches(tiles: Sequence[Tile], batch_size: int) -> Iterator[Sequence[Tile]]:
    """Consecutive tiles of one size, at most ``batch_size`` at a time (a batch is one tensor)."""
    for _, same in itertools.groupby(tiles, key=lambda tile: tile[1]):
        same = list(same)
        for index in range(0, len(same), batch_size):
            yield same[index : index + batch_size]


def _cut_patch(image: torch.Tensor, corner: tuple[int, int, int], patch_size: tuple[int, int, int], pad_value: float):
    """The patch of ``image`` (C, Z, Y, X) at ``corner``, padded at its far end where it runs past the image."""
    slices = tuple(slice(c, c + p) for c, p in zip(corner, patch_size))
    patch = image[(slice(None),) + slices]
    missing = [p - s for p, s in zip(patch_size, patch.shape[1:])]
    if any(missing):
        # F.pad takes (x_before, x_after, y_before, y_after, z_before, z_after).
        patch = torch.nn.functional.pad(patch, (0, missing[2], 0, missing[1], 0, missing[0]), value=pad_value)
    return patch


def sliding_window_predict(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch_size: Sequence[int],
    step_fraction: float = 1.0,
    weighting: str = "constant",
    batch_size: int = 1,
    region: np.ndarray | torch.Tensor | BoundingBox | None = None,
    device: torch.device | str | None = None,
    output_device: torch.device | str | None = "cpu",
    pad_value: float = 0.0,
    sigma_scale: float = 0.125,
    progress: bool = False,
    with_boxes: bool = False,
    placement: str = "grid",
    size_multiple: int = 8,
) -> torch.Tensor:
    """Apply a patch network to a whole volume by tiling it and averaging the tile outputs per voxel.

    Parameters
    ----------
    predict_fn : maps a batch ``(B, C, pz, py, px)`` to ``(B, K, pz, py, px)`` (any float dtype). It is called
        under ``torch.no_grad``; wrap it in ``torch.autocast`` yourself for mixed precision.
    image : float tensor ``(C, Z, Y, X)``, on any device (patches are cut there and moved to ``device``).
    patch_size : tile size ``(pz, py, px)`` in voxels.
    step_fraction : tile step as a fraction of the patch size: 1.0 tiles without overlap (the paper),
        0.5 overlaps by half. Equivalent to MONAI's ``overlap = 1 - step_fraction``.
    weighting : ``"constant"`` (plain mean of overlapping tiles) or ``"gaussian"`` (each tile weighted by a
        Gaussian with σ = ``sigma_scale`` × patch size, 1/8 by default, favouring tile centres).
    batch_size : number of patches per call of ``predict_fn``.
    region : restrict prediction to a region: a boolean mask ``(Z, Y, X)`` of the voxels that need a
        prediction, or a bounding box ``((z0, z1), (y0, y1), (x0, x1))`` (stops exclusive). Tiles that do not
        touch it are not run; voxels covered by no tile get 0.
    device : where ``predict_fn`` runs (patches are moved there); default: the image's device.
    output_device : where the float32 accumulators (and the result) live; default the CPU, None for the
        image's device.
    pad_value : value of the padding added to patches that run past an axis shorter than the patch.
    sigma_scale : σ of the Gaussian weighting as a fraction of the patch size.
    progress : show a tqdm progress bar over the patches.
    with_boxes : call ``predict_fn(batch, boxes)`` with ``boxes`` an int64 CPU tensor ``(B, 2, 3)``: the start and
        the size ``(z, y, x)`` of each patch in image voxels (the ``patch_box`` of :mod:`dscovid.model.geometry`;
        a patch padded past a short axis keeps its full size, so its box reaches past the volume).
    placement : ``"grid"`` (MONAI's tiles), ``"region"`` (tiles fitted to a region mask) or ``"region_sized"``
        (fitted in size too: ``predict_fn`` then gets batches of tiles of other sizes, each a multiple of
        ``size_multiple``, at most ``MAX_TILE_SCALE`` × the patch in-plane); see :func:`plan_tile_boxes`.

    Returns
    -------
    float32 tensor ``(K, Z, Y, X)`` on ``output_device``: per voxel, the (weighted) mean of the outputs of
    all tiles covering it, 0 where no tile was run.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (C, Z, Y, X), got shape {tuple(image.shape)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    patch_size = tuple(int(v) for v in patch_size)
    shape_zyx = tuple(int(v) for v in image.shape[1:])
    device = torch.device(device) if device is not None else image.device
    output_device = torch.device(output_device) if output_device is not None else image.device

    tiles = plan_tile_boxes(shape_zyx, patch_size, step_fraction, region, placement, size_multiple)
    # Tiles of one size together (one tensor per batch); raster order within a size.
    tiles.sort(key=lambda tile: (tile[1], tile[0]))
    log.debug("sliding window: %d tiles of %s over %s (step %.2f, %s)", len(tiles), patch_size, shape_zyx,
              step_fraction, placement)

    tile_weights: dict[tuple[int, int, int], torch.Tensor] = {}  # the Gaussian of each tile size, on output_device
    output: torch.Tensor | None = None  # allocated once the number of output channels K is known
    weight_map = torch.zeros(shape_zyx, dtype=torch.float32, device=output_device)

    bar = progress_bar(total=len(tiles), desc="patches", unit="patch", disable=not progress, leave=False)
    with torch.no_grad():
        for batch_tiles in _batches(tiles, batch_size):
            size = batch_tiles[0][1]
            batch = torch.stack([_cut_patch(image, corner, size, pad_value) for corner, _ in batch_tiles])
            batch = batch.to(device, non_blocking=True)
            if with_boxes:
                boxes = torch.tensor([[corner, size] for corner, _ in batch_tiles], dtype=torch.int64)
                prediction = predict_fn(batch, boxes)
            else:
                prediction = predict_fn(batch)
            if prediction.ndim != 5 or prediction.shape[0] != len(batch_tiles) or tuple(prediction.shape[2:]) != size:
                raise ValueError(
                    f"predict_fn returned shape {tuple(prediction.shape)} for a batch of shape {tuple(batch.shape)}; "
                    f"expected (B, K, {', '.join(map(str, size))})"
                )
            prediction = prediction.to(output_device, dtype=torch.float32)
            if output is None:
                output = torch.zeros((prediction.shape[1],) + shape_zyx, dtype=torch.float32, device=output_device)
            if weighting == "gaussian" and size not in tile_weights:
                tile_weights[size] = gaussian_importance_map(size, sigma_scale).to(output_device)
            for tile, (corner, _) in zip(prediction, batch_tiles):
                # Crop the tile to the image (it may be padded) and add it in.
                inside = tuple(min(p, length - c) for c, p, length in zip(corner, size, shape_zyx))
                target = tuple(slice(c, c + n) for c, n in zip(corner, inside))
                tile = tile[:, : inside[0], : inside[1], : inside[2]]
                if weighting == "constant":
                    output[(slice(None),) + target] += tile
                    weight_map[target] += 1.0
                else:
                    weights = tile_weights[size][: inside[0], : inside[1], : inside[2]]
                    output[(slice(None),) + target].addcmul_(tile, weights)  # in place: no weighted copy of the tile
                    weight_map[target] += weights
            bar.update(len(batch_tiles))
    bar.close()

    if output is None:
        # No tile touched the region: the number of output channels is unknown without running the network once.
        probe = _cut_patch(image, (0, 0, 0), patch_size, pad_value)[None].to(device)
        with torch.no_grad():
            if with_boxes:
                channels = predict_fn(probe, torch.tensor([[(0, 0, 0), patch_size]], dtype=torch.int64)).shape[1]
            else:
                channels = predict_fn(probe).shape[1]
        return torch.zeros((channels,) + shape_zyx, dtype=torch.float32, device=output_device)
    # In place, to avoid another full-size tensor: voxels with no tile have output 0 and weight 0 → 0 / tiny = 0.
    output.div_(weight_map.clamp_(min=torch.finfo(torch.float32).tiny))
    return output
