"""The DICOM structured report of one case: a TID 1500 Measurement Report (Comprehensive 3D SR, highdicom).

The report holds two volumetric measurement groups (TID 1411), each referencing one segment of the case's SEG
(:mod:`dscovid.io.dicom_seg`) and carrying the model's identity (TID 4019 algorithm identification: dscovid's
version, trainer, configuration, folds, checkpoint, plans, dataset):

- **Lesion** (segment 1; finding *Lesion*, site *Lung*): lesion volume (ml), number of lesions, lesion volume ratio
  (%), peripheral lesion ratio (%, the peripheral thickness in the algorithm parameters), lesion mean and standard
  deviation of HU;
- **Lung** (segment 2; finding *Lung*): lung volume (ml), the predicted class (qualitative evaluation *Finding*:
  SNOMED CT COVID-19 840539006, community acquired pneumonia 385093006, or dscovid's private "no pneumonia") and the
  probability of each class (%), the involvement of each lung (%), each of the six zones' involvement (%) and score
  (0-4, finding site *Upper/Middle/Lower zone of lung* with its laterality), the six-zone severity score (0-24) and
  the MosMedData category (CT-0 ... CT-4).

Values come from the case's ``predictions.json`` entry, so the SR and the JSON say the same; a value that is
undefined there (``null``: the peripheral ratio or HU statistics without a lesion, a zone without lung) is left out
of the SR. Ratios and probabilities in [0, 1] in the JSON are written in percent here. The document is marked
complete and unverified (no person has checked it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dscovid.io.atomic import atomic_path
from dscovid.io.dicom_content import (
    FINDING,
    LESION_COUNT,
    LESION_SEGMENT,
    LESION_TYPE,
    LESION_VOLUME_RATIO,
    LUNG_INVOLVEMENT,
    LUNG_SEGMENT,
    LUNG_TYPE,
    MEAN,
    MOSMED_CATEGORY,
    PERIPHERAL_LESION_RATIO,
    PROCEDURE_CT_CHEST,
    SEVERITY_SCORE,
    SIDES,
    STANDARD_DEVIATION,
    UNIT_COUNT,
    UNIT_HU,
    UNIT_ML,
    UNIT_PERCENT,
    UNIT_SCORE,
    VOLUME,
    ZONE_INVOLVEMENT,
    ZONE_SCORE,
    ZONE_SITES,
    ModelIdentity,
    class_code,
    coding_scheme_identification,
    mosmed_code,
    probability_code,
)
from dscovid.io.dicom_series import SourceSeries

#: Series number of the SR (the SEG has 9001).
SR_SERIES_NUMBER = 9002


def _defined(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


def _measurement(name, value, unit, sites: Sequence[hd.sr.FindingSite] | None = None) -> hd.sr.Measurement:
    # The algorithm is identified once per group (TID 1411), which applies to each of its measurements.
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, finding_sites=sites)


def _tracking(segmentation: Dataset, segment_number: int, label: str) -> hd.sr.TrackingIdentifier:
    """The tracking identifier of a SEG segment, so that the SR's group and the segment track the same finding."""
    for item in segmentation.SegmentSequence:
        if int(item.SegmentNumber) == segment_number and "TrackingUID" in item:
            return hd.sr.TrackingIdentifier(uid=str(item.TrackingUID), identifier=label)
    return hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label)


def _segment(segmentation: Dataset, segment_number: int, source: SourceSeries) -> hd.sr.ReferencedSegment:
    """A reference to a SEG segment and its source series (not per source image: an empty segment has no frames)."""
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(segmentation.SOPClassUID), sop_instance_uid=str(segmentation.SOPInstanceUID),
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(source.series_instance_uid),
    )


def _lesion_group(entry: Mapping, segmentation: Dataset, source: SourceSeries,
                  algorithm) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    measurements = []
    for key, name, unit, scale in (
        ("lesion_volume_ml", VOLUME, UNIT_ML, 1.0),
        ("lesion_count", LESION_COUNT, UNIT_COUNT, 1.0),
        ("lesion_volume_ratio", LESION_VOLUME_RATIO, UNIT_PERCENT, 100.0),
        ("peripheral_lesion_ratio", PERIPHERAL_LESION_RATIO, UNIT_PERCENT, 100.0),
        ("lesion_hu_mean", MEAN, UNIT_HU, 1.0),
        ("lesion_hu_std", STANDARD_DEVIATION, UNIT_HU, 1.0),
    ):
        if _defined(entry.get(key)):
            measurements.append(_measurement(name, float(entry[key]) * scale, unit))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(segmentation, LESION_SEGMENT, "dscovid lesion"),
        referenced_segment=_segment(segmentation, LESION_SEGMENT, source),
        finding_type=LESION_TYPE,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _lung_group(entry: Mapping, segmentation: Dataset, source: SourceSeries, algorithm,
                class_names: Sequence[str]) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    measurements = []
    if _defined(entry.get("lung_volume_ml")):
        measurements.append(_measurement(VOLUME, entry["lung_volume_ml"], UNIT_ML))
    for name in class_names:
        probability = (entry.get("probabilities") or {}).get(name)
        if _defined(probability):
            measurements.append(_measurement(probability_code(name), 100.0 * float(probability), UNIT_PERCENT))
    for side, laterality in SIDES.items():
        share = entry.get(f"{side}_lung_involvement")
        if _defined(share):
            site = [hd.sr.FindingSite(codes.SCT.Lung, laterality=laterality)]
            measurements.append(_measurement(LUNG_INVOLVEMENT, 100.0 * float(share), UNIT_PERCENT, site))
    for zone, values in (entry.get("severity_zones") or {}).items():
        side, part = zone.split("_")
        site = [hd.sr.FindingSite(ZONE_SITES[part], laterality=SIDES[side])]
        if _defined(values.get("involvement")):
            measurements.append(_measurement(ZONE_INVOLVEMENT, 100.0 * float(values["involvement"]), UNIT_PERCENT,
                                             site))
        measurements.append(_measurement(ZONE_SCORE, values["score"], UNIT_SCORE, site))
    if _defined(entry.get("severity_score")):
        measurements.append(_measurement(SEVERITY_SCORE, entry["severity_score"], UNIT_SCORE))
    evaluations = []
    if entry.get("predicted_class"):
        evaluations.append(hd.sr.QualitativeEvaluation(FINDING, class_code(str(entry["predicted_class"]))))
    if entry.get("mosmed_category"):
        evaluations.append(hd.sr.QualitativeEvaluation(MOSMED_CATEGORY, mosmed_code(str(entry["mosmed_category"]))))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(segmentation, LUNG_SEGMENT, "dscovid lung"),
        referenced_segment=_segment(segmentation, LUNG_SEGMENT, source),
        finding_type=LUNG_TYPE,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )


def build_report(source: SourceSeries, segmentation: Dataset, entry: Mapping, model: ModelIdentity,
                 class_names: Sequence[str], peripheral_thickness_mm: float) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report of one case.

    Parameters
    ----------
    source : the source series (the report's evidence, with the SEG).
    segmentation : the case's SEG (:func:`dscovid.io.dicom_seg.build_segmentation`), whose segments it references.
    entry : the case's ``predictions.json`` entry (probabilities, lesion report, severity).
    model : the model's identity.
    class_names : the classes, in the order their probabilities are reported.
    peripheral_thickness_mm : σ of the peripheral lesion ratio (recorded with the algorithm's parameters).
    """
    parameters = [*model.parameter_strings(), f"peripheral_thickness_mm={float(peripheral_thickness_mm):g}"]
    algorithm = hd.sr.AlgorithmIdentification(name="dscovid DeepSC-COVID", version=model.version,
                                              parameters=parameters)
    # A stable UID for the same model, so that reports of one model share their device.
    device_uid = generate_uid(prefix=None, entropy_srcs=["dscovid", model.serial_number()])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name="dscovid", manufacturer_name="dscovid", model_name=model.model_name,
            serial_number=model.serial_number(),
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURE_CT_CHEST,
        imaging_measurements=[_lesion_group(entry, segmentation, source, algorithm),
                              _lung_group(entry, segmentation, source, algorithm, class_names)],
        title=codes.DCM.ImagingMeasurementReport,
    )
    document = hd.sr.Comprehensive3DSR(
        evidence=[*source.headers, segmentation],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="dscovid",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="dscovid measurement report (TID 1500)",
    )
    document.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
    return document


def write_report(document: Dataset, path: str | os.PathLike) -> Path:
    """Write an SR atomically (temporary name, then rename)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        document.save_as(temporary, enforce_file_format=True)
    return path
