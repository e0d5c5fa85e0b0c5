"""The demo on the built-in synthetic dataset: the whole pipeline from generation to an HTML report (docs/demo.md).

``run_demo`` (pipeline.py) runs the stages, each skipped when its outputs are complete; ``write_report`` (html_report.py)
writes the report. The per-case montage is :mod:`dscovid.prediction.montage` (``dscovid_predict --png`` uses it too).
"""

from dscovid.demo.html_report import write_report
from dscovid.demo.pipeline import DemoResult, StageRecord, run_demo

__all__ = ["DemoResult", "StageRecord", "run_demo", "write_report"]
