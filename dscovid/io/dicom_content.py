"""What dscovid's DICOM objects say: the coded concepts they use and the identity of the model that made them.

Standard codes come from pydicom's tables of the DICOM standard (SNOMED CT ``SCT``, DICOM ``DCM``, ``UCUM``). The
concepts no standard vocabulary has (the paper's lesion ratios, the class probabilities, the six-zone severity score,
MosMedData's categories, the non-pneumonia class) use the private coding scheme ``99DSCOVID`` (private designators
start with ``99``, DICOM PS3.16 §8.2), declared in each object's Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dscovid import __version__

PRIVATE_SCHEME = "99DSCOVID"


def private_code(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of dscovid's private coding scheme."""
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


def coding_scheme_identification() -> Dataset:
    """The item of the Coding Scheme Identification Sequence that declares :data:`PRIVATE_SCHEME`."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "dscovid measurements"
    item.CodingSchemeResponsibleOrganization = "dscovid project"
    return item


# ----------------------------------------------------------------------------------------------- segments

#: Segment 1: the predicted lesions (ground-glass opacities and consolidations, not told apart).
LESION_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003
LESION_TYPE = codes.SCT.Lesion  # SCT 52988006
#: Segment 2: the lungs as reported (the lung mask plus the predicted lesion).
LUNG_CATEGORY = codes.SCT.AnatomicalStructure  # SCT 91723000
LUNG_TYPE = codes.SCT.Lung  # SCT 39607008

LESION_SEGMENT, LUNG_SEGMENT = 1, 2

# ----------------------------------------------------------------------------------------------- report concepts

PROCEDURE_CT_CHEST = hd.sr.CodedConcept("169069000", "SCT", "CT of chest")
FINDING = codes.DCM.Finding  # DCM 121071, the predicted class as a qualitative evaluation
VOLUME = codes.SCT.Volume  # SCT 118565006
MEAN = codes.SCT.Mean
STANDARD_DEVIATION = codes.SCT.StandardDeviation
LESION_COUNT = private_code("LESCOUNT", "Number of lesions")
LESION_VOLUME_RATIO = private_code("LVR", "Lesion volume ratio")
PERIPHERAL_LESION_RATIO = private_code("PLR", "Peripheral lesion ratio")
LUNG_INVOLVEMENT = private_code("LUNGINV", "Lung involvement")
ZONE_INVOLVEMENT = private_code("ZONEINV", "Lung zone involvement")
ZONE_SCORE = private_code("ZONESCORE", "Lung zone severity score")
SEVERITY_SCORE = private_code("SEVSCORE", "Six-zone CT severity score")
MOSMED_CATEGORY = private_code("MOSMEDCAT", "MosMedData CT category")

UNIT_ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
UNIT_PERCENT = codes.UCUM.Percent
UNIT_HU = codes.UCUM.HounsfieldUnit
UNIT_COUNT = hd.sr.CodedConcept("{lesions}", "UCUM", "lesions")
UNIT_SCORE = hd.sr.CodedConcept("{score}", "UCUM", "score")

ZONE_SITES = {"upper": codes.SCT.UpperZoneOfLung, "middle": codes.SCT.MiddleZoneOfLung,
              "lower": codes.SCT.LowerZoneOfLung}
SIDES = {"right": codes.SCT.Right, "left": codes.SCT.Left}

#: The diagnosis of each class dscovid knows; other class names get a private code.
CLASS_CODES = {
    "covid": hd.sr.CodedConcept("840539006", "SCT", "COVID-19"),
    "cap": hd.sr.CodedConcept("385093006", "SCT", "Community acquired pneumonia"),
    "non_pneumonia": private_code("NONPNEUMONIA", "No pneumonia"),
}
_CLASS_LABELS = {"covid": "COVID-19", "cap": "community-acquired pneumonia", "non_pneumonia": "non-pneumonia"}


def class_code(name: str) -> hd.sr.CodedConcept:
    """The coded diagnosis of class ``name``."""
    return CLASS_CODES.get(name) or private_code(f"CLASS-{name}"[:16].upper(), name)


def probability_code(name: str) -> hd.sr.CodedConcept:
    """The concept "probability of class ``name``"."""
    return private_code(f"P-{name}"[:16].upper(), f"Probability of {_CLASS_LABELS.get(name, name)}")


def mosmed_code(category: str) -> hd.sr.CodedConcept:
    """MosMedData's category ``CT-k`` as a coded value."""
    return private_code(category, f"MosMedData {category}")


# ----------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made a result: written into every SEG segment and SR measurement group.

    Attributes
    ----------
    trainer, configuration : the model folder's ``<trainer>__<configuration>``.
    folds : the folds averaged.
    checkpoint : the checkpoint file of each fold.
    plans, dataset : the plans name and the dataset the model was trained on (None if unknown).
    version : the dscovid version that predicted.
    """

    trainer: str
    configuration: str
    folds: tuple[str, ...]
    checkpoint: str = "checkpoint_final.pt"
    plans: str | None = None
    dataset: str | None = None
    version: str = __version__

    @property
    def model_name(self) -> str:
        """``<trainer>__<configuration>``, the model folder's name (at most 64 characters, a DICOM LO)."""
        return f"{self.trainer}__{self.configuration}"[:64]

    def parameters(self) -> dict[str, str]:
        """The identity as algorithm parameters (name → value)."""
        parameters = {"trainer": self.trainer, "configuration": self.configuration,
                      "folds": ",".join(self.folds), "checkpoint": self.checkpoint}
        if self.plans:
            parameters["plans"] = str(self.plans)
        if self.dataset:
            parameters["dataset"] = str(self.dataset)
        return parameters

    def serial_number(self) -> str:
        """A short stable fingerprint of the identity (the "device serial number" of DICOM equipment modules)."""
        text = "|".join(f"{key}={value}" for key, value in sorted(self.parameters().items()))
        return hashlib.sha1(f"{text}|{self.version}".encode()).hexdigest()[:16]

    def parameter_strings(self) -> Sequence[str]:
        """``name=value`` strings, for SR algorithm identification (TID 4019)."""
        return [f"{key}={value}" for key, value in self.parameters().items()]
