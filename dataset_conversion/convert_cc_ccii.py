"""CC-CCII / CNCB 2019nCoVR AI diagnosis set (Zhang et al., Cell 2020; CC BY 3.0 CN) → raw dataset.

Layout: one 8-bit PNG/JPG per axial slice::

    <root>/{NCP,CP,Normal}/<patient_id>/<scan_id>/<slice>.png|jpg
    <root>/unzip_filenames.csv              label, patient_id, scan_id, ... (optional; cross-checked)

Classes: NCP → ``covid``, CP (common pneumonia) → ``cap``, Normal → ``non_pneumonia``. There are no
voxel masks: covid and cap scans are ``lesion_annotated: false``, normal scans get an all-zero mask.

The slices carry neither Hounsfield units nor a spacing, so both are assumptions, written into
dataset.json (``cc_ccii_assumptions``) and each case's metadata:

- **Intensity.** With ``intensity="lung_window"`` (the default), grey value g in 0..255 becomes
  ``-1350 + g * 1500 / 255``, i.e. the slices are read as exported with a lung window of width
  1500 HU and level -600 HU (air 0 → -1350, 255 → +150). With ``intensity="raw"`` the grey values
  are kept as they are. Either way the dataset is marked ``intensity_unit: "not_HU"``: the values
  are not calibrated and the pipeline warns about it.
- **Spacing.** In-plane, the slice width is taken to span a 350 mm field of view (``fov_mm``; 0.68 mm
  for 512 pixels); along z, the stack is taken to span 300 mm of thorax (``z_extent_mm``), so the
  z spacing is 300 / number of slices. ``spacing_zyx_mm`` overrides both with fixed values.
- **Order.** Slices are stacked by the number in their file name, ascending, as z index 0, 1, ...;
  origin (0, 0, 0), identity direction.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from dataset_conversion.common import (
    CaseJob,
    ConversionReport,
    SkippedCase,
    natural_key,
    relative_to,
    require_source_dir,
    run_conversion,
    safe_case_name,
    write_case_volume,
)
from dscovid.errors import DscovidError
from dscovid.io.image_io import Geometry

log = logging.getLogger(__name__)

CLASS_FOLDERS = {"ncp": "covid", "cp": "cap", "normal": "non_pneumonia"}
SLICE_ENDINGS = (".png", ".jpg", ".jpeg")
#: The documented lung window the 8-bit grey values are mapped through (``intensity="lung_window"``).
LUNG_WINDOW_HU = (-1350.0, 150.0)
DEFAULT_FOV_MM = 350.0
DEFAULT_Z_EXTENT_MM = 300.0
INTENSITY_MODES = ("lung_window", "raw")


def slice_files(scan_dir: Path) -> list[Path]:
    """The slice images of one scan, ordered by the number in their name (``2.png`` before ``10.png``)."""
    files = [p for p in scan_dir.iterdir() if p.is_file() and p.name.lower().endswith(SLICE_ENDINGS)]
    return sorted(files, key=lambda p: natural_key(p.stem))


def read_slices(files: list[Path]) -> np.ndarray:
    """Stack 8-bit slices into a (Z, Y, X) uint8 volume, refusing unreadable or differently sized slices."""
    slices = []
    for path in files:
        try:
            with Image.open(path) as image:
                grey = image.convert("L") if image.mode != "L" else image
                slices.append(np.asarray(grey, dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as error:
            raise DscovidError(f"{path}: cannot be read as an image ({error})") from None
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise DscovidError(f"slices differ in size ({', '.join(map(str, sorted(shapes)))})")
    return np.stack(slices)


def map_intensity(volume_u8: np.ndarray, mode: str) -> np.ndarray:
    """8-bit grey values → the stored int16 values (see the module docstring for the two modes)."""
    if mode == "raw":
        return volume_u8.astype(np.int16)
    if mode == "lung_window":
        low, high = LUNG_WINDOW_HU
        return np.rint(low + volume_u8.astype(np.float32) * ((high - low) / 255.0)).astype(np.int16)
    raise DscovidError(f"unknown intensity mode {mode!r} (choose from {', '.join(INTENSITY_MODES)})")


def assumed_spacing_zyx_mm(shape_zyx: tuple[int, int, int], fov_mm: float, z_extent_mm: float,
                           spacing_zyx_mm: tuple[float, float, float] | None) -> tuple[float, float, float]:
    """The spacing a stacked scan is given (see the module docstring)."""
    if spacing_zyx_mm is not None:
        return tuple(float(v) for v in spacing_zyx_mm)
    in_plane = fov_mm / max(shape_zyx[1], shape_zyx[2])
    return (z_extent_mm / shape_zyx[0], in_plane, in_plane)


def convert_cc_ccii_case(job: CaseJob, out_dir: Path) -> dict:
    """Stack and write one CC-CCII scan (worker; raises DscovidError to skip it)."""
    files = slice_files(Path(job.sources["image"]))
    if len(files) < 2:
        raise DscovidError(f"{len(files)} slice image(s) (.png/.jpg); a 3D scan needs at least 2")
    volume = read_slices(files)
    options = job.options
    spacing = assumed_spacing_zyx_mm(volume.shape, options["fov_mm"], options["z_extent_mm"],
                                     tuple(options["spacing_zyx_mm"]) if options.get("spacing_zyx_mm") else None)
    geometry = Geometry(tuple(int(v) for v in volume.shape), spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ct = map_intensity(volume, options["intensity"])
    outputs = [write_case_volume(out_dir, "imagesTr", job.case, ct, geometry)]
    if job.class_name == "non_pneumonia":
        outputs.append(write_case_volume(out_dir, "labelsTr", job.case, np.zeros(ct.shape, np.uint8), geometry))
    metadata = {
        **job.metadata,
        "slices": len(files),
        "first_slice": files[0].name,
        "last_slice": files[-1].name,
        "assumed_spacing_zyx_mm": [round(v, 4) for v in spacing],
        "intensity_unit": "not_HU",
        "intensity_mapping": options["intensity"],
        "outputs": outputs,
    }
    return {"class": job.class_name, "lesion_annotated": job.class_name == "non_pneumonia", "metadata": metadata}


def read_unzip_filenames(path: Path) -> dict[tuple[str, str], str]:
    """unzip_filenames.csv as ``{(patient_id, scan_id): label folder name}``."""
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as error:
        raise DscovidError(f"{path}: cannot be read as CSV ({error})") from None
    table.columns = [column.strip().lower() for column in table.columns]
    if not {"label", "patient_id", "scan_id"} <= set(table.columns):
        raise DscovidError(f"{path}: needs the columns label, patient_id and scan_id")
    return {(str(r["patient_id"]).strip(), str(r["scan_id"]).strip()): str(r["label"]).strip()
            for r in table.to_dict("records")}


def list_cc_ccii_jobs(source: Path, options: dict) -> tuple[list[CaseJob], list[SkippedCase]]:
    """Find the scans ``<class>/<patient>/<scan>/`` under ``source``."""
    class_dirs = [(p, CLASS_FOLDERS[p.name.lower()]) for p in sorted(source.iterdir())
                  if p.is_dir() and p.name.lower() in CLASS_FOLDERS]
    if not class_dirs:
        raise DscovidError(f"{source}: no NCP/, CP/ or Normal/ folder (CC-CCII layout)")
    index_path = source / "unzip_filenames.csv"
    index = read_unzip_filenames(index_path) if index_path.is_file() else {}
    jobs, skipped = [], []
    for class_dir, class_name in class_dirs:
        for patient in sorted((p for p in class_dir.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
            for scan in sorted((p for p in patient.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
                where = f"{class_dir.name}/{patient.name}/{scan.name}"
                listed = index.get((patient.name, scan.name))
                if listed is not None and listed.lower() != class_dir.name.lower():
                    reason = f"unzip_filenames.csv says {listed} but the scan lies in {class_dir.name}/"
                    skipped.append(SkippedCase(where, reason))
                    continue
                try:
                    case = safe_case_name(f"{class_dir.name}_{patient.name}_{scan.name}")
                except DscovidError as error:
                    skipped.append(SkippedCase(where, str(error)))
                    continue
                metadata = {
                    "source_dataset": "CC-CCII (CNCB 2019nCoVR)",
                    "source_class": class_dir.name,
                    "source_id": where,
                    "patient_id": patient.name,
                    "scan_id": scan.name,
                    "source_files": {"image": relative_to(scan, source)},
                }
                jobs.append(CaseJob(case, class_name, where, {"image": str(scan)}, dict(options), metadata))
    return jobs, skipped


def convert_cc_ccii(source: Path, out_dir: Path, num_processes: int = 1, intensity: str = "lung_window",
                    fov_mm: float = DEFAULT_FOV_MM, z_extent_mm: float = DEFAULT_Z_EXTENT_MM,
                    spacing_zyx_mm: tuple[float, float, float] | None = None, progress: bool = False) -> ConversionReport:
    """Convert CC-CCII slice folders into a raw dataset of stacked volumes at ``out_dir`` (marked not_HU).

    Parameters
    ----------
    intensity : ``"lung_window"`` (0..255 → -1350..150, documented above) or ``"raw"`` (0..255 kept).
    fov_mm : assumed in-plane field of view in mm (the slice width spans it).
    z_extent_mm : assumed z extent of each scan in mm (z spacing = extent / slices).
    spacing_zyx_mm : fixed spacing (z, y, x) in mm instead of the two assumptions above.
    """
    if intensity not in INTENSITY_MODES:
        raise DscovidError(f"unknown intensity mode {intensity!r} (choose from {', '.join(INTENSITY_MODES)})")
    if fov_mm <= 0 or z_extent_mm <= 0 or (spacing_zyx_mm is not None and min(spacing_zyx_mm) <= 0):
        raise DscovidError("field of view, z extent and spacing must be positive")
    source = require_source_dir(Path(source), "CC-CCII")
    options = {"intensity": intensity, "fov_mm": float(fov_mm), "z_extent_mm": float(z_extent_mm),
               "spacing_zyx_mm": [float(v) for v in spacing_zyx_mm] if spacing_zyx_mm is not None else None}
    jobs, skipped = list_cc_ccii_jobs(source, options)
    assumptions = {
        "intensity": (f"8-bit grey g mapped to {LUNG_WINDOW_HU[0]:g} + g * {LUNG_WINDOW_HU[1] - LUNG_WINDOW_HU[0]:g} / 255 "
                      "(lung window W1500 L-600), not calibrated HU") if intensity == "lung_window"
        else "8-bit grey values kept as they are (0..255)",
        "spacing": (f"fixed {list(options['spacing_zyx_mm'])} mm (z, y, x)" if spacing_zyx_mm is not None
                    else f"in-plane {fov_mm:g} mm field of view / slice width; z {z_extent_mm:g} mm / number of slices"),
        "slice_order": "ascending number in the slice file name = ascending z index",
    }
    return run_conversion(
        "cc_ccii", source, Path(out_dir), jobs, convert_cc_ccii_case, num_processes, skipped,
        intensity_unit="not_HU",
        description="CC-CCII (CNCB 2019nCoVR, CC BY 3.0 CN), 8-bit slices stacked by dscovid_convert cc_ccii; "
                    "intensities and spacing are assumptions (see cc_ccii_assumptions)",
        options=options, progress=progress, extra={"cc_ccii_assumptions": assumptions},
    )

