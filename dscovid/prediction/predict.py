"""Prediction on unseen scans (docs/prediction.md): ``predict_cases``, the function behind ``dscovid_predict``.

Per case:

1. read the scan (HU checked), segment the lungs, preprocess exactly as in training
   (:func:`dscovid.prediction.inputs.load_case`, with the plans the folds were trained on);
2. run every fold, plain and mirrored, over the preprocessed scan and average the outputs
   (:func:`dscovid.inference.engine.run_networks`);
3. write the case on its original grid and make its entry (:func:`dscovid.prediction.export.export_case`);
4. at the end, ``predictions.json`` and ``predictions.csv`` (:mod:`dscovid.prediction.output_folder`).

Work overlaps: the next case is read and preprocessed in the background while the networks run, and the previous
case is exported in the background. A case that fails is reported by name with its reason; the others still run;
a failed case leaves no file behind (every file is written atomically, and the files of a case that fails half-way
are removed).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm import tqdm

from dscovid import __version__
from dscovid.errors import DscovidError
from dscovid.inference.engine import NetworkOutput, run_networks
from dscovid.inference.model_loading import TrainedModel, load_trained_model
from dscovid.io.scans import Scan, case_name_problems, find_scans
from dscovid.prediction.dicom_export import DicomExport, refuse_non_dicom
from dscovid.prediction.export import LESION_THRESHOLD, export_case
from dscovid.prediction.inputs import LoadedCase, load_case
from dscovid.prediction.lesion_report import DEFAULT_PERIPHERAL_THICKNESS_MM
from dscovid.prediction.output_folder import (
    previous_entries,
    remove_case_files,
    remove_leftovers,
    run_identity,
    write_predictions,
)
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
    cases = find_scans(inputs)
    if dicom:
        refuse_non_dicom([case.path for case in cases])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = model.inference
    step_used = float(step_fraction if step_fraction is not None else settings.step_fraction)
    identity = run_identity(model, step_used, peripheral_thickness_mm)
    kept = previous_entries(output_dir, identity, overwrite)
    remove_leftovers(output_dir)

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
        "plans": model.plans.plans_name,
        "dataset": model.plans.dataset_name,
        "class_names": list(class_names),
        "weighting": settings.weighting,
        "device": str(device),
        "lesion_threshold": LESION_THRESHOLD,
        "cases": all_entries,
        "failed": sorted(failed, key=lambda f: f["case"]),
    }
    summary = write_predictions(output_dir, summary, class_names)
    log.info("%d case(s) predicted, %d failed; results in %s", len(entries), len(failed), output_dir)
    return summary


def _timed_export(loaded: LoadedCase, output: NetworkOutput, output_dir: Path, class_names: Sequence[str],
                  save_probabilities: bool, peripheral_thickness_mm: float, timing: dict,
                  dicom: DicomExport | None = None) -> dict:
    start = time.perf_counter()
    entry = export_case(loaded, output, output_dir, class_names, save_probabilities, peripheral_thickness_mm, dicom)
    timing["export"] = time.perf_counter() - start  # the caller's dict: read once the future is done
    return entry
