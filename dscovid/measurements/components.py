"""Connected components of masks on full-size grids, for the lung mask, the lesion report and the post-processing.

The lesion report labels the predicted lesions and the lung once per case on the original grid (tens of millions
of voxels for a 512×512 scan), the small-lesion removal labels the lesions again, and the lung mask labels its
working grid several times: ``cc3d`` labels in one pass with no structuring element, several times faster than
``scipy.ndimage.label``, and finds the same components, numbered in the same order (by their first voxel in C
order) for every connectivity but 2D's 8, which the tests check.
"""

from __future__ import annotations

import cc3d
import numpy as np

#: The connectivities :func:`label` accepts, per number of dimensions: in 3D faces (6), faces and edges (18), or
#: faces, edges and corners (26); in 2D edges (4) or edges and corners (8).
CONNECTIVITIES = {3: (6, 18, 26), 2: (4, 8)}


def label(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """The connected components of the non-zero voxels of a 3D (or 2D) ``mask``.

    Returns ``(labels, count)`` like ``scipy.ndimage.label``: ``labels`` (uint32, the mask's shape) numbers the
    components 1..count (in the order SciPy does, but for 2D's 8-connectivity), 0 is the background.
    ``connectivity`` 26 is SciPy's ``np.ones((3, 3, 3))`` structure, 6 (3D) and 4 (2D) its default ones.
    """
    mask = np.asarray(mask)
    if mask.ndim not in CONNECTIVITIES:
        raise ValueError(f"label needs a 2D or 3D mask, got shape {mask.shape}")
    if connectivity not in CONNECTIVITIES[mask.ndim]:
        raise ValueError(f"connectivity of a {mask.ndim}D mask must be one of {CONNECTIVITIES[mask.ndim]}, "
                         f"got {connectivity}")
    if mask.size == 0:
        return np.zeros(mask.shape, dtype=np.uint32), 0
    labels, count = cc3d.connected_components(np.ascontiguousarray(mask != 0), connectivity=connectivity,
                                              return_N=True, out_dtype=np.uint32)
    return labels, int(count)
