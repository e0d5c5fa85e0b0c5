"""The DeepSC-COVID network: two stems, the cross-stitch unit, the lesion and classification subnets.

Where the two branches meet, features are moved with the true geometric mapping of ``dscovid.model.geometry``:

- classification → segmentation: the classification stem features are sampled over the patch box at the
  segmentation stem's resolution (equation 2, ``I_cls`` for ``F_seg``);
- segmentation → classification: the segmentation stem features are pasted into the classification stem grid with
  their coverage; outside the patch the classification stem's own features (``seg_to_cls_fill="classification"``)
  or zeros (the paper's zero padding, ``"zeros"``) stand in for them;
- Ŝ entering the classifier: the patch's Ŝ is pasted onto the classification grid; outside the patch the
  ``lesion_context`` (ground truth, a cached prediction, or zero) stands in for it;
- the evidence masks are cropped to the patch box by the loss (``dscovid.model.losses``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dscovid.model.classification_subnet import ClassificationSubnet
from dscovid.model.cross_stitch import CrossStitch
from dscovid.model.evidence import evidence_masks
from dscovid.model.findings_head import FindingsHead
from dscovid.model.geometry import BoxLike, ShapeLike, as_boxes, composite, paste_box, sample_box
from dscovid.model.inception import make_stem
from dscovid.model.lesion_subnet import LesionSubnet
from dscovid.plans.model_config import NetworkConfig

#: Names a plans file's ``training.stages[].trainable`` may use, and the top-level modules each stands for.
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "stem_seg": ("stem_seg",),
    "lesion_subnet": ("lesion_subnet",),
    "stem_cls": ("stem_cls",),
    "classification_subnet": ("classification_subnet",),
    "cross_stitch": ("cross_stitch",),
    "seg": ("lesion_subnet",),
    "findings_head": ("findings_head",),
    "cls": ("classification_subnet",),
    "segmentation": ("stem_seg", "lesion_subnet"),
    "classification": ("stem_cls", "classification_subnet", "findings_head"),
}

#: The two parts pre-trained separately in stage 1 (paper §V-A): each task's stem and subnet, plus the row of the
#: cross-stitch (equation 2) that produces that task's features. Parameter-name prefixes.
SEGMENTATION_PART = ("stem_seg.", "lesion_subnet.", "cross_stitch.w_seg1", "cross_stitch.w_cls2")
CLASSIFICATION_PART = ("stem_cls.", "classification_subnet.", "findings_head.", "cross_stitch.w_seg2",
                       "cross_stitch.w_cls1")


@dataclass
class SegmentationResult:
    """Output of :meth:`DeepSCCOVID.segment_patches`.

    lesion_logits : (B, 1, pz, py, px), the argument of the sigmoid of equation 3.
    side_outputs : Ŝ1..Ŝ4 logits at patch/8, patch/4, patch/2, patch.
    seg_features : (B, C0, pz/2, py/2, px/2), the segmentation stem features ``I_seg`` (for the cross-stitch into
        the classifier: paste them with ``geometry.stitch_boxes`` at inference).
    """

    lesion_logits: torch.Tensor
    side_outputs: list[torch.Tensor]
    seg_features: torch.Tensor

    @property
    def lesion_probability(self) -> torch.Tensor:
        """Ŝ = sigmoid(fused logits), (B, 1, pz, py, px)."""
        return torch.sigmoid(self.lesion_logits)


@dataclass
class DeepSCOutput:
    """Output of the training forward; fields that the configured tasks do not produce are None.

    lesion_logits : (B, 1, pz, py, px); side_outputs : four tensors (B, 1, ...);
    class_logits : (B, K); evidence : three tensors (B, K, z_l, y_l, x_l) (equation 5 for every class, uncropped);
    findings_logits : (B, K), the findings head's term of ``class_logits`` (None without the head);
    lesion_on_grid : (B, 1, N, H, W), what the classifier saw; patch_box (B, 2, 3) and volume_shape (B, 3):
    float64 CPU tensors, for cropping the evidence masks.
    """

    lesion_logits: torch.Tensor | None = None
    side_outputs: list[torch.Tensor] | None = None
    class_logits: torch.Tensor | None = None
    findings_logits: torch.Tensor | None = None
    evidence: list[torch.Tensor] | None = None
    lesion_on_grid: torch.Tensor | None = None
    patch_box: torch.Tensor | None = None
    volume_shape: torch.Tensor | None = None

    @property
    def lesion_probability(self) -> torch.Tensor | None:
        """Ŝ, (B, 1, pz, py, px)."""
        return None if self.lesion_logits is None else torch.sigmoid(self.lesion_logits)


class DeepSCCOVID(nn.Module):
    """Joint 3D lesion segmentation and classification (paper section IV), or one of its single-task networks.

    Parameters
    ----------
    config : NetworkConfig
        Architecture and ablation switches (``configuration["network"]``).

    Inputs: a patch ``(B, 1, pz, py, px)`` of the preprocessed volume (pz, py, px divisible by 8) with its box,
    and the whole scan on the classification grid ``(B, 1, N, H, W)`` (divisible by 16), one per patch.
    """

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or NetworkConfig()
        self.has_segmentation = config.tasks in ("joint", "segmentation")
        self.has_classification = config.tasks in ("joint", "classification")
        norm = (config.norm, config.norm_groups)
        c0 = config.stem_channels
        if self.has_segmentation:
            self.stem_seg = make_stem(config.stem, c0, *norm)
            self.lesion_subnet = LesionSubnet(c0, config.segmentation_widths, config.side_output_weights, *norm)
        if self.has_classification:
            self.stem_cls = make_stem(config.stem, c0, *norm)
            lesion_channels = config.lesion_channels if self.has_segmentation else 0
            self.classification_subnet = ClassificationSubnet(
                c0, config.classification_widths, lesion_channels, config.num_classes, *norm,
                dropout=config.classifier_dropout, lesion_gate=config.lesion_gate,
            )
        self.findings_head = None
        if config.tasks == "joint" and config.findings_head:
            self.findings_head = FindingsHead(config.num_classes)
        self.uses_cross_stitch = config.tasks == "joint" and config.cross_stitch
        if self.uses_cross_stitch:
            self.cross_stitch = CrossStitch(*config.cross_stitch_init)

    # Which parameters belong to which part --------------------------------------------------------------------------

    def parameters_of(self, names: Sequence[str]) -> list[nn.Parameter]:
        """Parameters of the modules named by ``names`` (keys of :data:`MODULE_GROUPS`), each module once.

        A module this network does not have (a single-task network's missing branch) contributes nothing.

        Raises
        ------
        KeyError
            For a name that is not in :data:`MODULE_GROUPS`.
        """
        wanted = [module for name in names for module in MODULE_GROUPS[name]]
        modules = dict(self.named_children())
        return [p for name in dict.fromkeys(wanted) if name in modules for p in modules[name].parameters()]

    @staticmethod
    def task_of(parameter_name: str) -> str:
        """``"segmentation"`` or ``"classification"``: the stage-1 part a parameter (by its name) belongs to."""
        if parameter_name.startswith(SEGMENTATION_PART):
            return "segmentation"
        if parameter_name.startswith(CLASSIFICATION_PART):
            return "classification"
        raise ValueError(f"parameter {parameter_name!r} belongs to neither task part (update SEGMENTATION_PART)")

    # Inference-friendly pieces -------------------------------------------------------------------------------------

    def encode_classification(self, cls_image: torch.Tensor) -> torch.Tensor:
        """``I_cls``: the classification stem over the whole scan, (B, 1, N, H, W) → (B, C0, N/2, H/2, W/2)."""
        return self.stem_cls(cls_image)

    def segment_patches(
        self,
        patches: torch.Tensor,
        patch_box: BoxLike | None = None,
        volume_shape: ShapeLike | None = None,
        cls_features: torch.Tensor | None = None,
    ) -> SegmentationResult:
        """Run the segmentation stem, the cross-stitch (classification → segmentation) and the lesion subnet.

        Parameters
        ----------
        patches : (B, 1, pz, py, px)
        patch_box : (B, 2, 3), start and size (z, y, x) in preprocessed voxels; needed with the cross-stitch.
        volume_shape : (B, 3) or (3,)
        cls_features : (B, C0, N/2, H/2, W/2) or (1, ...) shared by all patches (sliding window over one scan);
            ``encode_classification`` of the scan(s); needed with the cross-stitch.
        """
        i_seg = self.stem_seg(patches)
        f_seg = i_seg
        if self.uses_cross_stitch:
            if cls_features is None or patch_box is None or volume_shape is None:
                raise ValueError("the cross-stitch needs cls_features, patch_box and volume_shape")
            if cls_features.shape[0] == 1 and patches.shape[0] > 1:
                cls_features = cls_features.expand(patches.shape[0], *cls_features.shape[1:])
            i_cls_on_patch = sample_box(cls_features, patch_box, volume_shape, i_seg.shape[2:])
            f_seg = self.cross_stitch.segmentation(i_seg, i_cls_on_patch.to(i_seg.dtype))
        logits, sides = self.lesion_subnet(f_seg)
        return SegmentationResult(logits, sides, i_seg)

    def classify(
        self,
        cls_features: torch.Tensor,
        lesion_on_grid: torch.Tensor | None = None,
        seg_features_on_grid: torch.Tensor | None = None,
        seg_coverage: torch.Tensor | None = None,
        cls_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Cross-stitch (segmentation → classification) and the classification subnet.

        Parameters
        ----------
        cls_features : (B, C0, n, h, w), ``I_cls`` from :meth:`encode_classification`.
        lesion_on_grid : (B, 1, N, H, W), lesion probability on the classification grid (at inference: the stitched
            Ŝ of the whole scan resampled onto the grid). Not used by the classification-only network.
        seg_features_on_grid : (B, C0, n, h, w) or None, the segmentation stem features pasted onto the
            classification stem grid (``geometry.stitch_boxes``: sum / weight); None: none available.
        seg_coverage : (B, 1, n, h, w) in [0, 1] or None (None with features given means fully covered).
        cls_image : (B, 1, N, H, W), the classification image; needed by the findings head.

        Returns
        -------
        class_logits : (B, K), the sum of the evidence masks plus, with the findings head, its term
        evidence : three (B, K, z_l, y_l, x_l) tensors, equation 5 for every class (uncropped)
        """
        logits, evidence, findings = self.classify_parts(cls_features, lesion_on_grid, seg_features_on_grid,
                                                         seg_coverage, cls_image)
        return (logits if findings is None else logits + findings), evidence

    def classify_parts(
        self,
        cls_features: torch.Tensor,
        lesion_on_grid: torch.Tensor | None = None,
        seg_features_on_grid: torch.Tensor | None = None,
        seg_coverage: torch.Tensor | None = None,
        cls_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """:meth:`classify` with the subnet's logits and the findings head's term (B, K) (None without a head) apart."""
        f_cls = cls_features
        if self.uses_cross_stitch:
            fill = cls_features if self.config.seg_to_cls_fill == "classification" else None
            if seg_features_on_grid is None:
                seg_part = fill if fill is not None else torch.zeros_like(cls_features)
            elif seg_coverage is None:
                seg_part = seg_features_on_grid
            else:
                seg_part = composite(seg_features_on_grid, seg_coverage, fill)
            f_cls = self.cross_stitch.classification(cls_features, seg_part.to(cls_features.dtype))
        logits, features = self.classification_subnet(f_cls, lesion_on_grid if self.has_segmentation else None)
        findings = None
        if self.findings_head is not None:
            if cls_image is None or lesion_on_grid is None:
                raise ValueError("the findings head needs the lesion map and the classification image")
            findings = self.findings_head(lesion_on_grid, cls_image)
        return logits, evidence_masks(features, self.classification_subnet.linear.weight), findings

    # Training forward ----------------------------------------------------------------------------------------------

    def forward(
        self,
        seg_patch: torch.Tensor | None = None,
        patch_box: BoxLike | None = None,
        volume_shape: ShapeLike | None = None,
        cls_image: torch.Tensor | None = None,
        lesion_context: torch.Tensor | None = None,
    ) -> DeepSCOutput:
        """One training step's forward: B patches, each with its own case's classification grid.

        Parameters
        ----------
        seg_patch : (B, 1, pz, py, px), the patch of the preprocessed image (not for ``tasks="classification"``).
        patch_box : (B, 2, 3), start and size (z, y, x) of each patch in preprocessed voxels.
        volume_shape : (B, 3), each case's preprocessed volume shape.
        cls_image : (B, 1, N, H, W), each case's ``cls_image`` (not for ``tasks="segmentation"``).
        lesion_context : (B, 1, N, H, W) or None, what stands for Ŝ outside the patch on the classification grid
            (``network.lesion_context``: the case's ``cls_lesion``, or a cached prediction); None means zero.
        """
        out = DeepSCOutput()
        batch = (seg_patch if seg_patch is not None else cls_image).shape[0]
        if patch_box is not None and volume_shape is not None:
            out.patch_box, out.volume_shape = as_boxes(patch_box, volume_shape, batch)
        if self.config.tasks == "classification":
            out.class_logits, out.evidence = self.classify(self.encode_classification(cls_image))
            return out
        if self.config.tasks == "segmentation":
            result = self.segment_patches(seg_patch)
            out.lesion_logits, out.side_outputs = result.lesion_logits, result.side_outputs
            return out

        if out.patch_box is None:
            raise ValueError("the joint network needs patch_box and volume_shape")
        i_cls = self.encode_classification(cls_image)
        result = self.segment_patches(seg_patch, out.patch_box, out.volume_shape, i_cls)
        out.lesion_logits, out.side_outputs = result.lesion_logits, result.side_outputs

        seg_on_grid, seg_coverage = None, None
        if self.uses_cross_stitch:
            seg_on_grid, seg_coverage = paste_box(result.seg_features, out.patch_box, out.volume_shape, i_cls.shape[2:])
        probability = result.lesion_probability.detach() if self.config.detach_lesion_map else result.lesion_probability
        lesion_values, lesion_coverage = paste_box(probability, out.patch_box, out.volume_shape, cls_image.shape[2:])
        context = None if self.config.lesion_context == "none" else lesion_context
        if context is None and self.config.lesion_context != "none":
            raise ValueError(f"network.lesion_context={self.config.lesion_context!r} needs a lesion_context tensor")
        out.lesion_on_grid = composite(lesion_values, lesion_coverage, None if context is None else context.float())
        logits, out.evidence, out.findings_logits = self.classify_parts(
            i_cls, out.lesion_on_grid, seg_on_grid, seg_coverage, cls_image
        )
        out.class_logits = logits if out.findings_logits is None else logits + out.findings_logits
        return out
