"""The whole first stage as one function: validate → fingerprint → plan → preprocess (``dscovid_plan_and_preprocess``).

Each step is also its own function (:func:`dscovid.io.validate.verify_dataset`,
:func:`dscovid.fingerprint.extractor.extract_fingerprint`, :func:`dscovid.planning.planner.plan_experiment`,
:func:`dscovid.preprocessing.preprocessor.preprocess_dataset`); this module only chains them and decides what
can be reused from an earlier run (a fingerprint made from the same source files, preprocessed cases that are up
to date).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from dscovid.errors import DscovidError
from dscovid.fingerprint.extractor import FINGERPRINT_FILE, extract_fingerprint
from dscovid.io.dataset import RawDataset, load_raw_dataset, write_json_atomic
from dscovid.io.stamps import digest
from dscovid.planning.planner import DEFAULT_PRESETS, plan_experiment
from dscovid.plans.configuration import Plans, load_plans
from dscovid.preprocessing.preprocessor import case_sources, preprocess_dataset

log = logging.getLogger(__name__)

PLANS_FILE = "plans.json"


def sources_digest(dataset: RawDataset) -> str:
    """A hash of every case's class and source files (size, modification time): a changed dataset changes it."""
    listing = [(case.name, case.class_name, case.lesion_annotated, case_sources(case)) for case in dataset.cases()]
    return digest(listing)


def fingerprint_dataset(dataset: RawDataset, output_dir: Path, num_processes: int = 1, reuse: bool = True,
                        progress: bool = True) -> dict:
    """The dataset's fingerprint: read from ``output_dir`` when it was made from the same files, else computed."""
    path = Path(output_dir) / FINGERPRINT_FILE
    digest = sources_digest(dataset)
    if reuse and path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            stored = {}
        if stored.get("sources_digest") == digest:
            log.info("fingerprint: up to date (%s)", path)
            return stored
    fingerprint = extract_fingerprint(dataset, output_dir, num_processes=num_processes, progress=progress)
    fingerprint["sources_digest"] = digest
    stored = json.loads(path.read_text(encoding="utf-8"))  # NaN already turned to null by the extractor
    stored["sources_digest"] = digest
    write_json_atomic(stored, path)
    return stored


def plan_and_preprocess(
    dataset_folder: str | Path,
    preprocessed_root: str | Path,
    configurations: Sequence[str] | None = None,
    presets: Sequence[str] | None = None,
    num_processes: int = 1,
    plans_file: str | Path | None = None,
    override_spacing: Sequence[float] | None = None,
    verify: bool = True,
    preprocess: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Validate, fingerprint, plan and preprocess one raw dataset.

    Parameters
    ----------
    dataset_folder : the raw dataset folder (``DatasetNNN_Name``).
    preprocessed_root : the preprocessed root; results go to ``preprocessed_root/DatasetNNN_Name/``.
    configurations : which configurations to preprocess (default: every configuration of the plans).
    presets : presets to plan (names or JSON paths; default 3d_paper and 3d_cpu, plus any of ``configurations``
        that names a shipped preset). Ignored with ``plans_file``.
    plans_file : use this plans file (validated; its ``dataset_name`` must match) instead of planning.
    override_spacing : target spacing (z, y, x mm) for every planned configuration.
    verify : run the dataset validator first and refuse an invalid dataset.
    preprocess : False stops after planning.
    overwrite : redo every preprocessed case even when up to date.

    Returns
    -------
    ``{"output": folder, "plans": Plans, "preprocessed": {configuration summary}}``.
    """
    dataset = load_raw_dataset(dataset_folder)
    if verify:
        from dscovid.io.validate import require_valid_dataset

        require_valid_dataset(dataset.root, num_processes=num_processes)
    output = Path(preprocessed_root) / dataset.name
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(dataset.meta, output / "dataset.json")

    fingerprint = fingerprint_dataset(dataset, output, num_processes=num_processes, progress=progress)
    if plans_file is not None:
        plans = load_plans(plans_file)
        if plans.dataset_name != dataset.name:
            raise DscovidError(f"{plans_file}: the plans are for {plans.dataset_name}, not {dataset.name} "
                               f"(edit dataset_name if you mean to reuse them)")
    else:
        chosen = list(presets or DEFAULT_PRESETS)
        from dscovid.plans.presets import available_presets

        chosen += [name for name in configurations or () if name in available_presets() and name not in chosen]
        plans = Plans.from_dict(plan_experiment(fingerprint, dataset.name, dataset.class_names, chosen,
                                                override_spacing))
        previous = output / PLANS_FILE
        if previous.exists():
            # Like nnU-Net: hand-added configurations of an earlier plans file survive re-planning.
            try:
                old = load_plans(previous)
                for configuration in old.configurations.values():
                    if configuration.name not in plans.configurations:
                        plans = plans.with_configuration(configuration)
            except DscovidError as error:
                log.warning("ignoring the configurations of the earlier %s (%s)", previous, error)
    write_json_atomic(plans.to_dict(), output / PLANS_FILE)
    log.info("plans: %s (%s)", output / PLANS_FILE, ", ".join(plans.configurations))

    summary = {}
    if preprocess:
        names = list(configurations or plans.configurations)
        summary = preprocess_dataset(dataset, output, plans, names, num_processes=num_processes,
                                     overwrite=overwrite, progress=progress)
        log.info("preprocessed %d case(s), %d up to date, %d failed", len(summary["processed"]),
                 len(summary["skipped"]), len(summary["failed"]))
        if summary["failed"]:
            raise DscovidError(f"{len(summary['failed'])} case(s) failed: {', '.join(summary['failed'])} "
                               "(the reasons are logged above; the other cases were written)")
    return {"output": output, "plans": plans, "preprocessed": summary}
