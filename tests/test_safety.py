"""Nothing lost, nothing silently wrong: inputs checked before long work, configs bound to their artifacts,
clear one-line errors, atomic and readable outputs."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cspine import TARGETS
from cspine.competition import DataError, read_test, read_train
from cspine.config import ConfigError, FoldConfig, load_config
from cspine.pipeline import bind_config, check_inputs, run, setup_run
from cspine.runs import Run

from .conftest import SMOKE_CONFIG


def _copy(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest)
    return dest


def test_an_empty_csv_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(DataError, match=r"train.csv: the file is empty"):
        read_train(tmp_path)


@pytest.mark.parametrize("splits", [0, 1, -2])
def test_fewer_than_two_folds_is_refused(synthetic_root, splits):
    with pytest.raises(ConfigError, match=rf"folds.n_splits={splits}: must be at least 2"):  # when loaded
        load_config(SMOKE_CONFIG, [f"folds.n_splits={splits}"])
    cfg = dataclasses.replace(load_config(SMOKE_CONFIG), folds=FoldConfig(n_splits=splits))  # built in code
    with pytest.raises(ConfigError, match="at least 2 folds"):
        check_inputs(cfg, synthetic_root, read_train(synthetic_root))


def test_folds_too_small_for_the_blstms_are_refused_before_training(synthetic_root, tmp_path):
    cfg = load_config(SMOKE_CONFIG, ["folds.n_splits=7"])  # 8 studies: folds of 1, inner folds need 4
    with pytest.raises(DataError, match="8 training studies make 7 folds"):
        run(cfg, synthetic_root, tmp_path / "run", tmp_path / "sub.csv")
    assert not Run(tmp_path / "run").cache.root.exists()  # refused before the first stage


def test_a_bad_test_csv_is_found_before_training(synthetic_root, tmp_path):
    data = _copy(synthetic_root, tmp_path / "data")
    test = read_test(data)
    test.loc[3, "prediction_type"] = "C8"
    test.to_csv(data / "test.csv", index=False)
    with pytest.raises(DataError, match=r"test.csv: column 'prediction_type'.*rows \(first rows: \[3\]\)"):
        run(load_config(SMOKE_CONFIG), data, tmp_path / "run", tmp_path / "sub.csv")
    assert not Run(tmp_path / "run").cache.root.exists()


def test_an_unwritable_submission_path_is_found_before_training(synthetic_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder is needed")
    with pytest.raises(OSError, match="cannot write to .*a_file"):
        run(load_config(SMOKE_CONFIG), synthetic_root, tmp_path / "run", blocker / "sub.csv")
    assert not (tmp_path / "run").exists()


def test_a_changed_setting_is_refused_once_an_artifact_depends_on_it(tmp_path):
    run_folder = Run(tmp_path / "run")
    cfg = load_config(SMOKE_CONFIG)
    bind_config(cfg, run_folder)
    # nothing made yet
    bind_config(load_config(SMOKE_CONFIG, ["prepare.size=32", "slice.epochs=9"]), run_folder)
    assert load_config(run_folder.config).prepare.size == 32
    run_folder.cache.root.mkdir(parents=True)
    (run_folder.cache.root / "1.2.3.json").write_text("{}")  # a cached study now exists
    with pytest.raises(ConfigError, match=r"prepare.size=48 \(made with 32\)"):
        bind_config(cfg, run_folder)
    assert load_config(run_folder.config).prepare.size == 32  # the record still tells the truth
    # free settings
    bind_config(
        load_config(
            SMOKE_CONFIG,
            ["prepare.size=32", "slice.epochs=9", "seq.epochs=7", "slice.workers=3", "name=other"],
        ),
        run_folder,
    )
    assert load_config(run_folder.config).seq.epochs == 7


def test_a_synthetic_competition_made_otherwise_is_not_reused(tmp_path):
    from cspine.pipeline import resolve_data

    small = load_config(SMOKE_CONFIG, ["synth.n_train=3", "synth.n_test=1"])
    root = resolve_data(small, None, synthetic=tmp_path / "synthetic")
    assert resolve_data(small, None, synthetic=root) == root  # same recipe: reused
    with pytest.raises(ConfigError, match=r"synth.n_train=4 \(it has 3\)"):
        resolve_data(load_config(SMOKE_CONFIG, ["synth.n_train=4", "synth.n_test=1"]), None, synthetic=root)


def test_fold_override_that_is_not_a_number_is_one_clear_error(capsys):
    from cspine.cli import main

    assert main(["train-slices", "--config", str(SMOKE_CONFIG), "fold=x"]) == 2
    assert "fold='x'" in capsys.readouterr().err


def test_an_os_error_at_the_command_line_is_one_line(tmp_path, capsys):
    from cspine.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["prepare", "--config", str(SMOKE_CONFIG), "--out", str(blocker / "run")]) == 1
    err = capsys.readouterr().err
    assert "cannot write to" in err and "Traceback" not in err


def test_a_one_slice_study_is_left_out_of_training_as_predict_leaves_it_out(tmp_path):
    from cspine.dicom_writer import Encoding, write_series
    from cspine.prepare import StudyJob, cache_study
    from cspine.runs import Cache

    write_series(
        np.zeros((1, 32, 32)), tmp_path / "study", spacing=(1, 1, 1), study_uid="1.2.3", encoding=Encoding()
    )
    job = StudyJob(
        uid="1.2.3",
        image_dir=tmp_path / "study",
        out_dir=tmp_path / "cache",
        labels={t: 0 for t in TARGETS},
        boxes=[],
        mask_path=None,
        prepare=load_config(SMOKE_CONFIG).prepare,
    )
    (tmp_path / "cache").mkdir()
    uid, n, error = cache_study(job)
    assert n == 0 and "only 1 readable slice" in error
    assert not Cache(tmp_path / "cache").images(uid).exists()


def test_an_empty_segmentation_keeps_its_study(synthetic_root, tmp_path, caplog):
    from cspine.cache import read_meta
    from cspine.prepare import prepare

    data = _copy(synthetic_root, tmp_path / "data")
    mask = sorted((data / "segmentations").glob("*.nii"))[0]
    mask.write_bytes(b"")
    index = prepare(load_config(SMOKE_CONFIG), data, tmp_path / "cache")
    uid = mask.name.removesuffix(".nii")
    assert uid in set(index["StudyInstanceUID"])  # its images and study labels are still used
    assert read_meta(tmp_path / "cache", uid)["present"] is None
    assert str(mask) in caplog.text


def test_the_submission_is_readable_by_others(tmp_path):
    from cspine.submission import make_submission, write_submission

    test = pd.DataFrame(
        [{"row_id": f"u_{t}", "StudyInstanceUID": "u", "prediction_type": t} for t in TARGETS]
    )
    old = os.umask(0o022)
    try:
        path = write_submission(make_submission(test, {}), test, tmp_path / "submission.csv")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp's 0600 would hide it from a grader


def test_folds_are_made_once_and_bound_to_their_settings(synthetic_root, tmp_path):
    setup_run(load_config(SMOKE_CONFIG), synthetic_root, tmp_path / "run")
    folds = Run(tmp_path / "run").folds.read_text()
    with pytest.raises(ConfigError, match=r"folds.seed=3 \(made with 42\)"):
        setup_run(load_config(SMOKE_CONFIG, ["folds.seed=3"]), synthetic_root, tmp_path / "run")
    setup_run(load_config(SMOKE_CONFIG, ["seq.epochs=5"]), synthetic_root, tmp_path / "run")
    assert Run(tmp_path / "run").folds.read_text() == folds  # kept: CV stays comparable
    assert load_config(Run(tmp_path / "run").config).folds.seed == 42


def test_a_segmentation_added_after_prepare_is_noticed(synthetic_root, tmp_path, caplog):
    from cspine.cache import read_meta
    from cspine.prepare import prepare

    data = _copy(synthetic_root, tmp_path / "data")
    mask = sorted((data / "segmentations").glob("*.nii"))[0]
    uid = mask.name.removesuffix(".nii")
    aside = mask.rename(tmp_path / mask.name)
    cfg = load_config(SMOKE_CONFIG)
    prepare(cfg, data, tmp_path / "cache")
    assert read_meta(tmp_path / "cache", uid)["present"] is None
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.json")}

    # arrives later, compressed
    (mask.parent / f"{mask.name}.gz").write_bytes(gzip.compress(aside.read_bytes()))
    caplog.clear()
    prepare(cfg, data, tmp_path / "cache")
    assert read_meta(tmp_path / "cache", uid)["present"] is not None  # its vertebra labels are used now
    assert f"study {uid} is cached again: its segmentation is {mask.name}.gz now and was none" in caplog.text
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.json")}
    assert {n for n in again if again[n] != written.get(n)} == {f"{uid}.json"}  # the others are not redone


@pytest.mark.parametrize("fmt", ["npy", "zarr"])
def test_a_damaged_cache_entry_is_named_and_cached_again(synthetic_root, tmp_path, caplog, fmt):
    from cspine.cache import load_study_images
    from cspine.prepare import prepare
    from cspine.runs import Cache

    cfg = load_config(SMOKE_CONFIG, [f"prepare.format={fmt}"])
    prepare(cfg, synthetic_root, tmp_path / "cache")
    cache = Cache(tmp_path / "cache")
    uid = sorted(p.name.removesuffix(".json") for p in cache.root.glob("1.*.json"))[0]
    good = load_study_images(cache.root, uid, mmap=False)  # a copy: the file is cut below
    stored = (
        cache.images(uid)
        if fmt == "npy"
        else max((p for p in cache.zarr(uid).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    )
    stored.write_bytes(stored.read_bytes()[: stored.stat().st_size // 2])  # a copy cut short
    caplog.clear()
    prepare(cfg, synthetic_root, tmp_path / "cache")
    assert f"study {uid} is cached again: its images take" in caplog.text and "damaged" in caplog.text
    assert np.array_equal(np.asarray(load_study_images(cache.root, uid)), good)
