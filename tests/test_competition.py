"""cspine.competition: data discovery, validated readers, test studies, slice labels, folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cspine import TARGETS
from cspine.competition import (
    DataError,
    find_data_dir,
    list_test_studies,
    make_folds,
    read_boxes,
    read_test,
    read_train,
)
from cspine.labels import slice_labels


def _write_train(tmp_path, rows):
    df = pd.DataFrame(rows, columns=["StudyInstanceUID", *TARGETS])
    df.to_csv(tmp_path / "train.csv", index=False)
    return df


def test_find_data_dir_order_and_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CSPINE_DATA", raising=False)
    with pytest.raises(DataError) as err:
        find_data_dir()
    for tried in (
        "input/rsna-2022-cervical-spine-fracture-detection",
        "/kaggle/input/rsna-2022",
        "/kaggle/input/competitions/rsna-2022",
    ):
        assert tried in str(err.value)
    env = tmp_path / "env"
    env.mkdir()
    (env / "test.csv").write_text("row_id,StudyInstanceUID,prediction_type\n")
    monkeypatch.setenv("CSPINE_DATA", str(env))
    assert find_data_dir() == env
    local = tmp_path / "input" / "rsna-2022-cervical-spine-fracture-detection"
    local.mkdir(parents=True)
    (local / "train.csv").write_text("x\n")
    assert find_data_dir() == env  # the environment variable comes first
    monkeypatch.delenv("CSPINE_DATA")
    assert find_data_dir() == local.relative_to(tmp_path) or find_data_dir().resolve() == local
    with pytest.raises(DataError, match="nowhere"):
        find_data_dir(tmp_path / "nowhere")  # a named path that is wrong is an error, not a fallback


def test_read_train_names_file_column_and_rows(tmp_path):
    good = ["1.2.3", 1, 0, 1, 0, 0, 0, 0, 0]
    _write_train(tmp_path, [good, ["1.2.4", 0, 0, 0, 0, 0, 0, 0, 0]])
    assert len(read_train(tmp_path)) == 2
    _write_train(tmp_path, [good, ["1.2.4", 0, 0, 0, 0, 0, 0, 0, 1]])
    with pytest.raises(DataError, match=r"train\.csv: column 'patient_overall' differs .* \[1\]"):
        read_train(tmp_path)
    _write_train(tmp_path, [good, ["1.2.4", 0, 0, 2, 0, 0, 0, 0, 0]])
    with pytest.raises(DataError, match="column 'C2' is not 0/1 in 1 rows"):
        read_train(tmp_path)
    _write_train(tmp_path, [good, good])
    with pytest.raises(DataError, match="repeats a study"):
        read_train(tmp_path)
    pd.DataFrame({"StudyInstanceUID": ["a"], "C1": [0]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r"missing \['patient_overall'"):
        read_train(tmp_path)


def test_read_boxes_checks_studies(tmp_path):
    train = _write_train(tmp_path, [["1.2.3", 1, 0, 1, 0, 0, 0, 0, 0], ["1.2.4", 0, 0, 0, 0, 0, 0, 0, 0]])
    boxes = pd.DataFrame(
        {
            "StudyInstanceUID": ["1.2.3", "9.9"],
            "x": [1.0, 2],
            "y": [1.0, 2],
            "width": [3.0, 3],
            "height": [3.0, 3],
            "slice_number": [5, 6],
        }
    )
    boxes.to_csv(tmp_path / "train_bounding_boxes.csv", index=False)
    with pytest.raises(
        DataError, match=r"train_bounding_boxes\.csv: column 'StudyInstanceUID' names a study not"
    ):
        read_boxes(tmp_path, train)
    boxes.iloc[:1].to_csv(tmp_path / "train_bounding_boxes.csv", index=False)
    assert len(read_boxes(tmp_path, train)) == 1
    assert read_boxes(tmp_path / "absent").empty


def test_test_studies_handle_both_public_mismatches(tmp_path, caplog):
    rows = [
        {"row_id": f"{u}_{t}", "StudyInstanceUID": u, "prediction_type": t}
        for u in ("1.1", "1.2")
        for t in TARGETS
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "test_images" / "1.2").mkdir(parents=True)
    (tmp_path / "test_images" / "7.7").mkdir()
    assert list_test_studies(tmp_path) == ["1.2"]
    assert "1.1" in caplog.text  # listed but absent: said so
    bad = pd.DataFrame(rows)
    bad.loc[0, "row_id"] = "1.1_C9"
    bad.to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(DataError, match="row_id"):
        read_test(tmp_path)


def test_slice_labels_follow_file_numbers_in_reversed_studies():
    numbers = np.array([40, 39, 38, 37, 36])  # head to feet, numbered feet to head
    boxes = pd.DataFrame({"StudyInstanceUID": ["u"] * 2, "slice_number": [39, 36]})
    np.testing.assert_array_equal(slice_labels(numbers, boxes, "u"), [0, 1, 0, 0, 1])
    with pytest.warns(UserWarning, match="absent"):
        slice_labels(numbers, pd.DataFrame({"StudyInstanceUID": ["u"], "slice_number": [99]}), "u")


def test_folds_are_disjoint_complete_stratified_and_deterministic():
    rng = np.random.default_rng(0)
    n = 600
    vert = (rng.random((n, 7)) < [0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.2]).astype(int)
    train = pd.DataFrame(vert, columns=list(TARGETS[1:]))
    train.insert(0, "patient_overall", vert.max(axis=1))
    train.insert(0, "StudyInstanceUID", [f"1.2.{i}" for i in range(n)])
    folds = make_folds(train, n_splits=5, seed=1)
    assert folds["StudyInstanceUID"].is_unique and len(folds) == n and set(folds["fold"]) == set(range(5))
    merged = train.merge(folds, on="StudyInstanceUID")
    for t in TARGETS:
        whole = train[t].mean()
        for _, part in merged.groupby("fold"):
            assert abs(part[t].mean() - whole) < 0.03, t
    pd.testing.assert_frame_equal(folds, make_folds(train, n_splits=5, seed=1))
    assert not folds["fold"].equals(make_folds(train, n_splits=5, seed=2)["fold"])
    with pytest.raises(DataError, match="cannot make"):
        make_folds(train.iloc[:3], n_splits=5)


def _masked_study(root: Path):
    """The first masked study of a synthetic competition: its mask's path and its series."""
    import warnings

    from cspine.dicom import load_series

    mask_path = next((root / "segmentations").glob("*.nii"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mask_path, load_series(root / "train_images" / mask_path.stem)


def test_read_mask_rejects_a_mask_of_another_extent(synthetic_root, tmp_path):
    import nibabel as nib

    from cspine.competition import read_mask

    mask_path, series = _masked_study(synthetic_root)
    image = nib.load(mask_path)
    short = nib.Nifti1Image(np.asarray(image.dataobj)[:, :, : image.shape[2] // 2], image.affine)
    nib.save(short, tmp_path / "short.nii")
    with pytest.raises(DataError, match=r"short\.nii: mask extent"):
        read_mask(tmp_path / "short.nii", series)


def test_mask_labels_follow_the_competitions_scheme():
    from cspine.competition import mask_labels

    real = np.array([0, 1, 7, 8, 12, 19], np.uint8)  # background, C1, C7, T1, T5, T12
    assert mask_labels(real, Path("m.nii")).tolist() == [0, 1, 7, 8, 8, 8]  # thoracic: one class
    just_below = np.array([0.0, 0.9999, 6.9999, 8.0001], np.float32)  # a float mask, as some tools write
    assert mask_labels(just_below, Path("m.nii")).tolist() == [0, 1, 7, 8]  # rounded, not truncated
    for bad, message in (
        (np.array([0, -1, 3]), r"m\.nii: mask labels \[-1\]"),
        (np.array([0, 20, 3]), r"labels \[20\] are outside 0\.\.19"),
        (np.array([0.0, 2.5]), "not whole numbers"),
        (np.array([0.0, np.nan]), "NaN"),
    ):
        with pytest.raises(DataError, match=message):
            mask_labels(bad, Path("m.nii"))


def test_read_mask_reads_thoracic_labels_and_refuses_a_flipped_mask(synthetic_root, tmp_path):
    import nibabel as nib

    from cspine.competition import read_mask

    mask_path, series = _masked_study(synthetic_root)
    image = nib.load(mask_path)
    data = np.asarray(image.dataobj).astype(np.float32)
    thoracic = np.where(data == 8, 11.0, data) - 1e-4 * (data > 0)  # T4's label, stored a hair below whole
    nib.save(nib.Nifti1Image(thoracic, image.affine), tmp_path / "real.nii")
    read = read_mask(tmp_path / "real.nii", series)
    assert read.max() <= 8 and (read == 1).any() and ((read == 8).any() == (data == 8).any())
    assert np.array_equal(read, read_mask(mask_path, series))  # the same labels as the integer mask
    flipped = np.where((data >= 1) & (data <= 7), 8 - data, data)  # C1 <-> C7, C2 <-> C6, C3 <-> C5
    nib.save(nib.Nifti1Image(flipped, image.affine), tmp_path / "flipped.nii")
    with pytest.raises(DataError, match=r"flipped\.nii: C1 lies below C7"):
        read_mask(tmp_path / "flipped.nii", series)


def test_a_gzipped_mask_is_found_and_read_like_the_plain_one(synthetic_root, tmp_path):
    import gzip
    import shutil

    from cspine.competition import find_mask, read_mask

    plain, series = _masked_study(synthetic_root)
    data = tmp_path / "data"
    (data / "segmentations").mkdir(parents=True)
    with open(plain, "rb") as src, gzip.open(data / "segmentations" / f"{plain.name}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    found = find_mask(data, plain.stem)
    assert found == data / "segmentations" / f"{plain.stem}.nii.gz" and find_mask(data, "absent") is None
    assert np.array_equal(read_mask(found, series), read_mask(plain, series))


def test_box_warnings_name_their_study():
    from cspine.labels import slice_labels

    boxes = pd.DataFrame(
        {"StudyInstanceUID": ["1.2.3"], "x": [1], "y": [1], "width": [2], "height": [2], "slice_number": [99]}
    )
    with pytest.warns(UserWarning, match=r"study 1\.2\.3: 1 boxes name slice numbers absent"):
        slice_labels(np.arange(1, 10), boxes, "1.2.3")


def test_a_mask_is_labelled_without_a_wide_copy():
    """Found by the rehearsal: a real-shaped mask (512² × 350, 92 MB as uint8) was widened to int64 (734 MB)
    to check its labels, in each of prepare's reading processes."""
    import tracemalloc

    from cspine.competition import mask_labels

    data = np.zeros((40, 256, 256), np.uint8)
    data[5:10], data[30:] = 3, 12
    tracemalloc.start()
    labels = mask_labels(data, Path("m.nii"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 3 * data.nbytes and labels.dtype == np.uint8 and labels.max() == 8  # thoracic: one class
