"""Writing CT series as real DICOM files, in the encodings the competition's data uses.

Used by the synthetic generator and by the tests, so both exercise the same files a scanner would write:
one axial slice per ``<n>.dcm``, CT Image Storage, explicit VR little endian or compressed (RLE Lossless,
JPEG 2000 Lossless via pylibjpeg-openjpeg, JPEG Lossless SV1 via python-gdcm).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.1.1"  # identifies files written by cspine
SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
    "jpeg_lossless": JPEGLosslessSV1,
}
Syntax = Literal["explicit", "rle", "j2k", "jpeg_lossless"]


@dataclass(frozen=True)
class Encoding:
    """How HU become stored values, and the transfer syntax that holds them.

    The competition's data has both RescaleIntercept −1024 with unsigned storage and 0 with signed.
    """

    syntax: Syntax = "explicit"
    signed: bool = True
    intercept: float = 0.0
    slope: float = 1.0
    bits_stored: int = 16

    @property
    def stored_range(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1

    def to_stored(self, hu: np.ndarray) -> np.ndarray:
        """HU float → stored int16/uint16, rounded and clipped to what BitsStored can hold."""
        lo, hi = self.stored_range
        stored = np.clip(np.rint((np.asarray(hu, np.float64) - self.intercept) / self.slope), lo, hi)
        return stored.astype(np.int16 if self.signed else np.uint16)


def _dataset(stored: np.ndarray, encoding: Encoding, header: dict) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = header["SOPInstanceUID"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ConvolutionKernel = "BONE"
    ds.PatientID = header["StudyInstanceUID"].rsplit(".", 1)[-1]
    for key, value in header.items():
        setattr(ds, key, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = encoding.bits_stored
    ds.HighBit = encoding.bits_stored - 1
    ds.PixelRepresentation = int(encoding.signed)
    ds.RescaleIntercept = f"{encoding.intercept:g}"
    ds.RescaleSlope = f"{encoding.slope:g}"
    ds.RescaleType = "HU"
    ds.WindowCenter = "400"
    ds.WindowWidth = "1800"
    ds.PixelData = stored.tobytes()
    return ds


def _transcode_gdcm(path: Path, syntax: UID) -> None:
    """Rewrites a file in place in a syntax pydicom cannot encode (JPEG Lossless SV1)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise OSError(f"{path}: gdcm could not read the file it is to transcode")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise OSError(f"{path}: gdcm could not encode {syntax.name}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise OSError(f"{path}: gdcm could not write {syntax.name}")


# Placeholders for the values that change from slice to slice. Each is as wide as any real value, and
# the real values are space-padded to that width (valid for IS and DS), so one serialised header serves
# every slice of a series.
_NUMBER_WIDTH = 8
_DS_WIDTH = 14
_INSTANCE_PLACEHOLDER = "9" * _NUMBER_WIDTH
_Z_PLACEHOLDER = "-" + "8" * (_DS_WIDTH - 1)


class _SeriesTemplate:
    """One series' header, serialised once by pydicom; each slice fills in its own values.

    JPEG Lossless SV1 has no pydicom encoder: its slices are written natively, then gdcm transcodes them.
    """

    def __init__(self, encoding: Encoding, header: dict, shape: tuple[int, int]):
        self.encoding = encoding
        self.syntax = SYNTAXES[encoding.syntax]
        self.file_syntax = ExplicitVRLittleEndian if self.syntax == JPEGLosslessSV1 else self.syntax
        self.sop_prefix = header["SOPInstanceUID"]
        header = dict(header, SOPInstanceUID=self._sop_uid(1), InstanceNumber=_INSTANCE_PLACEHOLDER)
        if "ImagePositionPatient" in header:
            header["ImagePositionPatient"] = [*header["ImagePositionPatient"][:2], _Z_PLACEHOLDER]
            header["SliceLocation"] = _Z_PLACEHOLDER
        ds = _dataset(np.zeros(shape, np.int16 if encoding.signed else np.uint16), encoding, header)
        if self.file_syntax != ExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = self.file_syntax
            ds.PixelData = encapsulate([b"\0\0"])
            ds["PixelData"].VR = "OB"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        raw = buffer.getvalue()
        self.head = raw[: raw.rindex(b"\xe0\x7f\x10\x00")]

    def _sop_uid(self, number: int) -> str:
        return f"{self.sop_prefix}.{10**_NUMBER_WIDTH + number}"

    def _pixel_element(self, stored: np.ndarray) -> bytes:
        if self.file_syntax == ExplicitVRLittleEndian:
            data = stored.tobytes()
            return b"\xe0\x7f\x10\x00OW\x00\x00" + len(data).to_bytes(4, "little") + data
        frame = get_encoder(self.file_syntax).encode(
            stored,
            encoding_plugin="pylibjpeg",
            rows=stored.shape[0],
            columns=stored.shape[1],
            samples_per_pixel=1,
            bits_allocated=16,
            bits_stored=self.encoding.bits_stored,
            pixel_representation=int(self.encoding.signed),
            photometric_interpretation="MONOCHROME2",
            number_of_frames=1,
        )
        return (
            b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
            + encapsulate([frame])
            + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # sequence delimiter
        )

    def write(self, path: Path, stored: np.ndarray, number: int, z: float | None) -> None:
        if not 0 <= number < 10**_NUMBER_WIDTH:
            raise ValueError(f"file number {number} does not fit {_NUMBER_WIDTH} digits")
        head = self.head.replace(self._sop_uid(1).encode(), self._sop_uid(number).encode())
        head = head.replace(_INSTANCE_PLACEHOLDER.encode(), f"{number:<{_NUMBER_WIDTH}d}".encode())
        if z is not None:
            head = head.replace(_Z_PLACEHOLDER.encode(), f"{z:<{_DS_WIDTH}.7g}".encode())
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(head + self._pixel_element(np.ascontiguousarray(stored)))
        if self.syntax == JPEGLosslessSV1:
            _transcode_gdcm(tmp, self.syntax)
        os.replace(tmp, path)


def write_series(
    hu: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    spacing: tuple[float, float, float],
    study_uid: str,
    encoding: Encoding = Encoding(),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    slice_thickness: float | None = None,
    numbering: Literal["head_to_feet", "feet_to_head"] = "head_to_feet",
    first_number: int = 1,
    file_numbers: Sequence[int] | None = None,
    with_positions: bool = True,
) -> list[Path]:
    """Writes a head-to-feet HU volume as one ``<n>.dcm`` per slice.

    Args:
        hu: float [N, H, W] in HU, slice 0 nearest the head.
        out_dir: the study folder (created).
        spacing: (dz, dy, dx) in mm; positions step by dz from ``origin`` toward the feet.
        study_uid: StudyInstanceUID; series and instance UIDs are derived from it.
        encoding: stored-value representation and transfer syntax.
        origin: ImagePositionPatient (x, y, z) of the head-most slice.
        slice_thickness: SliceThickness written to the header (defaults to dz; larger values describe
            overlapping reconstructions).
        numbering: whether file numbers (and InstanceNumber) run head to feet or feet to head.
        first_number: the number of the first file.
        file_numbers: explicit file numbers in head-to-feet order (overrides numbering/first_number).
        with_positions: False leaves out ImagePositionPatient (to test the loader's fallbacks).

    Returns:
        The written paths, in head-to-feet order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(hu)
    dz, dy, dx = spacing
    if file_numbers is None:
        numbers = np.arange(first_number, first_number + n)
        file_numbers = numbers if numbering == "head_to_feet" else numbers[::-1]
    series_uid = f"{study_uid}.1"
    header = {
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "SOPInstanceUID": series_uid,
        "FrameOfReferenceUID": f"{study_uid}.2",
        "SeriesNumber": 1,
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        "PixelSpacing": [f"{dy:.6g}", f"{dx:.6g}"],
        "SliceThickness": f"{(slice_thickness or dz):.6g}",
        "PatientPosition": "HFS",
    }
    if with_positions:
        header["ImagePositionPatient"] = [f"{origin[0]:.6g}", f"{origin[1]:.6g}", "0"]
    template = _SeriesTemplate(encoding, header, hu.shape[1:])
    paths = []
    for k in range(n):
        path = out_dir / f"{int(file_numbers[k])}.dcm"
        z = origin[2] - k * dz if with_positions else None
        template.write(path, encoding.to_stored(hu[k]), int(file_numbers[k]), z)
        paths.append(path)
    return paths
