"""cspine.dicom: ordering, rescale, backends against the pydicom reference, and clear errors."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files

from cspine.dicom import DicomError, _read_slice, load_series, read_hu
from cspine.dicom_writer import Encoding, write_series

from .conftest import ramp_volume

UID = "1.2.826.0.1.3680043.10001"
ENCODINGS = [
    Encoding("explicit", signed=True, intercept=0.0),
    Encoding("explicit", signed=False, intercept=-1024.0, bits_stored=12),
    Encoding("rle", signed=True, intercept=-1024.0, bits_stored=12),
    Encoding("rle", signed=False, intercept=-1024.0, slope=1.0),
    Encoding("j2k", signed=True, intercept=0.0),
    Encoding("j2k", signed=False, intercept=-1024.0, bits_stored=12),
    Encoding("jpeg_lossless", signed=True, intercept=0.0),
    Encoding("explicit", signed=True, intercept=-1000.0, slope=0.5),
]


def _expected(hu: np.ndarray, enc: Encoding) -> np.ndarray:
    return enc.to_stored(hu).astype(np.float32) * enc.slope + enc.intercept


def _real_ct_files() -> list[str]:
    files = []
    for f in get_testdata_files("*"):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        if ds.get("Modality") == "CT" and "PixelData" in pydicom.dcmread(f, specific_tags=["PixelData"]):
            files.append(f)
    return files


REAL_CT = _real_ct_files()


@pytest.mark.parametrize(
    "enc",
    ENCODINGS,
    ids=lambda e: f"{e.syntax}-{'s' if e.signed else 'u'}{e.bits_stored}-i{e.intercept:g}-m{e.slope:g}",
)
@pytest.mark.parametrize("backend", ["auto", "pydicom", "dicomsdl"])
def test_round_trip_every_encoding_and_backend(tmp_path, enc, backend):
    hu = ramp_volume()
    write_series(hu, tmp_path, spacing=(2.0, 0.7, 0.7), study_uid=UID, encoding=enc)
    series = load_series(tmp_path, backend=backend)
    np.testing.assert_array_equal(series.hu, _expected(hu, enc))
    assert series.hu.dtype == np.float32


def test_order_is_head_to_feet_whatever_the_file_numbers(tmp_path):
    hu = ramp_volume(n=8)
    write_series(
        hu,
        tmp_path,
        spacing=(1.5, 0.5, 0.5),
        study_uid=UID,
        numbering="feet_to_head",
        first_number=40,
        origin=(0, 0, -20),
    )
    s = load_series(tmp_path)
    np.testing.assert_array_equal(s.hu, hu)
    assert list(s.slice_numbers) == list(range(47, 39, -1))
    assert np.all(np.diff(s.positions[:, 2]) < 0)
    assert [p.name for p in s.paths] == [f"{n}.dcm" for n in s.slice_numbers]
    assert s.spacing == pytest.approx((1.5, 0.5, 0.5))
    assert s.uid == UID


def test_shuffled_file_names_are_ordered_by_position(tmp_path):
    hu = ramp_volume(n=7)
    numbers = [5, 2, 7, 1, 3, 6, 4]  # head-to-feet order of slices, shuffled names
    write_series(hu, tmp_path, spacing=(1.0, 1.0, 1.0), study_uid=UID, file_numbers=numbers)
    s = load_series(tmp_path)
    np.testing.assert_array_equal(s.hu, hu)
    assert list(s.slice_numbers) == numbers


def test_spacing_comes_from_positions_not_thickness(tmp_path):
    write_series(ramp_volume(n=5), tmp_path, spacing=(0.8, 0.6, 0.6), slice_thickness=1.25, study_uid=UID)
    assert load_series(tmp_path).spacing[0] == pytest.approx(0.8)


def test_missing_positions_fall_back_to_instance_number_with_warning(tmp_path):
    hu = ramp_volume(n=5)
    write_series(
        hu, tmp_path, spacing=(1, 1, 1), study_uid=UID, with_positions=False, file_numbers=[3, 1, 5, 2, 4]
    )
    with pytest.warns(UserWarning, match="InstanceNumber"):
        s = load_series(tmp_path)
    assert list(s.slice_numbers) == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(s.hu, hu[[1, 3, 0, 4, 2]])


def test_non_uniform_spacing_warns(tmp_path):
    hu = ramp_volume(n=6)
    write_series(hu[:3], tmp_path, spacing=(1, 1, 1), study_uid=UID, origin=(0, 0, 0), file_numbers=[1, 2, 3])
    write_series(
        hu[3:], tmp_path, spacing=(1, 1, 1), study_uid=UID, origin=(0, 0, -30), file_numbers=[4, 5, 6]
    )
    with pytest.warns(UserWarning, match="non-uniform slice spacing"):
        s = load_series(tmp_path)
    assert s.spacing[0] == pytest.approx(1.0)


def test_gantry_tilt_warns(tmp_path):
    write_series(ramp_volume(n=4), tmp_path, spacing=(1, 1, 1), study_uid=UID)
    for path in sorted(tmp_path.iterdir()):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [0, 0.5 * int(path.stem), -float(path.stem)]  # y drifts with z: tilted
        ds.save_as(path)
    with pytest.warns(UserWarning, match="gantry tilt"):
        load_series(tmp_path)


@pytest.mark.parametrize("backend", ["auto", "pydicom", "dicomsdl"])
def test_truncated_file_names_the_file(tmp_path, backend):
    write_series(ramp_volume(n=4), tmp_path, spacing=(1, 1, 1), study_uid=UID)
    bad = tmp_path / "3.dcm"
    bad.write_bytes(bad.read_bytes()[:900])
    with pytest.raises(DicomError, match=r"3\.dcm"):
        load_series(tmp_path, backend=backend)


def test_skip_leaves_out_bad_slices_with_one_warning(tmp_path):
    hu = ramp_volume(n=5)
    write_series(hu, tmp_path, spacing=(1, 1, 1), study_uid=UID)
    (tmp_path / "2.dcm").write_bytes(b"not dicom at all")
    (tmp_path / "4.dcm").write_bytes((tmp_path / "4.dcm").read_bytes()[:700])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = load_series(tmp_path, on_error="skip")
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1 and "2.dcm" in messages[0] and "4.dcm" in messages[0]
    assert list(s.slice_numbers) == [1, 3, 5]
    np.testing.assert_array_equal(s.hu, hu[[0, 2, 4]])
    assert {p.name for p, _ in s.skipped} == {"2.dcm", "4.dcm"}


def test_non_dicom_file_is_a_clear_error(tmp_path):
    write_series(ramp_volume(n=3), tmp_path, spacing=(1, 1, 1), study_uid=UID)
    (tmp_path / "9.dcm").write_text("hello")
    with pytest.raises(DicomError, match=r"9\.dcm.*not a DICOM file"):
        load_series(tmp_path)


def test_mixed_shapes_raise_or_skip(tmp_path):
    write_series(ramp_volume(n=4, size=32), tmp_path, spacing=(1, 1, 1), study_uid=UID)
    write_series(
        ramp_volume(n=1, size=24),
        tmp_path,
        spacing=(1, 1, 1),
        study_uid=UID,
        file_numbers=[9],
        origin=(0, 0, -10),
    )
    with pytest.raises(DicomError, match=r"9\.dcm.*shape"):
        load_series(tmp_path)
    with pytest.warns(UserWarning, match="9.dcm"):
        s = load_series(tmp_path, on_error="skip")
    assert s.hu.shape == (4, 32, 32)


def test_a_folder_of_nothing_readable_is_a_clear_error(tmp_path):
    (tmp_path / "1.dcm").write_text("not dicom")
    (tmp_path / "2.dcm").write_bytes(b"")
    with pytest.raises(DicomError, match=r"no readable slice among 2 files: 1\.dcm"):
        load_series(tmp_path, on_error="skip")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DicomError, match="does not exist"):
        load_series(tmp_path / "nope")
    with pytest.raises(DicomError, match="empty"):
        load_series(tmp_path)


def test_non_ct_and_colour_images_are_rejected(tmp_path):
    write_series(ramp_volume(n=1), tmp_path, spacing=(1, 1, 1), study_uid=UID)
    path = tmp_path / "1.dcm"
    ds = pydicom.dcmread(path)
    ds.Modality = "MR"
    ds.save_as(path)
    for backend in ("auto", "pydicom", "dicomsdl"):
        with pytest.raises(DicomError, match=r"1\.dcm.*not a CT image"):
            read_hu(path, backend=backend)
    rgb = get_testdata_files("SC_rgb.dcm")[0]
    with pytest.raises(DicomError, match="not a"):
        read_hu(rgb, backend="pydicom")


def test_unknown_backend_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="backend"):
        read_hu(get_testdata_files("CT_small.dcm")[0], backend="gdcm")


@pytest.mark.parametrize("path", REAL_CT, ids=lambda p: Path(p).name)
def test_auto_equals_pydicom_on_every_real_ct_file(path):
    reference = read_hu(path, backend="pydicom")
    auto = _read_slice(Path(path), "auto")
    np.testing.assert_array_equal(auto.hu(), reference)
    if auto.decoder == "dicomsdl":  # where auto trusts the fast path, the fast path alone must agree too
        np.testing.assert_array_equal(read_hu(path, backend="dicomsdl"), reference)


def test_real_files_cover_the_hard_cases():
    names = {Path(p).name for p in REAL_CT}
    assert {"J2K_pixelrep_mismatch.dcm", "CT_small.dcm", "693_J2KR.dcm", "bad_sequence.dcm"} <= names
    assert (
        _read_slice(Path(next(p for p in REAL_CT if p.endswith("J2K_pixelrep_mismatch.dcm"))), "auto").decoder
        == "pydicom"
    )


UNDECODABLE = {"1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"}


def test_transfer_syntax_matrix(transfer_syntax_dir):
    original = read_hu(transfer_syntax_dir / "CTImage.dcm", backend="pydicom")
    lossy = {
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
    }
    checked = 0
    for path in sorted(transfer_syntax_dir.glob("CTImage.dcm_*")):
        syntax = path.stem.rsplit("_", 1)[-1] if path.suffix == ".dcm" else path.name.rsplit("_", 1)[-1]
        if syntax in UNDECODABLE:
            for backend in ("auto", "pydicom", "dicomsdl"):
                with pytest.raises(DicomError, match=rf"{path.name}.*{syntax}"):
                    read_hu(path, backend=backend)
            continue
        reference = read_hu(path, backend="pydicom")
        np.testing.assert_array_equal(read_hu(path, backend="auto"), reference)
        if syntax in lossy:
            assert 0 < np.abs(reference - original).max() < 200, path.name
        else:
            np.testing.assert_array_equal(reference, original, err_msg=path.name)
        checked += 1
    assert checked == 13  # 15 re-encodings of CTImage.dcm, less the two no decoder handles
    for name in ("CT1_J2KR", "CT2_J2KR", "CT0012.fragmented_no_bot_jpeg_baseline.51.dcm"):
        np.testing.assert_array_equal(
            read_hu(transfer_syntax_dir / name, backend="auto"),
            read_hu(transfer_syntax_dir / name, backend="pydicom"),
        )


def test_enhanced_ct_rescale_from_functional_groups(transfer_syntax_dir):
    path = transfer_syntax_dir / "CT0012.fragmented_no_bot_jpeg_baseline.51.dcm"
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds
    group = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = read_hu(path, backend="auto")
    assert hu.shape == (2, ds.Rows, ds.Columns)
    expected = ds.pixel_array.astype(np.float32) * float(group.RescaleSlope) + float(group.RescaleIntercept)
    np.testing.assert_array_equal(hu, expected)


def test_real_slices_load_as_a_series(tmp_path):
    for i, name in enumerate(["693_UNCI.dcm", "693_J2KR.dcm"]):
        shutil.copy(get_testdata_files(name)[0], tmp_path / f"{i + 1}.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = load_series(tmp_path)
    assert s.hu.shape[0] == 2 and s.hu.min() < -500 and s.hu.max() > 500


@pytest.mark.parametrize("syntax", ["explicit", "rle", "j2k", "jpeg_lossless"])
def test_truncation_anywhere_is_a_dicom_error_never_a_crash(tmp_path, syntax):
    # dicomsdl segfaults on truncated pixel data; the byte-level check must keep every cut away from it.
    # A cut that leaves the pixels whole (only the closing delimiter lost) may decode, but exactly.
    write_series(ramp_volume(n=1), tmp_path, spacing=(1, 1, 1), study_uid=UID, encoding=Encoding(syntax))
    full = (tmp_path / "1.dcm").read_bytes()
    reference = read_hu(tmp_path / "1.dcm", backend="pydicom")
    cut_file = tmp_path / "cut.dcm"
    errors = 0
    for cut in np.linspace(0, len(full) - 1, 25).astype(int):
        cut_file.write_bytes(full[:cut])
        for backend in ("auto", "dicomsdl"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    np.testing.assert_array_equal(read_hu(cut_file, backend=backend), reference)
            except DicomError as exc:
                assert "cut.dcm" in str(exc)
                errors += 1
    assert errors >= 2 * 23


def _with_defect(root: Path, edit, encoding: Encoding, victims=(2,)) -> Path:
    """A 6-slice study whose slices ``victims`` (by file order) had their headers edited by ``edit``."""
    study = root / "study"
    write_series(ramp_volume(6, 32, seed=3), study, spacing=(2.0, 0.5, 0.5), study_uid=UID, encoding=encoding)
    for k in victims:
        path = sorted(study.iterdir(), key=lambda p: int(p.stem))[k]
        ds = pydicom.dcmread(path)
        edit(ds)
        with pydicom.config.disable_value_validation():
            ds.save_as(path, enforce_file_format=True)
    return study


RESCALE_DEFECTS = {
    "slope 0": lambda ds: setattr(ds, "RescaleSlope", "0"),
    "NaN slope": lambda ds: setattr(ds, "RescaleSlope", "NaN"),
    "infinite intercept": lambda ds: setattr(ds, "RescaleIntercept", "inf"),
    "no intercept": lambda ds: delattr(ds, "RescaleIntercept"),
}


@pytest.mark.parametrize("backend", ["pydicom", "dicomsdl", "auto"])
@pytest.mark.parametrize("defect", list(RESCALE_DEFECTS))
def test_a_slice_with_a_broken_rescale_takes_its_studys_on_every_backend(tmp_path, defect, backend):
    encoding = Encoding("explicit", signed=False, intercept=-1024.0, bits_stored=12)
    clean = load_series(_with_defect(tmp_path / "clean", lambda ds: None, encoding), backend=backend)
    broken_dir = _with_defect(tmp_path / "broken", RESCALE_DEFECTS[defect], encoding)
    with pytest.warns(
        UserWarning,
        match=r"1 slice\(s\) with a missing, zero or non-finite .*\(3\.dcm\).*"
        r"RescaleIntercept -1024",
    ):
        broken = load_series(broken_dir, backend=backend)
    assert np.isfinite(broken.hu).all()
    np.testing.assert_array_equal(broken.hu, clean.hu)  # repaired exactly, on every backend alike


def test_a_study_without_any_rescale_reads_stored_values_as_hu(tmp_path):
    def strip(ds):
        del ds.RescaleSlope, ds.RescaleIntercept

    encoding = Encoding("explicit", signed=True, intercept=0.0)
    study = _with_defect(tmp_path, strip, encoding, victims=range(6))
    for backend in ("pydicom", "dicomsdl"):
        with pytest.warns(UserWarning, match="no slice of the study has a usable rescale"):
            series = load_series(study, backend=backend)
        np.testing.assert_array_equal(series.hu, _expected(ramp_volume(6, 32, seed=3), encoding))


def test_a_slice_with_its_own_valid_rescale_keeps_it(tmp_path):
    encoding = Encoding("explicit", signed=True, intercept=0.0)

    def other_scale(ds):  # a valid header: HU = 2 · stored − 1000, stored values left as they are
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-1000"

    clean = load_series(_with_defect(tmp_path / "clean", lambda ds: None, encoding), backend="pydicom")
    study = _with_defect(tmp_path / "other", other_scale, encoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to repair, nothing to warn about
        series = load_series(study, backend="pydicom")
    k = [p.name for p in series.paths].index("3.dcm")
    np.testing.assert_array_equal(series.hu[k], clean.hu[k] * 2 - 1000)  # clean HU are the stored values
    others = [i for i in range(6) if i != k]
    np.testing.assert_array_equal(series.hu[others], clean.hu[others])


def test_a_truncated_compressed_slice_is_reported_as_truncated(tmp_path):
    study = tmp_path / "study"
    write_series(
        ramp_volume(4, 32),
        study,
        spacing=(1, 1, 1),
        study_uid=UID,
        encoding=Encoding("jpeg_lossless", signed=True, intercept=0.0),
    )
    victim = sorted(study.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-300])
    for backend in ("auto", "pydicom", "dicomsdl"):
        with pytest.raises(DicomError, match=f"{victim.name}: .*truncated"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_hu(victim, backend)


@pytest.fixture(scope="module")
def jpeg_lossless_study(tmp_path_factory):
    """24 noisy 64² slices in JPEG Lossless SV1 (the real data's syntax): enough to decode in processes."""
    folder = tmp_path_factory.mktemp("jl") / "study"
    hu = np.random.default_rng(3).normal(0, 300, (24, 64, 64)) + ramp_volume(n=24, size=64)
    write_series(
        hu,
        folder,
        spacing=(1, 1, 1),
        study_uid=UID,
        encoding=Encoding("jpeg_lossless", signed=True, intercept=-1024.0),
    )
    return folder


def test_a_codec_bound_study_decodes_in_processes_to_the_reference(jpeg_lossless_study, monkeypatch):
    import cspine.dicom

    calls, real = [], cspine.dicom._decode_in_processes
    monkeypatch.setattr(cspine.dicom, "_decode_in_processes", lambda *a: calls.append(a[1]) or real(*a))
    parallel = load_series(jpeg_lossless_study, workers=2)
    assert calls == [2]
    serial = load_series(jpeg_lossless_study, workers=1)
    reference = load_series(jpeg_lossless_study, backend="pydicom")
    assert calls == [2] and len(parallel) == 24
    assert np.array_equal(parallel.hu, serial.hu) and np.array_equal(parallel.hu, reference.hu)
    assert list(parallel.slice_numbers) == list(reference.slice_numbers)


def test_a_slice_that_fails_in_a_decoding_process_is_named(jpeg_lossless_study, tmp_path):
    folder = tmp_path / "study"
    shutil.copytree(jpeg_lossless_study, folder)
    victim = folder / "7.dcm"
    data = bytearray(victim.read_bytes())
    data[-400:-2] = b"\x00" * 398  # a damaged JPEG stream of the right length: parsed, then not decodable
    victim.write_bytes(bytes(data))
    with pytest.raises(DicomError, match="7.dcm"):
        load_series(folder, workers=2)
    with pytest.warns(UserWarning, match=r"skipped 1 of 24 slices: 7\.dcm"):
        skipped = load_series(folder, workers=2, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        serial = load_series(folder, workers=1, on_error="skip")
    assert len(skipped) == 23 and np.array_equal(skipped.hu, serial.hu)


@pytest.mark.parametrize("backend", ["auto", "dicomsdl", "pydicom"])
def test_uncompressed_pixel_data_shorter_than_its_header_says_is_refused_before_decoding(tmp_path, backend):
    """dicomsdl reads past the buffer of such a file (a segfault, or garbage cached): no decoder sees it."""
    import pydicom

    from cspine.dicom import DicomError, read_hu
    from cspine.dicom_writer import write_series

    (path,) = write_series(
        np.full((1, 32, 32), -1000, np.float32), tmp_path / "s", spacing=(1, 1, 1), study_uid="1.2.3"
    )
    ds = pydicom.dcmread(path)
    ds.Rows = 64  # the header claims twice the pixels the element holds
    ds.save_as(path)
    with pytest.raises(DicomError, match=r"truncated: 2048 bytes of uncompressed pixel data.*64 × 32.*4096"):
        read_hu(path, backend)


@pytest.mark.parametrize("backend", ["pydicom", "dicomsdl", "auto"])
def test_a_folder_of_two_series_reads_the_larger_and_names_both(tmp_path, backend):
    """Two SeriesInstanceUIDs in one study folder were merged into one volume (a "gantry tilt" of 55°)."""
    folder = tmp_path / "study"
    main = np.full((12, 16, 16), 100.0, np.float32)
    write_series(main, folder, spacing=(1.0, 0.5, 0.5), study_uid="1.2.3")
    other = tmp_path / "other"  # a second reconstruction, shifted and tilted: its files join the folder
    write_series(
        np.full((5, 16, 16), -500.0, np.float32),
        other,
        spacing=(2.0, 0.5, 0.5),
        study_uid="1.2.3",
        origin=(30.0, 10.0, 7.0),
        first_number=100,
    )
    for path in other.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "1.2.3.9"
        ds.save_as(folder / path.name)
    with pytest.warns(
        UserWarning,
        match=r"2 series in one folder \(1\.2\.3\.1: 12 slices, 1\.2\.3\.9: 5 slices\); only 1\.2\.3\.1 is read",
    ):
        series = load_series(folder, backend=backend, workers=1)
    assert len(series) == 12 and np.allclose(series.hu, 100.0)
