"""MosMedData COVID19_1110 (Morozov et al., 2020; CC BY-NC-ND 3.0) → raw dataset.

Layout::

    <root>/studies/CT-{0,1,2,3,4}/study_NNNN.nii.gz
    <root>/masks/study_NNNN_mask.nii.gz          binary lesion masks (GGO + consolidation), 50 CT-1 studies
    <root>/dataset_registry.csv                  study_id, category, study_file, mask_file (optional)

CT-0 ("no CT signs of viral pneumonia") → ``non_pneumonia`` with an all-zero mask (annotated);
CT-1..CT-4 (< 25 %, 25-50 %, 50-75 %, > 75 % lung involvement) → ``covid``, the category kept as
``severity`` metadata; a covid study with a mask is annotated, the others are not. MosMed has no CAP
class. Only every 10th slice was kept, so the z spacing is large (about 8-10 mm).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

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
    strip_volume_ending,
    to_int16_hu,
    write_case_volume,
)
from dscovid.errors import DscovidError
from dscovid.io.image_io import read_image

log = logging.getLogger(__name__)

INVOLVEMENT = {0: "no CT signs of viral pneumonia", 1: "<25%", 2: "25-50%", 3: "50-75%", 4: ">75%"}
_CATEGORY = re.compile(r"^CT-([0-4])$", re.IGNORECASE)


def _study_key(text: str) -> str:
    """``studies/CT-1/study_0255.nii.gz``, ``study_0255`` → ``study_0255`` (the registry's study id)."""
    return strip_volume_ending(Path(str(text).replace("\\", "/")).name).removesuffix("_mask")


def read_registry(path: Path) -> dict[str, tuple[str, str | None]]:
    """dataset_registry.csv as ``{study key: (category "CT-k", mask file name or None)}``."""
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as error:
        raise DscovidError(f"{path}: cannot be read as CSV ({error})") from None
    table.columns = [column.strip() for column in table.columns]
    if "category" not in table.columns or not {"study_file", "study_id"} & set(table.columns):
        raise DscovidError(f"{path}: needs the columns category and study_file (or study_id)")
    registry = {}
    for row in table.to_dict("records"):
        study = row.get("study_file") if isinstance(row.get("study_file"), str) else row.get("study_id")
        mask = row.get("mask_file")
        mask_name = Path(mask.replace("\\", "/")).name if isinstance(mask, str) and mask.strip() else None
        registry[_study_key(str(study))] = (str(row["category"]).strip().upper(), mask_name)
    return registry


def convert_mosmed_case(job: CaseJob, out_dir: Path) -> dict:
    """Write one MosMed study (worker; raises DscovidError to skip it)."""
    ct, geometry = read_image(job.sources["image"])
    ct = to_int16_hu(ct, job.sources["image"])
    label = None
    if job.class_name == "non_pneumonia":
        label = np.zeros(ct.shape, dtype=np.uint8)
    elif "label" in job.sources:
        label = read_label_on_grid(job.sources["label"], geometry)
        if not label.any():
            log.warning("%s: the lesion mask of a %s study is empty", job.case, job.metadata.get("severity"))
    outputs = [write_case_volume(out_dir, "imagesTr", job.case, ct, geometry)]
    if label is not None:
        outputs.append(write_case_volume(out_dir, "labelsTr", job.case, label, geometry))
    return {"class": job.class_name, "lesion_annotated": label is not None,
            "metadata": {**job.metadata, "outputs": outputs}}


def list_mosmed_jobs(source: Path) -> tuple[list[CaseJob], list[SkippedCase]]:
    """Find the MosMed studies and masks under ``source``."""
    studies = source / "studies"
    folders = sorted(p for p in studies.iterdir() if p.is_dir() and _CATEGORY.match(p.name)) if studies.is_dir() else []
    if not folders:
        raise DscovidError(f"{source}: no studies/CT-0 .. CT-4 folders (MosMedData layout)")
    registry_path = next((p for p in (source / "dataset_registry.csv", source / "dataset_registry.xlsx") if p.is_file()), None)
    registry = read_registry(registry_path) if registry_path is not None and registry_path.suffix == ".csv" else {}
    masks = source / "masks"
    jobs, skipped = [], []
    for folder in folders:
        level = int(_CATEGORY.match(folder.name).group(1))
        category = f"CT-{level}"
        class_name = "non_pneumonia" if level == 0 else "covid"
        for image in sorted((p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii"))),
                            key=lambda p: natural_key(p.name)):
            study = _study_key(image.name)
            where = f"{category}/{study}"
            if study in registry and registry[study][0] != category:
                reason = f"dataset_registry.csv says {registry[study][0]} but the study lies in {category}/"
                skipped.append(SkippedCase(where, reason))
                continue
            mask_name = registry.get(study, (None, None))[1] or f"{study}_mask.nii.gz"
            mask = masks / mask_name
            if not mask.is_file() and (masks / f"{study}_mask.nii").is_file():
                mask = masks / f"{study}_mask.nii"
            sources = {"image": str(image)}
            if mask.is_file() and level == 0:
                log.warning("%s: ignoring the lesion mask of a CT-0 (normal) study", where)
            elif mask.is_file():
                sources["label"] = str(mask)
            metadata = {
                "source_dataset": "MosMedData COVID19_1110",
                "source_id": study,
                "severity": category,
                "severity_level": level,
                "involvement": INVOLVEMENT[level],
                "source_files": {role: relative_to(path, source) for role, path in sources.items()},
            }
            try:
                case = safe_case_name(study)
            except DscovidError as error:
                skipped.append(SkippedCase(where, str(error)))
                continue
            jobs.append(CaseJob(case, class_name, where, sources, {}, metadata))
    return jobs, skipped


def convert_mosmed(source: Path, out_dir: Path, num_processes: int = 1, progress: bool = False) -> ConversionReport:
    """Convert MosMedData into a raw dataset at ``out_dir`` (see the module docstring for the mapping)."""
    source = require_source_dir(Path(source), "MosMedData")
    jobs, skipped = list_mosmed_jobs(source)
    return run_conversion(
        "mosmed", source, Path(out_dir), jobs, convert_mosmed_case, num_processes, skipped,
        description="MosMedData COVID19_1110 (CC BY-NC-ND 3.0), converted by dscovid_convert mosmed; "
                    "CT-0 = non_pneumonia, CT-1..4 = covid (severity in metadata)",
        progress=progress,
    )
