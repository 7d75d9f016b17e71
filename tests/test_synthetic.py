"""cspine.synthetic and cspine.phantom: the real layout, consistent labels, anatomy where it belongs."""

from __future__ import annotations

import hashlib
import warnings

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom

from cspine import TARGETS, VERTEBRAE
from cspine.competition import read_boxes, read_mask, read_test, read_train
from cspine.config import SynthConfig
from cspine.dicom import load_series
from cspine.labels import slice_labels
from cspine.phantom import PhantomConfig, draw_fractured_levels, render_study
from cspine.synthetic import make_competition, make_study


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_series(path)


def test_layout_is_the_competitions(synthetic_root):
    root = synthetic_root
    for name in ("train.csv", "train_bounding_boxes.csv", "test.csv", "sample_submission.csv"):
        assert (root / name).is_file(), name
    train, test = read_train(root), read_test(root)  # the readers validate the schemas
    assert list(train.columns) == ["StudyInstanceUID", *TARGETS]
    assert len(train) == 8 and len(test) == 2 * 8
    sub = pd.read_csv(root / "sample_submission.csv")
    assert list(sub.columns) == ["row_id", "fractured"] and (sub["row_id"] == test["row_id"]).all()
    for uid in train["StudyInstanceUID"]:
        assert uid.startswith("1.2.826.0.1.3680043.") and "_" not in uid
        files = list((root / "train_images" / uid).iterdir())
        assert files and all(f.suffix == ".dcm" and f.stem.isdigit() for f in files)
    for uid in test["StudyInstanceUID"].unique():
        assert (root / "test_images" / uid).is_dir()
    masks = list((root / "segmentations").glob("*.nii"))
    assert masks and all(m.stem in set(train["StudyInstanceUID"]) for m in masks)


def test_headers_look_real(synthetic_root):
    uid = read_train(synthetic_root)["StudyInstanceUID"].iloc[0]
    path = next((synthetic_root / "train_images" / uid).glob("*.dcm"))
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CT" and ds.StudyInstanceUID == uid
    for key in (
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "Rows",
        "Columns",
        "BitsStored",
        "PixelRepresentation",
        "RescaleIntercept",
        "RescaleSlope",
        "InstanceNumber",
    ):
        assert key in ds, key
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.InstanceNumber == int(path.stem)


def test_every_study_loads_head_to_feet_with_consistent_labels(synthetic_root):
    root = synthetic_root
    train = read_train(root)
    boxes = read_boxes(root, train)
    assert (train["patient_overall"] == train[list(VERTEBRAE)].max(axis=1)).all()
    for row in train.itertuples():
        series = _load(root / "train_images" / row.StudyInstanceUID)
        assert np.all(np.diff(series.positions[:, 2]) < 0)
        assert series.hu.min() <= -1000 and series.hu.max() > 500
        study_boxes = boxes[boxes["StudyInstanceUID"] == row.StudyInstanceUID]
        assert (len(study_boxes) > 0) == bool(row.patient_overall)  # box_fraction=1: every positive has boxes
        if len(study_boxes):
            labels = slice_labels(series.slice_numbers, study_boxes)
            assert labels.sum() == study_boxes["slice_number"].nunique()
            mask_path = root / "segmentations" / f"{row.StudyInstanceUID}.nii"
            if mask_path.exists():
                mask = read_mask(mask_path, series)
                fractured = {i + 1 for i, v in enumerate(VERTEBRAE) if getattr(row, v)}
                order = {n: k for k, n in enumerate(series.slice_numbers)}
                for b in study_boxes.itertuples():  # every box sits on a fractured vertebra's footprint
                    k = order[b.slice_number]
                    window = mask[k, int(b.y) : int(b.y + b.height), int(b.x) : int(b.x + b.width)]
                    assert set(np.unique(window)) & fractured, (row.StudyInstanceUID, b)


def test_masks_sit_on_bone_and_align_by_affine(synthetic_root):
    root = synthetic_root
    for path in sorted((root / "segmentations").glob("*.nii")):
        series = _load(root / "train_images" / path.stem)
        mask = read_mask(path, series)
        assert set(np.unique(mask)) >= {0, 2, 5}
        assert np.median(series.hu[(mask >= 1) & (mask <= 7)]) > 200  # vertebrae are bone
        assert np.median(series.hu[mask == 0]) < 100
        flipped = nib.load(path).get_fdata()[:, ::-1, ::-1].transpose(2, 1, 0)  # the community's fixed flip
        flipped = np.minimum(flipped, 8)  # read_mask keeps every thoracic vertebra as one class
        in_file_order = mask[np.argsort(series.slice_numbers)]  # what the flip is meant to match
        head_to_feet_numbering = series.slice_numbers[0] < series.slice_numbers[-1]
        assert np.array_equal(flipped, in_file_order) == head_to_feet_numbering


def test_masks_label_the_thoracic_spine_as_the_real_ones_do(tmp_path):
    """Real masks label T1..T12 as 8..19; a third of the phantoms reach T2, so labels above 8 reach prepare."""
    reach = [
        render_study(np.random.default_rng((3, i)), PhantomConfig(image_size=32)).labels.max()
        for i in range(30)
    ]
    assert set(reach) == {8, 9} and 5 <= reach.count(9) <= 16
    root = make_competition(
        tmp_path / "c",
        SynthConfig(n_train=6, n_test=0, seed=2, image_size=48, n_slices=24, mask_fraction=1.0, min_masks=0),
    )
    raw = {path.stem: np.asarray(nib.load(path).dataobj) for path in (root / "segmentations").glob("*.nii")}
    assert any(9 in np.unique(data) for data in raw.values())
    for uid, data in raw.items():
        mask = read_mask(root / "segmentations" / f"{uid}.nii", _load(root / "train_images" / uid))
        assert mask.max() == 8 and (mask == 8).sum() == (data >= 8).sum()  # thoracic: one class


def test_reversed_numbering_really_is_reversed(tmp_path):
    seen = {"reversed": 0, "forward": 0}
    for i in range(60):  # ~10% of studies are numbered feet to head; tiny studies keep this quick
        if seen["reversed"] >= 2 and seen["forward"] >= 2:
            break
        uid = f"1.2.826.0.1.3680043.{900 + i}"
        result = make_study(
            tmp_path,
            "train",
            uid,
            (3, 2, i),
            PhantomConfig(image_size=40, n_slices=10),
            with_boxes=False,
            with_mask=True,
        )
        series = _load(tmp_path / "train_images" / uid)
        files_run_up = series.slice_numbers[0] > series.slice_numbers[-1]
        assert files_run_up == result["reversed"]
        seen["reversed" if files_run_up else "forward"] += 1
        if files_run_up:  # the fixed flip is wrong here, the affine is right
            path = tmp_path / "segmentations" / f"{uid}.nii"
            mask = read_mask(path, series)
            flipped = nib.load(path).get_fdata()[:, ::-1, ::-1].transpose(2, 1, 0)
            assert not np.array_equal(flipped, mask[np.argsort(series.slice_numbers)])
            assert np.median(series.hu[(mask >= 1) & (mask <= 7)]) > 200
    assert seen["reversed"] >= 1 and seen["forward"] >= 1


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".complete"):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_identical_bytes(tmp_path):
    a = make_competition(tmp_path / "a", SynthConfig(n_train=3, n_test=1, seed=5, image_size=48, n_slices=10))
    b = make_competition(
        tmp_path / "b", SynthConfig(n_train=3, n_test=1, seed=5, image_size=48, n_slices=10), workers=2
    )
    c = make_competition(tmp_path / "c", SynthConfig(n_train=3, n_test=1, seed=6, image_size=48, n_slices=10))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_phantom_anatomy_and_fractures():
    study = render_study(
        np.random.default_rng(0), PhantomConfig(image_size=96, n_slices=50, fractured=(2, 6), difficulty=0.0)
    )
    assert study.fractured_levels == (2, 6)
    labels = study.labels
    for level in range(1, 8):
        slices = np.flatnonzero((labels == level).any(axis=(1, 2)))
        assert len(slices), level
    # levels run head to feet: C1 above C2 above ... above C7
    tops = [np.flatnonzero((labels == lv).any(axis=(1, 2))).mean() for lv in range(1, 8)]
    assert tops == sorted(tops)
    assert study.hu.min() == -2048.0  # field-of-view padding
    gap = study.fracture > 0.5
    on_fractured_slices = (
        gap.any(axis=(1, 2))[:, None, None] & np.isin(labels, [2, 6]) & ~(study.fracture > 0)
    )
    assert gap.any()
    assert np.median(study.hu[gap]) < np.median(study.hu[on_fractured_slices]) - 150  # a low-density break
    assert all(labels[k].max() > 0 for k, *_ in study.fracture_boxes())
    assert {k for k, *_ in study.fracture_boxes()} == set(
        np.flatnonzero((study.fracture > 0.5).sum(axis=(1, 2)) >= 4)
    )


def test_a_healthy_atlas_is_a_closed_ring():
    """Normal anatomy must not look broken: a C1 whose arches stop short of the lateral masses shows four
    fracture-like gaps in every healthy study (the demo CNN's false positives gathered there)."""
    for seed in range(4):
        study = render_study(
            np.random.default_rng(seed), PhantomConfig(image_size=160, n_slices=100, fractured=())
        )
        c1 = np.flatnonzero((study.labels == 1).any(axis=(1, 2)))
        middle = c1[len(c1) // 2]  # through both arches
        bone = (study.labels[middle] == 1).astype(np.uint8)
        count, _ = cv2.connectedComponents(bone, connectivity=4)
        assert count - 1 == 1, seed  # one piece of bone, not arches and masses apart
        holes, hole_labels = cv2.connectedComponents(1 - bone, connectivity=4)
        enclosed = [
            (hole_labels == h).sum()
            for h in range(1, holes)
            if not (hole_labels == h)[[0, -1], :].any() and not (hole_labels == h)[:, [0, -1]].any()
        ]
        # the ring closes round the canal, not only round a foramen
        assert max(enclosed, default=0) > 100, seed


def test_label_prevalence_follows_the_real_data():
    draws = [draw_fractured_levels(np.random.default_rng([7, i])) for i in range(2000)]
    overall = np.mean([bool(d) for d in draws])
    per_level = np.array([np.mean([lv in d for d in draws]) for lv in range(1, 8)])
    assert 0.42 < overall < 0.54  # real: 47.6%
    assert per_level[6] > 2 * per_level[2]  # C7 (19.5%) far more often than C3 (3.6%)
    assert np.argmax(per_level) == 6 and np.argmin(per_level) == 2
    assert max(len(d) for d in draws) <= 6


def test_a_competition_without_test_studies_is_still_complete(tmp_path):
    root = make_competition(tmp_path, SynthConfig(n_train=2, n_test=0, seed=1, image_size=40, n_slices=8))
    assert read_test(root).empty and list(pd.read_csv(root / "sample_submission.csv").columns) == [
        "row_id",
        "fractured",
    ]


def test_label_shares_follow_the_real_data_with_a_dozen_masks(tmp_path):
    from cspine.synthetic import make_competition

    root = make_competition(tmp_path, SynthConfig(n_train=40, n_test=2, seed=5, image_size=48, n_slices=12))
    train = pd.read_csv(root / "train.csv")
    boxes = pd.read_csv(root / "train_bounding_boxes.csv")
    positives = set(train.loc[train["patient_overall"] == 1, "StudyInstanceUID"])
    boxed = set(boxes["StudyInstanceUID"])
    assert boxed <= positives and 0 < len(boxed) < len(positives) / 2  # about a quarter, as in the real data
    assert len(list((root / "segmentations").glob("*.nii"))) == 12  # 4.3% of 40 is 2: at least a dozen


def test_truth_gives_every_slice_of_every_study_its_true_vertebra(tmp_path):
    from cspine.competition import TRUTH_DIR, read_mask
    from cspine.dicom import load_series
    from cspine.synthetic import make_competition

    root = make_competition(
        tmp_path, SynthConfig(n_train=3, n_test=1, seed=2, image_size=48, n_slices=14, mask_fraction=1.0)
    )
    truth = pd.read_csv(root / TRUTH_DIR / "vertebrae.csv", dtype={"StudyInstanceUID": str})
    studies = [*(root / "train_images").iterdir(), *(root / "test_images").iterdir()]
    assert truth["StudyInstanceUID"].nunique() == len(studies) == 4
    assert len(truth) == sum(len(list(study.glob("*.dcm"))) for study in studies) >= 4 * 14
    assert not (root / "train_images" / TRUTH_DIR).exists()  # outside the competition layout
    for mask_path in (root / "segmentations").glob("*.nii"):
        uid = mask_path.name.removesuffix(".nii")
        series = load_series(root / "train_images" / uid)
        mask = read_mask(mask_path, series)
        rows = truth[truth["StudyInstanceUID"] == uid].set_index("slice_number").loc[series.slice_numbers]
        for k in range(len(series)):  # the truth agrees with the segmentation slice by slice
            present = {int(v) for v in np.unique(mask[k]) if 1 <= v <= 7}
            assert present == {
                i + 1 for i, v in enumerate(("C1", "C2", "C3", "C4", "C5", "C6", "C7")) if rows.iloc[k][v]
            }
