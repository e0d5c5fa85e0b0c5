"""The trainers: joint DeepSC-COVID, the two single-task networks, and the paper's ablations; and their registry.

Each variant is a few lines: the network's ``tasks`` option or a configuration key it overrides. ``-tr NAME`` looks
the name up in :data:`TRAINERS` (an explicit dictionary, not a search through modules).

=====================================================  ===========================================================
trainer                                                paper
=====================================================  ===========================================================
``DeepSCCOVIDTrainer``                                 DeepSC-COVID (two stages: separate pre-training, joint
                                                       fine-tuning with equation 11); the parts the configuration
                                                       holds: ``3d_paper`` has the paper's inception stem,
                                                       λ_ta = 10 and cross-stitch, ``3d_cpu`` a plain stem,
                                                       λ_ta = 0 and no cross-stitch
``SegmentationTrainer``                                Table II "DeepSC-COVID w/o Cls." (lesion subnet alone)
``ClassificationTrainer``                              Table II "DeepSC-COVID w/o Seg." (classifier alone)
``DeepSCCOVIDTrainer_noCrossStitch``                   Fig. 8: without the cross-stitch unit
``DeepSCCOVIDTrainer_crossStitch``                     the cross-stitch unit, whatever the configuration says
``DeepSCCOVIDTrainer_convStem``                        Fig. 8: plain convolution instead of the inception block
``DeepSCCOVIDTrainer_noTaskAware``                     λ_ta = 0 (supplementary ablation)
``DeepSCCOVIDTrainer_inceptionStem``                   the paper's inception stem, whatever the configuration says
``DeepSCCOVIDTrainer_taskAware``                       the paper's task-aware loss (λ_ta = 10), whatever the
                                                       configuration says
``DeepSCCOVIDTrainer_paperParts``                      all three: the paper's network and loss on any
                                                       configuration (``3d_cpu`` as it was before it dropped them)
``DeepSCCOVIDTrainer_lambdaTA1``/``_lambdaTA100``      λ_ta = 1 / 100 (supplementary ablation)
``DeepSCCOVIDTrainer_singleScaleTaskAware``            Table III: task-aware loss on one scale only
``DeepSCCOVIDTrainer_lastSideOutput``                  the lesion map from the full-resolution side output alone
                                                       (η = 0, 0, 0, 1: no fusion of the coarse ones, equation 3;
                                                       the task-aware loss, weighted by the same η, goes with it)
``DeepSCCOVIDTrainer_detachLesionMap``                 Ŝ enters the classifier without its gradient (the
                                                       classification loss no longer trains the lesion subnet)
``DeepSCCOVIDTrainer_paperLiteral``                    the paper's literal settings (ground-truth lesion context,
                                                       no hard negatives, non-overlapping tiles, no mirroring)
``DeepSCCOVIDTrainer_scannerAug``                      not in the paper: the default augmentation plus other
                                                       scanners' looks (noise, blur, sharpening, thick slices)
``DeepSCCOVIDTrainer_scannerNoise``                    not in the paper: the default augmentation with other
                                                       scanners' noise alone (more often, correlated in-plane)
``DeepSCCOVIDTrainer_lesionSampling``                  not in the paper: patches forced onto a lesion draw the
                                                       lesion uniformly, then a voxel (small lesions as often)
``DeepSCCOVIDTrainer_contextDegrade``                  not in the paper: the classifier's lesion context loses
                                                       lesions (small ones most) as an unseen scan's map does
``DeepSCCOVIDTrainer_falseLesions``                    not in the paper: the classifier's lesion map gets false
                                                       lesions on healthy lung, the class unchanged
``DeepSCCOVIDTrainer_classifierDropout``               not in the paper: dropout 0.5 on the classifier's pooled
                                                       features before its linear layer
``DeepSCCOVIDTrainer_lesionGate``                      not in the paper: the classifier sees the image only at
                                                       and around Ŝ's lesions (``network.lesion_gate``; on by
                                                       default in ``3d_cpu``)
``DeepSCCOVIDTrainer_noLesionGate``                    the classifier sees the whole image, as in the paper
``PlainCascadeTrainer``                                none of the paper's parts: a plain 3D U-Net and a small
                                                       classifier on the image and its predicted lesion map
=====================================================  ===========================================================

The single-task trainers run the same stages (and so the same number of iterations and learning rates) with their
one task, which keeps the "multi-task gain" comparison fair.
"""

from __future__ import annotations

from dscovid.errors import DscovidError
from dscovid.training.augmentation import AugmentationSettings
from dscovid.training.base_trainer import Trainer


class DeepSCCOVIDTrainer(Trainer):
    """The paper's joint model and two-stage schedule (stages from ``training.stages`` of the plans)."""

    tasks = "joint"


class SegmentationTrainer(Trainer):
    """Lesion segmentation alone (Dice + focal loss)."""

    tasks = "segmentation"

    def validation_score(self, metrics: dict[str, float]) -> float:
        return metrics["val_dice"] if metrics["val_dice"] == metrics["val_dice"] else 0.0


class ClassificationTrainer(Trainer):
    """Classification alone (weighted cross-entropy), on the classification grid without the lesion map."""

    tasks = "classification"

    def validation_score(self, metrics: dict[str, float]) -> float:
        return metrics["val_accuracy"]


class DeepSCCOVIDTrainer_noCrossStitch(DeepSCCOVIDTrainer):  # noqa: N801 - nnU-Net's variant naming
    overrides = {"network.cross_stitch": False}


class DeepSCCOVIDTrainer_crossStitch(DeepSCCOVIDTrainer):  # noqa: N801
    overrides = {"network.cross_stitch": True}


class DeepSCCOVIDTrainer_convStem(DeepSCCOVIDTrainer):  # noqa: N801
    overrides = {"network.stem": "conv"}


class DeepSCCOVIDTrainer_noTaskAware(DeepSCCOVIDTrainer):  # noqa: N801
    overrides = {"training.loss.lambda_ta": 0.0}


class DeepSCCOVIDTrainer_inceptionStem(DeepSCCOVIDTrainer):  # noqa: N801
    overrides = {"network.stem": "inception"}


class DeepSCCOVIDTrainer_taskAware(DeepSCCOVIDTrainer):  # noqa: N801
    overrides = {"training.loss.lambda_ta": 10.0}


class DeepSCCOVIDTrainer_paperParts(DeepSCCOVIDTrainer):  # noqa: N801
    """The paper's inception stem, task-aware loss (λ_ta = 10) and cross-stitch unit on any configuration."""

    overrides = {**DeepSCCOVIDTrainer_inceptionStem.overrides, **DeepSCCOVIDTrainer_taskAware.overrides,
                 **DeepSCCOVIDTrainer_crossStitch.overrides}


class DeepSCCOVIDTrainer_lambdaTA1(DeepSCCOVIDTrainer):  # noqa: N801
    overrides = {"training.loss.lambda_ta": 1.0}


class DeepSCCOVIDTrainer_lambdaTA100(DeepSCCOVIDTrainer):  # noqa: N801
    overrides = {"training.loss.lambda_ta": 100.0}


class DeepSCCOVIDTrainer_singleScaleTaskAware(DeepSCCOVIDTrainer):  # noqa: N801
    """Only the last side output Ŝ3 (patch/2) against the shallowest evidence mask V1."""

    overrides = {"training.loss.task_aware_scales": [3]}


class DeepSCCOVIDTrainer_lastSideOutput(DeepSCCOVIDTrainer):  # noqa: N801
    """Ŝ is the last side output alone: the coarse side outputs are not fused in (η1..η3 = 0)."""

    overrides = {"network.side_output_weights": [0.0, 0.0, 0.0, 1.0]}


class DeepSCCOVIDTrainer_detachLesionMap(DeepSCCOVIDTrainer):  # noqa: N801
    """The joint model whose classification loss does not reach the lesion subnet through Ŝ."""

    overrides = {"network.detach_lesion_map": True}


class DeepSCCOVIDTrainer_findings(DeepSCCOVIDTrainer):  # noqa: N801
    """The joint model with the findings head (``dscovid.model.findings_head``; not in the paper)."""

    overrides = {"network.findings_head": True}


class DeepSCCOVIDTrainer_noFindings(DeepSCCOVIDTrainer):  # noqa: N801
    """The joint model without the findings head, whatever the plans say (the paper's network)."""

    overrides = {"network.findings_head": False}


class DeepSCCOVIDTrainer_paperLiteral(DeepSCCOVIDTrainer):  # noqa: N801
    """The paper's settings where the ``3d_paper`` preset departs from them, for reproduction.

    The classifier sees the ground-truth lesion map outside the training patch (the paper trains on annotated
    scans and says nothing of a predicted context), no mined hard negatives, and prediction uses the paper's
    non-overlapping tiles without test-time mirroring. The lung margin is a preprocessing setting, so it comes
    from the plans the cache was made with: plan with ``preprocessing.lung_margin_mm`` 0 for the literal mask.
    """

    overrides = {
        "network.lesion_context": "ground_truth",
        "training.hard_negative_fraction": 0.0,
        "inference.step_fraction": 1.0,
        "inference.weighting": "constant",
        "inference.batch_size": 1,
        "inference.mirror_axes": [],
    }


class DeepSCCOVIDTrainer_lesionSampling(DeepSCCOVIDTrainer):  # noqa: N801
    """The default with per-lesion sampling: a patch forced onto a lesion picks the lesion uniformly, then a voxel
    of it, so small lesions are in as many patches as large ones (``training.lesion_sampling: "lesion"``)."""

    overrides = {"training.lesion_sampling": "lesion"}


class DeepSCCOVIDTrainer_scannerAug(DeepSCCOVIDTrainer):  # noqa: N801
    """The default with :meth:`AugmentationSettings.scanner`: trained to expect other reconstruction kernels, noise
    levels and slice thicknesses than its training set's."""

    def augmentation(self) -> AugmentationSettings:
        return AugmentationSettings.scanner()


class DeepSCCOVIDTrainer_scannerNoise(DeepSCCOVIDTrainer):  # noqa: N801
    """The default with :meth:`AugmentationSettings.scanner_noise`: other scanners' noise, without their blur,
    sharpening or thick slices."""

    def augmentation(self) -> AugmentationSettings:
        return AugmentationSettings.scanner_noise()


class DeepSCCOVIDTrainer_contextDegrade(DeepSCCOVIDTrainer):  # noqa: N801
    """The default with :meth:`AugmentationSettings.context`: for half of the samples the classifier's lesion map
    outside the patch loses lesions (small ones most often) and is scaled down, as the network's map of an unseen
    scan misses and under-segments what the ground truth and its map of a training scan hold."""

    def augmentation(self) -> AugmentationSettings:
        return AugmentationSettings.context()


class DeepSCCOVIDTrainer_falseLesions(DeepSCCOVIDTrainer):  # noqa: N801
    """The default with :meth:`AugmentationSettings.false_lesions`: for half of the samples the classifier's lesion
    map marks a few lesions on healthy lung, as the network's map of a noisier scanner's scan does, and the class
    stays the scan's own."""

    def augmentation(self) -> AugmentationSettings:
        return AugmentationSettings.false_lesions()


class DeepSCCOVIDTrainer_classifierDropout(DeepSCCOVIDTrainer):  # noqa: N801
    """The default with dropout 0.5 on the classifier's pooled features (``network.classifier_dropout``): its
    classifier otherwise fits its few dozen training scans exactly early in pre-training."""

    overrides = {"network.classifier_dropout": 0.5}


class DeepSCCOVIDTrainer_lesionGate(DeepSCCOVIDTrainer):  # noqa: N801
    """The classifier's features gated by Ŝ (``network.lesion_gate``; ``3d_cpu`` has it, ``3d_paper`` not): anatomy,
    which the phantoms draw independently of the class, no longer lets the classifier tell its few dozen training
    scans apart."""

    overrides = {"network.lesion_gate": True}


class DeepSCCOVIDTrainer_noLesionGate(DeepSCCOVIDTrainer):  # noqa: N801
    """The classifier sees the whole image, as in the paper (``3d_cpu`` without its lesion gate; the ablation)."""

    overrides = {"network.lesion_gate": False}


class PlainCascadeTrainer(DeepSCCOVIDTrainer):
    """The baseline the paper's parts must beat: none of them, on the same data, schedule and predictor.

    A plain 3D U-Net (convolutional stem, no deep supervision: only the full-resolution output) and a small
    classifier (convolutional stem, the residual encoder, pooling, one linear layer) on the image and the U-Net's
    lesion map, trained side by side: no cross-stitch, no task-aware loss, no findings head, and Ŝ enters the
    classifier detached, so neither task's loss trains the other's part. In the second stage the classifier sees
    the U-Net's own whole-scan prediction outside the patch, as it will at test time (a cascade trained on its
    first stage's output).
    """

    overrides = {
        "network.stem": "conv",
        "network.cross_stitch": False,
        "network.side_output_weights": [0.0, 0.0, 0.0, 1.0],
        "network.findings_head": False,
        "network.detach_lesion_map": True,
        "network.lesion_context": "prediction",
        "network.lesion_gate": False,
        "training.loss.lambda_ta": 0.0,
    }


TRAINERS: dict[str, type[Trainer]] = {
    cls.__name__: cls
    for cls in (
        DeepSCCOVIDTrainer,
        SegmentationTrainer,
        ClassificationTrainer,
        DeepSCCOVIDTrainer_noCrossStitch,
        DeepSCCOVIDTrainer_crossStitch,
        DeepSCCOVIDTrainer_convStem,
        DeepSCCOVIDTrainer_noTaskAware,
        DeepSCCOVIDTrainer_inceptionStem,
        DeepSCCOVIDTrainer_taskAware,
        DeepSCCOVIDTrainer_paperParts,
        DeepSCCOVIDTrainer_lambdaTA1,
        DeepSCCOVIDTrainer_lambdaTA100,
        DeepSCCOVIDTrainer_singleScaleTaskAware,
        DeepSCCOVIDTrainer_lastSideOutput,
        DeepSCCOVIDTrainer_detachLesionMap,
        DeepSCCOVIDTrainer_findings,
        DeepSCCOVIDTrainer_noFindings,
        DeepSCCOVIDTrainer_paperLiteral,
        DeepSCCOVIDTrainer_scannerAug,
        DeepSCCOVIDTrainer_scannerNoise,
        DeepSCCOVIDTrainer_lesionSampling,
        DeepSCCOVIDTrainer_contextDegrade,
        DeepSCCOVIDTrainer_falseLesions,
        DeepSCCOVIDTrainer_classifierDropout,
        DeepSCCOVIDTrainer_lesionGate,
        DeepSCCOVIDTrainer_noLesionGate,
        PlainCascadeTrainer,
    )
}
DEFAULT_TRAINER = "DeepSCCOVIDTrainer"


def get_trainer(name: str) -> type[Trainer]:
    """The trainer class registered under ``name``; the error lists the known names."""
    try:
        return TRAINERS[name]
    except KeyError:
        raise DscovidError(f"unknown trainer {name!r} (known: {', '.join(TRAINERS)})") from None
