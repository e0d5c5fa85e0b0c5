"""COVID-19-CT-Seg (Ma et al., Zenodo 3757476: 10 Coronacases + 10 Radiopaedia CTs) → raw dataset.

Zenodo layout (each folder holds ``<name>.nii.gz`` per case, the same names throughout)::

    <root>/COVID-19-CT-Seg_20cases/coronacases_001.nii.gz, radiopaedia_4_85506_1.nii.gz, ...
    <root>/Infection_Mask/            1 = infection
    <root>/Lung_Mask/                 1 = left lung, 2 = right lung
    <root>/Lung_and_Infection_Mask/   1 left, 2 right, 3 infection (used where a mask above is missing)

The Kaggle mirror renames them: ``ct_scans/coronacases_org_001.nii``,
``ct_scans/radiopaedia_org_covid-19-pneumonia-14_85914_0-dcm.nii`` and ``infection_mask/``,
``lung_mask/``, ``lung_and_infection_mask/`` (``metadata.csv`` pairs them when present; otherwise the
names are reduced to the Zenodo ones: ``_org``, ``covid-19-pneumonia-`` and ``-dcm`` dropped).

All cases are ``covid`` with lesion masks; the lung masks are binarised (1, 2 → 1) into ``lungsTr/``.
The Radiopaedia CTs are not in Hounsfield units (intensities about 0-255). Each CT is checked: one
without air near -1000 HU is skipped with the reason, unless ``keep_not_hu=True`` (``--keep-not-hu``),
which keeps it and marks the whole dataset ``intensity_unit: "not_HU"`` (the pipeline then warns that
its HU window does not apply).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dataset_conversion.common import (
    CaseJob,
    ConversionReport,
    SkippedCase,
    binarise,
    natural_key,
    read_label_array,
    read_label_on_grid,
    relative_to,
    require_same_grid,
    require_source_dir,
    run_conversion,
    safe_case_name,
    strip_volume_ending,
    to_int16_hu,
    write_case_volume,
)
from dscovid.errors import DscovidError
from dscovid.io.image_io import check_hounsfield, read_image

log = logging.getLogger(__name__)

#: Folder roles, matched case-insensitively against the Zenodo and the Kaggle names.
FOLDERS = {
    "image": ("covid-19-ct-seg_20cases", "ct_scans"),
    "infection": ("infection_mask",),
    "lung": ("lung_mask",),
    "lung_and_infection": ("lung_and_infection_mask",),
}
INFECTION_VALUE_COMBINED = 3


def canonical_name(file_name: str) -> str:
    """The Zenodo case name of a Zenodo or Kaggle file (``radiopaedia_org_covid-19-pneumonia-14_85914_0-dcm.nii``
    → ``radiopaedia_14_85914_0``)."""
    name = strip_volume_ending(Path(file_name).name)
    name = name.replace("_org", "").replace("covid-19-pneumonia-", "")
    return name.removesuffix("-dcm")


def convert_covid19_ct_seg_case(job: CaseJob, out_dir: Path) -> dict:
    """Write one case with its infection and lung masks (worker; raises DscovidError to skip it)."""
    keep_not_hu = bool(job.options.get("keep_not_hu", False))
    ct, geometry = read_image(job.sources["image"], check_hu=False)
    metadata = dict(job.metadata)
    try:
        check_hounsfield(ct, job.sources["image"])
        metadata["intensity_unit"] = "HU"
    except DscovidError:
        low, high = float(ct.min()), float(ct.max())
        if not keep_not_hu:
            raise DscovidError(
                f"intensities {low:g}..{high:g} are not Hounsfield units (no air near -1000 HU; the Radiopaedia "
                f"cases of this set are exported 0-255); --keep-not-hu keeps them and marks the dataset not_HU"
            ) from None
        log.warning("%s: intensities %g..%g are not HU; kept (--keep-not-hu)", job.case, low, high)
        metadata["intensity_unit"] = "not_HU"
        metadata["intensity_range"] = [low, high]
    ct = to_int16_hu(ct, job.sources["image"])
    combined = None
    if "lung_and_infection" in job.sources and ("infection" not in job.sources or "lung" not in job.sources):
        combined, combined_geometry = read_label_array(job.sources["lung_and_infection"], "lung and infection mask")
        require_same_grid(geometry, combined_geometry, "lung and infection mask")
    if "infection" in job.sources:
        label = read_label_on_grid(job.sources["infection"], geometry)
    elif combined is not None:
        label = (combined == INFECTION_VALUE_COMBINED).astype(np.uint8)
    else:
        raise DscovidError("no infection mask (Infection_Mask/ or Lung_and_Infection_Mask/)")
    if "lung" in job.sources:
        lung = read_label_on_grid(job.sources["lung"], geometry, "lung mask")
    else:
        lung = binarise(combined) if combined is not None else None
    outputs = [write_case_volume(out_dir, "imagesTr", job.case, ct, geometry),
               write_case_volume(out_dir, "labelsTr", job.case, label, geometry)]
    if lung is not None:
        outputs.append(write_case_volume(out_dir, "lungsTr", job.case, lung, geometry))
    metadata["outputs"] = outputs
    return {"class": "covid", "lesion_annotated": True, "metadata": metadata}


def _role_folders(source: Path) -> dict[str, Path]:
    found = {}
    for child in sorted(source.iterdir()):
        for role, names in FOLDERS.items():
            if child.is_dir() and child.name.lower() in names and role not in found:
                found[role] = child
    return found


def _volumes(folder: Path) -> dict[str, Path]:
    return {canonical_name(p.name): p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii"))}


def _pairs_from_metadata(path: Path, folders: dict[str, Path]) -> dict[str, dict[str, Path]]:
    """Kaggle's metadata.csv (columns ct_scan, infection_mask, lung_mask, lung_and_infection_mask) by case."""
    table = pd.read_csv(path, dtype=str)
    columns = {"image": "ct_scan", "infection": "infection_mask", "lung": "lung_mask",
               "lung_and_infection": "lung_and_infection_mask"}
    if "ct_scan" not in table.columns:
        raise DscovidError(f"{path}: no ct_scan column (Kaggle metadata.csv)")
    pairs = {}
    for row in table.to_dict("records"):
        entry = {}
        for role, column in columns.items():
            value = row.get(column)
            if role in folders and isinstance(value, str) and (folders[role] / Path(value.replace("\\", "/")).name).is_file():
                entry[role] = folders[role] / Path(value.replace("\\", "/")).name
        if "image" in entry:
            pairs[canonical_name(entry["image"].name)] = entry
    return pairs


def list_covid19_ct_seg_jobs(source: Path, keep_not_hu: bool = False) -> tuple[list[CaseJob], list[SkippedCase]]:
    """Pair the CTs with their masks under ``source`` (Zenodo or Kaggle naming)."""
    folders = _role_folders(source)
    if "image" not in folders:
        raise DscovidError(f"{source}: no COVID-19-CT-Seg_20cases/ or ct_scans/ folder (COVID-19-CT-Seg layout)")
    if (source / "metadata.csv").is_file():
        pairs = _pairs_from_metadata(source / "metadata.csv", folders)
    else:
        by_role = {role: _volumes(folder) for role, folder in folders.items()}
        pairs = {name: {role: by_role[role][name] for role in by_role if name in by_role[role]} for name in by_role["image"]}
    jobs, skipped = [], []
    for name in sorted(pairs, key=natural_key):
        entry = pairs[name]
        if "infection" not in entry and "lung_and_infection" not in entry:
            skipped.append(SkippedCase(name, "no infection mask for this CT"))
            continue
        sources = {role: str(path) for role, path in entry.items()}
        metadata = {
            "source_dataset": "COVID-19-CT-Seg (Ma et al., Zenodo 3757476)",
            "source_id": name,
            "source_site": "Radiopaedia" if name.lower().startswith("radiopaedia") else "Coronacases",
            "source_files": {role: relative_to(path, source) for role, path in sources.items()},
        }
        try:
            case = safe_case_name(name)
        except DscovidError as error:
            skipped.append(SkippedCase(name, str(error)))
            continue
        jobs.append(CaseJob(case, "covid", name, sources, {"keep_not_hu": keep_not_hu}, metadata))
    return jobs, skipped


def convert_covid19_ct_seg(source: Path, out_dir: Path, num_processes: int = 1, keep_not_hu: bool = False,
                           progress: bool = False) -> ConversionReport:
    """Convert COVID-19-CT-Seg (Zenodo or Kaggle naming) into a raw dataset at ``out_dir``.

    Parameters
    ----------
    keep_not_hu : keep CTs that are not in Hounsfield units (the Radiopaedia cases) and mark the dataset
        ``intensity_unit: "not_HU"``; by default they are skipped with the reason.
    """
    source = require_source_dir(Path(source), "COVID-19-CT-Seg")
    jobs, skipped = list_covid19_ct_seg_jobs(source, keep_not_hu)
    return run_conversion(
        "covid19_ct_seg", source, Path(out_dir), jobs, convert_covid19_ct_seg_case, num_processes, skipped,
        intensity_unit=None,
        description="COVID-19-CT-Seg (Ma et al., Zenodo 3757476), converted by dscovid_convert covid19_ct_seg",
        options={"keep_not_hu": keep_not_hu}, progress=progress,
    )
