"""DICOM CT loading: one slice (`read_hu`) or one study folder (`load_series`), in Hounsfield units.

Two decoders stand behind one API:
- ``"pydicom"``: the reference (``pydicom.pixels`` with the pylibjpeg plugins).
- ``"dicomsdl"``: the fast path (C++ parser and codecs).
- ``"auto"``: dicomsdl where it is known to give the reference's values, pydicom everywhere else
  (enhanced multi-frame files, JPEG 2000 whose codestream signedness differs from PixelRepresentation,
  transfer syntaxes not verified bit-exact, files dicomsdl cannot parse).

Every failure is a `DicomError` (a ValueError) whose message names the file and the reason.

    python -c "from cspine.dicom import load_series; s = load_series('input/.../train_images/<uid>'); print(s)"
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing as mp
import os
import sys
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Backend = Literal["auto", "pydicom", "dicomsdl"]
OnError = Literal["raise", "skip"]

# Transfer syntaxes on which dicomsdl's stored values equal pydicom's, bit for bit (verified by the tests
# on real files). Lossy syntaxes are left to the reference: two codecs may round differently.
FAST_PATH_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless P14",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
}
JPEG2000_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
ENHANCED_CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2.1"
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
GANTRY_TILT_TOLERANCE_DEG = 0.5  # steps between positions this far off the slice normal count as a tilt
SPACING_TOLERANCE = 0.1  # relative deviation from the median step that counts as non-uniform
# Syntaxes whose decoding is memory-bound (about 1 ms a 512² slice): processes would not pay for themselves.
# Every other syntax on the fast path (JPEG Lossless ~2.3 ms, JPEG-LS, JPEG 2000 ~40 ms) is codec-bound.
LIGHT_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"}
PROCESS_DECODE_MIN_SLICES = 16  # fewer slices do not repay starting the processes


class DicomError(ValueError):
    """A DICOM file or study that cannot be read; the message names the file and the reason."""


@dataclass
class Series:
    """One CT study as a volume, head to feet.

    Attributes:
        hu: float32 [N, H, W], Hounsfield units, slice 0 nearest the head.
        slice_numbers: int64 [N], the number in each file's name (``<n>.dcm``), in the order of ``hu``.
        positions: float64 [N, 3], ImagePositionPatient in mm (NaN where absent).
        spacing: (dz, dy, dx) in mm; dz is the median step between positions along the slice normal.
        uid: StudyInstanceUID (the folder name when the header has none).
        paths: source file of each slice, in the order of ``hu``.
        orientation: float64 [6], ImageOrientationPatient (row then column direction cosines).
        skipped: files left out under ``on_error="skip"``, with the reason.
    """

    hu: np.ndarray
    slice_numbers: np.ndarray
    positions: np.ndarray
    spacing: tuple[float, float, float]
    uid: str
    paths: list[Path]
    orientation: np.ndarray = field(default_factory=lambda: np.array([1.0, 0, 0, 0, 1.0, 0]))
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.hu.shape[0])

    def __repr__(self) -> str:
        n, h, w = self.hu.shape
        dz, dy, dx = self.spacing
        return (
            f"Series(uid={self.uid!r}, slices={n}, shape={h}x{w}, "
            f"spacing=({dz:.3g}, {dy:.3g}, {dx:.3g}) mm, skipped={len(self.skipped)})"
        )


@dataclass
class _Slice:
    """One file's header, and its pixels or the means to decode them (internal).

    pydicom slices are decoded when opened; dicomsdl slices keep their parsed dataset and decode later,
    straight into their place in the study's volume (no per-slice float array, no stacking copy).
    """

    path: Path
    shape: tuple[int, ...]  # (H, W), or (F, H, W) for a multi-frame file
    slope: float | np.ndarray | None  # None: missing, zero or not finite in the header (`_repair_rescale`)
    intercept: float | np.ndarray | None  # None: missing or not finite
    position: np.ndarray | None
    orientation: np.ndarray | None
    instance_number: int | None
    pixel_spacing: tuple[float, float] | None
    study_uid: str | None
    series_uid: str | None = None
    decoder: str = "pydicom"
    stored: np.ndarray | None = None  # pydicom: decoded stored values
    dataset: object = None  # dicomsdl: the parsed DataSet
    bits_stored: int = 16
    signed: bool = False
    syntax: str = ""  # dicomsdl: the transfer syntax UID (whether decoding is codec-bound)

    def _stored(self) -> np.ndarray:
        if self.stored is not None:
            return self.stored
        try:
            stored = self.dataset.pixelData(storedvalue=True)
        except Exception as exc:
            raise _fail(
                self.path,
                f"dicomsdl cannot decode the pixel data ({type(exc).__name__}: {str(exc).strip()[:200]})",
            ) from None
        if stored is None:
            raise _fail(self.path, "no pixel data")
        if stored.dtype.kind in "iu":
            stored = _fix_unused_bits(stored, self.bits_stored, self.signed)
        return stored

    def hu_into(self, out: np.ndarray) -> None:
        """Writes HU (stored × slope + intercept) into ``out`` (float32, this slice's shape)."""
        stored = self._stored()
        slope = np.asarray(self.slope, dtype=np.float32)
        intercept = np.asarray(self.intercept, dtype=np.float32)
        if stored.ndim == 3 and slope.ndim == 1:
            slope, intercept = slope[:, None, None], intercept[:, None, None]
        if np.all(slope == 1):
            np.add(stored, intercept, out=out, dtype=np.float32)
        else:
            np.multiply(stored, slope, out=out, dtype=np.float32)
            out += intercept

    def hu(self) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        self.hu_into(out)
        return out


def _fail(path: Path | str, reason: str) -> DicomError:
    return DicomError(f"{path}: {reason}")


def _check_image(path: Path, modality: str | None, samples: int | None, photometric: str | None) -> None:
    if modality is not None and str(modality).upper() != "CT":
        raise _fail(path, f"not a CT image (Modality={modality})")
    if samples not in (None, 1) or (photometric and not str(photometric).startswith("MONOCHROME")):
        raise _fail(
            path,
            f"not a greyscale image (SamplesPerPixel={samples}, "
            f"PhotometricInterpretation={photometric}): colour images are not CT slices",
        )


def _fix_unused_bits(stored: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Masks bits above BitsStored and sign-extends, as pydicom does for the reference."""
    bits_allocated = stored.dtype.itemsize * 8
    if bits_stored >= bits_allocated:
        return stored
    unsigned = stored.view(np.dtype(f"u{stored.dtype.itemsize}")) & ((1 << bits_stored) - 1)
    if not signed:
        return unsigned.astype(stored.dtype.newbyteorder("=").str.replace("i", "u"), copy=False)
    shift = bits_allocated - bits_stored
    as_signed = unsigned.view(np.dtype(f"i{stored.dtype.itemsize}"))
    return (as_signed << shift) >> shift


def _j2k_signed(data: bytes) -> bool | None:
    """Signedness of the first component in a JPEG 2000 codestream's SIZ marker, None if not found."""
    at = data.find(b"\xff\x4f\xff\x51")
    if at < 0 or at + 44 > len(data):
        return None
    return bool(data[at + 4 + 38] & 0x80)  # SOC(2) SIZ(2) Lsiz..Csiz(38), then Ssiz of component 0


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"
_EXPLICIT_PIXEL_VRS = (b"OB", b"OW", b"OD", b"OF", b"OL", b"UN")


def _pixel_data_complete(data: bytes) -> bool:
    """Whether a Part-10 file's Pixel Data element is whole, judged from the raw bytes.

    dicomsdl crashes the interpreter (segmentation fault) on truncated pixel data, so no file reaches it
    before this check passes; files that fail it go to pydicom, which reports them cleanly.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        return False
    at = data.find(_PIXEL_DATA_TAG, 132)
    if at < 0:
        return False
    explicit = data[at + 4 : at + 6] in _EXPLICIT_PIXEL_VRS
    length_at = at + 8 if explicit else at + 4
    if length_at + 4 > len(data):
        return False
    length = int.from_bytes(data[length_at : length_at + 4], "little")
    pos = length_at + 4
    if length != 0xFFFFFFFF:
        return pos + length <= len(data)
    while pos + 8 <= len(data):  # encapsulated: walk the items up to the sequence delimiter
        tag, item_length = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if tag == _SEQUENCE_DELIMITER:
            return True
        if tag != _ITEM_TAG or pos + 8 + item_length > len(data):
            return False
        pos += 8 + item_length
    return False


# the uncompressed transfer syntaxes
NATIVE_SYNTAXES = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
)


def _check_native_length(
    path: Path, syntax: str, available: int, rows: int, cols: int, samples: int, bits_allocated: int
) -> None:
    """Refuses uncompressed pixel data shorter than Rows × Columns × samples × bytes a sample.

    Given such a header, dicomsdl reads past its buffer: a segmentation fault that kills the reading process,
    or garbage cached without a word. No decoder sees the file.
    """
    if syntax not in NATIVE_SYNTAXES:
        return
    needed = rows * cols * max(samples, 1) * max(bits_allocated, 8) // 8
    if available < needed:
        raise _fail(
            path,
            f"truncated: {available} bytes of uncompressed pixel data, where Rows × Columns "
            f"({rows} × {cols}) at {bits_allocated} bits need {needed}",
        )


def _pixel_data_length(data: bytes) -> int | None:
    """The byte length the Pixel Data element declares in a Part-10 file (None: encapsulated, or absent)."""
    at = data.find(_PIXEL_DATA_TAG, 132)
    if at < 0:
        return None
    length_at = at + 8 if data[at + 4 : at + 6] in _EXPLICIT_PIXEL_VRS else at + 4
    length = int.from_bytes(data[length_at : length_at + 4], "little")
    return None if length == 0xFFFFFFFF else length


def _float_pair(value) -> tuple[float, float] | None:
    if value is None:
        return None
    vals = [float(v) for v in value]
    return (vals[0], vals[1]) if len(vals) >= 2 else None


def _vector(value, size: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray([float(v) for v in value], dtype=np.float64)
    return arr if arr.shape == (size,) else None


def _number(value) -> float | None:
    """A header value as a finite float; None when it is absent, empty, unparsable or not finite."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _slope(value) -> float | None:
    """A usable RescaleSlope: finite and not zero (a zero slope would flatten the slice to its intercept)."""
    number = _number(value)
    return number if number else None


def _repair_rescale(slices: list[_Slice], study_dir: Path) -> None:
    """Gives every slice whose header lacks a usable rescale the study's own, with a warning naming it.

    A slice without RescaleIntercept, with a slope of 0, or with a NaN or infinite value would otherwise
    be shifted or flattened (a missing intercept among slices at −1024 moves it by +1024 HU and, through
    the crop, the whole study). Such a slice takes the rescale most of its study's slices give: one
    scanner wrote them all. Slices whose headers give a valid rescale keep their own, even when it differs
    from the others, as DICOM allows. A study where no slice gives one is read as stored values = HU.
    Both backends read headers alike and repair here, so they agree on defective files.
    """
    scalar = [s for s in slices if np.ndim(s.slope) == 0 and np.ndim(s.intercept) == 0]
    bad = [s for s in scalar if s.slope is None or s.intercept is None]
    if not bad:
        return
    good = Counter((s.slope, s.intercept) for s in scalar if s.slope is not None and s.intercept is not None)
    if good:
        slope, intercept = good.most_common(1)[0][0]
        source = f"the study's RescaleSlope {slope:g} and RescaleIntercept {intercept:g}"
    else:
        slope, intercept = 1.0, 0.0
        source = "slope 1 and intercept 0 (no slice of the study has a usable rescale)"
    for s in bad:
        s.slope = slope if s.slope is None else s.slope
        s.intercept = intercept if s.intercept is None else s.intercept
    names = ", ".join(s.path.name for s in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    warnings.warn(
        f"{study_dir}: {len(bad)} slice(s) with a missing, zero or non-finite RescaleSlope or "
        f"RescaleIntercept ({names}) read with {source}",
        stacklevel=4,
    )


def _read_pydicom(path: Path) -> _Slice:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise _fail(path, f"not a DICOM file ({exc})") from None
    except Exception as exc:  # pydicom raises many types on truncated or corrupt headers
        raise _fail(path, f"unreadable DICOM header ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds:
        # pydicom drops an element cut short by the end of the file: a tag without its element is a truncation
        truncated = PIXEL_DATA_TAG in path.read_bytes()
        raise _fail(path, "truncated: the pixel data is incomplete" if truncated else "no pixel data")
    _check_image(path, ds.get("Modality"), ds.get("SamplesPerPixel"), ds.get("PhotometricInterpretation"))
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    _check_native_length(
        path,
        syntax,
        len(ds.PixelData),
        int(ds.get("Rows", 0)),
        int(ds.get("Columns", 0)),
        int(ds.get("SamplesPerPixel", 1)),
        int(ds.get("BitsAllocated", 16)),
    )
    try:
        stored = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        name = getattr(ds.file_meta.get("TransferSyntaxUID"), "name", syntax)
        raise _fail(
            path,
            f"transfer syntax {syntax} ({name}) cannot be decoded by the installed "
            f"decoders ({type(exc).__name__}: {str(exc).splitlines()[0]})",
        ) from None
    except Exception as exc:
        raise _fail(path, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None
    slope, intercept = _pydicom_rescale(ds, stored.shape[0] if stored.ndim == 3 else 1)
    return _Slice(
        path=path,
        shape=stored.shape,
        stored=stored,
        slope=slope,
        intercept=intercept,
        position=_vector(ds.get("ImagePositionPatient"), 3),
        orientation=_vector(ds.get("ImageOrientationPatient"), 6),
        instance_number=int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
        pixel_spacing=_float_pair(ds.get("PixelSpacing")),
        study_uid=str(ds.StudyInstanceUID) if "StudyInstanceUID" in ds else None,
        series_uid=str(ds.SeriesInstanceUID) if "SeriesInstanceUID" in ds else None,
    )


def _pydicom_rescale(ds, frames: int) -> tuple[float | np.ndarray, float | np.ndarray]:
    """Slope and intercept from the top level, else from the functional groups (enhanced CT)."""
    groups = "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds
    if "RescaleSlope" in ds or "RescaleIntercept" in ds or not groups:
        return _slope(ds.get("RescaleSlope")), _number(ds.get("RescaleIntercept"))

    def from_group(group) -> tuple[float, float] | None:
        seq = group.get("PixelValueTransformationSequence") if group is not None else None
        if not seq:
            return None
        item = seq[0]
        return _slope(item.get("RescaleSlope")) or 1.0, _number(item.get("RescaleIntercept")) or 0.0

    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_pair = from_group(shared[0]) if shared else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        pairs = [from_group(item) or shared_pair or (1.0, 0.0) for item in per_frame][:frames]
        if frames > 1:
            return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        return pairs[0]
    return shared_pair or (1.0, 0.0)


_DICOMSDL_TAGS = (
    "TransferSyntaxUID",
    "NumberOfFrames",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "SOPClassUID",
    "Modality",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsStored",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "PixelSpacing",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)


def _read_dicomsdl(path: Path, data: bytes | None = None, strict: bool = True) -> _Slice | None:
    """Decodes with dicomsdl. With strict=False returns None where the result could differ from pydicom."""
    import dicomsdl

    try:
        if data is None:
            data = path.read_bytes()
    except OSError as exc:
        raise _fail(path, f"cannot read the file ({exc})") from None
    if not _pixel_data_complete(data):
        if not strict:
            return None
        raise _fail(path, "not a DICOM file, or truncated: the pixel data is incomplete")
    try:
        dset = dicomsdl.open_memory(data)
        tags = dict(zip(_DICOMSDL_TAGS, dset.getValues(list(_DICOMSDL_TAGS))))
    except Exception as exc:
        if not strict:
            return None
        raise _fail(path, f"dicomsdl cannot parse the file ({type(exc).__name__}: {exc})") from None
    if any(isinstance(v, bytes) for v in tags.values()):
        # elements of VR UN come back as raw bytes; pydicom resolves them from its dictionary
        if not strict:
            return None
        tags = {
            k: v.decode("ascii", "replace").strip("\x00 ") if isinstance(v, bytes) else v
            for k, v in tags.items()
        }
    syntax = str(tags["TransferSyntaxUID"] or "")
    signed = int(tags["PixelRepresentation"] or 0) == 1
    if not strict:
        if syntax not in FAST_PATH_SYNTAXES or int(tags["NumberOfFrames"] or 1) != 1:
            return None
        if tags["SOPClassUID"] == ENHANCED_CT_SOP_CLASS and tags["RescaleIntercept"] is None:
            return None
        if syntax in JPEG2000_SYNTAXES and _j2k_signed(data) is not signed:
            return None
    _check_image(path, tags["Modality"], tags["SamplesPerPixel"], tags["PhotometricInterpretation"])
    info = dset.getPixelDataInfo()
    if int(info.get("NumberOfFrames") or 1) != 1:
        raise _fail(
            path,
            f"multi-frame file ({info['NumberOfFrames']} frames): dicomsdl returns only the first "
            "frame; read it with backend='pydicom' or 'auto'",
        )
    shape = (int(info["Rows"]), int(info["Cols"]))
    _check_native_length(
        path,
        syntax,
        _pixel_data_length(data) or 0,
        *shape,
        int(info["SamplesPerPixel"] or 1),
        int(info["BitsAllocated"] or 16),
    )
    slope, intercept, instance = tags["RescaleSlope"], tags["RescaleIntercept"], tags["InstanceNumber"]
    return _Slice(
        path=path,
        shape=shape,
        slope=_slope(slope),
        intercept=_number(intercept),
        position=_vector(tags["ImagePositionPatient"], 3),
        orientation=_vector(tags["ImageOrientationPatient"], 6),
        instance_number=int(instance) if instance is not None else None,
        pixel_spacing=_float_pair(tags["PixelSpacing"]),
        study_uid=str(tags["StudyInstanceUID"]) if tags["StudyInstanceUID"] else None,
        series_uid=str(tags["SeriesInstanceUID"]) if tags["SeriesInstanceUID"] else None,
        decoder="dicomsdl",
        dataset=dset,
        bits_stored=int(tags["BitsStored"] or 16),
        signed=signed,
        syntax=syntax,
    )


def _read_slice(path: Path, backend: Backend) -> _Slice:
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "file not found")
    if backend == "pydicom":
        return _read_pydicom(path)
    if backend == "dicomsdl":
        return _read_dicomsdl(path)
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'pydicom' or 'dicomsdl', not {backend!r}")
    fast = _read_dicomsdl(path, strict=False)
    return fast if fast is not None else _read_pydicom(path)


def read_hu(path: str | os.PathLike, backend: Backend = "auto") -> np.ndarray:
    """Reads one DICOM file as Hounsfield units.

    Args:
        path: a CT DICOM file.
        backend: "auto" (fast where verified), "pydicom" (reference) or "dicomsdl".

    Returns:
        float32 [H, W] in HU (stored × RescaleSlope + RescaleIntercept, the rescale taken from the
        functional groups of enhanced CT files); [F, H, W] for a multi-frame file.

    Raises:
        DicomError: naming the file, when it is missing, not DICOM, truncated, not a greyscale CT image,
            or in a transfer syntax no installed decoder handles.
    """
    item = _read_slice(Path(path), backend)
    _repair_rescale([item], Path(path).parent)
    out = np.empty(item.shape, np.float32)
    _decode_into(item, out, backend)
    return out


def _decode_into(item: _Slice, out: np.ndarray, backend: Backend) -> None:
    """Decodes one slice into ``out``; under "auto" a fast-path failure falls back to the reference."""
    try:
        item.hu_into(out)
    except DicomError:
        if backend != "auto" or item.decoder != "dicomsdl":
            raise
        reference = _read_pydicom(item.path)
        reference.slope, reference.intercept = item.slope, item.intercept  # as repaired for the study
        reference.hu_into(out)
    finally:
        item.dataset = None  # release the file's bytes as soon as its pixels are out


def _file_number(path: Path) -> int | None:
    try:
        return int(path.stem)
    except ValueError:
        return None


def _list_files(study_dir: Path) -> list[Path]:
    if not study_dir.exists():
        raise _fail(study_dir, "study folder does not exist")
    if not study_dir.is_dir():
        raise _fail(study_dir, "not a folder")
    files = sorted(p for p in study_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise _fail(study_dir, "study folder is empty")
    return files


def _order(slices: list[_Slice], study_dir: Path) -> np.ndarray:
    """Indices that put slices head to feet."""
    if all(s.position is not None for s in slices):
        z = np.array([s.position[2] for s in slices])
        if len(np.unique(z)) == len(z) or len(z) == 1:
            return np.argsort(-z, kind="stable")
    if all(s.instance_number is not None for s in slices):
        warnings.warn(
            f"{study_dir}: ImagePositionPatient missing or repeated; slices ordered by "
            "InstanceNumber (assumed head to feet)",
            stacklevel=3,
        )
        return np.argsort([s.instance_number for s in slices], kind="stable")
    warnings.warn(
        f"{study_dir}: neither ImagePositionPatient nor InstanceNumber on every slice; "
        "slices ordered by file number (assumed head to feet)",
        stacklevel=3,
    )
    numbers = [_file_number(s.path) if _file_number(s.path) is not None else i for i, s in enumerate(slices)]
    return np.argsort(numbers, kind="stable")


def _slice_spacing(positions: np.ndarray, orientation: np.ndarray, study_dir: Path) -> float:
    """Median step between positions along the slice normal (mm); warns on tilt or uneven steps."""
    if len(positions) < 2 or np.isnan(positions).any():
        return float("nan")
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal) or 1.0
    steps = np.diff(positions, axis=0)
    along = np.abs(steps @ normal)
    dz = float(np.median(along))
    lengths = np.linalg.norm(steps, axis=1)
    cos = np.clip(along / np.maximum(lengths, 1e-9), 0, 1)
    tilt = float(np.degrees(np.arccos(np.median(cos))))
    if tilt > GANTRY_TILT_TOLERANCE_DEG:
        warnings.warn(
            f"{study_dir}: gantry tilt of {tilt:.1f}° (slice positions step off the slice "
            "normal); the volume is not resampled",
            stacklevel=4,
        )
    if dz > 0 and np.max(np.abs(along - dz)) > SPACING_TOLERANCE * dz:
        warnings.warn(
            f"{study_dir}: non-uniform slice spacing ({along.min():.3g}–{along.max():.3g} mm, "
            f"median {dz:.3g} mm): missing slices or two series in one folder",
            stacklevel=4,
        )
    return dz


def _drop_odd_shapes(
    slices: list[_Slice], study_dir: Path, on_error: OnError, skipped: list[tuple[Path, str]]
) -> list[_Slice]:
    shapes = Counter(s.shape for s in slices)
    if len(shapes) <= 1:
        return slices
    main_shape = shapes.most_common(1)[0][0]
    odd = [s for s in slices if s.shape != main_shape]
    if on_error == "raise":
        first = odd[0]
        raise _fail(
            first.path,
            f"slice shape {first.shape} differs from the study's {main_shape} "
            f"({len(odd)} of {len(slices)} slices in {study_dir} differ)",
        )
    skipped.extend((s.path, f"shape {s.shape} differs from {main_shape}") for s in odd)
    return [s for s in slices if s.shape == main_shape]


_SHARED: tuple | None = (
    None  # in a decoding process: (the study's slices, its volume in shared memory, backend)
)


def _attach(slices: list[_Slice], buffer: mmap.mmap, shape: tuple[int, ...], backend: Backend) -> None:
    """Initialises a forked decoding process with the parent's parsed slices and the shared volume."""
    global _SHARED
    _SHARED = slices, np.frombuffer(buffer, np.float32).reshape(shape), backend


def _decode_slot(k: int) -> str | None:
    """In a decoding process: decodes slice k straight into the shared volume; the DicomError's message, or None."""
    slices, hu, backend = _SHARED
    try:
        _decode_into(slices[k], hu[k], backend)
    except DicomError as exc:
        return str(exc)
    return None


def _decode_in_processes(
    slices: list[_Slice], workers: int, backend: Backend
) -> tuple[np.ndarray, list[str | None]]:
    """Decodes every slice in ``workers`` forked processes; returns the volume and each slice's error or None.

    The volume lives in an anonymous shared mapping that the forked processes inherit (not /dev/shm, which
    containers often cap at 64 MB): each decodes its slices in place, so nothing but the error messages
    crosses a pipe. Pickling each slice back cost more than the second core gained (bench_dicom.py). The
    processes also inherit the parsed headers and the files' bytes, so no file is read twice.
    """
    shape = (len(slices), *slices[0].shape)
    buffer = mmap.mmap(-1, int(np.prod(shape)) * 4)
    with ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("fork"),
        initializer=_attach,
        initargs=(slices, buffer, shape, backend),
    ) as pool:
        errors = list(
            pool.map(_decode_slot, range(len(slices)), chunksize=max(1, len(slices) // (4 * workers)))
        )
    for item in slices:
        item.dataset = None  # the processes decoded from their copies: release the parent's file bytes
    return np.frombuffer(buffer, np.float32).reshape(shape), errors


def _can_fork() -> bool:
    """Decoding processes are forked, to inherit the volume's shared memory: Linux only. Forking is safe
    here because the children only decode, touching no thread, lock or CUDA state of the parent."""
    return sys.platform.startswith("linux")


def default_workers() -> int:
    """Decoding processes for a codec-bound study: every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def load_series(
    study_dir: str | os.PathLike,
    backend: Backend = "auto",
    workers: int | None = None,
    on_error: OnError = "raise",
) -> Series:
    """Loads a study folder of single-slice DICOM files as a head-to-feet HU volume.

    Order is by descending ImagePositionPatient z (never file name); without positions by InstanceNumber,
    then by file number, with a warning. Warns on gantry tilt and on non-uniform spacing.

    Args:
        study_dir: folder with one ``<n>.dcm`` per axial slice.
        backend: "auto", "pydicom" or "dicomsdl" (see the module docstring).
        workers: processes for studies in a codec-bound syntax (JPEG Lossless, JPEG-LS, JPEG 2000), on
            Linux; None uses every available core. Uncompressed and RLE studies decode in this process,
            which measures faster: they are memory-bound, and threads only add contention.
        on_error: "raise" stops at the first bad slice with a DicomError; "skip" leaves bad slices out
            and warns once, listing them.

    Returns:
        A `Series`.

    Raises:
        DicomError: a missing or empty folder, or (with on_error="raise") any bad slice.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    study_dir = Path(study_dir)
    files = _list_files(study_dir)
    slices, skipped = _read_headers(files, backend, on_error)
    slices = _usable_slices(slices, study_dir, on_error, skipped, len(files))
    slices = _one_series(slices, study_dir)
    slices = [slices[i] for i in _order(slices, study_dir)]
    hu, slices = _decode_volume(slices, study_dir, backend, workers or default_workers(), on_error, skipped)
    if skipped:
        warnings.warn(
            f"{study_dir}: skipped {len(skipped)} of {len(files)} slices: "
            + "; ".join(f"{p.name} ({why})" for p, why in skipped),
            stacklevel=2,
        )
    return _series(hu, slices, study_dir, skipped)


def _one_series(slices: list[_Slice], study_dir: Path) -> list[_Slice]:
    """The slices of one series: where a folder holds several (SeriesInstanceUID), the one with the most
    slices, said in a warning that names every series. Mixed, two series made one volume (with a "gantry
    tilt" of tens of degrees) that was predicted as a study."""
    counts: dict[str | None, int] = {}
    for s in slices:
        counts[s.series_uid] = counts.get(s.series_uid, 0) + 1
    if len(counts) < 2:
        return slices
    kept = max(counts, key=counts.get)
    warnings.warn(
        f"{study_dir}: {len(counts)} series in one folder ("
        + ", ".join(f"{uid or 'no SeriesInstanceUID'}: {n} slices" for uid, n in counts.items())
        + f"); only {kept} is read, the one with the most slices",
        stacklevel=3,
    )
    return [s for s in slices if s.series_uid == kept]


def _read_headers(files: list[Path], backend: Backend, on_error: OnError) -> tuple[list[_Slice], list]:
    """Every file's header (and, with pydicom, its pixels), and the files that could not be read."""

    def read(path: Path) -> _Slice | tuple[Path, str]:
        try:
            return _read_slice(path, backend)
        except DicomError as exc:
            if on_error == "raise":
                raise
            return path, str(exc).removeprefix(f"{path}: ")

    # headers only for the fast path: ~0.03 ms a file, threads measured slower
    results = [read(p) for p in files]
    return [r for r in results if isinstance(r, _Slice)], [r for r in results if isinstance(r, tuple)]


def _usable_slices(
    slices: list[_Slice], study_dir: Path, on_error: OnError, skipped: list, n_files: int
) -> list[_Slice]:
    """The slices that can make one volume: single-frame, of the study's shape, with a usable rescale.

    Raises:
        DicomError: none is left (naming the first causes), or, with on_error="raise", any is unusable.
    """
    multi = [s for s in slices if len(s.shape) != 2]
    if multi:
        reason = f"multi-frame file ({multi[0].shape[0]} frames): a series needs one slice per file"
        if on_error == "raise":
            raise _fail(multi[0].path, reason)
        skipped.extend((s.path, reason) for s in multi)
        slices = [s for s in slices if len(s.shape) == 2]
    slices = _drop_odd_shapes(slices, study_dir, on_error, skipped)
    _repair_rescale(slices, study_dir)
    if not slices:
        raise _fail(
            study_dir,
            f"no readable slice among {n_files} files: "
            + "; ".join(f"{p.name}: {why}" for p, why in skipped[:5]),
        )
    return slices


def _decode_volume(
    slices: list[_Slice], study_dir: Path, backend: Backend, workers: int, on_error: OnError, skipped: list
) -> tuple[np.ndarray, list[_Slice]]:
    """float32 [N, H, W] HU of the ordered slices, and the slices that decoded (the others join ``skipped``).

    Codec-bound syntaxes decode in ``workers`` processes; memory-bound ones, and pydicom's already decoded
    slices, in this process (threads measured slower).
    """
    codec_bound = all(s.decoder == "dicomsdl" and s.syntax not in LIGHT_SYNTAXES for s in slices)
    if workers > 1 and codec_bound and len(slices) > PROCESS_DECODE_MIN_SLICES and _can_fork():
        hu, errors = _decode_in_processes(slices, workers, backend)
    else:
        hu, errors = np.empty((len(slices), *slices[0].shape), np.float32), []
        for k, item in enumerate(slices):
            try:
                _decode_into(item, hu[k], backend)
                errors.append(None)
            except DicomError as exc:
                if on_error == "raise":
                    raise
                errors.append(str(exc))
    failed = []
    for item, error in zip(slices, errors):
        if error is not None and on_error == "raise":
            raise DicomError(error)
        failed.append(None if error is None else (item.path, error.removeprefix(f"{item.path}: ")))
    if any(failed):
        keep = [k for k, f in enumerate(failed) if f is None]
        skipped.extend(f for f in failed if f is not None)
        hu, slices = hu[keep], [slices[k] for k in keep]
        if not slices:
            raise _fail(study_dir, "no decodable slice")
    return hu, slices


def _series(hu: np.ndarray, slices: list[_Slice], study_dir: Path, skipped: list) -> Series:
    """The `Series` of a decoded volume: its geometry (positions, orientation, spacing), slice numbers, UID."""
    positions = np.array([s.position if s.position is not None else [np.nan] * 3 for s in slices])
    orientation = next(
        (s.orientation for s in slices if s.orientation is not None), np.array([1.0, 0, 0, 0, 1.0, 0])
    )
    dz = _slice_spacing(positions, orientation, study_dir)
    dy, dx = slices[0].pixel_spacing or (float("nan"), float("nan"))
    numbers = np.array(
        [
            _file_number(s.path)
            if _file_number(s.path) is not None
            else (s.instance_number if s.instance_number is not None else -1)
            for s in slices
        ],
        dtype=np.int64,
    )
    uid = next((s.study_uid for s in slices if s.study_uid), study_dir.name)
    return Series(
        hu=hu,
        slice_numbers=numbers,
        positions=positions,
        spacing=(dz, dy, dx),
        uid=uid,
        paths=[s.path for s in slices],
        orientation=orientation,
        skipped=skipped,
    )
