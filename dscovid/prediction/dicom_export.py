"""The DICOM outputs of a predicted case: ``<case>_seg.dcm`` (DICOM-SEG) and ``<case>_sr.dcm`` (TID 1500 SR).

The predictor's export calls :meth:`DicomExport.write_segmentation` as soon as the lesion and lung masks are on the
original grid (it runs beside the lesion report) and :meth:`DicomExport.write_report` once the case's
``predictions.json`` entry is complete, so the SR says what the JSON says. Only a case read from a DICOM series has
DICOM outputs; a NIfTI (or other volume) has no DICOM identity to reference.

Asked for explicitly (``dscovid_predict --dicom``), a series that cannot be referenced (blank or invalid UIDs, files
that do not match the volume) fails its case with the reason. By default (on for DICOM series input) such a series
gets its NIfTI, CSV and JSON outputs, a warning, and the reason in its entry's ``dicom_skipped``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dscovid.errors import DscovidError
from dscovid.inference.model_loading import TrainedModel
from dscovid.io.dicom_content import ModelIdentity
from dscovid.io.dicom_seg import build_segmentation, write_segmentation
from dscovid.io.dicom_series import SourceSeries, read_source_series
from dscovid.io.dicom_sr import build_report, write_report
from dscovid.io.image_io import Geometry

log = logging.getLogger(__name__)


def is_dicom_series(path: Path) -> bool:
    """True for a case read from a DICOM series (a folder; see :mod:`dscovid.inference.inputs`)."""
    return Path(path).is_dir()


def refuse_non_dicom(paths: list[Path]) -> None:
    """``--dicom`` with an input that is not a DICOM series: one line naming the first such input."""
    others = [path for path in paths if not is_dicom_series(path)]
    if others:
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        raise DscovidError(f"{others[0]}{more}: --dicom needs DICOM series input; this file has no DICOM identity "
                           f"(study, series, instance UIDs) for a DICOM-SEG or SR to reference")


@dataclass(frozen=True)
class WrittenSegmentation:
    """A SEG written for a case, with the source series it references."""

    source: SourceSeries
    segmentation: Dataset
    file_name: str


@dataclass(frozen=True)
class DicomExport:
    """What the DICOM outputs of a run need: the model's identity, the classes, and whether they were asked for.

    required : True when the user asked for ``--dicom`` (a series that cannot be referenced fails its case), False
        for the default (such a series is skipped with a warning).
    """

    model: ModelIdentity
    class_names: tuple[str, ...]
    peripheral_thickness_mm: float
    required: bool = False

    @classmethod
    def of(cls, model: TrainedModel, class_names, peripheral_thickness_mm: float, required: bool) -> DicomExport:
        identity = ModelIdentity(
            trainer=model.trainer, configuration=model.configuration_name, folds=tuple(model.folds),
            checkpoint=model.checkpoint_name, plans=model.plans.plans_name, dataset=model.plans.dataset_name,
        )
        return cls(identity, tuple(class_names), float(peripheral_thickness_mm), required)

    def write_segmentation(self, series: Path, geometry: Geometry, lesion: np.ndarray, lung: np.ndarray,
                           path: Path) -> WrittenSegmentation | str:
        """Write the SEG of a case read from ``series``; return it, or why the series cannot be referenced.

        lesion, lung : (Z, Y, X) uint8 masks on the series' grid ``geometry`` (as written to the NIfTI outputs).
        """
        try:
            source = read_source_series(series, geometry)
        except DscovidError as error:
            if self.required:
                raise
            log.warning("%s: no DICOM-SEG or SR written: %s", series.name, error)
            return str(error)
        segmentation = build_segmentation(source, lesion, lung, self.model)
        write_segmentation(segmentation, path)
        return WrittenSegmentation(source, segmentation, path.name)

    def write_report(self, written: WrittenSegmentation | str, entry: dict, path: Path) -> dict:
        """Write the SR of a case from its complete entry; return what the entry gains (file names or the reason)."""
        if isinstance(written, str):
            return {"dicom_skipped": written}
        document = build_report(written.source, written.segmentation, entry, self.model, self.class_names,
                                self.peripheral_thickness_mm)
        write_report(document, path)
        return {"files": {"dicom_seg": written.file_name, "dicom_sr": path.name}}
