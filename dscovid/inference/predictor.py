"""Prediction on unseen scans (DESIGN.md §8): preprocess as in training, run every fold, write on the original grid.

Per case:

1. read the scan (HU checked), segment the lungs, preprocess exactly as in training
   (:func:`dscovid.preprocessing.preprocessor.preprocess_image` with the plans the fold was trained on);
2. per fold: encode the whole scan on the classification grid, run the lesion subnet by sliding window over the
   tiles that touch the lung (the cross-stitch sees each patch's box; the segmentation stem features are stitched
   onto the classification grid), resample the stitched lesion probability Ŝ onto the classification grid, classify;
3. average the lesion probabilities, class probabilities and evidence masks over the folds;
4. map back onto the original grid (:func:`dscovid.preprocessing.preprocessor.restore_to_original`), threshold the
   lesion probability at 0.5 inside the lung, and write ``<case>.nii.gz``, ``<case>_evidence.nii.gz`` (and with
   ``save_probabilities`` the lesion probability and the lung mask) with the input's exact geometry, plus the
   lesion report.

Work overlaps: the next case is read and preprocessed in the background while the networks run, and the previous
case is exported in the background. A case that fails is reported by name with its reason; the others still run;
a failed case leaves no file behind (every file is written atomically, and the files of a case that fails half-way
are removed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dscovid import __version__
from dscovid.errors import DscovidError
from dscovid.inference.dicom_export import DicomExport, is_dicom_series, refuse_non_dicom
from dscovid.inference.inputs import CaseInput, case_name_problems, discover_cases
from dscovid.inference.model_loading import TrainedModel, load_trained_model
from dscovid.inference.report import (
    DEFAULT_PERIPHERAL_THICKNESS_MM,
    REPORT_KEYS,
    csv_rows,
    json_safe,
    lesion_report,
    write_csv_atomic,
)
from dscovid.inference.sliding_window import plan_tiles, sliding_window_predict
from dscovid.io.dataset import write_json_atomic
from dscovid.io.image_io import Geometry, read_image, write_image
from dscovid.model.findings_head import FEATURE_NAMES as FINDINGS_NAMES
from dscovid.model.findings_head import lesion_findings
from dscovid.planning.plans import Configuration
from dscovid.training.checkpoint import FINAL

log = logging.getLogger(__name__)

#: Lesion probability at or above which a voxel (inside the lung) is called lesion.
LESION_THRESHOLD = 0.5


# ----------------------------------------------------------------------------------------------- one case


@dataclass
class LoadedCase:
    """A case read and preprocessed: the original scan and lung, and the arrays the networks need."""

    name: str
    path: Path
    image_hu: np.ndarray  # (Z, Y, X) original grid
    geometry: Geometry
    lung: np.ndarray  # (Z, Y, X) uint8, original grid
    image: np.ndarray  # (Z', Y', X') float32 preprocessed
    lung_preprocessed: np.ndarray  # (Z', Y', X') uint8
    region_preprocessed: np.ndarray  # (Z', Y', X') uint8, where the network looks: the lung plus its margin
    cls_image: np.ndarray  # (N, H, W) float32
    properties: dict
    timing_s: dict = field(default_factory=dict)


def load_case(case: CaseInput, preprocessing: Configuration) -> LoadedCase:
    """Read one scan and preprocess it exactly as the training data was (runs in a background worker).

    Raises
    ------
    DscovidError
        Unreadable file, 2D image, NaN, not Hounsfield units, no lung found.
    """
    from dscovid.preprocessing.lung_mask import segment_lungs  # imported late: heavy, and only needed here
    from dscovid.preprocessing.preprocessor import preprocess_image

    start = time.perf_counter()
    image_hu, geometry = read_image(case.path)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    lung = np.asarray(segment_lungs(image_hu, geometry.spacing_zyx_mm, geometry.direction), dtype=np.uint8)
    arrays, properties = preprocess_image(image_hu, geometry, preprocessing, lung=lung, case_name=case.name)
    return LoadedCase(
        name=case.name,
        path=case.path,
        image_hu=image_hu,
        geometry=geometry,
        lung=lung,
        image=arrays["image"],
        lung_preprocessed=arrays["lung"],
        region_preprocessed=arrays["region"],
        cls_image=arrays["cls_image"],
        properties=properties,
        timing_s={"read": read_s, "preprocess": time.perf_counter() - start},
    )


@dataclass
class NetworkOutput:
    """The fold-averaged network outputs of one case, on the preprocessed grid.

    lesion_probability : (Z', Y', X') float32, Ŝ, 0 outside the lung.
    class_probabilities : (K,) softmax averaged over folds, or None for a segmentation-only model.
    evidence : (Z', Y', X') float32 evidence map (equation 5) of the predicted class, or None.
    tiles_run, tiles_total : sliding-window tiles run (touching the lung) and in the whole volume.
    findings_term : (K,) the findings head's term of the logits (docs/model.md), averaged over the passes that have
        a head; None without one.
    findings : the head's measurements of Ŝ (name → value), averaged likewise; None without a head.
    """

    lesion_probability: np.ndarray
    class_probabilities: np.ndarray | None
    evidence: np.ndarray | None
    tiles_run: int
    tiles_total: int
    findings_term: np.ndarray | None = None
    findings: dict[str, float] | None = None


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@dataclass
class ScanSegmentation:
    """The lesion subnet run over one whole preprocessed scan (:func:`segment_scan`).

    probability : (Z', Y', X') float32 Ŝ, 0 outside the region.
    cls_features : ``I_cls`` of the scan (the classification stem), or None for a segmentation-only network.
    stitched : (sum, weight) of the segmentation stem features stitched onto the classification stem grid (the
        cross-stitch input of the classifier), or None without the cross-stitch.
    """

    probability: torch.Tensor
    cls_features: torch.Tensor | None
    stitched: tuple[torch.Tensor, torch.Tensor] | None


def segment_scan(
    network: torch.nn.Module,
    image: torch.Tensor,
    region: np.ndarray,
    cls_image: torch.Tensor,
    patch_size_zyx: Sequence[int],
    step_fraction: float,
    weighting: str,
    batch_size: int,
    device: torch.device,
    output_device: torch.device,
    progress: bool = False,
    placement: str = "grid",
) -> ScanSegmentation:
    """Sliding-window Ŝ of one network over the tiles of ``region`` (the predictor's and the trainer's path).

    image : (1, Z', Y', X') float32 on ``output_device``; region : (Z', Y', X') bool;
    cls_image : (1, 1, N, H, W) on ``device`` (the classification stem's input, for the cross-stitch).
    placement : tile placement (``inference.tile_placement``): ``"grid"`` or ``"region"`` (fitted to the region).
    """
    from dscovid.model.geometry import stitch_boxes

    shape = tuple(int(v) for v in image.shape[1:])
    cross = bool(getattr(network, "uses_cross_stitch", False))
    i_cls = None
    if network.has_classification:
        with torch.no_grad(), _autocast(device):
            i_cls = network.encode_classification(cls_image)
    stitched: list = [None]

    def predict_fn(batch: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        with _autocast(device):
            result = network.segment_patches(
                batch, boxes if cross else None, shape if cross else None, i_cls if cross else None
            )
        if cross:
            # The segmentation stem features enter the classifier through the cross-stitch: stitch them onto
            # the classification stem grid with their coverage, as training pastes one patch.
            stitched[0] = stitch_boxes(result.seg_features.float(), boxes, shape, i_cls.shape[2:], stitched[0])
        return result.lesion_probability.float()

    probability = sliding_window_predict(
        predict_fn, image, patch_size_zyx, step_fraction=step_fraction, weighting=weighting, batch_size=batch_size,
        region=region, device=device, output_device=output_device, progress=progress, with_boxes=True,
        placement=placement,
    )[0]
    probability.mul_(torch.from_numpy(np.asarray(region, dtype=bool)).to(probability.device))
    return ScanSegmentation(probability, i_cls, stitched[0])


def run_networks(
    model: TrainedModel,
    image: np.ndarray,
    region: np.ndarray,
    cls_image: np.ndarray,
    step_fraction: float | None = None,
    weighting: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    mirror_axes: Sequence[int] | None = None,
    placement: str | None = None,
) -> NetworkOutput:
    """Run every fold of ``model`` on one preprocessed case (and its mirror images) and average them.

    Parameters
    ----------
    model : the loaded folds.
    image : (Z', Y', X') float32 preprocessed image.
    region : (Z', Y', X') 0/1, where the network looks (the preprocessed ``region``: the lung plus its margin);
        only tiles touching it are run, and Ŝ is 0 outside it.
    cls_image : (N, H, W) float32, ``image`` on the classification grid.
    step_fraction, weighting, batch_size : sliding-window settings (default: the configuration's ``inference``).
    mirror_axes : volume axes (0 z, 1 y, 2 x) to mirror at test time (default: ``inference.mirror_axes``, none if
        absent); each costs one more pass of every fold.
    placement : tile placement, ``"grid"`` or ``"region"`` (default: ``inference.tile_placement``, else the grid).
    """
    from dscovid.preprocessing.resampling import resample_to_grid

    settings = model.inference
    step_fraction = float(step_fraction if step_fraction is not None else settings.get("step_fraction", 1.0))
    weighting = weighting or settings.get("weighting", "constant")
    batch_size = int(batch_size or settings.get("batch_size", 1))
    mirror_axes = list(settings.get("mirror_axes", []) if mirror_axes is None else mirror_axes)
    placement = placement or settings.get("tile_placement", "grid")
    device = model.device
    patch = model.patch_size_zyx
    shape = tuple(int(v) for v in image.shape)
    grid = tuple(int(v) for v in cls_image.shape)
    region_mask = np.asarray(region) != 0
    # On a GPU the preprocessed volume (a few hundred MB at most) and the accumulators live there: no per-tile copies.
    accumulate_on = device if device.type == "cuda" else torch.device("cpu")
    probability_sum = torch.zeros(shape, dtype=torch.float32, device=accumulate_on)
    class_sum: torch.Tensor | None = None
    evidence_sum: list[torch.Tensor] | None = None
    findings_terms: list[torch.Tensor] = []
    findings_values: list[torch.Tensor] = []
    # Test-time mirroring along the axes the training mirrored (inference.mirror_axes): every fold also sees the
    # flipped scan, and its outputs are flipped back and averaged with the plain ones.
    flips = [()] + [(int(axis),) for axis in mirror_axes]
    for flip in flips:
        image_f = np.flip(image, flip) if flip else image
        cls_f = np.flip(cls_image, flip) if flip else cls_image
        region_f = np.flip(region_mask, flip) if flip else region_mask
        image_t = torch.from_numpy(np.ascontiguousarray(image_f, dtype=np.float32))[None].to(accumulate_on)
        cls_t = torch.from_numpy(np.ascontiguousarray(cls_f, dtype=np.float32))[None, None].to(device)
        for network in model.networks:
            if network.has_segmentation:
                scan = segment_scan(network, image_t, np.ascontiguousarray(region_f), cls_t, patch, step_fraction,
                                    weighting, batch_size, device, accumulate_on, progress, placement)
                probability, i_cls, stitched = scan.probability, scan.cls_features, scan.stitched
                probability_sum += torch.flip(probability, flip) if flip else probability
            else:
                probability, stitched = torch.zeros(shape, dtype=torch.float32, device=accumulate_on), None
                with torch.no_grad(), _autocast(device):
                    i_cls = network.encode_classification(cls_t)
            cross = bool(getattr(network, "uses_cross_stitch", False))

            if network.has_classification:
                lesion_on_grid = None
                if network.has_segmentation:
                    on_grid = resample_to_grid(probability.cpu().numpy(), grid)
                    lesion_on_grid = torch.from_numpy(np.ascontiguousarray(on_grid))[None, None].to(device)
                seg_on_grid = coverage = None
                if cross and stitched is not None:
                    total, weight = stitched
                    seg_on_grid = total / weight.clamp(min=1e-6)
                    coverage = weight.clamp(max=1.0)
                with torch.no_grad(), _autocast(device):
                    logits, evidence, term = network.classify_parts(i_cls, lesion_on_grid, seg_on_grid, coverage, cls_t)
                    if term is not None:
                        logits = logits + term
                        findings_terms.append(term[0].float().cpu())
                        # for the report; the head measured the same inside classify_parts
                        findings_values.append(lesion_findings(lesion_on_grid, cls_t)[0].cpu())
                probabilities = torch.softmax(logits.float(), dim=1)[0].cpu()
                # three (K, z_l, y_l, x_l), flipped back: a volume axis a is dimension a + 1 here
                evidence = [e.float()[0].cpu() for e in evidence]
                if flip:
                    evidence = [torch.flip(e, [a + 1 for a in flip]) for e in evidence]
                class_sum = probabilities if class_sum is None else class_sum + probabilities
                evidence_sum = evidence if evidence_sum is None else [a + b for a, b in zip(evidence_sum, evidence)]

    folds = len(model.networks) * len(flips)  # every fold, plain and mirrored
    lesion_probability = (probability_sum / folds).cpu().numpy()
    class_probabilities = evidence_map = None
    if class_sum is not None:
        class_probabilities = (class_sum / folds).numpy()
        predicted = int(np.argmax(class_probabilities))
        evidence_map = _evidence_of_class(evidence_sum, predicted, shape) / folds
    return NetworkOutput(
        lesion_probability=lesion_probability,
        class_probabilities=class_probabilities,
        evidence=evidence_map,
        tiles_run=len(plan_tiles(shape, patch, step_fraction, region_mask, placement)),
        tiles_total=len(plan_tiles(shape, patch, step_fraction)),
        findings_term=torch.stack(findings_terms).mean(0).numpy() if findings_terms else None,
        findings=dict(zip(FINDINGS_NAMES, torch.stack(findings_values).mean(0).tolist())) if findings_values else None,
    )


def _evidence_of_class(evidence: Sequence[torch.Tensor], index: int, shape: Sequence[int]) -> np.ndarray:
    """The class's evidence masks V1..V3 resampled onto the preprocessed grid and averaged, (Z', Y', X') float32.

    Each mask covers the whole volume (it comes from the classification grid), so trilinear resampling with
    ``align_corners=False`` puts it back in place (docs/formats.md §4).
    """
    total = None
    for masks in evidence:
        resampled = F.interpolate(masks[index][None, None], size=tuple(shape), mode="trilinear", align_corners=False)
        total = resampled if total is None else total + resampled
    return (total[0, 0] / len(evidence)).numpy()


# ----------------------------------------------------------------------------------------------- export


def output_files(name: str) -> dict[str, str]:
    """Every file a case may have in the output folder, by role (docs/formats.md §5)."""
    return {
        "mask": f"{name}.nii.gz",
        "evidence": f"{name}_evidence.nii.gz",
        "lesion_probability": f"{name}_lesion_prob.nii.gz",
        "lung": f"{name}_lung.nii.gz",
        "montage": f"{name}_montage.png",  # dscovid_predict --png (dscovid.inference.montage)
        "dicom_seg": f"{name}_seg.dcm",  # DICOM series input (dscovid.inference.dicom_export)
        "dicom_sr": f"{name}_sr.dcm",
    }


def remove_case_files(output_dir: Path, name: str) -> None:
    """Remove whatever files of case ``name`` the output folder holds (a failed case leaves none, old or new)."""
    for file_name in output_files(name).values():
        (output_dir / file_name).unlink(missing_ok=True)


def export_case(
    loaded: LoadedCase,
    output: NetworkOutput,
    output_dir: Path,
    class_names: Sequence[str],
    save_probabilities: bool = False,
    peripheral_thickness_mm: float = DEFAULT_PERIPHERAL_THICKNESS_MM,
    dicom: DicomExport | None = None,
) -> dict:
    """Write one case's files on its original grid and return its ``predictions.json`` entry (without timings).

    With ``dicom``, a case read from a DICOM series also gets its DICOM-SEG and SR (:mod:`dscovid.inference.dicom_export`).

    The lesion probability is resampled to the original grid first and thresholded there (inside the original
    lung mask), so the mask has the input's resolution, not the preprocessed one. The evidence map, the file writes
    (gzip) and the lesion report run in parallel threads: each spends its time in code that releases the GIL
    (torch resampling, ITK's writer, NumPy and SciPy). If any part fails, every file of the case is removed.
    """
    from dscovid.preprocessing.preprocessor import restore_to_original

    name, geometry = loaded.name, loaded.geometry
    names = output_files(name)
    files = {"mask": names["mask"]}

    def write_evidence() -> None:
        evidence = restore_to_original(output.evidence, loaded.properties, is_mask=False)
        write_image(evidence.astype(np.float32, copy=False), geometry, output_dir / names["evidence"])

    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix=f"dscovid-export-{name}")
    futures: list[Future] = []
    try:
        if output.evidence is not None:
            files["evidence"] = names["evidence"]
            futures.append(pool.submit(write_evidence))
        probability = restore_to_original(output.lesion_probability, loaded.properties, is_mask=False)
        allowed = loaded.lung != 0
        if float(loaded.properties.get("lung_margin_mm") or 0.0) > 0:
            # The network also looked just outside the lung mask (a consolidation the classical mask left out);
            # what it found there counts, and the reported lung is the lung mask plus that lesion.
            allowed |= restore_to_original(loaded.region_preprocessed, loaded.properties, is_mask=True) != 0
        lesion = ((probability >= LESION_THRESHOLD) & allowed).astype(np.uint8)
        del allowed
        lung = np.maximum(loaded.lung.astype(np.uint8, copy=False), lesion)
        futures.append(pool.submit(write_image, lesion, geometry, output_dir / names["mask"]))
        seg_future = None
        if dicom is not None and is_dicom_series(loaded.path):
            seg_future = pool.submit(dicom.write_segmentation, loaded.path, geometry, lesion, lung,
                                     output_dir / names["dicom_seg"])
        if save_probabilities:
            files["lesion_probability"] = names["lesion_probability"]
            files["lung"] = names["lung"]
            futures.append(pool.submit(write_image, probability.astype(np.float32, copy=False), geometry,
                                       output_dir / names["lesion_probability"]))
            futures.append(pool.submit(write_image, lung, geometry, output_dir / names["lung"]))
        del probability
        entry: dict = {"case": name, "predicted_class": None, "probabilities": None}
        if output.class_probabilities is not None:
            probabilities = output.class_probabilities
            entry["predicted_class"] = class_names[int(np.argmax(probabilities))]
            entry["probabilities"] = {c: float(p) for c, p in zip(class_names, probabilities)}
        if output.findings_term is not None:
            entry["findings_head"] = {"logit_term": {c: float(v) for c, v in zip(class_names, output.findings_term)},
                                      "measurements": output.findings}
        entry.update(lesion_report(loaded.image_hu, lesion, lung, geometry, peripheral_thickness_mm))
        for future in futures:
            future.result()
        if seg_future is not None:
            dicom_outputs = dicom.write_report(seg_future.result(), entry, output_dir / names["dicom_sr"])
            files.update(dicom_outputs.pop("files", {}))
            entry.update(dicom_outputs)
        entry["files"] = files
        entry["tiles"] = {"run": output.tiles_run, "total": output.tiles_total}
        return entry
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # no writer may finish after the clean-up
        remove_case_files(output_dir, name)
        raise
    finally:
        pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------------------- the output folder


def _previous_entries(output_dir: Path, identity: dict, overwrite: bool) -> list[dict]:
    """Entries of an earlier run of the same model to keep; refuse (or with ``overwrite`` clear) another model's."""
    path = output_dir / "predictions.json"
    if not path.exists():
        return []
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        same = all(previous.get(key) == value for key, value in identity.items())
    except (OSError, json.JSONDecodeError, AttributeError):
        previous, same = {}, False
    if same:
        return list(previous.get("cases") or [])
    if not overwrite:
        described = (f"{previous.get('trainer')}__{previous.get('configuration')} folds {previous.get('folds')} "
                     f"from {previous.get('model_dir')}, {previous.get('checkpoint')}, step "
                     f"{previous.get('step_fraction')}") if previous else "an unreadable predictions.json"
        raise DscovidError(
            f"{output_dir}: already holds predictions of another model or setting ({described}); "
            f"choose another output folder or pass --overwrite"
        )
    log.warning("%s: replacing the predictions of another model (--overwrite)", output_dir)
    for entry in previous.get("cases") or []:
        # The listed files, and what else a case may have (a --png montage is not listed).
        derived = output_files(str(entry.get("case", ""))).values() if entry.get("case") else ()
        for file_name in [*(entry.get("files") or {}).values(), *derived]:
            candidate = output_dir / str(file_name)
            if candidate.parent == output_dir:  # only files directly in the folder, never a path from the JSON
                candidate.unlink(missing_ok=True)
    return []


def _remove_leftovers(output_dir: Path) -> None:
    """Temporary files of an interrupted earlier run (``.<name>.<random><ending>``)."""
    for leftover in output_dir.glob(".*"):
        if leftover.is_file() and (leftover.name.endswith((".nii.gz", ".tmp"))):
            leftover.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class _Job:
    case: CaseInput
    future: Future | None
    problem: str | None


def _start_reader(num_workers: int) -> Executor:
    if num_workers <= 1:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="dscovid-read")
    return ProcessPoolExecutor(max_workers=num_workers, mp_context=get_context("spawn"), initializer=_init_worker)


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core: threads inside each worker would oversubscribe


def _describe(error: BaseException) -> str:
    if isinstance(error, DscovidError):
        return str(error)
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def predict_cases(
    model_dir: str | os.PathLike | None = None,
    inputs: str | os.PathLike | Sequence[str | os.PathLike] = (),
    output_dir: str | os.PathLike = ".",
    folds: Sequence[str | int] | None = None,
    configuration: str | None = None,
    device: torch.device | str | None = None,
    *,
    model: TrainedModel | None = None,
    step_fraction: float | None = None,
    save_probabilities: bool = False,
    num_workers: int = 1,
    overwrite: bool = False,
    peripheral_thickness_mm: float = DEFAULT_PERIPHERAL_THICKNESS_MM,
    checkpoint_name: str = FINAL,
    progress: bool = True,
    on_case: Callable[[dict], None] | None = None,
    dicom: bool | None = None,
) -> dict:
    """Predict every case of ``inputs`` into ``output_dir`` (the function behind ``dscovid_predict``).

    Parameters
    ----------
    model_dir : the ``<Trainer>__<configuration>`` folder (or pass a loaded ``model``).
    inputs : a folder (``*_0000.nii.gz``, other volumes, DICOM series sub-folders), a file, or a list of them.
    output_dir : created if needed; see docs/formats.md §5 for what is written.
    folds : the folds to average (default: every trained fold).
    configuration : if given, must be the model's configuration (a guard against a wrong folder).
    device : ``"cpu"``, ``"cuda"`` (mixed precision) or None for CUDA when available.
    step_fraction : sliding-window step (1.0: the paper's non-overlapping tiles, 0.5: half overlap);
        default: the configuration's ``inference.step_fraction``.
    save_probabilities : also write the lesion probability and the lung mask.
    num_workers : cases read and preprocessed ahead in the background: 1 uses a thread, N > 1 uses N processes.
    overwrite : replace the predictions of another model in ``output_dir`` instead of refusing.
    peripheral_thickness_mm : σ of the reported peripheral lesion ratio.
    progress : show a progress bar over the cases.
    on_case : called with each finished case's entry (for logging or tests).
    dicom : DICOM-SEG and SR per case (docs/prediction.md): None writes them for DICOM series input (a series that
        cannot be referenced is skipped with a warning); True requires DICOM series input (anything else is refused
        before the run) and fails a case whose series cannot be referenced; False writes none.

    Returns
    -------
    The ``predictions.json`` dictionary (also written, with ``predictions.csv``). Its ``failed`` list names every
    case that could not be predicted and why.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DscovidError("--device cuda was asked for, but no CUDA device is available")
    if model is None:
        if model_dir is None:
            raise DscovidError("no model given: pass a model folder (-m) or a dataset (-d)")
        model = load_trained_model(model_dir, folds, device, checkpoint_name)
    if configuration is not None and configuration != model.configuration_name:
        raise DscovidError(f"{model.model_dir}: holds configuration {model.configuration_name!r}, not {configuration!r}")
    if step_fraction is not None and not 0.0 < float(step_fraction) <= 1.0:
        raise DscovidError(f"the sliding-window step must be in (0, 1], got {step_fraction}")
    cases = discover_cases(inputs)
    if dicom:
        refuse_non_dicom([case.path for case in cases])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = model.inference
    step_used = float(step_fraction if step_fraction is not None else settings.get("step_fraction", 1.0))
    # Everything that changes the predictions: outputs of runs that differ in any of these are never mixed.
    identity = {**model.identity(), "checkpoint": model.checkpoint_name, "step_fraction": step_used,
                "peripheral_thickness_mm": float(peripheral_thickness_mm)}
    kept = _previous_entries(output_dir, identity, overwrite)
    _remove_leftovers(output_dir)

    problems = case_name_problems(cases)
    entries: dict[str, dict] = {}
    failed: list[dict] = []
    class_names = model.class_names or [f"class_{k}" for k in range(3)]
    dicom_export = None if dicom is False else DicomExport.of(model, class_names, peripheral_thickness_mm, bool(dicom))

    def fail(name: str, reason: str, remove_files: bool = True) -> None:
        log.error("%s: failed: %s", name, reason)
        failed.append({"case": name, "reason": reason})
        if remove_files:
            remove_case_files(output_dir, name)

    reader = _start_reader(num_workers)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dscovid-write")
    ahead = max(1, num_workers)
    queue: deque[_Job] = deque()
    pending_exports: list[tuple[str, Future, dict]] = []
    todo = iter(zip(cases, problems))
    bar = tqdm(total=len(cases), desc="predicting", unit="case", disable=not progress)

    def submit_next() -> None:
        item = next(todo, None)
        if item is None:
            return
        case, problem = item
        future = None if problem else reader.submit(load_case, case, model.preprocessing)
        queue.append(_Job(case, future, problem))

    def collect_exports(wait: bool) -> None:
        for item in list(pending_exports):
            name, future, timing = item
            if not wait and not future.done():
                continue
            pending_exports.remove(item)
            try:
                entry = future.result()
            except Exception as error:  # noqa: BLE001 - one case's failure must not stop the others
                log.debug("%s: export failed", name, exc_info=True)
                fail(name, _describe(error))
                continue
            entry["timing_s"] = {key: round(value, 3) for key, value in timing.items()}
            entries[name] = entry
            if on_case is not None:
                on_case(entry)

    try:
        for _ in range(ahead):
            submit_next()
        while queue:
            job = queue.popleft()
            submit_next()  # keep the background reader busy while this case runs
            name = job.case.name
            if job.problem is not None:  # an unsafe or duplicate name: its "files" may belong to another case
                fail(name, job.problem, remove_files=False)
                bar.update()
                continue
            try:
                loaded = job.future.result()
            except Exception as error:  # noqa: BLE001
                log.debug("%s: reading or preprocessing failed", name, exc_info=True)
                fail(name, _describe(error))
                bar.update()
                continue
            try:
                start = time.perf_counter()
                output = run_networks(model, loaded.image, loaded.region_preprocessed, loaded.cls_image,
                                      step_fraction=step_fraction)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timing = dict(loaded.timing_s, network=time.perf_counter() - start)
            except Exception as error:  # noqa: BLE001
                log.debug("%s: network failed", name, exc_info=True)
                fail(name, _describe(error))
                bar.update()
                continue
            # Drop the preprocessed arrays now: only the original scan and lung are needed for the export.
            loaded.image = loaded.cls_image = loaded.lung_preprocessed = None  # the region is kept for the export
            collect_exports(wait=True)  # at most one case waits for export: bounded memory
            pending_exports.append((name, writer.submit(_timed_export, loaded, output, output_dir, class_names,
                                                        save_probabilities, peripheral_thickness_mm, timing,
                                                        dicom_export), timing))
            bar.update()
        collect_exports(wait=True)
    finally:
        bar.close()
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)

    new_names = {case.name for case in cases}
    all_entries = [e for e in kept if e.get("case") not in new_names] + [entries[n] for n in sorted(entries)]
    all_entries.sort(key=lambda e: e["case"])
    summary = {
        "dscovid_version": __version__,
        **identity,
        "plans": model.plans.get("plans_name"),
        "dataset": model.plans.get("dataset_name"),
        "class_names": list(class_names),
        "weighting": settings.get("weighting", "constant"),
        "device": str(device),
        "lesion_threshold": LESION_THRESHOLD,
        "cases": all_entries,
        "failed": sorted(failed, key=lambda f: f["case"]),
    }
    summary = json_safe(summary)
    write_json_atomic(summary, output_dir / "predictions.json")
    columns = ["case", "predicted_class", *[f"p_{c}" for c in class_names], *REPORT_KEYS]
    write_csv_atomic(csv_rows(summary["cases"], class_names), columns, output_dir / "predictions.csv")
    log.info("%d case(s) predicted, %d failed; results in %s", len(entries), len(failed), output_dir)
    return summary


def _timed_export(loaded: LoadedCase, output: NetworkOutput, output_dir: Path, class_names: Sequence[str],
                  save_probabilities: bool, peripheral_thickness_mm: float, timing: dict,
                  dicom: DicomExport | None = None) -> dict:
    start = time.perf_counter()
    entry = export_case(loaded, output, output_dir, class_names, save_probabilities, peripheral_thickness_mm, dicom)
    timing["export"] = time.perf_counter() - start  # the caller's dict: read once the future is done
    return entry
