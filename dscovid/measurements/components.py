"""Connected components of the masks a prediction is measured on, on full-size grids.

The lesion report labels the predicted lesions and the lung once per case on the original grid (tens of millions
of voxels for a 512×512 scan), and the small-lesion removal labels the lesions again: ``cc3d`` labels in one pass
with no structuring element, several times faster than ``scipy.ndimage.label``, and finds the same components
(the tests check that the partition is the same).
"""

from __future__ import annotations

import cc3d
import numpy as np

#: The connectivities :func:`label` accepts: faces (6), faces and edges (18), or faces, edges and corners (26).
CONNECTIVITIES = (6, 18, 26)


def label(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """The connected components of the non-zero voxels of a 3D ``mask``.

    Returns ``(labels, count)`` like ``scipy.ndimage.label``: ``labels`` (uint32, the mask's shape) numbers the
    components 1..count, 0 is the background. ``connectivity`` 26 is SciPy's ``np.ones((3, 3, 3))`` structure, 6 its
    default one.
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"label needs a 3D mask, got shape {mask.shape}")
    if mask.size == 0:
        return np.zeros(mask.shape, dtype=np.uint32), 0
    labels, count = cc3d.connected_components(np.ascontiguousarray(mask != 0), connectivity=connectivity,
                                              return_N=True, out_dtype=np.uint32)
    return labels, int(count)
