"""Reading and writing CT volumes and masks with SimpleITK, in one axis order: (z, y, x).

Arrays handed to the rest of dscovid are numpy arrays indexed ``[z, y, x]``. Their geometry travels
beside them as a :class:`Geometry` in SimpleITK's physical conventions (LPS world coordinates in mm;
``origin_xyz_mm`` is the centre of voxel (0, 0, 0); ``direction`` is the 3×3 matrix, flattened row by
row, whose columns are the world directions of the x, y and z index axes). Conversion to and from
SimpleITK's (x, y, z) order happens here and nowhere else.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dscovid.errors import DscovidError
from dscovid.io import atomic
from dscovid.io.atomic import atomic_path, check_size, incomplete_write, make_folder, scratch_path
from dscovid.io.parallel_gzip import gzip_stream

log = logging.getLogger(__name__)

#: File endings SimpleITK reads as one volume (a folder is read as a DICOM series).
VOLUME_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")

#: A CT whose lowest value is above this cannot contain air in Hounsfield units (air is about -1000 HU).
_HU_AIR_CEILING = -500.0


@dataclass(frozen=True)
class Geometry:
    """Where a (z, y, x) voxel array sits in the world.

    Attributes
    ----------
    shape_zyx : voxel counts along z, y, x.
    spacing_zyx_mm : voxel spacing in mm along z, y, x.
    origin_xyz_mm : world position (LPS, mm) of the centre of voxel (0, 0, 0).
    direction : 9 numbers, the 3×3 direction matrix row by row (SimpleITK's ``GetDirection``).
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        size = image.GetSize()
        spacing = image.GetSpacing()
        return cls(
            shape_zyx=(int(size[2]), int(size[1]), int(size[0])),
            spacing_zyx_mm=(float(spacing[2]), float(spacing[1]), float(spacing[0])),
            origin_xyz_mm=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        return cls(
            shape_zyx=tuple(int(v) for v in data["shape_zyx"]),
            spacing_zyx_mm=tuple(float(v) for v in data["spacing_zyx_mm"]),
            origin_xyz_mm=tuple(float(v) for v in data["origin_xyz_mm"]),
            direction=tuple(float(v) for v in data["direction"]),
        )

    def to_dict(self) -> dict:
        return {key: list(value) for key, value in asdict(self).items()}

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set spacing, origin and direction of ``image`` (whose size must match) and return it."""
        image.SetSpacing(tuple(reversed(self.spacing_zyx_mm)))
        image.SetOrigin(self.origin_xyz_mm)
        image.SetDirection(self.direction)
        return image

    @property
    def direction_matrix(self) -> np.ndarray:
        """The 3×3 direction matrix; column k is the world direction of index axis k in (x, y, z) order."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_world_matrix(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous (z, y, x, 1) voxel indices to homogeneous (x, y, z, 1) world mm (LPS)."""
        linear_xyz = self.direction_matrix * np.asarray(tuple(reversed(self.spacing_zyx_mm)))[None, :]
        matrix = np.eye(4)
        matrix[:3, :3] = linear_xyz[:, ::-1]  # columns reordered so the input is (z, y, x)
        matrix[:3, 3] = self.origin_xyz_mm
        return matrix

    def matches(self, other: Geometry, tolerance_mm: float = 1e-3, tolerance_direction: float = 1e-4) -> bool:
        """True when both describe the same voxel grid within the tolerances."""
        return (
            self.shape_zyx == other.shape_zyx
            and np.allclose(self.spacing_zyx_mm, other.spacing_zyx_mm, atol=tolerance_mm)
            and np.allclose(self.origin_xyz_mm, other.origin_xyz_mm, atol=tolerance_mm)
            and np.allclose(self.direction, other.direction, atol=tolerance_direction)
        )

    def describe_difference(self, other: Geometry) -> str:
        """A short human-readable account of how ``other`` differs from this geometry."""
        parts = []
        if self.shape_zyx != other.shape_zyx:
            parts.append(f"shape {other.shape_zyx} != {self.shape_zyx}")
        if not np.allclose(self.spacing_zyx_mm, other.spacing_zyx_mm, atol=1e-3):
            parts.append(f"spacing {_fmt(other.spacing_zyx_mm)} != {_fmt(self.spacing_zyx_mm)}")
        if not np.allclose(self.origin_xyz_mm, other.origin_xyz_mm, atol=1e-3):
            parts.append(f"origin {_fmt(other.origin_xyz_mm)} != {_fmt(self.origin_xyz_mm)}")
        if not np.allclose(self.direction, other.direction, atol=1e-4):
            parts.append("direction differs")
        return ", ".join(parts) or "identical"


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and any(name.endswith(ending) for ending in VOLUME_ENDINGS)


def strip_ending(path: Path | str) -> str:
    """The file name without its volume ending (``case_0000.nii.gz`` → ``case_0000``)."""
    name = Path(path).name
    for ending in VOLUME_ENDINGS + (".dcm",):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return name


def dicom_series_files(folder: str | os.PathLike) -> list[Path]:
    """The files of the DICOM series dscovid reads from ``folder``, in the order of the volume's slices.

    The series with most files is chosen when the folder holds several (with a warning). GDCM sorts the files along
    the slice normal, so file ``k`` is slice ``k`` (array index ``[k]``) of the volume :func:`read_image` returns.
    """
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    try:
        series_ids = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as error:
        raise DscovidError(f"{folder}: cannot list DICOM series ({_first_line(error)})") from None
    if not series_ids:
        raise DscovidError(f"{folder}: no DICOM series found in this folder")
    files_per_series = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    chosen = max(series_ids, key=lambda sid: len(files_per_series[sid]))
    if len(series_ids) > 1:
        log.warning("%s: %d DICOM series found; using %s (the one with most slices)",
                    folder, len(series_ids), describe_series(chosen, files_per_series[chosen]))
    return [Path(name) for name in files_per_series[chosen]]


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(name) for name in dicom_series_files(folder)])
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise DscovidError(f"{folder}: cannot read the DICOM series ({_first_line(error)})") from None


def describe_series(series_id: str, files: Sequence[str]) -> str:
    """A DICOM series in words: its SeriesInstanceUID (or, where the files have none, its description), the
    number of slices and the first file."""
    first = Path(files[0]).name if files else "no file"
    if series_id.strip():
        return f"series {series_id.strip()} ({len(files)} slices, first file {first})"
    description = ""
    try:
        header = sitk.ImageFileReader()
        header.SetFileName(str(files[0]))
        header.ReadImageInformation()
        if header.HasMetaDataKey("0008|103e"):
            description = header.GetMetaData("0008|103e").strip()
    except (RuntimeError, IndexError):
        pass
    named = f' "{description}"' if description else ""
    return f"the series{named} without a SeriesInstanceUID ({len(files)} slices, first file {first})"


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # SimpleITK puts the useful sentence last ("... Exception thrown in ...: <reason>").
    return lines[-1][:200] if lines else type(error).__name__


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a complete NIfTI-1/2 file holds (header offset + voxel data), or None if this is not NIfTI."""
    if len(header) < 4:
        return None
    for order in "<>":
        (size,) = struct.unpack(order + "i", header[:4])
        if size == 348 and len(header) >= 112:
            dims = struct.unpack(order + "8h", header[40:56])
            (bitpix,) = struct.unpack(order + "h", header[72:74])
            (offset,) = struct.unpack(order + "f", header[108:112])
        elif size == 540 and len(header) >= 176:
            (bitpix,) = struct.unpack(order + "h", header[14:16])
            dims = struct.unpack(order + "8q", header[16:80])
            (offset,) = struct.unpack(order + "q", header[168:176])
        else:
            continue
        count = 1
        for extent in dims[1 : 1 + max(0, min(int(dims[0]), 7))]:
            count *= max(int(extent), 1)
        return int(offset) + count * int(bitpix) // 8
    return None


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _nifti_nonfinite_count(path: Path) -> int:
    """NaN/inf voxels stored in a floating-point NIfTI file.

    ITK's NIfTI reader hands NaN voxels over as 0, so they must be counted in the file itself.
    """
    name = path.name.lower()
    opener = gzip.open if name.endswith(".nii.gz") else open if name.endswith(".nii") else None
    if opener is None:
        return 0
    with opener(path, "rb") as stream:
        header = stream.read(540)
        for order in "<>":
            (size,) = struct.unpack(order + "i", header[:4])
            if size == 348:
                (datatype,) = struct.unpack(order + "h", header[70:72])
                offset = int(struct.unpack(order + "f", header[108:112])[0])
                break
            if size == 540:
                (datatype,) = struct.unpack(order + "h", header[12:14])
                (offset,) = struct.unpack(order + "q", header[168:176])
                break
        else:
            return 0
        if datatype not in _NIFTI_FLOAT_TYPES:
            return 0
        stream.seek(offset)
        data = np.frombuffer(stream.read(), dtype=order + _NIFTI_FLOAT_TYPES[datatype])
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def scan_gzip(path: Path) -> tuple[int, str | None]:
    """Decompress a gzip file as a stream, without keeping it: (payload bytes recovered, problem or None).

    Every member's CRC-32 and length are checked (zlib does it at each member's end); the problem is
    ``"truncated"`` when the file ends inside a member, else the decompressor's complaint. Memory stays bounded
    (16 MiB of output at a time) whatever the compression ratio.
    """
    total = 0
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    started = False
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                while chunk:
                    if decompressor.eof:  # the next member of a multi-member file
                        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    started = True
                    total += len(decompressor.decompress(chunk, 1 << 24))
                    chunk = decompressor.unconsumed_tail or decompressor.unused_data
                    if decompressor.eof and chunk.strip(b"\0") == b"":
                        chunk = b""  # zero padding after the last member is not data
    except zlib.error as error:
        return total, f"corrupt gzip data ({error})"
    if not started:
        return 0, "empty file"
    return total, None if decompressor.eof else "truncated"


def _nifti_header(path: Path) -> bytes:
    """The first 540 bytes of a NIfTI file's content (decompressed for ``.nii.gz``; fewer when it is shorter)."""
    if path.name.lower().endswith(".nii.gz"):
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        with open(path, "rb") as stream:
            head = b""
            while len(head) < 540 and (chunk := stream.read(1 << 16)):
                try:
                    head += decompressor.decompress(chunk, 540 - len(head))
                except zlib.error:
                    break
            return head
    with open(path, "rb") as stream:
        return stream.read(540)


def _check_nifti_complete(path: Path) -> None:
    """SimpleITK pads a truncated NIfTI with zeros instead of failing: compare the data size with the header."""
    problem = nifti_file_problem(path, full=False)
    if problem is not None:
        raise DscovidError(f"{path}: {problem}")


def nifti_file_problem(path: Path, full: bool = True) -> str | None:
    """Why a NIfTI file is not whole, or None (other formats: None).

    ``.nii``: the file must hold the header's voxel data. ``.nii.gz``: the decompressed payload must, and with
    ``full`` (or when the gzip trailer's length disagrees) the whole stream is decompressed and its CRC checked.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    expected = _nifti_expected_bytes(_nifti_header(path))
    if name.endswith(".nii"):
        actual = path.stat().st_size
        if expected is not None and actual < expected:
            return f"the file is truncated ({actual} of {expected} bytes of image data)"
        return None
    if not full and expected is not None:
        # The gzip trailer holds the uncompressed size (mod 2**32): a whole file agrees, and reading stops here.
        with open(path, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            if stream.tell() >= 18:
                stream.seek(-4, os.SEEK_END)
                if struct.unpack("<I", stream.read(4))[0] == expected % 2**32:
                    return None
    actual, problem = scan_gzip(path)
    if expected is None:
        return f"the gzip stream is {problem} ({actual} bytes could be decompressed)" if problem else None
    if actual < expected:
        cause = "truncated" if problem in (None, "truncated") else problem
        return f"the file is {cause} ({actual} of {expected} bytes of image data)"
    if problem is not None:
        return f"the gzip stream is {problem}"
    return None


def read_sitk(path: str | os.PathLike) -> sitk.Image:
    """Read a volume file or a folder holding a DICOM series as a SimpleITK image, refusing unreadable input."""
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(path)
    if not path.exists():
        raise DscovidError(f"{path}: no such file or folder")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DscovidError(f"{path}: cannot read the image, the file is unreadable or truncated ({_first_line(error)})") from None
    _check_nifti_complete(path)
    return image


def _check_dimensions(image: sitk.Image, path: Path) -> None:
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 3 and image.GetNumberOfComponentsPerPixel() == 1 and min(size) > 1:
        return
    if dim == 2 or (dim == 3 and min(size) == 1):
        raise DscovidError(f"{path}: is a 2D image of size {'x'.join(map(str, size))}; a 3D CT volume is required")
    if dim > 3:
        raise DscovidError(f"{path}: is a {dim}D image of size {'x'.join(map(str, size))}; a 3D CT volume is required")
    if image.GetNumberOfComponentsPerPixel() != 1:
        components = image.GetNumberOfComponentsPerPixel()
        raise DscovidError(f"{path}: has {components} components per voxel; a grey-level CT is required")
    raise DscovidError(f"{path}: unsupported image of dimension {dim}")


def check_hounsfield(array: np.ndarray, path: Path | str) -> None:
    """Refuse intensities that cannot be Hounsfield units: NaN/inf, or no voxel anywhere near air (-1000 HU)."""
    finite = np.isfinite(array)
    if not finite.all():
        raise DscovidError(f"{path}: contains {int((~finite).sum())} NaN or infinite voxels")
    low, high = float(array.min()), float(array.max())
    if low > _HU_AIR_CEILING:
        raise DscovidError(
            f"{path}: intensities range {low:g}..{high:g} do not look like Hounsfield units "
            f"(air should be near -1000 HU; rescale the image to HU first)"
        )


def read_image(path: str | os.PathLike, check_hu: bool = True) -> tuple[np.ndarray, Geometry]:
    """Read a CT volume (any SimpleITK format, or a DICOM series folder) as a (z, y, x) array and its geometry.

    Parameters
    ----------
    path : a volume file (``.nii.gz``, ``.mha``, ``.nrrd``, ...) or a folder holding one or more DICOM series
        (the series with most slices is taken, with a warning).
    check_hu : refuse images that are not in Hounsfield units (see :func:`check_hounsfield`).

    Returns
    -------
    array : float32 or integer array ``[z, y, x]`` in HU (the file's own data type where it is integral).
    geometry : the voxel grid of the array.

    Raises
    ------
    DscovidError
        One line naming the file for unreadable or truncated files, 2D or 4D images, NaN/infinite
        voxels, and (with ``check_hu``) intensities that are not Hounsfield units.
    """
    path = Path(path)
    image = read_sitk(path)
    _check_dimensions(image, path)
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        nonfinite = int(array.size - np.count_nonzero(np.isfinite(array))) or _nifti_nonfinite_count(path)
        if nonfinite:
            raise DscovidError(f"{path}: contains {nonfinite} NaN or infinite voxels")
    if check_hu:
        check_hounsfield(array, path)
    return array, Geometry.of(image)


def read_mask(path: str | os.PathLike, reference: Geometry | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a 0/1 mask as a uint8 (z, y, x) array; with ``reference``, refuse a mask on another grid."""
    path = Path(path)
    image = read_sitk(path)
    _check_dimensions(image, path)
    array = sitk.GetArrayFromImage(image)
    geometry = Geometry.of(image)
    if reference is not None and not reference.matches(geometry):
        raise DscovidError(f"{path}: geometry does not match its image ({reference.describe_difference(geometry)})")
    if array.dtype.kind == "f" and (not np.isfinite(array).all() or _nifti_nonfinite_count(path)):
        raise DscovidError(f"{path}: contains NaN or infinite voxels")
    values = np.unique(array)
    if not np.isin(values, (0, 1)).all():
        shown = ", ".join(f"{v:g}" for v in values[:8])
        raise DscovidError(f"{path}: mask values must be 0 or 1, found {shown}{'...' if len(values) > 8 else ''}")
    return array.astype(np.uint8), geometry


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """Wrap a (z, y, x) array as a SimpleITK image carrying ``geometry`` (shapes must agree)."""
    if tuple(array.shape) != tuple(geometry.shape_zyx):
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape_zyx}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))


def uint8_scaling(low: float, high: float) -> tuple[float, float]:
    """``(slope, intercept)`` for storing values in ``[low, high]`` as uint8 codes ``q``: value ≈ ``q·slope + intercept``.

    The range is widened to hold 0, and 0 is exactly representable (the code ``-intercept / slope`` reads back as
    exactly 0.0, also in float32: the slope keeps 16 significant bits, so every ``k·slope`` with ``|k| <= 255`` is a
    float32). Any value of the range is stored within ``slope / 2`` (at most 1/508 of the range).
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if not high > low:
        return 1.0, 0.0
    mantissa, exponent = math.frexp((high - low) / 254.0)  # one spare code: the rounding up below never runs short
    slope = math.ldexp(math.ceil(mantissa * 2**16) / 2**16, exponent)
    zero_code = math.ceil(-low / slope)
    return slope, -zero_code * slope


def quantize_uint8(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """The uint8 codes of ``values`` under :func:`uint8_scaling`'s ``(slope, intercept)`` (nearest code, clipped)."""
    codes = np.subtract(values, np.float32(intercept), dtype=np.float32)
    codes /= np.float32(slope)
    np.rint(codes, out=codes)
    np.clip(codes, 0, 255, out=codes)
    return codes.astype(np.uint8)


#: zlib level of the gzip of a scaled NIfTI (:func:`write_image` with ``scaling``); the choice: docs/prediction.md.
SCALED_GZIP_LEVEL = 1
#: Threads of that gzip (None: every CPU this process may use; :func:`dscovid.io.parallel_gzip.default_threads`).
GZIP_THREADS: int | None = None


def write_image(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True,
                scaling: tuple[float, float] | None = None) -> Path:
    """Write a (z, y, x) array with ``geometry`` to ``path`` atomically, verified before the rename.

    ITK's writer does not fail on a full disk (it prints a warning and leaves a short file), so what it wrote is
    read back before the temporary file takes the final name: a NIfTI file's size against its header, a gzip
    stream decompressed whole with its CRC and length, other formats read back and compared voxel by voxel.
    Header + data pairs (``.mhd``, ``.nhdr``) are written into a hidden temporary folder and moved data first,
    header last.

    ``scaling`` ``(slope, intercept)`` (NIfTI only): the file stores ``array`` (integer codes, e.g. from
    :func:`quantize_uint8`) with ``scl_slope`` and ``scl_inter`` in its header, so readers (ITK, SimpleITK,
    nibabel) see float32 ``array·slope + intercept``. ITK cannot write them: it writes the uncompressed file, its
    size is checked against its header, the two header fields are set, and the file is gzipped here
    (:mod:`dscovid.io.parallel_gzip`, every write checked, the size on disk checked).

    Raises
    ------
    DscovidError
        One line naming ``path``: ``disk full``, no permission, read-only file system, or a file written
        incomplete; nothing is left under ``path`` or under a temporary name.
    """
    path = Path(path)
    image = to_sitk(array, geometry)
    ending = next((e for e in VOLUME_ENDINGS if path.name.lower().endswith(e)), path.suffix)
    if scaling is not None:
        if ending not in (".nii", ".nii.gz"):
            raise ValueError(f"{path}: a scaled image can only be written as NIfTI (.nii, .nii.gz)")
        return _write_scaled_nifti(image, path, compress and ending == ".nii.gz", scaling)
    if ending in (".mhd", ".nhdr"):  # header + data pairs cannot be renamed as one file
        return _write_header_and_data(image, array, path, compress)

    def verify(temporary: Path) -> None:
        _verify_written(temporary, array, path)

    with atomic_path(path, suffix=ending, verify=verify) as temporary:
        _sitk_write(image, temporary, compress, path)
    return path


def _write_scaled_nifti(image: sitk.Image, path: Path, compress: bool, scaling: tuple[float, float]) -> Path:
    slope, intercept = (float(v) for v in scaling)
    with atomic_path(path, suffix=".nii.gz" if compress else ".nii") as temporary:
        with scratch_path(path, suffix=".nii") as plain:
            target = plain if compress else temporary
            _sitk_write(image, target, False, path)
            problem = nifti_file_problem(target, full=False)
            if problem is not None or target.stat().st_size == 0:
                raise incomplete_write(path, target, problem or "0 bytes written")
            with open(target, "r+b") as stream:
                header = stream.read(4)
                order = next((o for o in "<>" if struct.unpack(o + "i", header)[0] == 348), None)
                if order is None:
                    raise DscovidError(f"{path}: cannot write (ITK wrote no NIfTI-1 header)")
                stream.seek(112)  # scl_slope, scl_inter: two float32 of the NIfTI-1 header
                stream.write(struct.pack(order + "ff", slope, intercept))
            if compress:
                with open(plain, "rb") as source, atomic.open_for_writing(temporary) as stream:  # fault tests replace it
                    written = gzip_stream(source, stream, SCALED_GZIP_LEVEL, GZIP_THREADS)
                check_size(temporary, written, path)
    return path


def _sitk_write(image: sitk.Image, temporary: Path, compress: bool, target: Path) -> None:
    try:
        sitk.WriteImage(image, str(temporary), compress)
    except RuntimeError as error:
        raise incomplete_write(target, temporary, _first_line(error)) from None


def _verify_written(temporary: Path, array: np.ndarray, target: Path) -> None:
    """Raise when the file ITK wrote at ``temporary`` does not hold ``array`` whole."""
    if not temporary.exists() or temporary.stat().st_size == 0:
        raise incomplete_write(target, temporary, "0 bytes written")
    if temporary.name.lower().endswith((".nii", ".nii.gz")):
        problem = nifti_file_problem(temporary, full=True)
    else:
        try:
            read_back = sitk.ReadImage(str(temporary))  # kept alive while its array view is compared
            written = sitk.GetArrayViewFromImage(read_back)
            same = written.shape == array.shape and np.array_equal(written, array, equal_nan=array.dtype.kind == "f")
            problem = None if same else "the voxels read back differ from those written"
        except RuntimeError as error:
            problem = f"cannot be read back ({_first_line(error)})"
    if problem is not None:
        raise incomplete_write(target, temporary, problem)


def _write_header_and_data(image: sitk.Image, array: np.ndarray, path: Path, compress: bool) -> Path:
    """Write a header + data pair into a hidden folder beside ``path``, check it, then move data first, header last.

    A reader opens the header, so until the header arrives under its final name no reader sees the pair.
    """
    import shutil
    import tempfile

    make_folder(path.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        _sitk_write(image, staged, compress, path)
        _verify_written(staged, array, path)
        for produced in sorted(staging.iterdir(), key=lambda p: p.name == path.name):  # the header last
            os.replace(produced, path.parent / produced.name)
    except OSError as error:
        from dscovid.io.atomic import write_error

        raise write_error(path, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
