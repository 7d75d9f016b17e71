"""The crop track: crops land on their vertebra, a missed vertebra is still placed, the models stay out of fold,
and predict and the Kaggle bundle use them."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest

from cspine import VERTEBRAE
from cspine.competition import read_mask
from cspine.config import load_config
from cspine.crops import (
    CropStoreError,
    bone_u8,
    crop_spec,
    cut_study,
    cut_study_planes,
    cut_vertebra,
    place_vertebrae,
    read_crop_store,
    slice_picks,
    write_crop_store,
)
from cspine.dicom import load_series
from cspine.preprocess import labels_in_cache_frame, preprocess_study
from cspine.runs import Run
from cspine.segmenter import vertebra_extents

from .conftest import SMOKE_CONFIG
from .test_segment import SEG_SMOKE

CROP_SMOKE = [
    *SEG_SMOKE,
    "crop.enabled=true",
    "crop.size=32",
    "crop.slices=4",
    "crop.epochs=1",
    "crop.batch_size=4",
    "crop.backbone=test_resnet",
    "crop.hidden=8",
    "crop.workers=1",
]


def _feet_to_head_with_gaps(root, uid, tmp_path):
    """A copy of a study numbered feet to head (its files renamed: the geometry stays), two slices removed."""
    study = tmp_path / uid
    files = sorted((root / "train_images" / uid).glob("*.dcm"), key=lambda p: int(p.stem))
    study.mkdir()
    for path, number in zip(files, [int(p.stem) for p in files][::-1]):
        shutil.copy(path, study / f"{number}.dcm")
    for gone in sorted(study.glob("*.dcm"))[3:5]:
        gone.unlink()
    return study


@pytest.mark.filterwarnings("ignore:.*non-uniform slice spacing")  # the two slices removed on purpose
def test_crops_land_on_their_vertebra_in_feet_to_head_and_gappy_studies(synthetic_root, tmp_path):
    spec = crop_spec(24, 5, 1, 0.1)
    checked = 0
    for mask_path in sorted((synthetic_root / "segmentations").glob("*.nii")):
        uid = mask_path.name.removesuffix(".nii")
        folder = synthetic_root / "train_images" / uid
        if checked == 0:
            folder = _feet_to_head_with_gaps(synthetic_root, uid, tmp_path)
        series = load_series(folder)
        if checked == 0:
            assert series.slice_numbers[0] > series.slice_numbers[-1]  # head first, numbered from the feet
        truth = read_mask(mask_path, series)  # full resolution, aligned slice by slice
        _, boxes = preprocess_study(series.hu, 48)
        labels = labels_in_cache_frame(truth, boxes, 48)  # what the segment stage would predict at best
        _, found = vertebra_extents(labels, 4)
        places = place_vertebrae(found, len(series), 48)
        for i, place in enumerate(places):
            label = i + 1
            on = cut_vertebra(((truth == label) * 255).astype(np.uint8), labels, place, boxes[:1], 48, spec)
            off = cut_vertebra(
                ((truth != label) & (truth > 0)).astype(np.uint8) * 255, labels, place, boxes[:1], 48, spec
            )
            picks = slice_picks(place["z0"], place["z1"], len(series), spec.slices, 0)
            assert (truth[picks] == label).any(axis=(1, 2)).mean() >= 0.8, (uid, place)  # the right slices
            centre = on[:, spec.context, 8:16, 8:16].astype(float).mean()
            # the right bone
            assert centre > off[:, spec.context, 8:16, 8:16].astype(float).mean(), (
                uid,
                place,
            )
        checked += 1
    assert checked >= 3


def test_a_vertebra_the_segmentation_missed_is_placed_between_its_neighbours():
    found = [
        {"vertebra": "C1", "z0": 0, "z1": 3, "y0": 10, "y1": 20, "x0": 10, "x1": 20},
        {"vertebra": "C2", "z0": 4, "z1": 11, "y0": 12, "y1": 24, "x0": 10, "x1": 22},
        {"vertebra": "C4", "z0": 20, "z1": 25, "y0": 14, "y1": 26, "x0": 12, "x1": 24},
    ]
    places = {p["vertebra"]: p for p in place_vertebrae(found, 60, 48)}
    assert [places[v]["found"] for v in VERTEBRAE] == [True, True, False, True, False, False, False]
    assert 11 <= places["C3"]["z0"] <= places["C3"]["z1"] <= 20  # between C2 and C4
    assert places["C5"]["z0"] > places["C4"]["z1"] - 2 and places["C7"]["z1"] <= 59  # on down the column
    assert places["C7"]["z0"] > places["C5"]["z0"]
    nothing = place_vertebrae([], 30, 48)
    assert all(not p["found"] and (p["z0"], p["z1"], p["y1"]) == (0, 29, 48) for p in nothing)
    crops = cut_study(
        np.zeros((30, 64, 64), np.uint8),
        np.zeros((30, 48, 48), np.uint8),
        nothing,
        [(0, 64, 0, 64)],
        48,
        crop_spec(16, 3, 1, 0.1),
    )
    assert crops.shape == (7, 3, 4, 16, 16)


def test_the_crop_store_gives_back_exactly_the_crops_cut_holding_each_plane_once(synthetic_root, tmp_path):
    """The store keeps each (slice, square) once: the model reads, vertebra by vertebra, exactly the crops
    `cut_study` cuts (the `rsna` geometry's 15 picks and two neighbours each side, on a study thinner in
    slices than the picks are apart), and a damaged file is named."""
    mask_path = sorted((synthetic_root / "segmentations").glob("*.nii"))[0]
    uid = mask_path.name.removesuffix(".nii")
    series = load_series(synthetic_root / "train_images" / uid)
    truth = read_mask(mask_path, series)
    _, boxes = preprocess_study(series.hu, 48)
    labels = labels_in_cache_frame(truth, boxes, 48)
    places = place_vertebrae(vertebra_extents(labels, 4)[1], len(series), 48)
    bone = bone_u8(series.hu)
    # 32 px: the scan's pixels are kept and resized when read; 6 px: squares wider than the crop, kept resized
    for size in (32, 6):
        spec = crop_spec(size, 15, 2, 0.15)
        dense = cut_study(bone, labels, places, boxes, 48, spec)  # a box a slice: squares differ by slice
        parts = cut_study_planes(bone, labels, places, boxes, 48, spec)
        path = write_crop_store(tmp_path / f"{uid}.npz", parts)
        assert read_crop_store(path).shape == (7, 15, 6, size, size)
        np.testing.assert_array_equal(read_crop_store(path), dense)
        for k in range(7):
            np.testing.assert_array_equal(read_crop_store(path, k), dense[k])
        resized = np.concatenate([p["frames"][:, 2] < 0 for p in parts])
        assert resized.all() if size == 6 else not resized.all()  # both kinds, each read back exactly
        planes = sum(len(p["frames"]) for p in parts)
        assert planes < 7 * 15 * 5 * 0.8  # neighbours shared between picks are kept once
        assert path.stat().st_size < dense.nbytes / 2
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CropStoreError, match=uid):
        read_crop_store(path, 3)


@pytest.fixture(scope="module")
def crop_run(synthetic_root, tmp_path_factory):
    """The smoke pipeline with the crop track, run once."""
    from cspine.pipeline import run

    run_dir = tmp_path_factory.mktemp("crop_run")
    cfg = load_config(SMOKE_CONFIG, CROP_SMOKE)
    run(cfg, synthetic_root, run_dir, run_dir / "submission.csv")
    return run_dir, cfg


@pytest.mark.slow
def test_a_crop_model_never_scores_a_study_it_trained_on(crop_run):
    from cspine.checkpoints import load_crop_model

    run_dir, cfg = crop_run
    run = Run(run_dir)
    folds = run.read_folds()
    crops = read_crop_store(run.crop_study(folds["StudyInstanceUID"].iat[0]))
    assert crops.shape == (7, 4, 4, 32, 32) and crops.dtype == np.uint8
    for k in cfg.folds.trained:
        _, meta = load_crop_model(run.crop_model(k))
        scored = set(
            pd.read_csv(run.crop_file(k, "oof.csv"), dtype={"StudyInstanceUID": str})["StudyInstanceUID"]
        )
        assert scored and not scored & set(meta.trained_on)
        assert scored == set(folds.loc[folds["fold"] == k, "StudyInstanceUID"])
    inputs = pd.read_csv(run.blend_file("inputs.csv"))
    assert {f"crop:{v}" for v in VERTEBRAE} | {"crop:max", "crop:noisy_or"} <= set(inputs.columns)
    report = (run.report / "report.md").read_text()
    assert "crop track" in report and "placed between its neighbours" in report


@pytest.mark.slow
def test_predict_and_the_bundle_use_the_crop_models(crop_run, synthetic_root, tmp_path, monkeypatch):
    import cspine.predict
    from cspine.kaggle import package_kaggle
    from cspine.predict import predict

    run_dir, cfg = crop_run
    calls = []
    real = cspine.predict.crop_outputs
    monkeypatch.setattr(cspine.predict, "crop_outputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    sub = predict(cfg, synthetic_root, run_dir, tmp_path / "submission.csv")
    assert (
        len(calls) == len(list((synthetic_root / "test_images").iterdir()))
        and sub["fractured"].between(0, 1).all()
    )
    bundle = package_kaggle(cfg, run_dir, tmp_path / "bundle", wheels=False)
    assert sorted(p.parent.name for p in (bundle / "models" / "crop").rglob("model.pt")) == [
        f"fold{k}" for k in cfg.folds.trained
    ]
    assert not list((bundle / "models" / "crop").rglob("*.npz"))  # the training crops stay home


@pytest.mark.slow
def test_a_blend_of_another_run_or_a_config_without_the_tracks_is_refused_by_name(
    crop_run, smoke_run, synthetic_root, tmp_path
):
    """A blend.pt copied from a run without the tracks predicted on this one (answers moved by up to 0.46,
    two tracks unused, exit 0); `predict --config smoke` here said models were missing that exist."""
    from cspine.checkpoints import CheckpointError
    from cspine.config import ConfigError
    from cspine.predict import predict

    run_dir, cfg = crop_run
    with pytest.raises(ConfigError, match=r"blend\.models=\['blstm', 'cnn'\].*'crop'") as refused:
        predict(load_config(SMOKE_CONFIG), synthetic_root, run_dir, tmp_path / "a.csv")
    assert "missing" not in str(refused.value)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("cache", "crop"))
    shutil.copytree(Run(run_dir).crop_dir, Run(copy).crop_dir, ignore=shutil.ignore_patterns("studies"))
    shutil.copy(Run(smoke_run).blend_model, Run(copy).blend_model)
    with pytest.raises(CheckpointError, match=r"blend\.pt: the blend reads .*not the models it was fitted"):
        predict(cfg, synthetic_root, copy, tmp_path / "b.csv")
    assert not (tmp_path / "b.csv").exists()


def test_a_crop_setting_changed_at_predict_time_is_refused_as_the_cache_size_is(crop_run):
    """Every `crop.*` setting the crop models were made with differed silently: predict cut crops the models
    never saw (`crop.size`, `crop.slices`), or read them with another architecture's name."""
    import torch

    from cspine.config import ConfigError
    from cspine.ensemble import check_config, load_ensemble

    run_dir, cfg = crop_run
    ensemble = load_ensemble(run_dir, cfg.seq.hidden, [torch.device("cpu")])
    check_config(cfg, ensemble)  # the run's own config: accepted
    for override, said in (
        ("crop.size=48", "crop.size=48 (the models: 32)"),
        ("crop.slices=6", "crop.slices=6 (the models: 4)"),
        ("crop.margin=0.3", "crop.margin=0.3 (the models: "),
        ("crop.hidden=16", "crop.hidden=16 (the models: 8)"),
        ("seg.min_pixels=3", "seg.min_pixels=3 (the models: "),
        ("blend.top_k=99", "blend.top_k=99 (the models: "),
    ):
        with pytest.raises(ConfigError, match=re.escape(said)):
            check_config(load_config(SMOKE_CONFIG, [*CROP_SMOKE, override]), ensemble)
    check_config(load_config(SMOKE_CONFIG, [*CROP_SMOKE, "crop.epochs=99", "crop.workers=1"]), ensemble)


def test_a_study_whose_segmentation_found_no_vertebra_has_no_spine_to_answer_about(
    crop_run, synthetic_root, monkeypatch
):
    """It got confident answers from the CNNs; with no vertebra found it now fails, and `predict` gives it
    the prior and counts it (`predict.max_failed`), as a scan of pure air."""
    import torch

    import cspine.predict
    from cspine.ensemble import load_ensemble
    from cspine.predict import predict_images
    from cspine.studies import read_study

    run_dir, cfg = crop_run
    ensemble = load_ensemble(run_dir, cfg.seq.hidden, [torch.device("cpu")])
    assert ensemble.crops
    monkeypatch.setattr(
        cspine.predict, "segment_study", lambda models, images, *a: np.zeros(images.shape[:3], np.uint8)
    )
    i = ensemble.reading
    study = read_study(
        sorted((synthetic_root / "test_images").iterdir())[0], i.size, i.crop, i.margin, 2, bone=True
    )
    from cspine.studies import NoSpineError

    with pytest.raises(NoSpineError, match="found none of C1..C7"):
        predict_images(study, ensemble, cfg)


@pytest.mark.slow
def test_a_killed_crop_fold_resumes_to_the_same_model(crop_run, tmp_path, monkeypatch):
    import dataclasses

    import torch

    import cspine.training
    from cspine.checkpoints import load_checkpoint
    from cspine.train_crops import train_crop_fold

    run_dir, cfg = crop_run
    cfg = dataclasses.replace(cfg, crop=dataclasses.replace(cfg.crop, epochs=2))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for copy in (whole, killed):
        shutil.copytree(run_dir, copy)
    train_crop_fold(cfg, whole, 0)

    real = cspine.training.save_checkpoint

    def dies_after_the_first_epoch(state, path, kind):
        real(state, path, kind)
        if kind == "crop-resume":
            raise KeyboardInterrupt

    monkeypatch.setattr(cspine.training, "save_checkpoint", dies_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_crop_fold(cfg, killed, 0)
    assert Run(killed).crop_last(0).is_file()
    monkeypatch.setattr(cspine.training, "save_checkpoint", real)
    train_crop_fold(cfg, killed, 0)
    a, b = (load_checkpoint(Run(r).crop_model(0), "crop")["model"] for r in (whole, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed exactly, as if never stopped
    assert not Run(killed).crop_last(0).exists()


@pytest.mark.slow
def test_a_deleted_or_truncated_crop_file_is_cut_again(crop_run, caplog):
    """The stage counted as done with a study's crops deleted (the fold then trained without it) or
    truncated (read as an mmap error naming no file); both are cut again, and a study none could be cut of
    is a one-line error."""
    from cspine.crop import crop, is_cropped

    run_dir, cfg = crop_run
    run = Run(run_dir)
    first, second = sorted(run.crop_studies.glob("*.npz"))[:2]
    whole = {p: p.read_bytes() for p in (first, second)}
    first.unlink()
    second.write_bytes(whole[second][: len(whole[second]) // 2])
    assert not is_cropped(cfg, run_dir)
    with caplog.at_level("INFO", logger="cspine.crop"):
        crop(cfg, run_dir, Run(run_dir).data_dir_file.read_text().strip())
    assert "2 to cut" in caplog.text and is_cropped(cfg, run_dir)
    for path, data in whole.items():
        read_crop_store(path)  # whole again
        assert path.stat().st_size == len(data)
