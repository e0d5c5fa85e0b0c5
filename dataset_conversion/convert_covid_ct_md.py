"""COVID-CT-MD (Afshar et al., Sci Data 8:121, 2021; figshare collection 5129081) → raw dataset.

Layout: one DICOM folder per subject (JPEG-Lossless slices) under a folder per class, beside the
label files::

    <root>/COVID-19 subjects/<id>/*.dcm     (full release: "COVID-19 Cases")   → covid
    <root>/Cap subjects/<id>/*.dcm          (full release: "Cap Cases")        → cap
    <root>/Normal subjects/<id>/*.dcm       (full release: "Normal Cases")     → non_pneumonia
    <root>/Index.csv                        Label Index, Diagnosis, Relative Path, Folder/ID
    <root>/Slice-level-labels-updated-1.npy [label index, slice] 1 = infection visible
    <root>/Lobe-level-labels-updated-1.npy  [label index, slice, lobe] lobes LLL, LUL, RLL, RML, RUL

There are no voxel lesion masks: covid and cap cases are ``lesion_annotated: false``; normal cases get
an all-zero mask (annotated). The radiologists' slice labels are indexed by slice in ascending
SliceLocation (0020,1041). They are written per case to ``sliceLabelsTr/<case>.json`` re-indexed by
the z index of the written volume (SimpleITK's order), with the SliceLocation and world z of each
index, so that a predicted mask can be compared slice by slice
(:func:`dscovid.evaluation.slice_level.evaluate_slice_labels`). Normal cases get all-zero slice labels
marked ``"labelled_by": "diagnosis"``; covid/cap cases absent from Index.csv get no slice labels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from dataset_conversion.common import (
    CaseJob,
    ConversionReport,
    SkippedCase,
    natural_key,
    relative_to,
    require_source_dir,
    run_conversion,
    safe_case_name,
    to_int16_hu,
    write_case_json,
    write_case_volume,
)
from dscovid.errors import DscovidError
from dscovid.io.image_io import Geometry, read_image

log = logging.getLogger(__name__)

LOBE_NAMES = ("LLL", "LUL", "RLL", "RML", "RUL")
#: Index.csv diagnosis → our class.
DIAGNOSES = {"covid-19": "covid", "cap": "cap", "normal": "non_pneumonia"}
_SLICE_LOCATION = "0020|1041"
_POSITION = "0020|0032"


def class_of_folder(name: str) -> str | None:
    """Our class for a top-level folder of either release ("COVID-19 subjects", "Cap Cases", "Normal", ...)."""
    lowered = name.lower()
    if lowered.startswith("covid"):
        return "covid"
    if lowered.startswith("cap"):
        return "cap"
    if lowered.startswith("normal"):
        return "non_pneumonia"
    return None


def _dicom_folder(case_dir: Path) -> Path | None:
    """The folder holding the case's slices: the case folder itself, or the sub-folder with most files."""
    if any(p.is_file() and not p.name.startswith(".") for p in case_dir.iterdir()):
        return case_dir
    folders = [p for p in case_dir.rglob("*") if p.is_dir() and any(q.is_file() for q in p.iterdir())]
    return max(folders, key=lambda p: sum(q.is_file() for q in p.iterdir())) if folders else None


def series_file_names(folder: Path) -> list[str]:
    """The slice files of the series :func:`dscovid.io.image_io.read_image` reads, in its z order."""
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise DscovidError(f"{folder}: no DICOM series found in this folder")
    files = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in ids}
    return list(files[max(ids, key=lambda sid: len(files[sid]))])


def slice_locations_mm(files: list[str]) -> np.ndarray:
    """SliceLocation (0020,1041) of each file in mm, read from the headers only (no pixel decoding)."""
    values = []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if reader.HasMetaDataKey(_SLICE_LOCATION):
            values.append(float(reader.GetMetaData(_SLICE_LOCATION).strip()))
        elif reader.HasMetaDataKey(_POSITION):
            # Some exports drop SliceLocation; the labels were sorted by it, and in this dataset it equals IPP z.
            values.append(float(reader.GetMetaData(_POSITION).split("\\")[2]))
        else:
            raise DscovidError(f"{name}: has neither SliceLocation nor ImagePositionPatient; slices cannot be ordered")
    return np.asarray(values, dtype=float)


def align_slice_labels(locations_mm: np.ndarray, row: np.ndarray, where: str) -> np.ndarray:
    """Re-index a label row given in ascending SliceLocation onto the volume's z order.

    Parameters
    ----------
    locations_mm : (Z,) SliceLocation of each z index of the volume.
    row : (S, ...) labels for slices sorted by ascending SliceLocation (S ≥ Z; entries beyond Z must be 0).

    Returns
    -------
    (Z, ...) labels, entry z belonging to z index z of the volume.
    """
    count = len(locations_mm)
    if len(row) < count:
        raise DscovidError(f"{where}: {count} slices but labels for only {len(row)}")
    if np.any(row[count:]):
        raise DscovidError(f"{where}: labels mark slices beyond the {count} slices of the series as infected")
    if len(np.unique(locations_mm)) != count:
        raise DscovidError(f"{where}: repeated SliceLocation values; slices cannot be matched to their labels")
    rank = np.empty(count, dtype=np.int64)
    rank[np.argsort(locations_mm, kind="stable")] = np.arange(count)
    return row[rank]


def world_z_mm(geometry: Geometry) -> np.ndarray:
    """World z (LPS, mm) of the centre of each z index of a volume."""
    matrix = geometry.index_to_world_matrix()
    indices = np.zeros((geometry.shape_zyx[0], 4))
    indices[:, 0] = np.arange(geometry.shape_zyx[0])
    indices[:, 3] = 1.0
    return (indices @ matrix.T)[:, 2]


def convert_covid_ct_md_case(job: CaseJob, out_dir: Path) -> dict:
    """Write one COVID-CT-MD case and its slice labels (worker; raises DscovidError to skip it)."""
    folder = Path(job.sources["image"])
    ct, geometry = read_image(folder)
    ct = to_int16_hu(ct, folder)
    files = series_file_names(folder)
    if len(files) != geometry.shape_zyx[0]:
        raise DscovidError(f"{folder}: {len(files)} slice files but {geometry.shape_zyx[0]} slices were read")
    locations = slice_locations_mm(files)
    metadata = dict(job.metadata)
    sidecar = None
    where = f"{job.source_id}"
    if job.class_name == "non_pneumonia":
        infection = np.zeros(len(files), dtype=np.int64)
        lobes = None
        labelled_by, origin = "diagnosis", "normal diagnosis: no slice shows infection"
    elif "slice_labels" in job.sources:
        row_index = int(job.options["label_index"])
        slice_rows = np.load(job.sources["slice_labels"], mmap_mode="r", allow_pickle=False)
        if row_index >= len(slice_rows):
            raise DscovidError(f"{where}: label index {row_index} beyond the {len(slice_rows)} rows of the slice labels")
        infection = align_slice_labels(locations, np.asarray(slice_rows[row_index]).astype(np.int64), where)
        lobes = None
        if "lobe_labels" in job.sources:
            lobe_rows = np.load(job.sources["lobe_labels"], mmap_mode="r", allow_pickle=False)
            lobes = align_slice_labels(locations, np.asarray(lobe_rows[row_index]).astype(np.int64), where)
        labelled_by = "radiologists"
        origin = f"{Path(job.sources['slice_labels']).name} row {row_index}"
    else:
        infection = None
    if infection is not None:
        sidecar = {
            "case": job.case,
            "source_id": job.source_id,
            "labelled_by": labelled_by,
            "source": origin,
            "axis": f"z index of imagesTr/{job.case}_0000.nii.gz (SimpleITK order)",
            "infection": [int(v) for v in infection],
            "slice_location_mm": [round(float(v), 3) for v in locations],
            "world_z_mm": [round(float(v), 3) for v in world_z_mm(geometry)],
        }
        if lobes is not None:
            sidecar["lobe_names"] = list(LOBE_NAMES)
            sidecar["lobe_infection"] = [[int(v) for v in slice_lobes] for slice_lobes in lobes]
        metadata["infected_slices"] = int(np.sum(infection))
    outputs = [write_case_volume(out_dir, "imagesTr", job.case, ct, geometry)]
    if job.class_name == "non_pneumonia":
        outputs.append(write_case_volume(out_dir, "labelsTr", job.case, np.zeros(ct.shape, np.uint8), geometry))
    if sidecar is not None:
        outputs.append(write_case_json(out_dir, "sliceLabelsTr", job.case, sidecar))
    metadata["slice_labels"] = outputs[-1] if sidecar is not None else None
    metadata["outputs"] = outputs
    return {"class": job.class_name, "lesion_annotated": job.class_name == "non_pneumonia", "metadata": metadata}


def _label_file(source: Path, prefix: str) -> Path | None:
    """The ``-updated-1`` label file (which fixes P001 and P006), else the original one, else None."""
    updated = source / f"{prefix}-updated-1.npy"
    if updated.is_file():
        return updated
    others = sorted(source.glob(f"{prefix}*.npy"))
    if others:
        log.warning("%s: using %s; the -updated-1 release corrects cases P001 and P006", source, others[-1].name)
        return others[-1]
    return None


def read_index(path: Path) -> dict[str, tuple[int, str]]:
    """Index.csv as ``{Folder/ID: (Label Index, class)}``."""
    try:
        table = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except (OSError, ValueError) as error:
        raise DscovidError(f"{path}: cannot be read as CSV ({error})") from None
    table.columns = [column.strip() for column in table.columns]
    missing = {"Label Index", "Diagnosis", "Folder/ID"} - set(table.columns)
    if missing:
        raise DscovidError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    index = {}
    for values in table.to_dict("records"):
        diagnosis = DIAGNOSES.get(str(values["Diagnosis"]).strip().lower())
        if diagnosis is None:
            raise DscovidError(f"{path}: unknown diagnosis {values['Diagnosis']!r} (expected COVID-19, CAP or Normal)")
        try:
            label_index = int(str(values["Label Index"]).strip())
        except ValueError:
            raise DscovidError(f"{path}: Label Index {values['Label Index']!r} is not a number") from None
        index[str(values["Folder/ID"]).strip()] = (label_index, diagnosis)
    return index


def list_covid_ct_md_jobs(source: Path) -> tuple[list[CaseJob], list[SkippedCase]]:
    """Find the COVID-CT-MD subjects and their label rows under ``source``."""
    class_dirs = [(p, class_of_folder(p.name)) for p in sorted(source.iterdir()) if p.is_dir() and class_of_folder(p.name)]
    if not class_dirs:
        raise DscovidError(
            f"{source}: no 'COVID-19 subjects'/'COVID-19 Cases', 'Cap ...' or 'Normal ...' folder (COVID-CT-MD layout)"
        )
    index_path = source / "Index.csv"
    index = read_index(index_path) if index_path.is_file() else {}
    slice_file, lobe_file = _label_file(source, "Slice-level-labels"), _label_file(source, "Lobe-level-labels")
    if not index or slice_file is None:
        log.warning("%s: Index.csv or Slice-level-labels*.npy missing; no slice labels will be written", source)
    jobs, skipped = [], []
    for class_dir, class_name in class_dirs:
        for case_dir in sorted((p for p in class_dir.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
            source_id = case_dir.name
            where = f"{class_dir.name}/{source_id}"
            dicom = _dicom_folder(case_dir)
            if dicom is None:
                skipped.append(SkippedCase(where, f"{case_dir}: no slice files"))
                continue
            try:
                case = safe_case_name(source_id)
            except DscovidError as error:
                skipped.append(SkippedCase(where, str(error)))
                continue
            sources = {"image": str(dicom)}
            options: dict = {}
            metadata = {"source_dataset": "COVID-CT-MD", "source_class": class_dir.name, "source_id": source_id,
                        "source_files": {"image": relative_to(dicom, source)}}
            if source_id in index:
                label_index, diagnosis = index[source_id]
                if diagnosis != class_name:
                    skipped.append(SkippedCase(where, f"Index.csv says {diagnosis} but the case lies in {class_dir.name}/"))
                    continue
                metadata["label_index"] = label_index
                options["label_index"] = label_index
                if slice_file is not None and class_name != "non_pneumonia":
                    sources["slice_labels"] = str(slice_file)
                    metadata["source_files"]["slice_labels"] = relative_to(slice_file, source)
                    if lobe_file is not None:
                        sources["lobe_labels"] = str(lobe_file)
                        metadata["source_files"]["lobe_labels"] = relative_to(lobe_file, source)
            jobs.append(CaseJob(case, class_name, where, sources, options, metadata))
    return jobs, skipped


def convert_covid_ct_md(source: Path, out_dir: Path, num_processes: int = 1, progress: bool = False) -> ConversionReport:
    """Convert COVID-CT-MD (sample or full release layout) into a raw dataset at ``out_dir``.

    Writes the CTs (int16 HU), all-zero lesion masks for normal cases, and the slice-level infection
    labels per case in ``sliceLabelsTr/<case>.json`` (see the module docstring).
    """
    source = require_source_dir(Path(source), "COVID-CT-MD")
    jobs, skipped = list_covid_ct_md_jobs(source)
    return run_conversion(
        "covid_ct_md", source, Path(out_dir), jobs, convert_covid_ct_md_case, num_processes, skipped,
        description="COVID-CT-MD (Afshar et al., Sci Data 2021), converted by dscovid_convert covid_ct_md; "
                    "slice-level infection labels in sliceLabelsTr/",
        progress=progress, extra={"slice_labels_folder": "sliceLabelsTr"},
    )
