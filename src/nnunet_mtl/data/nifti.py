"""The one reader for every NIfTI file the project opens: it proves the file whole before its voxels are used.

Why not ``sitk.ReadImage`` alone: ITK's NIfTI reader fills a ``.nii.gz`` cut short with zeros when the voxels are
integers (a truncated CT or mask then reads as a valid volume with a zero slab), turns NaN and inf into 0, and
raises exceptions that name no file. So :func:`read_volume`

1. reads the file's bytes once and decompresses a gzip stream to its end, which checks the stream's CRC-32 and
   length (a cut or a flipped byte fails here): libdeflate through imagecodecs (an nnU-Net dependency; 2-3x faster
   than zlib, faster than ITK's own reading), and Python's :mod:`gzip` for what libdeflate refuses (a damaged
   stream, which it then explains, or a multi-member stream); bytes that are not gzip are taken as uncompressed
   NIfTI whatever the file is called, as ITK and nnU-Net take them;
2. parses the header with nibabel (NIfTI-1 or NIfTI-2, either byte order) and requires the data after
   ``vox_offset`` to hold exactly the voxels the header announces;
3. takes geometry (spacing, origin, direction in ITK's LPS convention) and pixel type from ITK's own header reader
   (``ReadImageInformation`` over the verified header bytes, copied to a small temporary file, so ITK never reads
   the file itself), and the voxels from the verified buffer, scaled as ITK scales them (``scl_slope`` 0 or NaN
   counts as 1), so an intact file gives exactly what ``sitk.ReadImage`` gives (the tests compare both over the
   NIfTI data types and scalings);
4. requires a 3D single-channel volume of integers or floats without NaN or inf.

Every failure is a :class:`NiftiError` that names the file and says what is wrong. :func:`read_geometry` is the
header-only variant for files whose voxels are not used (images that only give a reference grid).
"""

from __future__ import annotations

import gzip
import io
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_HEADER_BYTES = 348
NIFTI2_HEADER_BYTES = 540
HEADER_PROBE_BYTES = 64 * 1024  # compressed bytes read by read_geometry to reach the end of the header
ITK_DTYPES = {sitk.sitkUInt8: np.uint8, sitk.sitkInt8: np.int8, sitk.sitkUInt16: np.uint16,
              sitk.sitkInt16: np.int16, sitk.sitkUInt32: np.uint32, sitk.sitkInt32: np.int32,
              sitk.sitkUInt64: np.uint64, sitk.sitkInt64: np.int64, sitk.sitkFloat32: np.float32,
              sitk.sitkFloat64: np.float64}
# First bytes of formats that end up under a .nii.gz name (a renamed file, an error page saved by a download).
OTHER_FORMATS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"PK\x03\x04", "a zip archive"),
                 (b"NRRD", "a NRRD file"), (b"ObjectType", "a MetaImage (.mha) file"), (b"II*\x00", "a TIFF image"),
                 (b"MM\x00*", "a TIFF image"), (b"\x93NUMPY", "a numpy .npy file"), (b"%PDF", "a PDF document"),
                 (b"BZh", "a bzip2 stream"), (b"\xfd7zXZ", "an xz stream"), (b"\x28\xb5\x2f\xfd", "a zstd stream"),
                 (b"<!DOCTYPE", "an HTML page"), (b"<html", "an HTML page"), (b"<?xml", "an XML file"))


class NiftiError(ValueError):
    """A file that is not a whole, usable NIfTI volume; ``problem`` says why without the path."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class Geometry:
    """ITK's view of the header: size, spacing, origin (x, y, z order) and direction, and the voxel type."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    pixel_id: int

    @property
    def pixel_type(self) -> str:
        return sitk.GetPixelIDValueAsString(self.pixel_id)

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Give ``image`` (same size) this file's spacing, origin and direction, exactly."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


@dataclass(frozen=True)
class Volume:
    """A verified 3D volume: ``array`` in z, y, x order and ITK's pixel type (read-only), as
    ``sitk.GetArrayFromImage(sitk.ReadImage(path))`` gives it for an intact file."""

    path: Path
    array: np.ndarray
    geometry: Geometry
    compressed: bool  # a gzip stream (False: uncompressed NIfTI, whatever the file name says)
    file_bytes: bytes | None = None  # the file as read, when asked for (a byte-for-byte copy without a second read)

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.geometry.spacing

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        return tuple(float(s) for s in reversed(self.geometry.spacing))

    def image(self) -> sitk.Image:
        """A SimpleITK image of the voxels with the file's geometry."""
        return self.geometry.apply_to(sitk.GetImageFromArray(self.array))

    def nnunet_input(self) -> tuple[np.ndarray, dict]:
        """What nnU-Net's ``SimpleITKIO().read_images([path])`` returns for this file (same array, dtype and
        properties), so its preprocessor's ``run_case_npy`` can take the verified voxels without reading again."""
        spacing = self.geometry.spacing
        properties = {"sitk_stuff": {"spacing": spacing, "origin": self.geometry.origin,
                                     "direction": self.geometry.direction},
                      "spacing": list(np.abs(list(spacing)[::-1]))}
        return np.vstack([self.array[None]], dtype=np.float32, casting="unsafe"), properties


def read_volume(path: Path | str, what: str = "volume", keep_file_bytes: bool = False) -> Volume:
    """Read and verify a NIfTI volume (see the module docstring); raises :class:`NiftiError`."""
    path = Path(path)
    data = _read_bytes(path)
    compressed = data[:2] == GZIP_MAGIC
    raw = _gunzip_fast(data) if compressed else None
    if raw is None or raw[:2] == GZIP_MAGIC:
        raw = _gunzip(path, data) if compressed else data
    header, offset, shape, dtype = _parse_header(path, raw, compressed)
    n_voxels = int(np.prod(shape, dtype=np.int64))
    expected = offset + n_voxels * dtype.itemsize
    if compressed and len(raw) != expected:
        raw = _gunzip(path, data)  # libdeflate reads the first member of a multi-member stream only
    stored = "decompressed stream" if compressed else "file"
    if len(raw) < expected:
        raise NiftiError(path, f"is cut short: its header announces {_shape(shape)} voxels of {dtype.name} "
                               f"({n_voxels * dtype.itemsize} bytes from byte {offset}), the {stored} holds "
                               f"{max(len(raw) - offset, 0)} of them (an interrupted copy or download?)")
    if len(raw) > expected:
        raise NiftiError(path, f"holds {len(raw) - expected} bytes beyond the {_shape(shape)} voxels of "
                               f"{dtype.name} its header announces: header and data disagree")
    geometry, components = _itk_header(path, raw[:offset])
    _check_volume(path, what, geometry, components, dtype)
    if int(np.prod(geometry.size)) != n_voxels:
        raise NiftiError(path, f"ITK reads {list(geometry.size)} voxels where the header announces {_shape(shape)}")
    voxels = np.frombuffer(raw, dtype=dtype, count=n_voxels, offset=offset).reshape(geometry.size[::-1])
    array = _as_itk_reads(voxels, header, ITK_DTYPES[geometry.pixel_id])
    array.flags.writeable = False
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            kinds = sorted({"NaN" if np.isnan(v) else repr(float(v)) for v in np.unique(array[bad])})
            raise NiftiError(path, f"{what} holds {int(bad.sum())} non-finite voxels ({', '.join(kinds)})")
    return Volume(path, array, geometry, compressed, data if keep_file_bytes else None)


def read_geometry(path: Path | str, what: str = "volume") -> Geometry:
    """Header only, for files whose voxels are not used (an image that gives a reference grid): a NIfTI header,
    checked as :func:`read_volume` checks it, of a 3D single-channel volume. The geometry depends on the header
    bytes only, so damage further on (not seen here) cannot change it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(HEADER_PROBE_BYTES)
    except OSError as e:
        raise NiftiError(path, f"cannot be read ({e.strerror or e})") from None
    if not data:
        raise NiftiError(path, "is empty (0 bytes)")
    compressed = data[:2] == GZIP_MAGIC
    if compressed:
        # inflate no further than the header needs, so damage further on cannot stop the reading
        stream = zlib.decompressobj(wbits=31)
        try:
            head = stream.decompress(data, NIFTI2_HEADER_BYTES)
            _, offset, _, _ = _parse_header(path, head, compressed, header_only=True)
            if offset > len(head):
                head += stream.decompress(stream.unconsumed_tail, offset - len(head))
        except zlib.error as e:
            raise NiftiError(path, f"has a damaged gzip stream ({e})") from None
        data = head
    header, offset, _, dtype = _parse_header(path, data, compressed, header_only=True)
    if len(data) < offset:
        raise NiftiError(path, f"is cut short inside its NIfTI header and extensions ({len(data)} of {offset} "
                               "bytes)")
    geometry, components = _itk_header(path, data[:offset])
    _check_volume(path, what, geometry, components, dtype)
    return geometry


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise NiftiError(path, f"cannot be read ({e.strerror or e})") from None
    if not data:
        raise NiftiError(path, "is empty (0 bytes)")
    return data


def _gunzip_fast(data: bytes) -> bytes | None:
    """libdeflate's gzip decoder (CRC-32 and length checked); None when it refuses or is not installed."""
    try:
        import imagecodecs

        return imagecodecs.gzip_decode(data)
    except Exception:  # damaged, multi-member or over 4 GiB: Python's gzip decides and explains
        return None


def _gunzip(path: Path, data: bytes) -> bytes:
    """The whole gzip stream; Python's gzip checks CRC-32 and length at the end of every member."""
    try:
        raw = gzip.decompress(data)
    except EOFError:
        raise NiftiError(path, "is cut short or damaged: its gzip stream ends before its end marker (an "
                               "interrupted copy or download?)") from None
    except gzip.BadGzipFile as e:
        reason = str(e)
        if "CRC" in reason or "length" in reason.lower():
            raise NiftiError(path, f"fails the gzip integrity check ({reason}): bytes were changed") from None
        if reason.startswith("Not a gzipped file"):
            raise NiftiError(path, "holds bytes after the end of its gzip stream that are not gzip (appended or "
                                   "damaged data)") from None
        raise NiftiError(path, f"is not a valid gzip stream ({reason})") from None
    except zlib.error as e:
        raise NiftiError(path, f"has a damaged gzip stream ({e})") from None
    if raw[:2] == GZIP_MAGIC:
        raise NiftiError(path, "is gzip-compressed twice (decompressed once it is still gzip)")
    return raw


def _parse_header(path: Path, raw: bytes, compressed: bool, header_only: bool = False):
    """nibabel's header of a single-file NIfTI-1 or NIfTI-2; returns (header, data offset, shape, dtype)."""
    import nibabel as nib

    sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")} if len(raw) >= 4 else set()
    if NIFTI1_HEADER_BYTES in sizes:
        header_class, header_bytes, magics = nib.Nifti1Header, NIFTI1_HEADER_BYTES, (b"n+1", b"ni1")
    elif NIFTI2_HEADER_BYTES in sizes:
        header_class, header_bytes, magics = nib.Nifti2Header, NIFTI2_HEADER_BYTES, (b"n+2", b"ni2")
    else:
        inside = " inside its gzip stream" if compressed else ""
        raise NiftiError(path, f"is not a NIfTI file{inside} ({_guess_format(raw)})")
    if len(raw) < header_bytes:
        raise NiftiError(path, f"is cut short inside its NIfTI header ({len(raw)} of {header_bytes} bytes)")
    try:
        header = header_class.from_fileobj(io.BytesIO(raw if not header_only else raw[:header_bytes]), check=False)
        magic = bytes(header["magic"].item()).split(b"\x00")[0]
        if magic == magics[1]:
            raise NiftiError(path, "is the header of a .hdr/.img pair: its voxels are in another file; save the "
                                   "volume as a single .nii.gz")
        if magic != magics[0]:
            raise NiftiError(path, f"has no NIfTI magic (found {magic!r}: an Analyze 7.5 header or damaged bytes)")
        shape = header.get_data_shape()
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
    except NiftiError:
        raise
    except Exception as e:  # nibabel raises several types for damaged fields; all mean the same to the user
        raise NiftiError(path, f"has a damaged NIfTI header ({e})") from None
    if offset < header_bytes:
        raise NiftiError(path, f"has a damaged NIfTI header (voxel data offset {offset} lies inside the header)")
    if not shape or min(shape) < 1:
        raise NiftiError(path, f"holds no voxels (dimensions {list(shape)})")
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise NiftiError(path, f"stores voxels as {dtype}, expected integers or floats (one value per voxel)")
    return header, offset, shape, dtype


def _guess_format(raw: bytes) -> str:
    if len(raw) >= 132 and raw[128:132] == b"DICM":
        return "it looks like a DICOM file"
    for magic, name in OTHER_FORMATS:
        if raw[: len(magic)].lower() == magic.lower():
            return f"it looks like {name}"
    return f"no NIfTI header; first bytes {raw[:8]!r}"


def _itk_header(path: Path, header_bytes: bytes) -> tuple[Geometry, int]:
    """ITK's reading of the header (geometry in its conventions, pixel type, dimensions), from the verified header
    bytes in a temporary file (ITK reads only the header from it, and nothing of the damaged region of a file)."""
    with tempfile.TemporaryDirectory(prefix="nnunet-mtl-header-") as folder:
        header_file = Path(folder) / "header.nii"
        header_file.write_bytes(header_bytes)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(header_file))
        reader.SetImageIO("NiftiImageIO")
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            reason = re.sub(r"^.*?ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", lines[-1]) if lines else "no reason given"
            reason = reason.replace(str(header_file), "the file")
            raise NiftiError(path, f"ITK cannot read its header ({reason})") from None
    geometry = Geometry(tuple(int(s) for s in reader.GetSize()), tuple(reader.GetSpacing()),
                        tuple(reader.GetOrigin()), tuple(reader.GetDirection()), int(reader.GetPixelID()))
    return geometry, int(reader.GetNumberOfComponents())


def _check_volume(path: Path, what: str, geometry: Geometry, components: int, dtype: np.dtype) -> None:
    if len(geometry.size) != 3:
        raise NiftiError(path, f"{what} is {len(geometry.size)}D (size {list(geometry.size)}), expected 3D")
    if components != 1:
        raise NiftiError(path, f"{what} has {components} components per voxel, expected a single channel")
    if geometry.pixel_id not in ITK_DTYPES:
        raise NiftiError(path, f"{what} stores voxels as {geometry.pixel_type} ({dtype}), expected integers or "
                               "floats")


def _as_itk_reads(voxels: np.ndarray, header, itk_dtype: type) -> np.ndarray:
    """The stored voxels as ITK's NIfTI reader returns them: native byte order, scaled by ``scl_slope`` and
    ``scl_inter`` unless that is the identity (slope 0 or NaN counts as 1, a NaN intercept as 0), in double
    precision from the stored value (integers go through float32, as ITK's buffer is float32 for them)."""
    slope, intercept = float(header["scl_slope"]), float(header["scl_inter"])
    slope = 1.0 if slope == 0 or np.isnan(slope) else slope
    intercept = 0.0 if np.isnan(intercept) else intercept
    if slope == 1.0 and intercept == 0.0:
        return voxels.astype(itk_dtype, copy=False) if voxels.dtype.isnative else voxels.astype(itk_dtype)
    if voxels.dtype.kind != "f" or voxels.dtype.itemsize == 4:
        voxels = voxels.astype(np.float32)
    return (voxels.astype(np.float64) * slope + intercept).astype(itk_dtype)


def _shape(shape: tuple[int, ...]) -> str:
    return " x ".join(str(s) for s in shape)
