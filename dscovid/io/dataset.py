"""The raw dataset format (docs/formats.md §1): nnU-Net's layout and dataset.json, plus the diagnosis of each case.

::

    <DSCOVID_raw>/Dataset001_Name/
      dataset.json
      imagesTr/<case>_0000.nii.gz     CT in HU
      labelsTr/<case>.nii.gz          lesion mask (0/1); absent for a case whose lesions were not annotated
      lungsTr/<case>.nii.gz           optional lung mask (overrides the built-in lung segmentation)
      imagesTs/<case>_0000.nii.gz     optional test images

dataset.json keeps nnU-Net's keys and adds ``classes`` and ``cases``::

    {"name": "Dataset001_Synthetic",
     "channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1},
     "file_ending": ".nii.gz", "numTraining": 60,
     "classes": {"covid": 0, "cap": 1, "non_pneumonia": 2},
     "cases": {"case_0000": {"class": "covid", "lesion_annotated": true, "metadata": {...}}, ...},
     "intensity_unit": "HU"}

A ``non_pneumonia`` case has no lesions: its all-zero mask is a valid annotation. A case with
``"lesion_annotated": false`` keeps its classification label but its segmentation loss is skipped.
``intensity_unit`` is ``"HU"`` (default) or ``"not_HU"`` for sources without calibrated intensities.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dscovid.errors import DscovidError
from dscovid.io.atomic import write_text_atomic

#: The diagnosis classes in the authors' order (index = position).
CLASS_NAMES: tuple[str, ...] = ("covid", "cap", "non_pneumonia")
DEFAULT_CLASSES: dict[str, int] = {name: index for index, name in enumerate(CLASS_NAMES)}
CHANNEL_SUFFIX = "_0000"

_DATASET_NAME = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9][A-Za-z0-9_\-]*)$")
_SAFE_CASE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def check_case_name(name: str) -> None:
    """Refuse case names that are not safe as file names (no separators, no ``..``, no leading dot)."""
    if not isinstance(name, str) or not _SAFE_CASE.match(name) or ".." in name or len(name) > 200:
        raise DscovidError(f"case name {name!r} is not a safe file name (letters, digits, '_', '-', '.' only)")


def case_file(folder: str | os.PathLike, name: str, ending: str) -> Path:
    """``folder/<name><ending>``, refusing a case name that would put the file anywhere else.

    Every writer of a per-case file builds its path here, so a case id such as ``../../x/evil`` cannot escape the
    folder even where the dataset validator was skipped.
    """
    check_case_name(name)
    return Path(folder) / f"{name}{ending}"


def is_safe_case_name(name: str) -> bool:
    try:
        check_case_name(name)
    except DscovidError:
        return False
    return True


@dataclass(frozen=True)
class Case:
    """One training case of a raw dataset, with the paths of its files (label/lung may not exist)."""

    name: str
    class_name: str
    class_index: int
    lesion_annotated: bool
    image: Path
    label: Path | None
    lung: Path | None
    metadata: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class RawDataset:
    """A raw dataset folder and its parsed dataset.json."""

    root: Path
    meta: dict

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def file_ending(self) -> str:
        return self.meta.get("file_ending", ".nii.gz")

    @property
    def classes(self) -> dict[str, int]:
        classes = self.meta.get("classes", DEFAULT_CLASSES)
        if not isinstance(classes, dict):
            raise DscovidError(f"{self.root / 'dataset.json'}: classes must be an object mapping names to indices")
        return dict(classes)

    @property
    def class_names(self) -> list[str]:
        return [name for name, _ in sorted(self.classes.items(), key=lambda item: item[1])]

    @property
    def is_hu(self) -> bool:
        return self.meta.get("intensity_unit", "HU") == "HU"

    def image_path(self, case: str, folder: str = "imagesTr") -> Path:
        return case_file(self.root / folder, case, f"{CHANNEL_SUFFIX}{self.file_ending}")

    def label_path(self, case: str) -> Path:
        return case_file(self.root / "labelsTr", case, self.file_ending)

    def lung_path(self, case: str) -> Path:
        return case_file(self.root / "lungsTr", case, self.file_ending)

    def cases(self) -> list[Case]:
        """The training cases listed in dataset.json, sorted by name.

        Raises
        ------
        DscovidError
            For a ``cases`` that is not an object, or a case whose name is not a safe file name or whose entry is
            not an object with a known ``class`` (the validator lists all such problems; this guards the stages
            when it was skipped with ``--no-verify``).
        """
        classes = self.classes
        where = self.root / "dataset.json"
        listed = self.meta.get("cases", {})
        if not isinstance(listed, dict):
            raise DscovidError(f"{where}: cases must be an object mapping case names to entries")
        result = []
        for name, entry in sorted(listed.items()):
            problem = case_entry_problem(name, entry, classes)
            if problem is not None:
                raise DscovidError(f"{where}: {problem}")
            label = self.label_path(name)
            lung = self.lung_path(name)
            result.append(
                Case(
                    name=name,
                    class_name=entry["class"],
                    class_index=classes[entry["class"]],
                    lesion_annotated=bool(entry.get("lesion_annotated", True)),
                    image=self.image_path(name),
                    label=label if label.exists() else None,
                    lung=lung if lung.exists() else None,
                    metadata=dict(entry.get("metadata", {})),
                )
            )
        return result

    def case(self, name: str) -> Case:
        for case in self.cases():
            if case.name == name:
                return case
        raise DscovidError(f"{self.root / 'dataset.json'}: no case named {name!r}")


def case_entry_problem(name: object, entry: object, classes: dict) -> str | None:
    """Why one ``cases`` entry of dataset.json cannot be used, or None (every value's type is checked)."""
    if not is_safe_case_name(name):
        return f"{name}: case name is not a safe file name (letters, digits, '_', '-', '.' only)"
    if not isinstance(entry, dict):
        return f"{name}: the entry must be an object with a 'class', found {type(entry).__name__} {entry!r}"
    if "class" not in entry:
        return f"{name}: the entry has no 'class'"
    value = entry["class"]
    if not isinstance(value, str):
        return f"{name}: class must be a class name (a string), found {type(value).__name__} {value!r}"
    if value not in classes:
        return f"{name}: unknown class {value!r} (known: {', '.join(map(str, classes))})"
    if not isinstance(entry.get("lesion_annotated", True), bool):
        return f"{name}: lesion_annotated must be true or false, found {entry['lesion_annotated']!r}"
    if not isinstance(entry.get("metadata", {}), dict):
        return f"{name}: metadata must be an object, found {type(entry['metadata']).__name__}"
    return None


def read_json(path: str | os.PathLike, missing: str = "not found") -> object:
    """Parse a JSON file; a missing file (``missing`` says why it matters), bad JSON or a key given twice in one
    object (JSON would silently keep the last: a case listed twice could change class) is one clear line."""
    duplicates: list[str] = []

    def keep_pairs(pairs: list[tuple[str, object]]) -> dict:
        result: dict = {}
        for key, value in pairs:
            if key in result and key not in duplicates:
                duplicates.append(key)
            result[key] = value
        return result

    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle, object_pairs_hook=keep_pairs)
    except FileNotFoundError:
        raise DscovidError(f"{path}: {missing}") from None
    except IsADirectoryError:
        raise DscovidError(f"{path}: is a folder, not a JSON file") from None
    except UnicodeDecodeError as error:
        raise DscovidError(f"{path}: not valid JSON (not UTF-8 text: {error.reason} at byte {error.start})") from None
    except OSError as error:
        raise DscovidError(f"{path}: cannot be read ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise DscovidError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if duplicates:
        shown = ", ".join(repr(key) for key in duplicates[:10]) + (" ..." if len(duplicates) > 10 else "")
        raise DscovidError(f"{path}: key(s) given twice in one object: {shown} (JSON keeps only the last; "
                           f"remove the duplicate entries)")
    return data


def load_dataset_json(path: Path) -> dict:
    data = read_json(path, "not found (every raw dataset needs a dataset.json)")
    if not isinstance(data, dict):
        raise DscovidError(f"{path}: must hold a JSON object")
    return data


def load_raw_dataset(folder: str | os.PathLike) -> RawDataset:
    """Open a raw dataset folder (its dataset.json must parse; :mod:`dscovid.io.validate` checks the rest)."""
    root = Path(folder)
    if not root.is_dir():
        raise DscovidError(f"{root}: dataset folder not found")
    return RawDataset(root=root, meta=load_dataset_json(root / "dataset.json"))


def parse_dataset_name(name: str) -> tuple[int, str]:
    """Split ``Dataset001_Name`` into (1, "Name"), refusing other names."""
    match = _DATASET_NAME.match(name)
    if not match:
        raise DscovidError(f"{name!r} is not a dataset name of the form DatasetNNN_Name (e.g. Dataset001_Synthetic)")
    return int(match.group(1)), match.group(2)


def find_dataset(identifier: str | os.PathLike, root: Path | None) -> Path:
    """Resolve a dataset given as a path, a full name (``Dataset001_Synthetic``) or a number (``1``, ``001``).

    Names and numbers are looked up in ``root`` (for example the raw or preprocessed root).
    """
    text = str(identifier)
    as_path = Path(text).expanduser()
    if as_path.is_dir() and (os.sep in text or text.startswith(".") or root is None or not (root / text).is_dir()):
        return as_path
    if root is None:
        raise DscovidError(f"dataset {text!r} is not a folder, and no data root is set to look it up in")
    if text.isdigit():
        number = int(text)
        matches = sorted(
            p for p in root.glob("Dataset*_*") if p.is_dir() and _DATASET_NAME.match(p.name)
            and int(_DATASET_NAME.match(p.name).group(1)) == number
        )
        if not matches:
            raise DscovidError(f"no dataset number {number:03d} in {root}")
        if len(matches) > 1:
            raise DscovidError(f"several datasets numbered {number:03d} in {root}: {', '.join(p.name for p in matches)}")
        return matches[0]
    candidate = root / text
    if candidate.is_dir():
        return candidate
    raise DscovidError(f"dataset {text!r} not found in {root}")


def write_json_atomic(data: object, path: str | os.PathLike) -> Path:
    """Write JSON to ``path`` through a temporary file and a rename, so no reader ever sees half a file."""
    return write_text_atomic(json.dumps(data, indent=2, sort_keys=False) + "\n", path)


def make_dataset_json(
    name: str,
    cases: dict[str, dict],
    file_ending: str = ".nii.gz",
    classes: dict[str, int] | None = None,
    intensity_unit: str = "HU",
    description: str = "",
    **extra: object,
) -> dict:
    """Build a dataset.json dictionary; ``cases`` maps case name to ``{"class", "lesion_annotated", "metadata"?}``."""
    data = {
        "name": name,
        "description": description,
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "lesion": 1},
        "file_ending": file_ending,
        "numTraining": len(cases),
        "classes": dict(classes or DEFAULT_CLASSES),
        "intensity_unit": intensity_unit,
        "cases": {key: cases[key] for key in sorted(cases)},
    }
    data.update(extra)
    return data
