"""The true mapping between a segmentation patch and the classification grid (docs/formats.md §4).

The classification grid ``(N, H, W)`` covers the whole preprocessed volume of shape ``(Z, Y, X)`` with cell-centred
sampling (``align_corners=False``). A patch box covering preprocessed voxels ``[start, start + size)`` along an axis
of length ``L`` occupies normalised coordinates ``[2*start/L - 1, 2*(start+size)/L - 1]`` of that grid. Any feature
map computed from the patch (at any stride) is taken to cover the same box, and any feature map computed from the
classification image (at any stride) to cover the whole volume: both are cell-centred, as ``F.interpolate`` with
``align_corners=False`` assumes.

Two operations are built on it, both with ``F.affine_grid`` / ``F.grid_sample`` (``align_corners=False``):

- :func:`sample_box`: read grid features over a patch box at any output resolution (the classification → segmentation
  direction of the cross-stitch, and the CROP of the evidence masks in equation 5);
- :func:`paste_box`: write patch features onto the grid, with the fraction of each grid cell that the box covers
  (the segmentation → classification direction of the cross-stitch, and Ŝ entering the classifier).

:func:`sample_box` is trilinear and area-averages where it downsamples; :func:`paste_box` is an exact area-weighted
(conservative) remapping, so a small lesion is neither lost between sample points nor smeared across cells. Boxes
may lie partly outside the volume: grid features outside it read as zero, patch parts outside it are dropped.

Boxes are given as ``patch_box`` of shape ``(B, 2, 3)``: ``patch_box[:, 0]`` the start and ``patch_box[:, 1]`` the
size, ``(z, y, x)``, in preprocessed voxels; ``volume_shape`` of shape ``(B, 3)`` is the preprocessed volume shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dscovid.errors import DscovidError

BoxLike = torch.Tensor | Sequence[Sequence[Sequence[float]]]
ShapeLike = torch.Tensor | Sequence[Sequence[int]]


def as_boxes(patch_box: BoxLike, volume_shape: ShapeLike, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Check and convert patch boxes and volume shapes to float64 CPU tensors.

    Parameters
    ----------
    patch_box : (B, 2, 3) tensor or nested sequence
        Start and size ``(z, y, x)`` of each patch in preprocessed voxels (start may be negative).
    volume_shape : (B, 3) tensor or nested sequence, or (3,) for one volume shared by all samples
        Preprocessed volume shape ``(Z, Y, X)``.
    batch_size : int
        Expected B.

    Returns
    -------
    boxes : (B, 2, 3) float64 tensor
    shapes : (B, 3) float64 tensor
    """
    boxes = torch.as_tensor(patch_box, dtype=torch.float64).detach().cpu()
    shapes = torch.as_tensor(volume_shape, dtype=torch.float64).detach().cpu()
    if shapes.ndim == 1:
        shapes = shapes.expand(batch_size, 3)
    if boxes.ndim == 2:
        boxes = boxes.expand(batch_size, 2, 3)
    if boxes.shape != (batch_size, 2, 3):
        raise DscovidError(f"patch_box must have shape ({batch_size}, 2, 3) (start, size in z, y, x), got {tuple(boxes.shape)}")
    if shapes.shape != (batch_size, 3):
        raise DscovidError(f"volume_shape must have shape ({batch_size}, 3), got {tuple(shapes.shape)}")
    if bool((boxes[:, 1] <= 0).any()) or bool((shapes <= 0).any()):
        raise DscovidError("patch box sizes and volume shapes must be positive")
    return boxes, shapes


def _theta_grid_to_box(start: torch.Tensor, size: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Affine map from box-normalised output coordinates to volume-normalised input coordinates, ``(3, 4)`` xyz."""
    centre = (2.0 * start + size) / shape - 1.0  # (z, y, x)
    half = size / shape
    theta = torch.zeros(3, 4, dtype=torch.float64)
    for row, axis in enumerate((2, 1, 0)):  # affine_grid works in (x, y, z)
        theta[row, row] = half[axis]
        theta[row, 3] = centre[axis]
    return theta


def _affine_sample(image: torch.Tensor, theta: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear samples of one ``(C, D, H, W)`` volume on a float64 ``(3, 4)`` theta's grid, in float32.

    Inside the volume the edge cells extend to the volume's edge (as ``F.interpolate`` does); sample points outside
    the volume read zero.
    """
    with torch.autocast(device_type=image.device.type, enabled=False):
        grid = F.affine_grid(theta[None].to(torch.float32).to(image.device), [1, 1, *size], align_corners=False)
        sampled = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        inside = (grid.abs() <= 1.0 + 1e-6).all(dim=-1)
    return sampled[0] * inside.to(sampled.dtype)


def sample_box(
    grid_features: torch.Tensor,
    patch_box: BoxLike,
    volume_shape: ShapeLike,
    out_size: Sequence[int],
) -> torch.Tensor:
    """Sample features that cover the whole volume over each patch box.

    Parameters
    ----------
    grid_features : (B, C, n, h, w) tensor
        Features on (a stride of) the classification grid; they cover the whole preprocessed volume.
    patch_box : (B, 2, 3)
        Start and size ``(z, y, x)`` of each box in preprocessed voxels.
    volume_shape : (B, 3) or (3,)
        Preprocessed volume shape.
    out_size : (pz, py, px)
        Resolution of the output over the box (e.g. the patch feature size).

    Returns
    -------
    (B, C, pz, py, px) float32 tensor
        Trilinear samples at the cell centres of the box; zero outside the volume. Where the box spans more grid
        cells than ``out_size`` the features are first sampled at the grid's own resolution and then area-averaged.
    """
    batch = grid_features.shape[0]
    boxes, shapes = as_boxes(patch_box, volume_shape, batch)
    grid_size = torch.tensor(grid_features.shape[2:], dtype=torch.float64)
    out_size = [int(s) for s in out_size]
    results = []
    for b in range(batch):
        start, size, shape = boxes[b, 0], boxes[b, 1], shapes[b]
        extent = size * grid_size / shape  # box size in grid cells
        native = [max(o, math.ceil(float(e) - 1e-6)) for o, e in zip(out_size, extent)]
        theta = _theta_grid_to_box(start, size, shape)
        sampled = _affine_sample(grid_features[b], theta, native)
        if native != out_size:
            sampled = F.interpolate(sampled[None], size=out_size, mode="area")[0]
        results.append(sampled)
    return torch.stack(results)


def box_coverage(
    patch_box: BoxLike, volume_shape: ShapeLike, grid_size: Sequence[int], device: torch.device | None = None
) -> torch.Tensor:
    """Fraction of each grid cell covered by each patch box (inside the volume).

    Returns
    -------
    (B, 1, n, h, w) float32 tensor in [0, 1]
    """
    boxes, shapes = as_boxes(patch_box, volume_shape, torch.as_tensor(patch_box).shape[0])
    batch = boxes.shape[0]
    result = []
    for b in range(batch):
        per_axis = []
        for axis, cells in enumerate(grid_size):
            length = shapes[b, axis]
            cell = length / cells
            edges = torch.arange(cells + 1, dtype=torch.float64) * cell
            lo = torch.clamp(boxes[b, 0, axis], min=0.0)
            hi = torch.clamp(boxes[b, 0, axis] + boxes[b, 1, axis], max=length)
            overlap = (torch.minimum(edges[1:], hi) - torch.maximum(edges[:-1], lo)).clamp(min=0.0)
            per_axis.append(overlap / cell)
        cover = per_axis[0][:, None, None] * per_axis[1][None, :, None] * per_axis[2][None, None, :]
        result.append(cover)
    return torch.stack(result)[:, None].to(torch.float32).to(device)


def _area_matrices(
    boxes: torch.Tensor, shapes: torch.Tensor, patch_size: Sequence[int], grid_size: Sequence[int], axis: int
) -> torch.Tensor:
    """``M[b, j, i]``: the fraction of grid cell j (along ``axis``) that patch voxel i covers, ``(B, n, P)`` float64."""
    length = shapes[:, axis, None, None]
    cells, voxels = int(grid_size[axis]), int(patch_size[axis])
    cell = length / cells
    j = torch.arange(cells, dtype=torch.float64)[None, :, None]
    i = torch.arange(voxels, dtype=torch.float64)[None, None, :]
    voxel = boxes[:, 1, axis, None, None] / voxels
    lo = (boxes[:, 0, axis, None, None] + i * voxel).clamp(min=0.0)
    hi = (boxes[:, 0, axis, None, None] + (i + 1) * voxel).clamp(max=length)
    overlap = (torch.minimum(hi, (j + 1) * cell) - torch.maximum(lo, j * cell)).clamp(min=0.0)
    return overlap / cell


def paste_box(
    patch_features: torch.Tensor,
    patch_box: BoxLike,
    volume_shape: ShapeLike,
    grid_size: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample patch features onto the grid that covers the whole volume, by exact area weighting.

    Each grid cell receives the average of the patch voxels it overlaps, weighted by the overlap (conservative
    remapping, separable along z, y, x). This is exact for any box position and any ratio of resolutions: an
    impulse lands in the cell that contains it, and nothing is blurred across a cell boundary. Where the grid is
    finer than the patch voxels, it is piecewise constant.

    Parameters
    ----------
    patch_features : (B, C, pz, py, px) tensor
        Features (or Ŝ) computed from a patch; they cover the patch box.
    patch_box : (B, 2, 3)
        Start and size ``(z, y, x)`` of each box in preprocessed voxels.
    volume_shape : (B, 3) or (3,)
        Preprocessed volume shape.
    grid_size : (n, h, w)
        The target grid (a stride of the classification grid).

    Returns
    -------
    values : (B, C, n, h, w) float32 tensor
        The average of the patch over the covered part of each cell; zero where the box does not reach.
    coverage : (B, 1, n, h, w) float32 tensor
        The fraction of each cell inside the box (and the volume); composite with
        ``coverage * values + (1 - coverage) * other``.
    """
    batch = patch_features.shape[0]
    boxes, shapes = as_boxes(patch_box, volume_shape, batch)
    grid_size = [int(s) for s in grid_size]
    patch_size = list(patch_features.shape[2:])
    device = patch_features.device
    mz, my, mx = (_area_matrices(boxes, shapes, patch_size, grid_size, axis).to(torch.float32).to(device) for axis in range(3))
    with torch.autocast(device_type=device.type, enabled=False):
        x = patch_features.float()
        x = torch.einsum("bwk,bcijk->bcijw", mx, x)
        x = torch.einsum("bhj,bcijw->bcihw", my, x)
        weighted = torch.einsum("bni,bcihw->bcnhw", mz, x)
        coverage = (mz.sum(2)[:, :, None, None] * my.sum(2)[:, None, :, None] * mx.sum(2)[:, None, None, :]).unsqueeze(1)
        values = torch.where(coverage > 0, weighted / coverage.clamp(min=1e-12), torch.zeros_like(weighted))
    return values, coverage


def composite(values: torch.Tensor, coverage: torch.Tensor, outside: torch.Tensor | None) -> torch.Tensor:
    """``coverage * values + (1 - coverage) * outside`` (``outside`` None means zero)."""
    if outside is None:
        return coverage * values
    return coverage * values + (1.0 - coverage) * outside


def stitch_boxes(
    patch_features: torch.Tensor,
    patch_box: BoxLike,
    volume_shape: Sequence[int],
    grid_size: Sequence[int],
    accumulator: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the patches of one volume onto its grid (sliding-window inference).

    Parameters
    ----------
    patch_features : (P, C, pz, py, px)
        P patches of the same volume.
    patch_box : (P, 2, 3)
    volume_shape : (3,)
    grid_size : (n, h, w)
    accumulator : (sum, weight) from an earlier call, or None

    Returns
    -------
    sum : (1, C, n, h, w) float32 tensor
        Coverage-weighted sum of the patch values.
    weight : (1, 1, n, h, w) float32 tensor
        Sum of the coverages; the stitched map is ``sum / weight.clamp(min=1e-6)``, covered where ``weight > 0``.
    """
    values, coverage = paste_box(patch_features, patch_box, [list(volume_shape)] * patch_features.shape[0], grid_size)
    total = (values * coverage).sum(0, keepdim=True)
    weight = coverage.sum(0, keepdim=True)
    if accumulator is not None:
        total = total + accumulator[0]
        weight = weight + accumulator[1]
    return total, weight
