"""Reading the preprocessed cache (docs/formats.md §2): case properties and the arrays of one case."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dscovid.errors import DscovidError
from dscovid.preprocessing.lung_cache import npz_problem
from dscovid.training.splits import CaseStratum

#: The arrays a training sample is cut from (the lung mask is not needed by the losses).
TRAINING_ARRAYS = ("image", "lesion", "cls_image", "cls_lesion")


@dataclass(frozen=True)
class CacheCase:
    """One preprocessed case: its ``.npz`` arrays and its ``.json`` properties."""

    name: str
    npz: Path
    properties: dict

    @property
    def class_index(self) -> int:
        return int(self.properties["class_index"])

    @property
    def lesion_annotated(self) -> bool:
        return bool(self.properties["lesion_annotated"])

    @property
    def lesion_locations_zyx(self) -> np.ndarray:
        """(K, 3) int64 lesion voxel indices on the preprocessed grid (K may be 0)."""
        locations = np.asarray(self.properties.get("lesion_locations_zyx") or [], dtype=np.int64)
        return locations.reshape(-1, 3)

    def load(self, keys: Sequence[str] = TRAINING_ARRAYS) -> dict[str, np.ndarray]:
        """Read the named arrays (an uncompressed npz reads only the members asked for)."""
        try:
            with np.load(self.npz) as archive:
                missing = [key for key in keys if key not in archive.files]
                if missing:
                    raise DscovidError(f"{self.npz}: missing array(s) {', '.join(missing)} (re-run preprocessing)")
                return {key: archive[key] for key in keys}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise DscovidError(f"{self.npz}: damaged preprocessed file, cannot be read ({type(error).__name__}: "
                               f"{error}); run dscovid_plan_and_preprocess again to remake it") from None

    def stratum(self) -> CaseStratum:
        """Class and lesion volume for the splits (from the properties if recorded, else counted in the npz)."""
        voxels = self.properties.get("lesion_voxels")
        if voxels is None:
            voxels = float(self.load(("lesion",))["lesion"].sum()) if self.lesion_annotated else 0.0
        return CaseStratum(self.class_index, float(voxels), self.lesion_annotated)


def list_cache_cases(data_dir: Path) -> dict[str, CacheCase]:
    """All cases of one configuration's cache folder ``<dataset>/<data_identifier>/``, by name.

    A case counts when both its ``.json`` and ``.npz`` exist (an interrupted preprocessing leaves neither
    half-written, but may leave one without the other).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DscovidError(f"{data_dir}: preprocessed data not found (run dscovid_plan_and_preprocess first)")
    cases = {}
    for json_path in sorted(data_dir.glob("*.json")):
        if json_path.name.startswith("."):
            continue
        npz = json_path.with_suffix(".npz")
        if not npz.exists():
            continue
        try:
            properties = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DscovidError(f"{json_path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(properties, dict):
            raise DscovidError(f"{json_path}: not a case's properties (re-run preprocessing)")
        for key in ("class_index", "lesion_annotated"):
            if key not in properties:
                raise DscovidError(f"{json_path}: missing property {key!r} (re-run preprocessing)")
        problem = npz_problem(npz, TRAINING_ARRAYS, properties.get("npz_bytes"))
        if problem is not None:  # found now, not as a bare zip error in a loader worker hours later
            raise DscovidError(f"{npz}: damaged preprocessed file ({problem}); run dscovid_plan_and_preprocess "
                               f"again to remake it")
        name = properties.get("case", json_path.stem)
        cases[name] = CacheCase(name, npz, properties)
    if not cases:
        raise DscovidError(f"{data_dir}: no preprocessed cases (run dscovid_plan_and_preprocess first)")
    return cases
