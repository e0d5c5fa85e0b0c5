"""COVID-19-20 lung CT lesion segmentation challenge (from TCIA "CT Images in COVID-19", CC BY 4.0) → raw dataset.

Layout: NIfTI pairs, anywhere below the source folder (the release splits them into Train/ and
Validation/)::

    volume-covid19-A-XXXX_ct.nii.gz     CT in HU
    volume-covid19-A-XXXX_seg.nii.gz    binary lesion mask (absent for the validation cases)

All cases are ``covid``; a case with a mask is annotated, one without is not. The case name is the
file name without ``_ct.nii.gz`` (``volume-covid19-A-0003``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from dataset_conversion.common import (
    CaseJob,
    ConversionReport,
    SkippedCase,
    natural_key,
    read_label_on_grid,
    relative_to,
    require_source_dir,
    run_conversion,
    safe_case_name,
    to_int16_hu,
    write_case_volume,
)
from dscovid.errors import DscovidError
from dscovid.io.image_io import read_image

log = logging.getLogger(__name__)

_CT_SUFFIXES = ("_ct.nii.gz", "_ct.nii")


def convert_covid19_20_case(job: CaseJob, out_dir: Path) -> dict:
    """Write one challenge case (worker; raises DscovidError to skip it)."""
    ct, geometry = read_image(job.sources["image"])
    ct = to_int16_hu(ct, job.sources["image"])
    label = read_label_on_grid(job.sources["label"], geometry) if "label" in job.sources else None
    if label is not None and not label.any():
        log.warning("%s: the lesion mask is empty", job.case)
    outputs = [write_case_volume(out_dir, "imagesTr", job.case, ct, geometry)]
    if label is not None:
        outputs.append(write_case_volume(out_dir, "labelsTr", job.case, label, geometry))
    return {"class": "covid", "lesion_annotated": label is not None, "metadata": {**job.metadata, "outputs": outputs}}


def list_covid19_20_jobs(source: Path) -> tuple[list[CaseJob], list[SkippedCase]]:
    """Find the ``*_ct.nii.gz`` volumes and their ``*_seg.nii.gz`` masks below ``source``."""
    images = sorted((p for p in source.rglob("*_ct.nii*") if p.name.endswith(_CT_SUFFIXES)), key=lambda p: natural_key(p.name))
    if not images:
        raise DscovidError(f"{source}: no volume-covid19-*_ct.nii.gz files (COVID-19-20 challenge layout)")
    masks = {p.name: p for p in source.rglob("*_seg.nii*")}
    jobs, skipped = [], []
    for image in images:
        stem = next(image.name[: -len(suffix)] for suffix in _CT_SUFFIXES if image.name.endswith(suffix))
        sources = {"image": str(image)}
        seg = image.with_name(f"{stem}_seg.nii.gz")
        seg = seg if seg.is_file() else masks.get(f"{stem}_seg.nii.gz") or masks.get(f"{stem}_seg.nii")
        if seg is not None:
            sources["label"] = str(seg)
        try:
            case = safe_case_name(stem)
        except DscovidError as error:
            skipped.append(SkippedCase(stem, str(error)))
            continue
        metadata = {
            "source_dataset": "COVID-19-20 challenge (TCIA CT Images in COVID-19)",
            "source_id": stem,
            "source_split": relative_to(image.parent, source),
            "source_files": {role: relative_to(path, source) for role, path in sources.items()},
        }
        jobs.append(CaseJob(case, "covid", stem, sources, {}, metadata))
    known = {Path(job.sources.get("label", "")).name for job in jobs}
    for name in sorted(set(masks) - known, key=natural_key):
        skipped.append(SkippedCase(name, f"lesion mask {masks[name]} has no matching _ct volume"))
    return jobs, skipped


def convert_covid19_20(source: Path, out_dir: Path, num_processes: int = 1, progress: bool = False) -> ConversionReport:
    """Convert the COVID-19-20 challenge data into a raw dataset at ``out_dir`` (all covid, masks where given)."""
    source = require_source_dir(Path(source), "COVID-19-20")
    jobs, skipped = list_covid19_20_jobs(source)
    return run_conversion(
        "covid19_20", source, Path(out_dir), jobs, convert_covid19_20_case, num_processes, skipped,
        description="COVID-19-20 challenge (TCIA CT Images in COVID-19, CC BY 4.0), converted by dscovid_convert covid19_20",
        progress=progress,
    )
