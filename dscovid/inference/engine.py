"""The inference engine: the networks of a trained model over one preprocessed scan (docs/prediction.md, step 2).

:func:`segment_scan` runs one network's lesion subnet by sliding window over the tiles that touch the scan's lung
region: the cross-stitch sees each patch's box, and the segmentation stem features are stitched onto the
classification stem grid. :func:`run_networks` does that for every fold, plain and mirrored, resamples the stitched
lesion probability Ŝ onto the classification grid, classifies, and averages the lesion probabilities, class
probabilities and evidence maps.

Everything here lives on the preprocessed grid; reading a scan and writing the results on its original grid is the
prediction stage's job (:mod:`dscovid.prediction`). The trainer runs :func:`segment_scan` too, for the lesion
context it caches (:mod:`dscovid.training.lesion_context`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dscovid.inference.model_loading import TrainedModel, inference_memory_format
from dscovid.inference.sliding_window import plan_tiles, sliding_window_predict
from dscovid.model.conv_layers import segmentation_layers
from dscovid.model.findings_head import FEATURE_NAMES as FINDINGS_NAMES
from dscovid.model.findings_head import lesion_findings
from dscovid.model.geometry import stitch_boxes
from dscovid.model.precision import autocast
from dscovid.plans.configuration import Configuration
from dscovid.plans.model_config import PATCH_DIVISOR
from dscovid.preprocessing.resampling import resample_to_grid


@dataclass
class NetworkOutput:
    """The fold-averaged network outputs of one case, on the preprocessed grid.

    lesion_probability : (Z', Y', X') float32, Ŝ, 0 outside the lung.
    class_probabilities : (K,) softmax averaged over folds, or None for a segmentation-only model.
    evidence : (Z', Y', X') float32 evidence map (equation 5) of the predicted class, or None.
    tiles_run, tiles_total : sliding-window tiles run (touching the lung) and in the whole volume.
    findings_term : (K,) the findings head's term of the logits (docs/model.md), averaged over the passes that have
        a head; None without one.
    findings : the head's measurements of Ŝ (name → value), averaged likewise; None without a head.
    """

    lesion_probability: np.ndarray
    class_probabilities: np.ndarray | None
    evidence: np.ndarray | None
    tiles_run: int
    tiles_total: int
    findings_term: np.ndarray | None = None
    findings: dict[str, float] | None = None


@dataclass
class ScanSegmentation:
    """The lesion subnet run over one whole preprocessed scan (:func:`segment_scan`).

    probability : (Z', Y', X') float32 Ŝ, 0 outside the region.
    cls_features : ``I_cls`` of the scan (the classification stem), or None for a segmentation-only network.
    stitched : (sum, weight) of the segmentation stem features stitched onto the classification stem grid (the
        cross-stitch input of the classifier), or None without the cross-stitch.
    """

    probability: torch.Tensor
    cls_features: torch.Tensor | None
    stitched: tuple[torch.Tensor, torch.Tensor] | None


def segment_scan(
    network: torch.nn.Module,
    image: torch.Tensor,
    region: np.ndarray,
    cls_image: torch.Tensor,
    patch_size_zyx: Sequence[int],
    step_fraction: float,
    weighting: str,
    batch_size: int,
    device: torch.device,
    output_device: torch.device,
    progress: bool = False,
    placement: str = "grid",
) -> ScanSegmentation:
    """Sliding-window Ŝ of one network over the tiles of ``region`` (the predictor's and the trainer's path).

    image : (1, Z', Y', X') float32 on ``output_device``; region : (Z', Y', X') bool;
    cls_image : (1, 1, N, H, W) on ``device`` (the classification stem's input, for the cross-stitch).
    placement : tile placement (``inference.tile_placement``): ``"grid"``, ``"region"`` (fitted to the region) or
        ``"region_sized"`` (fitted in size too; tile sizes are multiples of the network's ``PATCH_DIVISOR``).
    """
    shape = tuple(int(v) for v in image.shape[1:])
    cross = bool(getattr(network, "uses_cross_stitch", False))
    i_cls = None
    if network.has_classification:
        with torch.no_grad(), autocast(device):
            i_cls = network.encode_classification(cls_image)
    stitched: list = [None]

    memory_format = inference_memory_format(device)

    def predict_fn(batch: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        count = batch.shape[0]
        if device.type == "cpu" and count < batch_size:
            # The short last batch gets copies of its last tile, whose outputs are dropped: on the CPU a single
            # small tile runs through PyTorch's slow native convolution (tile_batch_size).
            batch = torch.cat([batch, batch[-1:].expand(batch_size - count, *batch.shape[1:])])
            boxes = torch.cat([boxes, boxes[-1:].expand(batch_size - count, *boxes.shape[1:])])
        batch = batch.contiguous(memory_format=memory_format)
        with autocast(device):
            result = network.segment_patches(
                batch, boxes if cross else None, shape if cross else None, i_cls if cross else None
            )
        if cross:
            # The segmentation stem features enter the classifier through the cross-stitch: stitch them onto
            # the classification stem grid with their coverage, as training pastes one patch.
            stitched[0] = stitch_boxes(result.seg_features[:count].float(), boxes[:count], shape, i_cls.shape[2:],
                                       stitched[0])
        return result.lesion_probability[:count].float()

    probability = sliding_window_predict(
        predict_fn, image, patch_size_zyx, step_fraction=step_fraction, weighting=weighting, batch_size=batch_size,
        region=region, device=device, output_device=output_device, progress=progress, with_boxes=True,
        placement=placement, size_multiple=PATCH_DIVISOR,
    )[0]
    probability.mul_(torch.from_numpy(np.asarray(region, dtype=bool)).to(probability.device))
    return ScanSegmentation(probability, i_cls, stitched[0])


#: On the CPU, the most bytes of convolution outputs one network call may produce (all tiles of its batch).
CPU_CALL_ACTIVATION_BYTES = 512 * 2**20


def tile_activation_bytes(configuration: Configuration) -> int:
    """float32 bytes of the convolution outputs of one tile through the segmentation branch (the planner's budget
    model, :func:`dscovid.model.conv_layers.segmentation_layers`)."""
    layers = segmentation_layers(configuration.segmentation.patch_size_zyx, configuration.network.to_dict())
    return 4 * sum(layer.voxels * layer.out_channels for layer in layers)


def tile_batch_size(configuration: Configuration, device: torch.device) -> int:
    """Sliding-window tiles per network call: the configuration's ``inference.batch_size`` on a GPU; on the CPU as
    many of them as keep the call's convolution outputs within :data:`CPU_CALL_ACTIVATION_BYTES`, at least one.

    On the CPU a batch of large tiles runs little faster than its tiles one after the other, while the activations
    of every tile of the batch are alive at once (the paper's 24×256×256 tiles hold 32-channel maps of the whole
    tile at full resolution). Small tiles keep their batch: PyTorch runs a single small 3D input through its slow
    native convolution instead of oneDNN's (docs/prediction.md, memory).
    """
    configured = int(configuration.inference.batch_size)
    if device.type == "cuda":
        return configured
    return max(1, min(configured, CPU_CALL_ACTIVATION_BYTES // tile_activation_bytes(configuration)))


def run_networks(
    model: TrainedModel,
    image: np.ndarray,
    region: np.ndarray,
    cls_image: np.ndarray,
    step_fraction: float | None = None,
    weighting: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    mirror_axes: Sequence[int] | None = None,
    placement: str | None = None,
) -> NetworkOutput:
    """Run every fold of ``model`` on one preprocessed case (and its mirror images) and average them.

    Parameters
    ----------
    model : the loaded folds.
    image : (Z', Y', X') float32 preprocessed image.
    region : (Z', Y', X') 0/1, where the network looks (the preprocessed ``region``: the lung plus its margin);
        only tiles touching it are run, and Ŝ is 0 outside it.
    cls_image : (N, H, W) float32, ``image`` on the classification grid.
    step_fraction, weighting : sliding-window settings (default: the configuration's ``inference``).
    batch_size : tiles per network call (default: :func:`tile_batch_size`).
    mirror_axes : volume axes (0 z, 1 y, 2 x) to mirror at test time (default: ``inference.mirror_axes``); each
        costs one more pass of every fold.
    placement : tile placement, ``"grid"``, ``"region"`` or ``"region_sized"`` (default: ``inference.tile_placement``).
    """
    settings = model.inference
    step_fraction = float(step_fraction if step_fraction is not None else settings.step_fraction)
    weighting = weighting or settings.weighting
    batch_size = int(batch_size or tile_batch_size(model.network_configuration, model.device))
    mirror_axes = list(settings.mirror_axes if mirror_axes is None else mirror_axes)
    placement = placement or settings.tile_placement
    device = model.device
    patch = model.patch_size_zyx
    shape = tuple(int(v) for v in image.shape)
    grid = tuple(int(v) for v in cls_image.shape)
    region_mask = np.asarray(region) != 0
    # On a GPU the preprocessed volume (a few hundred MB at most) and the accumulators live there: no per-tile copies.
    accumulate_on = device if device.type == "cuda" else torch.device("cpu")
    probability_sum = torch.zeros(shape, dtype=torch.float32, device=accumulate_on)
    class_sum: torch.Tensor | None = None
    evidence_sum: list[torch.Tensor] | None = None
    findings_terms: list[torch.Tensor] = []
    findings_values: list[torch.Tensor] = []
    # Test-time mirroring along the axes the training mirrored (inference.mirror_axes): every fold also sees the
    # flipped scan, and its outputs are flipped back and averaged with the plain ones.
    flips = [()] + [(int(axis),) for axis in mirror_axes]
    for flip in flips:
        image_f = np.flip(image, flip) if flip else image
        cls_f = np.flip(cls_image, flip) if flip else cls_image
        region_f = np.flip(region_mask, flip) if flip else region_mask
        image_t = torch.from_numpy(np.ascontiguousarray(image_f, dtype=np.float32))[None].to(accumulate_on)
        cls_t = torch.from_numpy(np.ascontiguousarray(cls_f, dtype=np.float32))[None, None].to(device)
        for network in model.networks:
            if network.has_segmentation:
                scan = segment_scan(network, image_t, np.ascontiguousarray(region_f), cls_t, patch, step_fraction,
                                    weighting, batch_size, device, accumulate_on, progress, placement)
                probability, i_cls, stitched = scan.probability, scan.cls_features, scan.stitched
                probability_sum += torch.flip(probability, flip) if flip else probability
            else:
                probability, stitched = torch.zeros(shape, dtype=torch.float32, device=accumulate_on), None
                with torch.no_grad(), autocast(device):
                    i_cls = network.encode_classification(cls_t)
            cross = bool(getattr(network, "uses_cross_stitch", False))

            if network.has_classification:
                lesion_on_grid = None
                if network.has_segmentation:
                    on_grid = resample_to_grid(probability.cpu().numpy(), grid)
                    lesion_on_grid = torch.from_numpy(np.ascontiguousarray(on_grid))[None, None].to(device)
                seg_on_grid = coverage = None
                if cross and stitched is not None:
                    total, weight = stitched
                    seg_on_grid = total / weight.clamp(min=1e-6)
                    coverage = weight.clamp(max=1.0)
                with torch.no_grad(), autocast(device):
                    logits, evidence, term = network.classify_parts(i_cls, lesion_on_grid, seg_on_grid, coverage, cls_t)
                    if term is not None:
                        logits = logits + term
                        findings_terms.append(term[0].float().cpu())
                        # for the report; the head measured the same inside classify_parts
                        findings_values.append(lesion_findings(lesion_on_grid, cls_t)[0].cpu())
                probabilities = torch.softmax(logits.float(), dim=1)[0].cpu()
                # three (K, z_l, y_l, x_l), flipped back: a volume axis a is dimension a + 1 here
                evidence = [e.float()[0].cpu() for e in evidence]
                if flip:
                    evidence = [torch.flip(e, [a + 1 for a in flip]) for e in evidence]
                class_sum = probabilities if class_sum is None else class_sum + probabilities
                evidence_sum = evidence if evidence_sum is None else [a + b for a, b in zip(evidence_sum, evidence)]

    folds = len(model.networks) * len(flips)  # every fold, plain and mirrored
    lesion_probability = (probability_sum / folds).cpu().numpy()
    class_probabilities = evidence_map = None
    if class_sum is not None:
        class_probabilities = (class_sum / folds).numpy()
        predicted = int(np.argmax(class_probabilities))
        evidence_map = _evidence_of_class(evidence_sum, predicted, shape) / folds
    return NetworkOutput(
        lesion_probability=lesion_probability,
        class_probabilities=class_probabilities,
        evidence=evidence_map,
        tiles_run=len(plan_tiles(shape, patch, step_fraction, region_mask, placement, PATCH_DIVISOR)),
        tiles_total=len(plan_tiles(shape, patch, step_fraction)),
        findings_term=torch.stack(findings_terms).mean(0).numpy() if findings_terms else None,
        findings=dict(zip(FINDINGS_NAMES, torch.stack(findings_values).mean(0).tolist())) if findings_values else None,
    )


def _evidence_of_class(evidence: Sequence[torch.Tensor], index: int, shape: Sequence[int]) -> np.ndarray:
    """The class's evidence masks V1..V3 resampled onto the preprocessed grid and averaged, (Z', Y', X') float32.

    Each mask covers the whole volume (it comes from the classification grid), so trilinear resampling with
    ``align_corners=False`` puts it back in place (docs/formats.md §4).
    """
    total = None
    for masks in evidence:
        resampled = F.interpolate(masks[index][None, None], size=tuple(shape), mode="trilinear", align_corners=False)
        total = resampled if total is None else total + resampled
    return (total[0, 0] / len(evidence)).numpy()
