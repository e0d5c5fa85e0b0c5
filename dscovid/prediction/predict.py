"""Prediction on unseen scans (docs/prediction.md): ``predict_cases``, the function behind ``dscovid_predict``.

Per case:

1. read the scan (HU checked), segment the lungs, preprocess exactly as in training
   (:func:`dscovid.prediction.inputs.load_case`, with the plans the folds were trained on);
2. run every fold, plain and mirrored, over the preprocessed scan and average the outputs
   (:func:`dscovid.inference.engine.run_networks`);
3. write the case on its original grid and make its entry (:func:`dscovid.prediction.export.export_case`);
4. record the case's outcome (``records/<case>.result.json`` or ``.failure.json``), and at the end rebuild
   ``predictions.json`` and ``predictions.csv`` from every record of the folder (:mod:`dscovid.prediction.output_folder`).

Work overlaps: the next case is read and preprocessed in the background while the networks run, and the previous
case is exported in the background. A case that fails is reported by name with its reason in one line; the others
still run; a failed case leaves no file behind and does not touch its files from an earlier run (the case's files
take their final names together, only when all are written). Several runs may share one output folder at the same
time (``num_parts``, or simply two runs): every case is listed once at the end (docs/reliability.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from dscovid import __version__
from dscovid.errors import DscovidError
from dscovid.inference.engine import NetworkOutput, run_networks
from dscovid.inference.model_loading import TrainedModel, load_trained_model
from dscovid.inference.sliding_window import PLACEMENTS
from dscovid.io.scans import Scan, case_name_problems, find_scans
from dscovid.io.shared_output import check_output_folder, has_result, write_failure, write_result
from dscovid.io.strict_json import json_safe
from dscovid.model.precision import precision_name
from dscovid.parallel import process_pool, progress_bar
from dscovid.prediction.dicom_export import DicomExport, refuse_non_dicom
from dscovid.prediction.export import LESION_THRESHOLD, export_case
from dscovid.prediction.inputs import (
    LoadedCase,
    load_case,
    select_part,
)
from dscovid.prediction.lesion_report import DEFAULT_PERIPHERAL_THICKNESS_MM
from dscovid.prediction.output_folder import claim_folder, rebuild_predictions, run_identity
from dscovid.prediction.postprocessing import model_postprocessing
from dscovid.results.checkpoint import FINAL

log = logging.getLogger(__name__)


@dataclass
class _Job:
    case: Scan
    future: Future | None
    problem: str | None


def _start_reader(num_workers: int) -> Executor:
    if num_workers <= 1:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="dscovid-read")
    return process_pool(num_workers)  # spawned, one thread each, ending with this process (kill -9 included)


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
    num_parts: int = 1,
    part_id: int = 0,
    accept_implausible: bool = False,
    min_lesion_ml: float | None = None,
    mirroring: bool = True,
    batch_size: int | None = None,
    tile_placement: str | None = None,
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
    num_parts, part_id : predict only part ``part_id`` of ``num_parts`` of the cases (:func:`select_part`), so that
        K jobs share one input folder and one output folder.
    accept_implausible : predict scans the plausibility rule refuses (:mod:`dscovid.io.plausibility`), flagged,
        instead of failing them.
    min_lesion_ml : drop predicted lesion components smaller than this volume in ml (0: keep all); None: the volume
        the model folder's ``postprocessing.json`` chose for these checkpoints, else 0
        (:mod:`dscovid.prediction.postprocessing`; docs/evaluation.md, post-processing).
    mirroring : the test-time mirroring along the configuration's ``inference.mirror_axes``; False runs each fold
        once (half the network time, for a slow device).
    batch_size : sliding-window tiles per network call (default: :func:`dscovid.inference.engine.tile_batch_size`:
        the configuration's ``inference.batch_size``, on the CPU fewer where the tiles are large).
    tile_placement : ``"grid"``, ``"region"`` or ``"region_sized"`` (:func:`dscovid.inference.sliding_window.plan_tiles`);
        default: the configuration's ``inference.tile_placement``.

    Returns
    -------
    The ``predictions.json`` dictionary (also written, with ``predictions.csv``): every case recorded in the
    folder, by this run and by others. Its ``failed`` list names every case whose latest attempt failed and why.

    Raises
    ------
    DscovidError
        Before anything is written: an output folder that equals, lies inside or contains an input, or cannot be
        written; a model or setting that does not fit; an output folder holding another model's predictions.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DscovidError("--device cuda was asked for, but no CUDA device is available")
    try:
        precision = precision_name(device)
    except ValueError as error:
        raise DscovidError(str(error)) from None
    if model is None:
        if model_dir is None:
            raise DscovidError("no model given: pass a model folder (-m) or a dataset (-d)")
        model = load_trained_model(model_dir, folds, device, checkpoint_name)
    if configuration is not None and configuration != model.configuration_name:
        raise DscovidError(f"{model.model_dir}: holds configuration {model.configuration_name!r}, not {configuration!r}")
    if batch_size is not None and int(batch_size) < 1:
        raise DscovidError(f"the tile batch size must be at least 1, got {batch_size}")
    if step_fraction is not None and not 0.0 < float(step_fraction) <= 1.0:
        raise DscovidError(f"the sliding-window step must be in (0, 1], got {step_fraction}")
    if min_lesion_ml is not None and not min_lesion_ml >= 0:  # NaN too
        raise DscovidError(f"the minimum lesion volume must be 0 or more ml, got {min_lesion_ml}")
    if tile_placement is not None and tile_placement not in PLACEMENTS:
        raise DscovidError(f"the tile placement must be one of {', '.join(PLACEMENTS)}, got {tile_placement!r}")
    every_case = find_scans(inputs)
    # Name problems over all parts (each part refuses the same duplicates); keyed by object: an input given twice
    # is two equal Scans, and only the second is the duplicate.
    problems = dict(zip((id(case) for case in every_case), case_name_problems(every_case)))
    cases = select_part(every_case, num_parts, part_id)
    if dicom:
        refuse_non_dicom([case.path for case in cases])
    input_paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    output_dir = check_output_folder(output_dir, input_paths)
    settings = model.inference
    step_used = float(step_fraction if step_fraction is not None else settings.step_fraction)
    min_lesion_ml = model_postprocessing(model) if min_lesion_ml is None else float(min_lesion_ml)
    if tile_placement == settings.tile_placement:
        tile_placement = None  # the model's own: the same run as without the option
    identity = run_identity(model, step_used, peripheral_thickness_mm, min_lesion_ml, mirroring, tile_placement)
    claim_folder(output_dir, identity, overwrite)

    done = 0
    unrecorded: list[dict] = []
    class_names = model.class_names or [f"class_{k}" for k in range(3)]
    dicom_export = None if dicom is False else DicomExport.of(model, class_names, peripheral_thickness_mm, bool(dicom))

    def fail(case: Scan, reason: str, name_usable: bool = True) -> None:
        log.error("%s: failed: %s", case.name, reason)
        failure = {"case": case.name, "reason": reason, "input": str(case.path)}
        if not name_usable:  # unsafe, or taken by another input: no record of its own (listed by this run only)
            unrecorded.append(failure)
            return
        if has_result(output_dir, case.name):
            failure["earlier_result_kept"] = True
        try:
            write_failure(output_dir, failure)
        except DscovidError as error:
            log.error("%s: %s", case.name, error)
            unrecorded.append(failure)

    def succeed(case: Scan, entry: dict) -> None:
        nonlocal done
        try:
            write_result(output_dir, json_safe(entry))  # a case without lesion has NaN measurements: null in JSON
        except DscovidError as error:  # its files are whole, but without a record the case is not listed
            fail(case, str(error))
            return
        done += 1
        verdict = (entry.get("plausibility") or {}).get("verdict", "plausible")
        if verdict != "plausible":
            reasons = entry["plausibility"]["refusals"] + entry["plausibility"]["flags"]
            accepted = " (implausible, predicted as asked)" if verdict == "refused" else ""
            log.warning("%s: flagged%s: %s", entry["case"], accepted, "; ".join(reasons))
        if on_case is not None:
            on_case(entry)

    # On a GPU the export resamples and thresholds there too (docs/prediction.md); on the CPU it runs in its thread.
    export_device = device if device.type == "cuda" else None
    reader = _start_reader(num_workers)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dscovid-write")
    ahead = max(1, num_workers)
    queue: deque[_Job] = deque()
    pending_exports: list[tuple[Scan, Future, dict]] = []
    todo = iter(cases)
    bar = progress_bar(total=len(cases), desc="predicting", unit="case", disable=not progress)

    def submit_next() -> None:
        case = next(todo, None)
        if case is None:
            return
        problem = problems[id(case)]
        future = None if problem else reader.submit(load_case, case, model.preprocessing, accept_implausible)
        queue.append(_Job(case, future, problem))

    def collect_exports(wait: bool) -> None:
        for item in list(pending_exports):
            case, future, timing = item
            if not wait and not future.done():
                continue
            pending_exports.remove(item)
            try:
                entry = future.result()
            except Exception as error:  # noqa: BLE001 - one case's failure must not stop the others
                log.debug("%s: export failed", case.name, exc_info=True)
                fail(case, _describe(error))
                continue
            entry["timing_s"] = {key: round(value, 3) for key, value in timing.items()}
            succeed(case, entry)

    try:
        for _ in range(ahead):
            submit_next()
        while queue:
            job = queue.popleft()
            submit_next()  # keep the background reader busy while this case runs
            name = job.case.name
            if job.problem is not None:  # an unsafe or duplicate name: its "files" may belong to another case
                fail(job.case, job.problem, name_usable=False)
                bar.update()
                continue
            try:
                loaded = job.future.result()
            except Exception as error:  # noqa: BLE001
                log.debug("%s: reading or preprocessing failed", name, exc_info=True)
                fail(job.case, _describe(error))
                bar.update()
                continue
            try:
                start = time.perf_counter()
                output = run_networks(model, loaded.image, loaded.region_preprocessed, loaded.cls_image,
                                      step_fraction=step_fraction, mirror_axes=None if mirroring else [],
                                      batch_size=batch_size, placement=tile_placement)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timing = dict(loaded.timing_s, network=time.perf_counter() - start)
            except Exception as error:  # noqa: BLE001
                log.debug("%s: network failed", name, exc_info=True)
                fail(job.case, _describe(error))
                bar.update()
                continue
            # Drop the preprocessed arrays now: only the original scan and lung are needed for the export.
            loaded.image = loaded.cls_image = loaded.lung_preprocessed = None  # the region is kept for the export
            collect_exports(wait=True)  # at most one case waits for export: bounded memory
            pending_exports.append((job.case, writer.submit(_timed_export, loaded, output, output_dir, class_names,
                                                        save_probabilities, peripheral_thickness_mm, timing,
                                                        dicom_export, export_device, min_lesion_ml), timing))
            bar.update()
        collect_exports(wait=True)
    finally:
        bar.close()
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)

    header = {
        "dscovid_version": __version__,
        **identity,
        "plans": model.plans.plans_name,
        "dataset": model.plans.dataset_name,
        "class_names": list(class_names),
        "weighting": settings.weighting,
        "mirror_axes": [int(axis) for axis in settings.mirror_axes] if mirroring else [],
        "device": str(device),
        "precision": precision,
        "lesion_threshold": LESION_THRESHOLD,
        "min_lesion_ml": float(min_lesion_ml),
    }
    summary = rebuild_predictions(output_dir, header, class_names, unrecorded)
    log.info("%d case(s) predicted, %d failed; results in %s", done, len(cases) - done, output_dir)
    return summary


def _timed_export(loaded: LoadedCase, output: NetworkOutput, output_dir: Path, class_names: Sequence[str],
                  save_probabilities: bool, peripheral_thickness_mm: float, timing: dict,
                  dicom: DicomExport | None = None, device: torch.device | None = None,
                  min_lesion_ml: float = 0.0) -> dict:
    start = time.perf_counter()
    entry = export_case(loaded, output, output_dir, class_names, save_probabilities, peripheral_thickness_mm, dicom,
                        device, min_lesion_ml)
    timing["export"] = time.perf_counter() - start  # the caller's dict: read once the future is done
    return entry
