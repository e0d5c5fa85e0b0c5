"""Image and dataset I/O: the only place where SimpleITK's (x, y, z) order appears."""

from dscovid.io.image_io import Geometry, read_image, read_mask, write_image

__all__ = ["Geometry", "read_image", "read_mask", "write_image"]
