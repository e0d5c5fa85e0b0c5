"""The classical lung mask (no trained weights) that keeps dense lesions inside: docs/lung_mask.md.

``settings`` (:class:`LungMaskSettings`, the labels), ``segment`` (:func:`segment_lungs`, :func:`segment_lung_sides`:
the steps in order), the steps themselves (``lungs``: body, airway, the lungs and their sides; ``filling``: the
lesion-aware filling; ``grid``: the coarse working grid and the refinement at full resolution; ``morphology``) and
``files`` (:func:`write_lung_masks`, behind ``dscovid_lung_mask``).
"""

from dscovid.preprocessing.lung.files import write_lung_masks
from dscovid.preprocessing.lung.segment import lung_volumes_ml, segment_lung_sides, segment_lungs
from dscovid.preprocessing.lung.settings import LEFT_LUNG, RIGHT_LUNG, LungMaskSettings

__all__ = [
    "LEFT_LUNG",
    "RIGHT_LUNG",
    "LungMaskSettings",
    "lung_volumes_ml",
    "segment_lung_sides",
    "segment_lungs",
    "write_lung_masks",
]
