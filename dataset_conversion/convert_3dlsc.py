"""3DLSC-COVID (Wang et al., IEEE TMI 2021; IEEE DataPort doi:10.21227/mxb3-7j48) → raw dataset.

Layout (inferred from the authors' ``data_process.py``; no format documentation was published)::

    <root>/{covid,cap,normal}/data-nii/<id>.nii.gz      CT, int16 HU
    <root>/{covid,cap}/segment_label/<id>.nii(.gz)      3D lesion mask (values > 0 are lesion)
    <root>/<class>/lung-npy/<id>.npy                    optional lung mask (lungmask R231), no geometry

Classes: covid → ``covid``, cap → ``cap``, normal → ``non_pneumonia``. A normal case gets an all-zero
lesion mask (annotated); a covid/cap case without a mask is ``lesion_annotated: false``.

The authors' loader flips and rotates arrays by hand (z reversed, masks ``fliplr``, CAP ids ≥ 214 and
normal ids ≥ 235 rotated by 90°), so the masks are not trusted to lie on their CT. Every mask is checked
against its CT before it is written:

- a lesion mask must have the CT's shape and header geometry, and its lesions must lie where lesions can
  be: inside the body and in the lungs (a field derived from the CT), denser than the lung around them.
  All 48 axis reorderings and flips of the mask are scored the same way; a mask for which another
  orientation fits clearly better is reported as mirrored/rotated;
- a ``.npy`` lung mask (no geometry) must have the CT's shape and overlap the CT's lung field.

A case whose mask does not fit is skipped with the reason. With ``fix_orientation=True``
(``--fix-orientation``) the converter instead applies the one orientation that fits, but only when it
fits unambiguously better than every other; the transform applied is recorded in the case's metadata.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from dataset_conversion.common import (
    CaseJob,
    ConversionReport,
    SkippedCase,
    binarise,
    find_volume,
    geometries_agree,
    natural_key,
    read_label_array,
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

#: Source folder → our class.
CLASS_FOLDERS = {"covid": "covid", "cap": "cap", "normal": "non_pneumonia"}

#: A lesion mask fits when this share of its voxels is inside the body ...
MIN_IN_BODY = 0.9
#: ... and this share in the CT's lung field.
MIN_IN_LUNGS = 0.6
#: One orientation beats another by this much more of the lesion in the body or the lungs ...
MARGIN_FRACTION = 0.2
#: ... or by lesions this much denser (median HU): a mirrored mask lands on normal lung, not on the lesion.
MARGIN_HU = 150.0
#: A lung mask fits when its Dice with the CT's lung field reaches this, and beats another by the margin.
MIN_LUNG_DICE = 0.7
MARGIN_LUNG_DICE = 0.05
#: At most this many lesion voxels are scored (evenly spaced), which bounds time and memory on large masks.
MAX_SCORED_VOXELS = 200_000

_AXIS_WORDS = {0: "reversed in z", 1: "flipped front-back (y)", 2: "flipped left-right (x)"}


@dataclass(frozen=True)
class AxisTransform:
    """An axis reordering followed by flips, mapping a mask array onto the CT's (z, y, x) array.

    ``order[k]`` is the mask axis that becomes output axis k; ``flips[k]`` reverses output axis k.
    """

    order: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @property
    def is_identity(self) -> bool:
        return self.order == (0, 1, 2) and not any(self.flips)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[axis] for axis in self.order)

    def apply(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.order)
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis)
        return np.ascontiguousarray(out)

    def map_indices(self, indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Voxel indices (N, 3) of the mask → indices (N, 3) in the transformed array."""
        out = indices[:, list(self.order)].copy()
        new_shape = self.output_shape(shape)
        for axis, flip in enumerate(self.flips):
            if flip:
                out[:, axis] = new_shape[axis] - 1 - out[:, axis]
        return out

    def describe(self) -> str:
        if self.is_identity:
            return "as is"
        pieces = []
        flips = list(self.flips)
        if self.order == (0, 2, 1) and flips[1] != flips[2]:
            pieces.append("rotated 90° in-plane")
            flips[1] = flips[2] = False
        elif self.order != (0, 1, 2):
            pieces.append(f"with its axes ({', '.join('zyx'[axis] for axis in self.order)}) taken as (z, y, x)")
        pieces += [_AXIS_WORDS[axis] for axis, flip in enumerate(flips) if flip]
        return " and ".join(pieces)

    def to_dict(self) -> dict:
        return {"order": list(self.order), "flips": list(self.flips), "description": self.describe()}


IDENTITY = AxisTransform((0, 1, 2), (False, False, False))


def all_transforms() -> list[AxisTransform]:
    """The 48 axis reorderings and flips of a 3D array (identity first)."""
    result = [AxisTransform(order, flips) for order in itertools.permutations(range(3))
              for flips in itertools.product((False, True), repeat=3)]
    return sorted(result, key=lambda t: not t.is_identity)


@dataclass(frozen=True)
class AnatomyFields:
    """Where lesions and lungs can be in a CT, on a grid subsampled in-plane by ``stride``.

    Attributes
    ----------
    body : bool (Z, Y/stride, X/stride), the patient (largest tissue component, holes filled per slice).
    lungs : bool, same shape, low-density regions inside the body closed and filled per slice, so
        lesions surrounded by lung (ground glass, consolidation) are included.
    stride : in-plane subsampling factor.
    """

    body: np.ndarray
    lungs: np.ndarray
    stride: int


def _close_disk(mask_yx: np.ndarray, radius: float) -> np.ndarray:
    """Binary closing of a 2D mask by a disk, through two distance transforms (same result as
    ``binary_closing`` with a disk, about twice as fast for the 10 mm disks used here)."""
    pad = int(np.ceil(radius)) + 1
    padded = np.pad(mask_yx, pad)
    dilated = ndimage.distance_transform_edt(~padded) <= radius
    return (ndimage.distance_transform_edt(dilated) > radius)[pad:-pad, pad:-pad]


def anatomy_fields(ct_zyx: np.ndarray, spacing_zyx_mm: tuple[float, float, float]) -> AnatomyFields:
    """Derive the body and lung fields of a CT in HU (thresholds -500 HU; closing radius 10 mm)."""
    pixel_mm = float(min(spacing_zyx_mm[1], spacing_zyx_mm[2]))
    # About 1.5 mm in-plane is plenty for "is this voxel in the lung" and keeps 512² scans fast.
    stride = max(1, int(1.5 // pixel_mm))
    small = ct_zyx[:, ::stride, ::stride]
    tissue = small > -500
    components, count = ndimage.label(tissue)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    if count == 0:
        empty = np.zeros(small.shape, dtype=bool)
        return AnatomyFields(body=empty, lungs=empty, stride=stride)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    patient = components == int(np.argmax(sizes))
    body = ndimage.binary_fill_holes(patient, structure=in_plane)
    air_inside = body & ~patient
    radius = max(1, int(round(10.0 / (pixel_mm * stride))))
    closed = np.zeros_like(air_inside)
    for z in np.flatnonzero(air_inside.any(axis=(1, 2))):
        closed[z] = _close_disk(air_inside[z], radius)
    lungs = ndimage.binary_fill_holes(closed, structure=in_plane) & body
    return AnatomyFields(body=body, lungs=lungs, stride=stride)


@dataclass(frozen=True)
class Fit:
    """How well lesion voxels sit in a CT: shares inside the body and the lungs, median HU under them."""

    in_body: float
    in_lungs: float
    median_hu: float

    @property
    def good(self) -> bool:
        return self.in_body >= MIN_IN_BODY and self.in_lungs >= MIN_IN_LUNGS

    def clearly_better_than(self, other: Fit) -> bool:
        if not self.good:
            return False
        if self.in_body - other.in_body >= MARGIN_FRACTION or self.in_lungs - other.in_lungs >= MARGIN_FRACTION:
            return True
        return self.in_lungs >= other.in_lungs - 0.1 and self.median_hu - other.median_hu >= MARGIN_HU

    def describe(self) -> str:
        return (f"{1 - self.in_body:.0%} of lesion voxels outside the body, {self.in_lungs:.0%} in the lungs, "
                f"median {self.median_hu:.0f} HU")

    def to_dict(self) -> dict:
        return {"in_body": round(self.in_body, 4), "in_lungs": round(self.in_lungs, 4), "median_hu": round(self.median_hu, 1)}


def _lesion_indices(mask: np.ndarray) -> np.ndarray:
    flat = np.flatnonzero(mask > 0)
    if flat.size > MAX_SCORED_VOXELS:
        flat = flat[np.linspace(0, flat.size - 1, MAX_SCORED_VOXELS).astype(np.int64)]
    return np.stack(np.unravel_index(flat, mask.shape), axis=1)


def _fit(indices_zyx: np.ndarray, ct_zyx: np.ndarray, fields: AnatomyFields) -> Fit:
    z, y, x = indices_zyx[:, 0], indices_zyx[:, 1], indices_zyx[:, 2]
    ys, xs = y // fields.stride, x // fields.stride
    return Fit(
        in_body=float(fields.body[z, ys, xs].mean()),
        in_lungs=float(fields.lungs[z, ys, xs].mean()),
        median_hu=float(np.median(ct_zyx[z, y, x])),
    )


def _unambiguous_best(fits: dict[AxisTransform, Fit]) -> AxisTransform | None:
    """The one transform that fits and is clearly better than every other candidate, if there is one."""
    ranked = sorted(fits, key=lambda t: (fits[t].good, fits[t].in_lungs, fits[t].median_hu), reverse=True)
    if not ranked or not fits[ranked[0]].good:
        return None
    best = ranked[0]
    if all(fits[best].clearly_better_than(fits[other]) for other in ranked[1:]):
        return best
    return None


def choose_label_transform(
    label: np.ndarray,
    ct_zyx: np.ndarray,
    fields: AnatomyFields,
    header_matches: bool,
    fix_orientation: bool,
    header_difference: str = "",
) -> tuple[AxisTransform, Fit | None]:
    """Decide how a lesion mask array maps onto its CT, or raise the reason it does not fit.

    Parameters
    ----------
    label : the mask array as read (its own (z, y, x) order), any values (> 0 is lesion).
    ct_zyx : the CT in HU.
    fields : :func:`anatomy_fields` of the CT.
    header_matches : whether the mask file's geometry equals the CT's (only meaningful for equal shapes).
    fix_orientation : apply the unambiguously best orientation instead of refusing.
    header_difference : how the headers differ, for the message.

    Returns
    -------
    The transform to apply (identity unless ``fix_orientation`` found a better one) and its fit
    (None for an empty mask).

    Raises
    ------
    DscovidError
        With the reason the mask does not fit (the case is skipped).
    """
    shape_matches = tuple(label.shape) == tuple(ct_zyx.shape)
    shape_reason = f"label shape {tuple(label.shape)} does not match image {tuple(ct_zyx.shape)}"
    indices = _lesion_indices(label)
    if indices.size == 0:
        if not shape_matches:
            raise DscovidError(shape_reason)
        if not header_matches and not fix_orientation:
            raise DscovidError(f"label geometry does not match the image ({header_difference})")
        return IDENTITY, None
    candidates = [t for t in all_transforms() if t.output_shape(label.shape) == tuple(ct_zyx.shape)]
    fits = {t: _fit(t.map_indices(indices, label.shape), ct_zyx, fields) for t in candidates}

    if not shape_matches:
        best = _unambiguous_best(fits) if fix_orientation else None
        if best is None:
            hint = ("; no axis reordering fits the CT unambiguously" if fix_orientation
                    else "; --fix-orientation would try reordering its axes")
            raise DscovidError(shape_reason + hint)
        log.warning("label %s: applying %s (%s)", shape_reason, best.describe(), fits[best].describe())
        return best, fits[best]
    if not header_matches and not fix_orientation:
        raise DscovidError(
            f"label geometry does not match the image ({header_difference}); "
            f"--fix-orientation would compare the voxel grids as the authors' code does"
        )

    as_is = fits[IDENTITY]
    better = {t: fit for t, fit in fits.items() if not t.is_identity and fit.clearly_better_than(as_is)}
    if not better:
        if as_is.good:
            return IDENTITY, as_is
        if as_is.in_body < MIN_IN_BODY:
            raise DscovidError(f"label does not fit the CT: {1 - as_is.in_body:.0%} of lesion voxels fall outside the body")
        raise DscovidError(
            f"label does not fit the CT: only {as_is.in_lungs:.0%} of lesion voxels lie in the lungs ({as_is.describe()})"
        )
    best = _unambiguous_best(better)
    if fix_orientation and best is not None:
        log.warning("label is %s relative to the CT: applying it (%s)", best.describe(), fits[best].describe())
        return best, fits[best]
    shown = best or max(better, key=lambda t: (better[t].in_lungs, better[t].median_hu))
    if as_is.in_body < MIN_IN_BODY:
        now = f"{1 - as_is.in_body:.0%} of lesion voxels fall outside the body"
    else:
        now = f"as is {as_is.in_lungs:.0%} of lesion voxels lie in the lungs (median {as_is.median_hu:.0f} HU)"
    then = f"{shown.describe()} it fits ({fits[shown].in_lungs:.0%} in the lungs, median {fits[shown].median_hu:.0f} HU)"
    advice = ("several orientations fit, so none was applied" if fix_orientation
              else "rerun with --fix-orientation to apply it" if best is not None
              else "several orientations fit, so --fix-orientation would not choose one")
    raise DscovidError(f"label is mirrored or rotated relative to the CT: {now}; {then}; {advice}")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 0.0


def choose_lung_transform(lung: np.ndarray, fields: AnatomyFields, ct_shape: tuple[int, int, int],
                          fix_orientation: bool) -> tuple[AxisTransform, float]:
    """Decide how a lung mask array without geometry (``.npy``) maps onto its CT, or raise why it does not fit.

    The mask is compared with the CT's lung field (:func:`anatomy_fields`) by Dice; the array as stored
    is taken as (z, y, x) unless ``fix_orientation`` finds another orientation unambiguously better.
    """
    if lung.ndim != 3:
        raise DscovidError(f"lung mask has {lung.ndim} dimensions; a 3D array is required")
    foreground = lung > 0
    candidates = [t for t in all_transforms() if t.output_shape(lung.shape) == tuple(ct_shape)]
    shape_reason = f"lung mask shape {tuple(lung.shape)} does not match image {tuple(ct_shape)}"
    if not candidates:
        raise DscovidError(shape_reason)
    if not fix_orientation and tuple(lung.shape) != tuple(ct_shape):
        raise DscovidError(shape_reason + "; --fix-orientation would try reordering its axes")
    stride = fields.stride
    if not fix_orientation:
        candidates = [IDENTITY] + [t for t in candidates if not t.is_identity]
    scores = {t: _dice(t.apply(foreground)[:, ::stride, ::stride], fields.lungs) for t in candidates}
    ranked = sorted(scores, key=scores.get, reverse=True)
    best = ranked[0]
    runner_up = scores[ranked[1]] if len(ranked) > 1 else 0.0
    if IDENTITY in scores and scores[IDENTITY] >= MIN_LUNG_DICE and scores[best] - scores[IDENTITY] < 2 * MARGIN_LUNG_DICE:
        return IDENTITY, scores[IDENTITY]
    if scores[best] < MIN_LUNG_DICE:
        raise DscovidError(f"lung mask does not fit the CT: Dice {scores[best]:.2f} with the CT's lung field at best")
    if fix_orientation and scores[best] - runner_up >= MARGIN_LUNG_DICE:
        log.warning("lung mask: applying %s (Dice %.2f with the CT's lung field)", best.describe(), scores[best])
        return best, scores[best]
    as_is = f"Dice {scores[IDENTITY]:.2f} with the CT's lung field as is, " if IDENTITY in scores else ""
    advice = ("rerun with --fix-orientation to apply it" if not fix_orientation and scores[best] - runner_up >= MARGIN_LUNG_DICE
              else "several orientations fit about equally, so none was applied")
    raise DscovidError(
        f"lung mask is mirrored or rotated relative to the CT: {as_is}{scores[best]:.2f} {best.describe()}; {advice}"
    )


def convert_3dlsc_case(job: CaseJob, out_dir: Path) -> dict:
    """Check and write one 3DLSC-COVID case (worker; raises DscovidError to skip it)."""
    fix = bool(job.options.get("fix_orientation", False))
    ct, geometry = read_image(job.sources["image"])
    ct = to_int16_hu(ct, job.sources["image"])
    metadata = dict(job.metadata)
    fields = None
    label = None
    if job.class_name == "non_pneumonia":
        label = np.zeros(ct.shape, dtype=np.uint8)
    elif "label" in job.sources:
        raw, label_geometry = read_label_array(job.sources["label"])
        fields = anatomy_fields(ct, geometry.spacing_zyx_mm)
        transform, fit = choose_label_transform(
            raw, ct, fields, header_matches=geometries_agree(geometry, label_geometry), fix_orientation=fix,
            header_difference=geometry.describe_difference(label_geometry),
        )
        label = binarise(transform.apply(raw))
        if fit is not None:
            metadata["label_fit"] = fit.to_dict()
        else:
            log.warning("%s: the lesion mask of a %s case is empty", job.case, job.class_name)
        if not transform.is_identity or not geometries_agree(geometry, label_geometry):
            metadata["label_orientation_fix"] = transform.to_dict()
    lung = None
    if "lung" in job.sources:
        try:
            lung_raw = np.load(job.sources["lung"], allow_pickle=False)
        except ValueError as error:
            raise DscovidError(f"lung mask {job.sources['lung']} cannot be read ({error})") from None
        fields = fields or anatomy_fields(ct, geometry.spacing_zyx_mm)
        transform, dice = choose_lung_transform(lung_raw, fields, ct.shape, fix)
        lung = binarise(transform.apply(lung_raw))
        metadata["lung_fit_dice"] = round(dice, 4)
        if not transform.is_identity:
            metadata["lung_orientation_fix"] = transform.to_dict()
    outputs = [write_case_volume(out_dir, "imagesTr", job.case, ct, geometry)]
    if label is not None:
        outputs.append(write_case_volume(out_dir, "labelsTr", job.case, label, geometry))
    if lung is not None:
        outputs.append(write_case_volume(out_dir, "lungsTr", job.case, lung, geometry))
    metadata["outputs"] = outputs
    return {"class": job.class_name, "lesion_annotated": label is not None, "metadata": metadata}


def _class_folders(source: Path) -> dict[str, Path]:
    found = {}
    for child in sorted(source.iterdir()):
        if child.is_dir() and child.name.lower() in CLASS_FOLDERS and (child / "data-nii").is_dir():
            found[child.name.lower()] = child
    return found


def list_3dlsc_jobs(source: Path, fix_orientation: bool = False,
                    use_lung_masks: bool = True) -> tuple[list[CaseJob], list[SkippedCase]]:
    """Find the 3DLSC-COVID cases under ``source`` (see the module docstring for the layout)."""
    folders = _class_folders(source)
    if not folders:
        raise DscovidError(f"{source}: no covid/, cap/ or normal/ folder with a data-nii/ inside (3DLSC-COVID layout)")
    jobs, skipped = [], []
    for folder_name, folder in folders.items():
        class_name = CLASS_FOLDERS[folder_name]
        images = sorted((p for p in (folder / "data-nii").iterdir() if p.name.endswith((".nii.gz", ".nii"))),
                        key=lambda p: natural_key(p.name))
        image_ids = {strip_volume_ending(p.name) for p in images}
        label_dir, lung_dir = folder / "segment_label", folder / "lung-npy"
        if label_dir.is_dir():
            for orphan in sorted(label_dir.iterdir(), key=lambda p: natural_key(p.name)):
                stem = strip_volume_ending(orphan.name)
                if orphan.name.endswith((".nii", ".nii.gz")) and stem not in image_ids:
                    skipped.append(SkippedCase(f"{folder_name}/{stem}", f"lesion mask {orphan} has no CT in data-nii/"))
        for image in images:
            source_id = strip_volume_ending(image.name)
            where = f"{folder_name}/{source_id}"
            try:
                case = safe_case_name(f"{folder_name}_{source_id}")
            except DscovidError as error:
                skipped.append(SkippedCase(where, str(error)))
                continue
            sources = {"image": str(image)}
            label = find_volume(label_dir, source_id) if label_dir.is_dir() else None
            if label is not None and class_name == "non_pneumonia":
                log.warning("%s: ignoring the lesion mask of a normal case (%s)", where, label)
            elif label is not None:
                sources["label"] = str(label)
            lung = lung_dir / f"{source_id}.npy"
            if use_lung_masks and lung.is_file():
                sources["lung"] = str(lung)
            metadata = {
                "source_dataset": "3DLSC-COVID",
                "source_class": folder_name,
                "source_id": source_id,
                "source_files": {role: relative_to(path, source) for role, path in sources.items()},
            }
            options = {"fix_orientation": fix_orientation}
            jobs.append(CaseJob(case, class_name, where, sources, options, metadata))
    return jobs, skipped


def convert_3dlsc(source: Path, out_dir: Path, num_processes: int = 1, fix_orientation: bool = False,
                  use_lung_masks: bool = True, progress: bool = False) -> ConversionReport:
    """Convert 3DLSC-COVID into a raw dataset at ``out_dir`` (``DatasetNNN_Name``).

    Parameters
    ----------
    source : the folder holding ``covid/``, ``cap/`` and ``normal/``.
    out_dir : the raw dataset folder to write (updated in place on a re-run).
    num_processes : worker processes.
    fix_orientation : apply the one mask orientation that fits unambiguously instead of skipping the case.
    use_lung_masks : also convert ``lung-npy/<id>.npy`` lung masks into ``lungsTr/``.
    progress : show a progress bar.
    """
    source = require_source_dir(Path(source), "3DLSC-COVID")
    jobs, skipped = list_3dlsc_jobs(source, fix_orientation, use_lung_masks)
    return run_conversion(
        "3dlsc", source, Path(out_dir), jobs, convert_3dlsc_case, num_processes, skipped,
        description="3DLSC-COVID (Wang et al., IEEE TMI 2021), converted by dscovid_convert 3dlsc",
        options={"fix_orientation": fix_orientation, "use_lung_masks": use_lung_masks}, progress=progress,
    )
