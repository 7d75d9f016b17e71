"""Vertebrae first: the segmentation stage, its geometry, and slice labels from vertebrae."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cspine import VERTEBRAE
from cspine.config import load_config
from cspine.labels import UNKNOWN
from cspine.runs import Run
from cspine.segment import sagittal_labels, sagittal_planes, slice_levels, vertebra_extents
from cspine.segmenter import (
    SEG_CLASSES,
    SegReading,
    count_levels,
    padded_rows,
    plane_labels,
    plane_rows,
    segment_study,
)

from .conftest import SMOKE_CONFIG

SEG_SMOKE = ["seg.steps=3", "seg.batch_size=4", "seg.row_mm=4", "seg.folds=2", "slice.labels=vertebrae"]


def test_a_sagittal_plane_is_one_column_of_every_slice_with_its_neighbours():
    n, s = 5, 8
    study = np.zeros((n, s, s, 3), np.uint8)
    study[..., 0] = np.arange(s)[None, None, :] * 10  # window 0 encodes the column
    study[..., 1] = np.arange(n)[:, None, None] * 10  # window 1 encodes the slice
    planes = sagittal_planes(study, np.array([0, 4]), context=1, rows=n)
    assert planes.shape == (2, 9, 32, 32)  # 3 planes × 3 windows; rows and width padded up to 32
    column = planes[:, 0::3, :n, 0] * 0.25 + 0.5  # undo the normalisation: window 0 of each plane
    assert np.allclose(column[0].numpy() * 255, [[0] * n, [0] * n, [10] * n], atol=1e-3)  # edge repeats
    assert np.allclose(column[1].numpy() * 255, [[30] * n, [40] * n, [50] * n], atol=1e-3)
    rows = planes[0, 1, :n, 0] * 0.25 + 0.5  # window 1 of the first plane, down the slices
    assert np.allclose(rows.numpy() * 255, np.arange(n) * 10, atol=1e-3)  # head to feet, top to bottom
    assert np.allclose(planes[:, :, n:] * 0.25 + 0.5, 0)  # below the scan: black
    mask = np.zeros((n, s, s), np.uint8)
    mask[2, 3, 4] = 5
    labels = sagittal_labels(mask, np.array([4]), rows=n, pad_to=32)
    assert labels.shape == (1, 32, 32) and labels[0, 2].max() == 5 and labels.sum() == 5 * 4  # 8 → 32 wide


def test_a_vertebra_lies_on_the_same_rows_however_long_the_scan_and_its_spacing():
    def scan(dz: float, length_mm: float) -> np.ndarray:  # C2 from 30 to 60 mm below the scan's top
        z = np.arange(0, length_mm, dz)
        mask = np.zeros((len(z), 8, 8), np.uint8)
        mask[(z >= 30) & (z < 60), 4, 4] = 2
        return mask

    def c2_rows(dz: float, length_mm: float) -> np.ndarray:
        mask = scan(dz, length_mm)
        rows = plane_rows(len(mask), dz, row_mm=2.0)
        return np.flatnonzero(
            (sagittal_labels(mask, np.array([4]), rows, padded_rows(rows))[0] == 2).any(dim=1)
        )

    short = c2_rows(1.0, 130)  # a scan that stops at C7, thin slices
    assert short.min() == 15 and short.max() == 29  # 30..60 mm at 2 mm a row
    # thick slices, or on into T2 and below
    for dz, length in [
        (2.5, 130),
        (1.0, 190),
        (2.5, 190),
        (0.625, 300),
    ]:
        rows = c2_rows(dz, length)
        assert abs(rows.min() - short.min()) <= 1 and abs(rows.max() - short.max()) <= 1, (dz, length, rows)
    with pytest.raises(ValueError, match="ImagePositionPatient"):
        plane_rows(100, float("nan"), 2.0)


def test_segment_study_maps_each_row_back_to_its_slice_and_ignores_the_padding():
    class RowModel(torch.nn.Module):  # labels rows 10..19 C3, and the padding below the scan C7
        def __init__(self, rows: int):
            super().__init__()
            self.rows = rows

        def forward(self, x):
            logits = torch.zeros(x.shape[0], SEG_CLASSES, *x.shape[2:])
            logits[:, 3, 10:20] = 10
            logits[:, 7, self.rows :] = 10
            return logits

    n, dz = 60, 1.5  # 90 mm: 45 rows at 2 mm, padded to 64
    study = np.zeros((n, 16, 16, 3), np.uint8)
    how = SegReading(context=0, row_mm=2.0, plane_stride=1, count=False, count_margin=0.2, min_pixels=1)
    labels = segment_study([RowModel(45)], study, dz, how, torch.device("cpu"))
    assert labels.shape == (n, 16, 16) and not (labels == 7).any()
    slices = np.flatnonzero((labels == 3).all(axis=(1, 2)))
    # rows 10..19 at 2 mm: 20..40 mm = slices 13..26
    assert 13 <= slices.min() <= 14 and 25 <= slices.max() <= 27


def _one_hot(labels: np.ndarray) -> torch.Tensor:
    """float [SEG_CLASSES, N, S, S]: a label volume as certain probabilities."""
    return torch.from_numpy(np.eye(SEG_CLASSES, dtype=np.float32)[labels].transpose(3, 0, 1, 2).copy())


@pytest.fixture(scope="module")
def long_phantom():
    """A phantom scan that runs on into T2, its labels with the thoracic ones as the one class T1."""
    from cspine.phantom import PhantomConfig, render_study

    study = render_study(np.random.default_rng(9), PhantomConfig(image_size=48))  # 133 slices, to T2
    assert (study.labels == 9).any()
    return np.minimum(study.labels, 8), study.spacing[0]


def test_counting_the_bodies_puts_back_a_label_that_drifted_down_the_spine(long_phantom):
    truth, dz = long_phantom
    # the network's error on long scans: C5 stretched over C6's body, each label below one body late
    drifted = truth.copy()
    for k in (6, 7, 8):
        drifted[truth == k] = k - 1
    how = SegReading(context=0, row_mm=2.0, plane_stride=1, count=True, count_margin=0.0, min_pixels=1)
    counted, was_counted = plane_labels(_one_hot(drifted), dz, how)
    spine = truth > 0
    assert was_counted and (counted[spine] == truth[spine]).mean() > 0.97
    assert (drifted[spine] == truth[spine]).mean() < 0.7  # what the network said
    assert not (counted[~spine]).any()  # the background stays background
    plain, was_counted = plane_labels(_one_hot(drifted), dz, dataclasses.replace(how, count=False))
    assert not was_counted and (plain == drifted).all()


def test_a_labels_margin_lets_it_reach_past_its_own_bodies(long_phantom):
    truth, dz = long_phantom
    c5 = np.flatnonzero((truth == 5).any(axis=(1, 2)))
    labelled = truth.copy()
    labelled[labelled == 5] = 4  # the network says C4 down C5's body (as a real C4's arch reaches its top)
    how = SegReading(context=0, row_mm=2.0, plane_stride=1, count=True, count_margin=0.0, min_pixels=1)
    strict = plane_labels(_one_hot(labelled), dz, how)[0]
    assert (strict[c5][truth[c5] > 0] == 5).all()  # C5's body is C5's alone
    wide = plane_labels(_one_hot(labelled), dz, dataclasses.replace(how, count_margin=0.5))[0]
    reached = np.flatnonzero((wide[c5] == 4).any(axis=(1, 2)))
    assert reached.tolist() == list(range(len(reached))) and 1 <= len(reached) <= len(c5) // 2


def test_a_spine_without_discs_or_without_bone_is_not_counted(long_phantom):
    truth, dz = long_phantom
    air = torch.zeros(SEG_CLASSES, 40, 8, 8)
    air[0] = 1
    assert count_levels(air, dz, 0.2) is None
    rod = torch.zeros(SEG_CLASSES, 40, 8, 8)  # bone from top to bottom: no disc to count by
    rod[0] = 1
    rod[3, :, 2:5, 2:5], rod[0, :, 2:5, 2:5] = 1, 0
    assert count_levels(rod, dz, 0.2) is None
    # a scan that stops inside C4: five vertebrae cannot be counted as seven
    short = _one_hot(truth[: np.flatnonzero((truth == 4).any(axis=(1, 2)))[2]])
    assert count_levels(short, dz, 0.2) is None


def test_vertebra_extents_keep_each_vertebras_longest_run():
    labels = np.zeros((12, 16, 16), np.uint8)
    labels[2:6, 4:8, 5:9] = 3  # C3 on slices 2..5
    labels[9, 0:3, 0:3] = 3  # a stray blob of C3 below it: noise
    labels[6:10, 6:10, 6:10] = 4  # C4 on slices 6..9
    presence, extents = vertebra_extents(labels, min_pixels=4)
    assert presence[:, 2].nonzero()[0].tolist() == [2, 3, 4, 5]
    assert presence[:, 3].nonzero()[0].tolist() == [6, 7, 8, 9]
    assert not presence[:, [0, 1, 4, 5, 6]].any()
    c3 = next(e for e in extents if e["vertebra"] == "C3")
    assert (c3["z0"], c3["z1"], c3["y0"], c3["y1"], c3["x0"], c3["x1"]) == (2, 5, 4, 8, 5, 9)
    assert slice_levels(labels, 4).tolist() == [0, 0, 3, 3, 3, 3, 4, 4, 4, 4, 0, 0]  # slice 9: C4 outnumbers


def test_pseudo_labels_are_presence_times_the_study_labels():
    from cspine.labels import vertebra_slice_labels

    def rows(uid, label, present, fracture):
        return [
            {
                "StudyInstanceUID": uid,
                "order": k,
                "label": label[k],
                **{f"{v}_present": present[k][i] for i, v in enumerate(VERTEBRAE)},
                **{f"{v}_fracture": fracture[k][i] for i, v in enumerate(VERTEBRAE)},
            }
            for k in range(3)
        ]

    u, none = [UNKNOWN] * 7, [0] * 7
    index = pd.DataFrame(
        rows("no_boxes", [UNKNOWN] * 3, [u] * 3, [u] * 3)  # fractured C2 and C5, no boxes, no mask
        + rows("masked", [UNKNOWN] * 3, [[0, 1, 0, 0, 0, 0, 0], none, none], [u] * 3)  # its own mask wins
        + rows("boxed", [0, 1, 0], [u] * 3, [none, [0, 1, 0, 0, 0, 0, 0], none])  # boxes stay the label
        + rows("healthy", [0] * 3, [u] * 3, [none] * 3)
    )
    labels = pd.DataFrame(
        {
            "StudyInstanceUID": ["no_boxes", "masked", "boxed", "healthy"],
            **{v: [int(v in ("C2", "C5")), int(v in ("C2", "C5")), int(v == "C2"), 0] for v in VERTEBRAE},
        }
    ).set_index("StudyInstanceUID")
    shown = {0: {"C1", "C2"}, 1: {"C4"}, 2: {"C5", "C6"}}  # the segmentation's reading, every study alike
    vertebrae = pd.DataFrame(
        [
            {"StudyInstanceUID": uid, "order": k, **{v: int(v in shown[k]) for v in VERTEBRAE}}
            for uid in labels.index
            for k in range(3)
        ]
    )
    out = vertebra_slice_labels(index, labels, vertebrae).set_index(["StudyInstanceUID", "order"])
    assert out.loc["no_boxes", "label"].tolist() == [1, 0, 1]  # C2 on slice 0, C5 on slice 2
    assert out.loc[("no_boxes", 2), "C5_fracture"] == 1 and out.loc[("no_boxes", 2), "C6_fracture"] == 0
    assert out.loc["masked", "label"].tolist() == [1, 0, 0]  # its mask shows C2 on slice 0 only
    assert out.loc["boxed", "label"].tolist() == [0, 1, 0]  # unchanged
    assert out.loc["healthy", "label"].tolist() == [0, 0, 0]
    # presence heads keep learning from true masks only
    assert (
        out[[f"{v}_present" for v in VERTEBRAE]].to_numpy()
        == index[[f"{v}_present" for v in VERTEBRAE]].to_numpy()
    ).all()


def _prepared(synthetic_root, run_dir, overrides=()):
    from cspine.pipeline import setup_run
    from cspine.prepare import prepare

    cfg = load_config(SMOKE_CONFIG, [*SEG_SMOKE, *overrides])
    setup_run(cfg, synthetic_root, run_dir)
    prepare(cfg, synthetic_root, Run(run_dir).cache.root)
    return cfg


def test_cached_masks_put_each_vertebra_on_its_slices_even_with_gaps(synthetic_root, tmp_path):
    """Feet-to-head numbering and missing slices: the cached mask, read by order, agrees with the truth
    file, read by slice number."""
    from cspine.cache import read_meta
    from cspine.competition import TRUTH_DIR

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    truth_path = data / TRUTH_DIR / "vertebrae.csv"
    truth = pd.read_csv(truth_path, dtype={"StudyInstanceUID": str})
    masked = sorted(p.name.removesuffix(".nii") for p in (data / "segmentations").glob("*.nii"))
    flipped = data / "train_images" / masked[1]  # renumbered feet to head, as about 10% of real studies are
    files = sorted(flipped.iterdir(), key=lambda p: int(p.stem))
    last = int(files[-1].stem) + 1
    for path in files:
        path.rename(path.with_name(f"{last - int(path.stem)}.tmp"))
    for path in flipped.iterdir():
        path.rename(path.with_suffix(".dcm"))
    rows = truth["StudyInstanceUID"] == masked[1]
    truth.loc[rows, "slice_number"] = last - truth.loc[rows, "slice_number"]
    truth.to_csv(truth_path, index=False)
    gappy = data / "train_images" / masked[0]
    for path in sorted(gappy.iterdir(), key=lambda p: int(p.stem))[10:13]:
        path.unlink()  # three slices missing in the middle: uneven spacing
    run = Run(tmp_path / "run")
    _prepared(data, run.root)
    for uid in masked:
        numbers = read_meta(run.cache.root, uid)["slice_numbers"]
        # head first in the cache, whatever the numbering
        assert (numbers[0] > numbers[-1]) == (uid == masked[1])
        levels = slice_levels(np.load(run.cache.mask(uid)), min_pixels=1)
        expected = (
            truth[truth["StudyInstanceUID"] == uid].set_index("slice_number").loc[numbers, "level"].to_numpy()
        )
        assert np.mean(levels == expected) > 0.9, uid  # the crop can hide a level's last few pixels
    assert len(read_meta(run.cache.root, masked[0])["slice_numbers"]) == 40 - 3


@pytest.mark.slow
def test_segment_trains_and_segments_every_study_out_of_fold(synthetic_root, tmp_path):
    from cspine.segment import is_segmented, load_segmenter, segment

    run = Run(tmp_path / "run")
    cfg = _prepared(synthetic_root, run.root)
    table = segment(cfg, run.root)
    index = run.cache.read_index()
    assert len(table) == len(index) and set(table["StudyInstanceUID"]) == set(index["StudyInstanceUID"])
    assert set(table.columns) >= {"order", "slice_number", "level", *VERTEBRAE}
    assert is_segmented(cfg, run.root)
    dice = pd.read_csv(run.seg_file("dice.csv"), dtype={"StudyInstanceUID": str})
    trained_on = {k: set(load_segmenter(run.seg_model(k))[1].trained_on) for k in range(2)}
    for uid, fold in zip(dice["StudyInstanceUID"], dice["fold"]):
        assert uid not in trained_on[fold]  # every Dice is out of fold
    assert set(dice["StudyInstanceUID"]) == {
        u for u in index["StudyInstanceUID"].unique() if run.cache.mask(u).is_file()
    }
    checks = pd.read_csv(run.seg_file("checks.csv"), dtype={"StudyInstanceUID": str})
    assert list(checks["StudyInstanceUID"]) == list(index["StudyInstanceUID"].unique())
    assert (checks["passed"] == checks["problems"].isna()).all()  # a failing study says why


@pytest.mark.slow
def test_self_training_labels_with_each_folds_own_round_one_model_and_keeps_the_masked_out_of_fold(
    synthetic_root, tmp_path, monkeypatch
):
    """Round 2 of fold k trains on its masked studies and on the unmasked ones its round-1 model labelled (so
    the fold's masked studies reach it through no label), and only on those whose labels pass."""
    import cspine.segment
    from cspine.segment import load_segmenter, masked_studies, segment

    run = Run(tmp_path / "run")
    cfg = _prepared(
        synthetic_root, run.root, ["seg.rounds=2", "seg.pseudo_steps=2", "seg.pseudo_confidence=0"]
    )
    unmasked = [
        u for u in run.cache.read_index()["StudyInstanceUID"].unique() if u not in masked_studies(run)
    ]
    # three training steps find no spine: the check is made to pass all but one study, the one being read
    rejected, reading = unmasked[0], [None]
    real = cspine.segment.load_study_images

    def load(root, uid, *args, **kwargs):
        reading[0] = uid
        return real(root, uid, *args, **kwargs)

    monkeypatch.setattr(cspine.segment, "load_study_images", load)
    monkeypatch.setattr(
        cspine.segment, "check_vertebrae", lambda found, dz: ["no C7"] if reading[0] == rejected else []
    )
    labellers = []  # the weights of every model that labels a study for round 2
    probabilities = cspine.segment.plane_probabilities

    def labelling(models, *args, **kwargs):
        labellers.append([{n: v.clone() for n, v in m.state_dict().items()} for m in models])
        return probabilities(models, *args, **kwargs)

    monkeypatch.setattr(cspine.segment, "plane_probabilities", labelling)
    segment(cfg, run.root)
    studies = run.cache.read_index()["StudyInstanceUID"].nunique()
    assert len(labellers) == 2 * len(unmasked) + studies  # round 2's labels, then the stage reads every study
    for k in range(2):
        own = load_segmenter(run.seg_first(k))[0].state_dict()
        for weights in labellers[k * len(unmasked) : (k + 1) * len(unmasked)]:  # fold by fold: its own model
            assert len(weights) == 1 and all(torch.equal(weights[0][name], own[name]) for name in own)
    for k in range(2):
        first, final = load_segmenter(run.seg_first(k))[1], load_segmenter(run.seg_model(k))[1]
        pseudo = pd.read_csv(run.seg_pseudo(k), dtype={"StudyInstanceUID": str})
        assert sorted(pseudo["StudyInstanceUID"]) == sorted(unmasked)
        assert pseudo.set_index("StudyInstanceUID")["used"].to_dict() == {u: u != rejected for u in unmasked}
        assert final.pseudo == sorted(set(unmasked) - {rejected}) and final.trained_on == first.trained_on
        assert final.labelled_by == first.trained_on
        assert len(final.losses) == 2 and len(first.losses) == 3
    dice = pd.read_csv(run.seg_file("dice.csv"), dtype={"StudyInstanceUID": str})
    for uid, fold in zip(dice["StudyInstanceUID"], dice["fold"]):
        meta = load_segmenter(run.seg_model(fold))[1]
        assert uid not in meta.trained_on + meta.pseudo + meta.labelled_by


def test_a_fold_model_whose_pseudo_labels_came_from_its_own_studies_is_refused(tmp_path):
    from cspine.checkpoints import SegmenterMeta
    from cspine.segment import _check_out_of_fold

    run = Run(tmp_path / "run")
    folds = {"a": 0, "b": 1}
    how = SegReading(context=0, row_mm=2.0, plane_stride=1, count=True, count_margin=0.2, min_pixels=1)
    clean = [
        SegmenterMeta(how, 0, trained_on=["b"], pseudo=["x"], labelled_by=["b"], losses=[]),
        SegmenterMeta(how, 1, trained_on=["a"], pseudo=["x"], labelled_by=["a"], losses=[]),
    ]
    _check_out_of_fold(run, folds, clean)
    leaked = [
        dataclasses.replace(clean[0], labelled_by=["a", "b"]),
        clean[1],
    ]  # labelled by a model that saw "a"
    with pytest.raises(RuntimeError, match="fold0.pt trained on a study it would score"):
        _check_out_of_fold(run, folds, leaked)


@pytest.mark.slow
def test_dice_on_every_study_reads_the_truth_in_the_caches_frame(synthetic_root, tmp_path):
    """A segmentation equal to each masked study's cached mask scores 1 against the truth files, feet-to-head
    numbering and gaps included; one that misses C3 scores 0 there; a study read by no model is skipped."""
    from cspine.scoring import truth_dice, truth_dice_table
    from cspine.segment import masked_studies
    from cspine.segmenter import save_labels

    run = Run(tmp_path / "run")
    _prepared(synthetic_root, run.root)
    masked = masked_studies(run)
    for uid in masked:
        labels = np.load(run.cache.mask(uid))
        save_labels(run.seg_labels(uid), np.where(labels == 3, 0, labels) if uid == masked[0] else labels)
    pd.DataFrame({"StudyInstanceUID": masked}).to_csv(run.seg_file("dice.csv"), index=False)
    table = truth_dice(run).set_index("StudyInstanceUID")
    assert sorted(table.index) == sorted(masked)
    assert (table.loc[masked[1:], list(VERTEBRAE)] > 0.97).all().all()
    assert table.loc[masked[0], "C3"] == 0 and table.loc[masked[0], "C4"] > 0.97
    summary = truth_dice_table(table.reset_index())
    assert summary.iloc[-1]["group"] == "every study" and summary.iloc[-1]["studies"] == len(masked)


def _extents(heights: list[int], gaps: list[int] | None = None) -> list[dict]:
    """C1..C7 one after another, ``heights`` slices each, ``gaps`` slices between them (default none)."""
    out, z = [], 0
    for i, (v, h) in enumerate(zip(VERTEBRAE, heights)):
        out.append({"vertebra": v, "z0": z, "z1": z + h - 1})
        z += h + (gaps[i] if gaps and i < len(gaps) else 0)
    return out


def test_the_check_passes_a_true_spine_and_names_what_is_wrong_with_a_bad_one():
    from cspine.segmenter import check_vertebrae

    spine = [3, 9, 4, 4, 4, 5, 5]  # at 3 mm a slice: C1 9 mm, C2 27, C3..C7 12-15 (the phantoms' proportions)
    assert check_vertebrae(_extents(spine), 3.0) == []
    assert check_vertebrae(_extents(spine)[:6], 3.0) == ["no C7"]
    assert check_vertebrae([], 3.0) == [f"no {', '.join(VERTEBRAE)}"]
    swapped = _extents(spine)
    swapped[3], swapped[4] = {**swapped[4], "vertebra": "C4"}, {**swapped[3], "vertebra": "C5"}
    assert "out of order from head to feet" in check_vertebrae(swapped, 3.0)
    assert check_vertebrae(_extents([3, 9, 4, 4, 12, 5, 5]), 3.0) == ["implausible heights: C5 36 mm"]
    assert check_vertebrae(_extents(spine, [0, 0, 0, 6, 0, 0]), 3.0) == ["gaps: C4-C5 18 mm"]
    assert check_vertebrae(_extents(spine), 0.3) == ["C3..C7 1 mm high"]


def test_a_study_whose_vertebrae_fail_the_check_labels_no_slice_from_them(tmp_path):
    """Its fractured slices stay unknown (what the study label allows), not labelled from a wrong vertebra."""
    from cspine.labels import vertebra_slice_labels
    from cspine.runs import write_csv
    from cspine.train_slices import checked_vertebrae

    run = Run(tmp_path / "run")
    rows = [
        {
            "StudyInstanceUID": uid,
            "order": k,
            "slice_number": k + 1,
            "level": 3,
            **{v: int(v == "C3") for v in VERTEBRAE},
        }
        for uid in ("good", "bad")
        for k in range(2)
    ]
    write_csv(pd.DataFrame(rows), run.seg_file("vertebrae.csv"))
    write_csv(
        pd.DataFrame(
            {"StudyInstanceUID": ["good", "bad"], "passed": [True, False], "problems": ["", "no C7"]}
        ),
        run.seg_file("checks.csv"),
    )
    index = pd.DataFrame(
        {
            "StudyInstanceUID": ["good", "good", "bad", "bad"],
            "order": [0, 1, 0, 1],
            "label": UNKNOWN,
            **{f"{v}_present": UNKNOWN for v in VERTEBRAE},
            **{f"{v}_fracture": UNKNOWN for v in VERTEBRAE},
        }
    )
    labels = pd.DataFrame(
        {"C3": [1, 1], **{v: [0, 0] for v in VERTEBRAE if v != "C3"}}, index=["good", "bad"]
    )
    out = vertebra_slice_labels(index, labels, checked_vertebrae(run)).set_index("StudyInstanceUID")
    assert (out.loc["good", "label"] == 1).all() and (out.loc["bad", "label"] == UNKNOWN).all()


@pytest.mark.slow
def test_segment_under_ddp_gathers_every_ranks_share_as_one_process_would(synthetic_root, tmp_path):
    """Two gloo ranks train one model each fold and segment half the studies each; rank 0 writes tables
    equal to those one process writes from the same models."""
    import torch.multiprocessing as mp

    from cspine.segment import segment

    run = Run(tmp_path / "run")
    cfg = _prepared(synthetic_root, run.root)
    mp.spawn(_segment_rank, args=(2, str(tmp_path / "init"), str(run.root)), nprocs=2, join=True)
    assert (tmp_path / "rank1_returned_none").is_file()
    shared = {
        name: pd.read_csv(run.seg_file(name), dtype={"StudyInstanceUID": str})
        for name in ("vertebrae.csv", "extents.csv", "dice.csv")
    }
    for name in shared:
        run.seg_file(name).unlink()
    segment(cfg, run.root)  # the fold models exist: only the segmentation runs again, in one process
    for name, table in shared.items():
        pd.testing.assert_frame_equal(table, pd.read_csv(run.seg_file(name), dtype={"StudyInstanceUID": str}))
    order = run.cache.read_index().drop_duplicates("StudyInstanceUID")["StudyInstanceUID"].tolist()
    assert shared["vertebrae.csv"]["StudyInstanceUID"].drop_duplicates().tolist() == order


def _segment_rank(rank: int, world: int, init_file: str, run_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from cspine.runtime import Runtime
    from cspine.segment import segment

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    table = segment(
        load_config(SMOKE_CONFIG, SEG_SMOKE),
        run_dir,
        Runtime(torch.device("cpu"), rank=rank, world_size=world),
    )
    if rank == 1 and table is None:
        (Path(init_file).parent / "rank1_returned_none").touch()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_no_training_stage_reads_the_truth_files(synthetic_root, tmp_path):
    """The truth files are for evaluation: an audit hook records every file opened from them while the
    training stages run, segmentation and its self-training included."""
    from cspine.competition import TRUTH_DIR
    from cspine.pipeline import run_stages

    assert (synthetic_root / TRUTH_DIR / "vertebrae.csv").is_file()  # there to be read, if anything wanted to
    opened, recording = [], [True]

    def audit(event, args):
        if recording[0] and event == "open" and args and f"/{TRUTH_DIR}/" in str(args[0]):
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed: this one stops recording when the test ends
    try:
        run = Run(tmp_path / "run")
        cfg = _prepared(synthetic_root, run.root, ["seg.rounds=2", "seg.pseudo_steps=2"])  # self-training too
        run_stages(cfg, synthetic_root, run.root, until="train-seq")
    finally:
        recording[0] = False
    assert Run(run.root).seg_file("vertebrae.csv").is_file() and Run(run.root).slice_best(0).is_file()
    assert opened == []


def test_each_vertebra_reads_only_its_own_slices():
    from cspine.inputs import VERTEBRA_FEATURES, vertebra_inputs

    probs = np.full((20, 15), 0.01, np.float32)
    probs[5, 0] = 0.99  # a fracture-looking slice inside C3 (slices 4..7, 3..8 with the margin)
    probs[15, 0] = 0.999  # a stronger one far below it
    x = vertebra_inputs(probs, {"C3": (4, 7)}, margin=1, bins=4)
    assert x.shape == (7, 4, VERTEBRA_FEATURES)
    assert x[2, :, 0].max() == pytest.approx(np.log(0.99 / 0.01), abs=1e-3)  # C3 sees slice 5, not slice 15
    assert x[0, :, 0].max() == pytest.approx(np.log(0.999 / 0.001), abs=1e-2)  # C1 not found: the whole study
    assert (x[2, :, 3 + 2] == 1).all() and x[2, :, 3:].sum() == 4  # one-hot: which vertebra it reads


@pytest.fixture(scope="module")
def vertebra_run(synthetic_root, tmp_path_factory):
    """The smoke pipeline with the segmentation and the vertebra track, run once."""
    from cspine.pipeline import run

    run_dir = tmp_path_factory.mktemp("vertebra_run")
    cfg = load_config(SMOKE_CONFIG, [*SEG_SMOKE, "vert.enabled=true", "vert.epochs=2", "vert.inner_folds=2"])
    run(cfg, synthetic_root, run_dir, run_dir / "submission.csv")
    return run_dir, cfg


@pytest.mark.slow
def test_the_vertebra_track_never_scores_a_study_with_a_model_that_trained_on_it(vertebra_run):
    from cspine.checkpoints import load_vertebra_model

    run_dir, _ = vertebra_run
    run = Run(run_dir)
    folds = run.read_folds()
    for fold in sorted(folds["fold"].unique()):
        in_fold = set(folds.loc[folds["fold"] == fold, "StudyInstanceUID"])
        scored = set(
            pd.read_csv(run.vert_file(fold, "oof.csv"), dtype={"StudyInstanceUID": str})["StudyInstanceUID"]
        )
        metas = [load_vertebra_model(p)[1] for p in run.vert_models() if p.parent == run.vert_dir(fold)]
        assert len(metas) == 2 and scored == in_fold
        for meta in metas:
            # through CNN k, on fold k
            assert meta.fold == fold and set(meta.trained_on) < in_fold
        for uid in scored:  # held out by exactly one inner model
            assert sum(uid not in set(meta.trained_on) for meta in metas) == 1


@pytest.mark.slow
def test_predict_evaluate_and_the_bundle_use_the_vertebra_track(vertebra_run, synthetic_root, tmp_path):
    import torch

    from cspine.competition import read_test
    from cspine.ensemble import load_ensemble
    from cspine.kaggle import package_kaggle
    from cspine.scoring import VERTEBRA_TRACK
    from cspine.submission import validate_submission

    run_dir, cfg = vertebra_run
    validate_submission(pd.read_csv(run_dir / "submission.csv"), read_test(synthetic_root))
    ensemble = load_ensemble(run_dir, cfg.seq.hidden, [torch.device("cpu")])
    assert len(ensemble.vertebra) == 4 and len(ensemble.segmenters) == 2 and ensemble.seg_reading.row_mm == 4
    scores = pd.read_csv(Run(run_dir).report / "scores.csv")
    assert VERTEBRA_TRACK in set(scores["Model"])
    bundle = package_kaggle(cfg, run_dir, tmp_path / "bundle", wheels=False)
    assert len(list(bundle.glob("models/vertebra/fold*/inner*.pt"))) == 4
    assert len(list(bundle.glob("models/segment/fold*.pt"))) == 2
    bundled = load_ensemble(bundle / "models", cfg.seq.hidden, [torch.device("cpu")])
    assert len(bundled.vertebra) == 4


@pytest.mark.slow
def test_turning_the_track_off_in_a_trained_run_leaves_a_run_that_predicts(
    vertebra_run, synthetic_root, tmp_path
):
    """vert.* may change in a run (its stage redoes itself): predict then answers without the track, with
    the run's own config, as its message would advise."""
    import shutil

    from cspine.cli import main
    from cspine.competition import read_test
    from cspine.pipeline import run
    from cspine.submission import validate_submission

    run_dir, _ = vertebra_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    off = load_config(SMOKE_CONFIG, [*SEG_SMOKE, "vert.enabled=false", "vert.epochs=2", "vert.inner_folds=2"])
    run(off, synthetic_root, copy, copy / "submission.csv")
    assert not any("vert:" in c for c in pd.read_csv(Run(copy).blend_file("inputs.csv")).columns)  # refitted
    out = tmp_path / "again.csv"
    assert main(["predict", "--models", str(copy), "--data", str(synthetic_root), "--out", str(out)]) == 0
    validate_submission(pd.read_csv(out), read_test(synthetic_root))


def test_a_t2_slice_labelled_thoracic_counts_as_right(tmp_path):
    """The segmentation has one thoracic class (8); the truth names T2 (9): a slice of T2 read as thoracic is
    right, one read as C7 is wrong."""
    from cspine.competition import TRUTH_DIR
    from cspine.scoring import segmentation_scores

    run = Run(tmp_path / "run")
    data = tmp_path / "data"
    (data / TRUTH_DIR).mkdir(parents=True)
    run.root.mkdir()
    run.data_dir_file.write_text(str(data))
    none = {v: 0 for v in VERTEBRAE}
    rows = [
        {"StudyInstanceUID": "1", "slice_number": k, "level": level, **none} for k, level in ((1, 8), (2, 7))
    ]
    run.seg_file("dice.csv").parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(run.seg_file("vertebrae.csv"), index=False)
    pd.DataFrame([{"StudyInstanceUID": "2", **{v: 0.8 for v in VERTEBRAE}}]).to_csv(
        run.seg_file("dice.csv"), index=False
    )
    truth = [{"StudyInstanceUID": "1", "slice_number": k, "level": 9, **none} for k in (1, 2)]
    pd.DataFrame(truth).to_csv(data / TRUTH_DIR / "vertebrae.csv", index=False)
    _, accuracy = segmentation_scores(run)
    assert accuracy.set_index("group").loc["without a mask", "slice level"] == 0.5
