"""The demo's HTML report: Table II-style metrics, ROC and confusion figures, training curves and per-case montages.

The report is one self-contained folder (``report.html`` and the PNGs it shows, copied beside it) that opens offline:
no external CSS, scripts or fonts.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from dscovid.io.atomic import atomic_path, write_text_atomic

log = logging.getLogger("dscovid.demo")

#: Table II columns: (summary key, header, shown in percent).
SEGMENTATION_COLUMNS = (("dsc", "DSC (%)", True), ("sensitivity", "Sensitivity (%)", True),
                        ("specificity", "Specificity (%)", True), ("nsd", "NSD (%)", True), ("rmsd", "RMSD (mm)", False))
CLASSIFICATION_COLUMNS = (("sensitivity", "Sensitivity (%)"), ("specificity", "Specificity (%)"),
                          ("f1", "F1-score (%)"), ("auc", "AUC (%)"))

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #bbb; padding: .3em .6em; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
.ok { color: #176d17; font-weight: bold; } .wrong { color: #b00; font-weight: bold; }
.figures img { max-width: 48%; vertical-align: top; margin: .3em; border: 1px solid #ddd; }
.case { margin: 1.2em 0; } .case img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; font-size: .9em; }
"""


def _number(value: object, percent: bool = False) -> str:
    if value is None or not isinstance(value, (int, float)) or value != value:
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def _mean_std(block: Mapping, key: str, percent: bool) -> str:
    mean, std = block.get("mean", {}).get(key), block.get("std", {}).get(key)
    if mean is None:
        return "–"
    text = _number(mean, percent)
    return f"{text} ({_number(std, percent)})" if std is not None else text


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def segmentation_table(summary: Mapping, seconds_per_case: float | None) -> str:
    """Table II, segmentation part: mean (std) over the test cases with a lesion, then per class and over all cases."""
    segmentation = summary["segmentation"]
    headers = ["Cases", "n", "Time (s)", *[header for _, header, _ in SEGMENTATION_COLUMNS]]
    rows = []
    blocks = [("DeepSC-COVID, cases with lesions", segmentation["lesion_cases"])]
    blocks += [(f"class {name}", block) for name, block in segmentation.get("by_class", {}).items()]
    blocks.append(("all test cases", segmentation))
    for label, block in blocks:
        n = block.get("n", {}).get("dsc", 0)
        time_text = _number(seconds_per_case) if label.startswith("DeepSC") else ""
        rows.append([html.escape(label), str(n), time_text,
                     *[_mean_std(block, key, percent) for key, _, percent in SEGMENTATION_COLUMNS]])
    return _table(headers, rows)


def classification_table(summary: Mapping, seconds_per_case: float | None) -> str:
    """Table II, classification part: accuracy and macro values, then each class against the rest."""
    classification = summary.get("classification")
    if not classification:
        return "<p>No classification (no true classes or no predictions.json).</p>"
    headers = ["Class", "n", "Time (s)", "Accuracy (%)", *[header for _, header in CLASSIFICATION_COLUMNS]]
    macro = classification["macro"]
    rows = [["DeepSC-COVID (macro)", str(classification["n"]), _number(seconds_per_case),
             _number(classification["accuracy"], True), *[_number(macro.get(key), True) for key, _ in
                                                          CLASSIFICATION_COLUMNS]]]
    for name, values in classification["per_class"].items():
        rows.append([html.escape(name), str(values.get("support", "")), "", "",
                     *[_number(values.get(key), True) for key, _ in CLASSIFICATION_COLUMNS]])
    return _table(headers, rows)


def confusion_table(summary: Mapping) -> str:
    classification = summary.get("classification")
    if not classification:
        return ""
    names = classification["class_names"]
    rows = [[f"true {html.escape(name)}", *[str(v) for v in row]]
            for name, row in zip(names, classification["confusion_matrix"])]
    return _table(["", *[f"predicted {n}" for n in names]], rows)


def _copy(source: Path, report_dir: Path, name: str) -> str | None:
    """Copy a figure next to the report (so the folder travels alone); its relative link, or None if absent."""
    if not source.is_file():
        log.warning("report: %s not found, left out", source)
        return None
    target = report_dir / name
    if source.resolve() != target.resolve():
        with atomic_path(target) as temporary:
            shutil.copyfile(source, temporary)
    return name


def write_report(
    report_dir: str | os.PathLike,
    summary_path: str | os.PathLike,
    predictions_path: str | os.PathLike,
    fold_dir: str | os.PathLike,
    montage_dir: str | os.PathLike,
    stages: Sequence[object] = (),
    settings: Mapping[str, object] | None = None,
) -> Path:
    """Write ``report_dir/report.html`` from the evaluator's summary, the predictions and the training folder.

    Parameters
    ----------
    report_dir : the report folder (created); figures are copied into it.
    summary_path : the evaluator's ``summary.json`` (its ``summary_roc.png`` and ``summary_confusion.png`` beside it).
    predictions_path : the predictor's ``predictions.json`` (lesion reports and timings per case).
    fold_dir : the trained fold (``progress.png``, ``training_log.txt``).
    montage_dir : folder of ``<case>_montage.png`` (must lie inside ``report_dir`` or is copied there).
    stages : the demo's stage records (``name``, ``status``, ``seconds``, ``detail``, ``work_seconds``).
    settings : run settings shown at the top.

    Returns
    -------
    The path of ``report.html``.
    """
    from dscovid.prediction.montage import montage_file_name

    report_dir, summary_path, fold_dir = Path(report_dir), Path(summary_path), Path(fold_dir)
    montage_dir = Path(montage_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    predictions = json.loads(Path(predictions_path).read_text(encoding="utf-8"))
    stem = summary_path.with_suffix("")
    figures = {
        "roc": _copy(Path(f"{stem}_roc.png"), report_dir, "roc.png"),
        "confusion": _copy(Path(f"{stem}_confusion.png"), report_dir, "confusion.png"),
        "progress": _copy(fold_dir / "progress.png", report_dir, "progress.png"),
    }
    seconds = [sum(e.get("timing_s", {}).values()) for e in predictions.get("cases", []) if e.get("timing_s")]
    seconds_per_case = sum(seconds) / len(seconds) if seconds else None

    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>dscovid demo report</title>",
             f"<style>{_STYLE}</style></head><body>",
             "<h1>DeepSC-COVID demo: synthetic chest CT, joint lesion segmentation and diagnosis</h1>"]
    if settings:
        parts.append(_table(["setting", "value"], [[html.escape(str(k)), html.escape(str(v))]
                                                   for k, v in settings.items()]))
    parts.append("<p class='note'>Synthetic phantoms (dataset_conversion/synthetic.py), not patients: these figures "
                 "check that the pipeline works end to end; they say nothing about clinical performance.</p>")

    parts.append("<h2>Segmentation (Table II layout)</h2>")
    parts.append("<p class='note'>Mean (standard deviation) over the test cases; segmentation metrics over the cases "
                 "whose reference has a lesion, as in the paper; NSD at a tolerance of "
                 f"{summary.get('nsd_tolerance_mm', 1.0):g} mm, specificity over the {summary.get('specificity_region')}. "
                 "Time: mean prediction time per case (read, preprocess, network, export).</p>")
    parts.append(segmentation_table(summary, seconds_per_case))
    parts.append("<h2>Classification (Table II layout)</h2>")
    parts.append("<p class='note'>Sensitivity, specificity, F1 and AUC of each class against the rest; the first row "
                 "gives the accuracy and their unweighted means.</p>")
    parts.append(classification_table(summary, seconds_per_case))
    parts.append(confusion_table(summary))
    parts.append("<div class='figures'>")
    for key, alt, width in (("roc", "ROC curves per class", 100), ("confusion", "confusion matrix", 45)):
        if figures[key]:
            parts.append(f"<img src='{figures[key]}' alt='{alt}' style='max-width:{width}%'>")
    parts.append("</div>")

    parts.append("<h2>Training curves (fold 0)</h2>")
    if figures["progress"]:
        parts.append(f"<div class='figures'><img src='{figures['progress']}' alt='training progress' "
                     "style='max-width:70%'></div>")
    if stages:
        parts.append("<h2>Stages</h2>")
        rows = []
        for record in stages:
            data = record if isinstance(record, Mapping) else vars(record)
            work = data.get("work_seconds")
            rows.append([html.escape(data["name"]), html.escape(data["status"]),
                         _number(data["seconds"]), _number(work) if work is not None else "–",
                         html.escape(str(data["detail"]))])
        parts.append(_table(["stage", "this run", "seconds (this run)", "seconds (when done)", "what"], rows))

    parts.append("<h2>Test cases</h2>")
    parts.append("<p class='note'>Axial slices through the lesions: predicted outline red, reference outline green "
                 "(dashed); bottom row: evidence map of the predicted class.</p>")
    truth = {row["case"]: row["class"] for row in (summary.get("classification") or {}).get("per_case", [])}
    dice = {row["case"]: row.get("dsc") for row in summary["segmentation"]["per_case"]}
    montage_links = {}
    for entry in predictions.get("cases", []):
        case = entry["case"]
        source = montage_dir / montage_file_name(case)
        relative = None
        if source.is_file():
            try:
                relative = source.resolve().relative_to(report_dir.resolve()).as_posix()
            except ValueError:
                relative = _copy(source, report_dir, montage_file_name(case))
        montage_links[case] = relative
        predicted, true_class = entry.get("predicted_class"), truth.get(case)
        verdict = "ok" if predicted == true_class else "wrong"
        probabilities = ", ".join(f"{k} {v:.3f}" for k, v in (entry.get("probabilities") or {}).items())
        parts.append(f"<div class='case' id='{html.escape(case)}'><h3>{html.escape(case)}: predicted "
                     f"<span class='{verdict}'>{html.escape(str(predicted))}</span>, true {html.escape(str(true_class))}"
                     f" &mdash; probabilities {html.escape(probabilities)}; lesion DSC {_number(dice.get(case))}, "
                     f"{entry.get('lesion_count', '–')} predicted lesion(s)</h3>")
        if relative:
            parts.append(f"<img src='{html.escape(relative)}' alt='montage of {html.escape(case)}'>")
        parts.append("</div>")
    parts.append("</body></html>")

    return write_text_atomic("\n".join(parts), report_dir / "report.html")
