"""DICOM-SEG of one case: the lesion and the lung as two binary segments over the source series (highdicom).

The SEG is a *binary* segmentation (the masks dscovid writes are thresholded; the lesion probability stays in
``<case>_lesion_prob.nii.gz``) with two segments:

1. ``Lesion`` (SNOMED CT category *Morphologically abnormal structure* 49755003, type *Lesion* 52988006, in the
   *Lung* 39607008): the predicted lesion mask, made by the network (algorithm family *Artificial Intelligence*);
2. ``Lung`` (category *Anatomical structure* 91723000, type *Lung* 39607008): the reported lung, the lung mask plus
   the lesion, made by dscovid's classical lung segmentation (family *Image Processing*).

Frame ``k`` of a mask is the plane of source file ``k`` (:class:`dscovid.io.dicom_series.SourceSeries` keeps the
volume's slice order), so highdicom copies each frame's position, the orientation, the pixel spacing and the Frame of
Reference UID from the source images and references each frame's source SOP Instance UID; empty frames are left out.
The SEG shares the source's patient and study, in a new series.
"""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from dscovid.io.atomic import atomic_path
from dscovid.io.dicom_content import (
    LESION_CATEGORY,
    LESION_SEGMENT,
    LESION_TYPE,
    LUNG_CATEGORY,
    LUNG_SEGMENT,
    LUNG_TYPE,
    ModelIdentity,
)
from dscovid.io.dicom_series import SourceSeries

#: Series number of the SEG (the SR takes the next): far above a scanner's own series numbers.
SEG_SERIES_NUMBER = 9001

_LESION_COLOUR = (255, 80, 0)  # orange-red, as the montages draw lesions
_LUNG_COLOUR = (70, 130, 255)


def _segment_descriptions(model: ModelIdentity) -> list[hd.seg.SegmentDescription]:
    network = hd.AlgorithmIdentificationSequence(
        name="dscovid DeepSC-COVID", family=codes.DCM.ArtificialIntelligence, version=model.version,
        source="dscovid", parameters=model.parameters(),
    )
    lung_mask = hd.AlgorithmIdentificationSequence(
        name="dscovid classical lung mask", family=codes.DCM.ImageProcessing, version=model.version,
        source="dscovid", parameters={"lung": "lung mask plus predicted lesion"},
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=LESION_SEGMENT, segment_label="Lesion", segmented_property_category=LESION_CATEGORY,
            segmented_property_type=LESION_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=network, tracking_uid=hd.UID(), tracking_id="dscovid lesion",
            anatomic_regions=[codes.SCT.Lung], display_color=hd.color.CIELabColor.from_rgb(*_LESION_COLOUR),
        ),
        hd.seg.SegmentDescription(
            segment_number=LUNG_SEGMENT, segment_label="Lung", segmented_property_category=LUNG_CATEGORY,
            segmented_property_type=LUNG_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=lung_mask, tracking_uid=hd.UID(), tracking_id="dscovid lung",
            display_color=hd.color.CIELabColor.from_rgb(*_LUNG_COLOUR),
        ),
    ]


def build_segmentation(source: SourceSeries, lesion: np.ndarray, lung: np.ndarray,
                       model: ModelIdentity) -> hd.seg.Segmentation:
    """The SEG of one case.

    Parameters
    ----------
    source : the source series, in volume order (:func:`dscovid.io.dicom_series.read_source_series`).
    lesion, lung : (Z, Y, X) masks on the source grid (non-zero = inside), ``Z`` the number of source files; the lung
        segment is written as lung ∪ lesion, as dscovid reports the lung.
    model : the model's identity, written into the segments' algorithm identification.

    Returns
    -------
    The highdicom Segmentation (a pydicom Dataset), not yet written.
    """
    lesion = np.asarray(lesion) != 0
    lung = (np.asarray(lung) != 0) | lesion
    shape = (len(source.headers), int(source.headers[0].Rows), int(source.headers[0].Columns))
    if lesion.shape != shape or lung.shape != shape:
        raise ValueError(f"masks {lesion.shape} / {lung.shape} do not match the source series {shape}")
    stacked = np.stack([lesion, lung], axis=-1).astype(np.uint8)  # (Z, Y, X, segment)
    segmentation = hd.seg.Segmentation(
        source_images=list(source.headers),
        pixel_array=stacked,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(model),
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="dscovid",
        manufacturer_model_name=model.model_name,
        software_versions=model.version,
        device_serial_number=model.serial_number(),
        content_label="DSCOVID",
        content_description="dscovid lesion and lung segmentation",
        series_description="dscovid lesion and lung (DICOM-SEG)",
        omit_empty_frames=True,
    )
    return segmentation


def write_segmentation(segmentation: hd.seg.Segmentation, path: str | os.PathLike) -> Path:
    """Write a SEG atomically (temporary name, then rename)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        segmentation.save_as(temporary, enforce_file_format=True)
    return path
