"""The shipped plan presets (``plans/*.json`` in the repository, ``dscovid.presets`` once installed).

A preset is the starting point of one configuration: what the planner copies (HU window, widths, losses,
optimiser) and the rules and budget it adapts to a dataset's fingerprint (``preprocessing.spacing_rule``,
``segmentation.patch_size_zyx``, ``classification.num_slices`` / ``in_plane_yx``, ``budget``).
:func:`preset_configuration` gives a preset's configuration as it stands, unplanned, for tests and benchmarks.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from dscovid.errors import DscovidError
from dscovid.plans.configuration import Configuration
from dscovid.plans.model_config import NetworkConfig

#: Top-level keys every preset has.
PRESET_KEYS = ("name", "preprocessing", "segmentation", "classification", "network", "training", "inference",
               "budget")


def _repository_folder() -> Path:
    return Path(__file__).resolve().parents[2] / "plans"


def _preset_text(name: str) -> tuple[str, str] | None:
    """(text, where) of the preset ``name`` from the installed package, else from the repository's plans/."""
    try:
        candidate = resources.files("dscovid.presets") / f"{name}.json"
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8"), f"dscovid.presets/{name}.json"
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    path = _repository_folder() / f"{name}.json"
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    return None


def available_presets() -> list[str]:
    """Names of the shipped presets."""
    names: set[str] = set()
    try:
        names |= {p.name[:-5] for p in resources.files("dscovid.presets").iterdir() if p.name.endswith(".json")}
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    folder = _repository_folder()
    if folder.is_dir():
        names |= {p.stem for p in folder.glob("*.json")}
    return sorted(names)


def load_preset(name_or_path: str | os.PathLike) -> dict:
    """A preset by name (``"3d_paper"``) or from a JSON file path; refuses unknown names and incomplete presets."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        found = _preset_text(str(name_or_path))
        if found is None:
            raise DscovidError(f"no plans preset named {str(name_or_path)!r} "
                               f"(available: {', '.join(available_presets()) or 'none'})")
        text, where = found
    try:
        preset = json.loads(text)
    except json.JSONDecodeError as error:
        raise DscovidError(f"{where}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(preset, dict):
        raise DscovidError(f"{where}: a preset must be a JSON object")
    for key in PRESET_KEYS:
        if key not in preset:
            raise DscovidError(f"{where}: {key}: missing key")
    return preset


def preset_configuration(name: str, target_spacing_zyx_mm: tuple[float, float, float]) -> Configuration:
    """The configuration a shipped preset gives as it stands, before the planner fits it to a dataset.

    Its own patch, classification grid (``num_slices`` × ``in_plane_yx``), network, batch, loss, stages and
    inference, at ``target_spacing_zyx_mm``, with a class weight of 1 per class (the planner would clip the sizes to
    the data, weigh the classes by their frequency and size the batch and the stages to the budget). For tests and
    benchmarks that need the shipped settings without a dataset.
    """
    preset = load_preset(name)
    classification = preset["classification"]
    num_classes = int(preset["network"].get("num_classes", NetworkConfig.num_classes))
    return Configuration.from_dict(name, {
        "data_identifier": preset["name"],
        "description": preset.get("description", ""),
        "preprocessing": {**{k: v for k, v in preset["preprocessing"].items() if k != "spacing_rule"},
                          "target_spacing_zyx_mm": [float(v) for v in target_spacing_zyx_mm]},
        "segmentation": preset["segmentation"],
        "classification": {"grid_zyx": [classification["num_slices"], *classification["in_plane_yx"]]},
        "network": preset["network"],
        "training": {**preset["training"], "class_weights": [1.0] * num_classes},
        "inference": preset["inference"],
    })
