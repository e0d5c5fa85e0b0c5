"""What every dataset converter shares: case jobs, the idempotent parallel runner, and writing one case.

A converter lists the cases of a source as :class:`CaseJob` objects and hands them, with a module-level
worker function, to :func:`run_conversion`. The worker reads the sources of one case, writes its files
into the raw dataset (``imagesTr``, ``labelsTr``, ``lungsTr``, ``sliceLabelsTr``) and returns the case's
dataset.json entry, or raises :class:`~dscovid.errors.DscovidError` to have the case skipped with that
message as the reason. The runner then writes ``dataset.json`` once, at the end.

Re-running a conversion is idempotent: each case entry keeps a ``conversion_stamp`` (a hash of the
size and modification time of its source files, the converter options and :data:`FORMAT_VERSION`);
a case whose stamp is unchanged and whose outputs exist is not rewritten, and the dataset.json written
is the same.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from dscovid import __version__
from dscovid.errors import DscovidError
from dscovid.io.dataset import (
    CHANNEL_SUFFIX,
    check_case_name,
    is_safe_case_name,
    load_dataset_json,
    make_dataset_json,
    parse_dataset_name,
    write_json_atomic,
)
from dscovid.io.image_io import Geometry, read_sitk, write_image
from dscovid.io.stamps import digest, file_stamp

log = logging.getLogger(__name__)

#: Bumped when a converter's output for the same source changes, so that re-runs rewrite old cases.
FORMAT_VERSION = 1

FILE_ENDING = ".nii.gz"

#: Folders of the raw dataset a converter writes per case (the file name is the case name + ending).
CASE_FOLDERS = ("imagesTr", "labelsTr", "lungsTr", "sliceLabelsTr")

#: Header differences between a mask and its CT that are float rounding in the NIfTI header, not a real mismatch.
GEOMETRY_TOLERANCE_MM = 1e-2
DIRECTION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class CaseJob:
    """One case to convert: everything a worker process needs (plain, picklable values only).

    Attributes
    ----------
    case : the case name in the raw dataset (safe as a file name).
    class_name : ``covid``, ``cap`` or ``non_pneumonia``.
    source_id : the case's identifier in the source dataset (shown in skip reasons).
    sources : role (``image``, ``label``, ``lung``, ...) → absolute path of a source file or DICOM folder.
    options : converter options that change this case's output (part of the re-run stamp).
    metadata : what the converter already knows (source paths, severity, ...); copied into dataset.json.
    """

    case: str
    class_name: str
    source_id: str
    sources: dict[str, str]
    options: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedCase:
    """A source case that was not converted, and why (one line)."""

    source_id: str
    reason: str


@dataclass
class ConversionReport:
    """What a conversion did.

    Attributes
    ----------
    dataset_dir : the raw dataset folder written.
    converted : case names now in the dataset (written in this run or already up to date), sorted.
    up_to_date : the subset of ``converted`` that was already up to date and not rewritten.
    skipped : the source cases that could not be converted, with the reason.
    intensity_unit : ``"HU"`` or ``"not_HU"``, as written into dataset.json.
    class_counts : number of converted cases per class.
    """

    dataset_dir: Path
    converted: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    skipped: list[SkippedCase] = field(default_factory=list)
    intensity_unit: str = "HU"
    class_counts: dict[str, int] = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        """Human-readable lines: the counts, then one line per skipped case."""
        counts = ", ".join(f"{name} {count}" for name, count in sorted(self.class_counts.items()))
        lines = [
            f"{self.dataset_dir}: {len(self.converted)} case(s) converted "
            f"({len(self.up_to_date)} already up to date){'; ' + counts if counts else ''}; "
            f"intensity unit {self.intensity_unit}; {len(self.skipped)} skipped"
        ]
        lines += [f"skipped {item.source_id}: {item.reason}" for item in self.skipped]
        return lines


def safe_case_name(text: str) -> str:
    """Turn a source identifier into a case name that :func:`check_case_name` accepts.

    Runs of characters other than letters, digits, ``_``, ``-`` and ``.`` become ``_``; leading
    non-alphanumerics and ``..`` are removed (``"P 002/a"`` → ``"P_002_a"``).
    """
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", text.strip())
    name = re.sub(r"\.{2,}", ".", name)
    name = re.sub(r"^[^A-Za-z0-9]+", "", name).rstrip("_")
    check_case_name(name)
    return name


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers numerically (``IM2`` before ``IM10``)."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text))


def strip_volume_ending(name: str) -> str:
    """``study_0001.nii.gz`` → ``study_0001`` (also ``.nii``, ``.mha``, ``.nrrd``)."""
    for ending in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return name


def find_volume(folder: Path, stem: str) -> Path | None:
    """The file ``<folder>/<stem>.nii.gz`` or ``.nii`` (first that exists), else None."""
    for ending in (".nii.gz", ".nii"):
        candidate = folder / f"{stem}{ending}"
        if candidate.is_file():
            return candidate
    return None


def to_int16_hu(array: np.ndarray, where: str | Path) -> np.ndarray:
    """Round a CT to int16 (the raw dataset stores HU as int16), refusing values int16 cannot hold."""
    if array.dtype == np.int16:
        return array
    if array.size and (float(array.min()) < -32768 or float(array.max()) > 32767):
        raise DscovidError(f"{where}: intensities {float(array.min()):g}..{float(array.max()):g} do not fit int16")
    if array.dtype.kind == "f":
        array = np.rint(array)
    return array.astype(np.int16)


def binarise(mask: np.ndarray) -> np.ndarray:
    """Lesion or lung mask as uint8 0/1 (any value above 0 is foreground, as the public loaders do)."""
    return (mask > 0).astype(np.uint8)


def geometries_agree(image: Geometry, mask: Geometry) -> bool:
    """True when a mask lies on its CT's voxel grid up to float rounding in the file header."""
    return image.matches(mask, tolerance_mm=GEOMETRY_TOLERANCE_MM, tolerance_direction=DIRECTION_TOLERANCE)


def require_same_grid(image: Geometry, mask: Geometry, kind: str) -> None:
    """Refuse a mask that is not on its CT's grid, saying how it differs (the case is then skipped)."""
    if image.shape_zyx != mask.shape_zyx:
        raise DscovidError(f"{kind} shape {mask.shape_zyx} does not match image {image.shape_zyx}")
    if not geometries_agree(image, mask):
        raise DscovidError(f"{kind} geometry does not match the image ({image.describe_difference(mask)})")


def read_label_array(path: str | Path, kind: str = "label") -> tuple[np.ndarray, Geometry]:
    """Read a source mask as it is stored (any integer values), refusing one that is not a 3D scalar volume."""
    mask_image = read_sitk(path)
    if mask_image.GetDimension() != 3 or mask_image.GetNumberOfComponentsPerPixel() != 1:
        raise DscovidError(f"{kind} {path} is not a 3D single-channel image")
    array = sitk.GetArrayFromImage(mask_image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DscovidError(f"{kind} {path} contains NaN or infinite values")
    return array, Geometry.of(mask_image)


def read_label_on_grid(path: str | Path, image: Geometry, kind: str = "label") -> np.ndarray:
    """Read a source mask that must lie on its CT's grid (else the case is skipped) and binarise it (> 0)."""
    array, geometry = read_label_array(path, kind)
    require_same_grid(image, geometry, kind)
    return binarise(array)


def output_path(out_dir: Path, folder: str, case: str) -> Path:
    """Where a case's file of one kind goes (images carry nnU-Net's channel suffix; slice labels are JSON)."""
    if folder == "imagesTr":
        return out_dir / folder / f"{case}{CHANNEL_SUFFIX}{FILE_ENDING}"
    if folder == "sliceLabelsTr":
        return out_dir / folder / f"{case}.json"
    return out_dir / folder / f"{case}{FILE_ENDING}"


def write_case_volume(out_dir: Path, folder: str, case: str, array: np.ndarray, geometry: Geometry) -> str:
    """Write one image or mask of a case atomically; returns its path relative to the dataset folder."""
    path = output_path(out_dir, folder, case)
    write_image(array, geometry, path)
    return path.relative_to(out_dir).as_posix()


def write_case_json(out_dir: Path, folder: str, case: str, data: dict) -> str:
    """Write one JSON sidecar of a case atomically; returns its path relative to the dataset folder."""
    path = output_path(out_dir, folder, case)
    write_json_atomic(data, path)
    return path.relative_to(out_dir).as_posix()


def relative_to(path: Path | str, root: Path) -> str:
    """``path`` relative to the source root when it lies inside it (for metadata), else as given."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def job_stamp(job: CaseJob) -> str:
    """A short hash of what a case's output depends on: its source files, the options and the format version."""
    payload = {
        "sources": {role: file_stamp(path) for role, path in sorted(job.sources.items())},
        "options": job.options,
        "class": job.class_name,
        "metadata": job.metadata,
        "format": FORMAT_VERSION,
    }
    return digest(payload)


def check_output_dir(out_dir: Path, converter: str) -> dict | None:
    """Refuse an output folder that is not named DatasetNNN_Name or holds another dataset; return its old dataset.json.

    A folder that already holds a dataset.json written by the same converter is updated in place
    (its entries are the basis of the idempotent re-run); anything else is left alone.
    """
    parse_dataset_name(out_dir.name)
    if out_dir.exists() and not out_dir.is_dir():
        raise DscovidError(f"{out_dir}: exists and is not a folder")
    meta_path = out_dir / "dataset.json"
    if not meta_path.exists():
        return None
    meta = load_dataset_json(meta_path)
    previous = meta.get("conversion", {}).get("converter") if isinstance(meta.get("conversion"), dict) else None
    if previous != converter:
        made_by = f"by the {previous!r} converter" if previous else "not by dscovid_convert"
        raise DscovidError(
            f"{out_dir}: already holds a dataset made {made_by}; choose another output folder (nothing was changed)"
        )
    return meta


def _run_job(worker: Callable[[CaseJob, Path], dict], job: CaseJob, out_dir: Path) -> tuple[str, dict | str]:
    """Run one worker and turn a data problem into a skip reason (runs in a worker process)."""
    try:
        return "ok", worker(job, out_dir)
    except DscovidError as error:
        return "skip", str(error)
    except (OSError, ValueError) as error:
        # A corrupt source file surfaces as OSError/ValueError from numpy or Pillow: one case, not the whole run.
        return "skip", f"{type(error).__name__}: {error}"


def _is_up_to_date(out_dir: Path, entry: dict | None, stamp: str) -> bool:
    if not isinstance(entry, dict):
        return False
    metadata = entry.get("metadata", {})
    if metadata.get("conversion_stamp") != stamp:
        return False
    outputs = metadata.get("outputs", [])
    return bool(outputs) and all((out_dir / relative).is_file() for relative in outputs)


def _remove_case_outputs(out_dir: Path, case: str, keep: Iterable[str] = ()) -> None:
    """Delete a case's files from an earlier run that this run did not write (so nothing stale stays listed)."""
    keep = set(keep)
    for folder in CASE_FOLDERS:
        path = output_path(out_dir, folder, case)
        if path.relative_to(out_dir).as_posix() not in keep and path.exists():
            log.debug("%s: removing stale %s", case, path)
            path.unlink()


def run_conversion(
    converter: str,
    source: Path,
    out_dir: Path,
    jobs: list[CaseJob],
    worker: Callable[[CaseJob, Path], dict],
    num_processes: int = 1,
    skipped: list[SkippedCase] | None = None,
    intensity_unit: str | None = "HU",
    description: str = "",
    options: dict | None = None,
    progress: bool = False,
    extra: dict | None = None,
) -> ConversionReport:
    """Convert every job (in parallel), then write dataset.json listing the cases that converted.

    Parameters
    ----------
    converter : the converter's name (``mosmed``, ...), recorded in dataset.json.
    source : the source dataset folder (recorded in dataset.json).
    out_dir : the raw dataset folder, named ``DatasetNNN_Name``.
    jobs : the cases found in the source.
    worker : module-level function ``worker(job, out_dir) -> entry`` writing one case and returning its
        dataset.json entry ``{"class", "lesion_annotated", "metadata": {..., "outputs": [relative paths]}}``.
    num_processes : worker processes (1 = in this process).
    skipped : cases the converter already refused while listing the source.
    intensity_unit : ``"HU"``, ``"not_HU"``, or None to decide from the entries (``not_HU`` when any case's
        metadata says ``intensity_unit: not_HU``).
    description, options, extra : written into dataset.json (``options`` under ``conversion``).

    Returns
    -------
    The report; dataset.json is written only when at least one case converted.
    """
    previous = check_output_dir(out_dir, converter)
    previous_cases = previous.get("cases", {}) if previous else {}
    report = ConversionReport(dataset_dir=out_dir, skipped=list(skipped or []))

    unique_jobs: list[CaseJob] = []
    seen: dict[str, str] = {}
    for job in jobs:
        if job.case in seen:
            report.skipped.append(SkippedCase(job.source_id, f"case name {job.case!r} is already used by {seen[job.case]}"))
            continue
        seen[job.case] = job.source_id
        unique_jobs.append(job)

    entries: dict[str, dict] = {}
    pending: list[tuple[CaseJob, str]] = []
    for job in unique_jobs:
        stamp = job_stamp(job)
        if _is_up_to_date(out_dir, previous_cases.get(job.case), stamp):
            entries[job.case] = previous_cases[job.case]
            report.up_to_date.append(job.case)
        else:
            pending.append((job, stamp))
    if report.up_to_date:
        log.info("%d case(s) already up to date in %s", len(report.up_to_date), out_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(pending), desc=f"converting {converter}", unit="case", disable=not progress)

    def collect(job: CaseJob, stamp: str, outcome: tuple[str, dict | str]) -> None:
        status, value = outcome
        if status == "ok":
            entry = dict(value)
            entry["metadata"] = {**entry.get("metadata", {}), "conversion_stamp": stamp}
            entries[job.case] = entry
            _remove_case_outputs(out_dir, job.case, keep=entry["metadata"].get("outputs", []))
        else:
            log.warning("skipping %s: %s", job.source_id, value)
            report.skipped.append(SkippedCase(job.source_id, str(value)))
        bar.update()

    if num_processes > 1 and len(pending) > 1:
        with ProcessPoolExecutor(max_workers=num_processes) as pool:
            futures = {pool.submit(_run_job, worker, job, out_dir): (job, stamp) for job, stamp in pending}
            for future in as_completed(futures):
                job, stamp = futures[future]
                collect(job, stamp, future.result())
    else:
        for job, stamp in pending:
            collect(job, stamp, _run_job(worker, job, out_dir))
    bar.close()

    report.converted = sorted(entries)
    report.up_to_date.sort()
    report.skipped.sort(key=lambda item: natural_key(item.source_id))
    for entry in entries.values():
        report.class_counts[entry["class"]] = report.class_counts.get(entry["class"], 0) + 1
    if intensity_unit is None:
        not_hu = any(entry.get("metadata", {}).get("intensity_unit") == "not_HU" for entry in entries.values())
        intensity_unit = "not_HU" if not_hu else "HU"
    report.intensity_unit = intensity_unit
    if not entries:
        log.error("%s: no case could be converted; dataset.json not written", out_dir)
        return report
    # Only now that dataset.json will be rewritten: files of cases no longer listed would fail verification.
    for case in sorted((set(previous_cases) | set(seen)) - set(entries)):
        if is_safe_case_name(case):
            _remove_case_outputs(out_dir, case)
    meta = make_dataset_json(
        name=out_dir.name,
        cases=entries,
        file_ending=FILE_ENDING,
        intensity_unit=intensity_unit,
        description=description,
        conversion={
            "converter": converter,
            "source": str(source.resolve()),
            "options": dict(options or {}),
            "dscovid_version": __version__,
            "skipped": {item.source_id: item.reason for item in report.skipped},
        },
        **(extra or {}),
    )
    write_json_atomic(meta, out_dir / "dataset.json")
    log.debug("%s", report.summary_lines()[0])
    return report


def require_source_dir(source: Path, what: str) -> Path:
    """Refuse a source that is not an existing folder (an input error, not a skipped case)."""
    source = Path(source)
    if not source.is_dir():
        raise DscovidError(f"{source}: {what} source folder not found")
    return source

