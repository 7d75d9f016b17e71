"""The rehearsal: a recipe at the competition's shapes with only its time cut, every stage and the Kaggle
reruns measured, and what it measures read from the right places."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import psutil
import pytest

from cspine.config import load_config
from cspine.measure import Measured, tree_memory
from cspine.pipeline import STAGE_NAMES, check_synthetic
from cspine.rehearse import Shape, rehearse, time_cuts

# the smoke config with every track on: the least size that reaches every path
EVERY_TRACK = [
    "vert.enabled=true",
    "crop.enabled=true",
    "slice.labels=vertebrae",
    "seg.batch_size=4",
    "seg.row_mm=4",
    "crop.size=32",
    "crop.slices=4",
    "crop.backbone=test_resnet",
    "crop.hidden=8",
    "crop.batch_size=4",
]


def test_the_rsna_rehearsal_cuts_time_only():
    """Models, sizes, channels, precisions, workers, cache format and crop geometry are the recipe's own."""
    full = load_config("rsna")
    cut = load_config("rsna", time_cuts(full, Shape()))
    for key in ("prepare", "crop", "slice", "seg"):
        kept = {
            k: v
            for k, v in vars(getattr(full, key)).items()
            if k not in ("epochs", "steps_per_epoch", "val_max_slices", "steps", "folds")
        }
        assert kept == {k: getattr(getattr(cut, key), k) for k in kept}, key
    assert (cut.slice.backbone, cut.prepare.size, cut.prepare.format, cut.prepare.workers) == (
        "resnet50",
        256,
        "zarr",
        8,
    )
    assert (cut.crop.size, cut.crop.slices, cut.crop.context, cut.crop.backbone) == (256, 15, 2, "resnet50")
    assert (cut.slice.epochs, cut.slice.steps_per_epoch, cut.folds.n_splits, cut.crop.steps_per_epoch) == (
        1,
        1,
        2,
        1,
    )
    assert (cut.synth.image_size, tuple(cut.synth.slice_range)) == (512, (250, 450))


def test_the_process_tree_memory_counts_the_workers():
    child = subprocess.Popen(
        [sys.executable, "-c", "import numpy, time; a = numpy.ones(50_000_000); time.sleep(30)"]
    )
    try:
        before = tree_memory(psutil.Process())
        deadline = time.time() + 20
        while tree_memory(psutil.Process()) - before < 300e6 and time.time() < deadline:
            time.sleep(0.2)
        with Measured(interval=0.05) as m:
            time.sleep(0.3)
        assert m.peak_bytes - before > 300e6  # the child's 400 MB of ones
        assert m.seconds >= 0.3
    finally:
        child.kill()


@pytest.mark.slow
def test_a_rehearsal_runs_every_stage_the_bundle_and_both_kaggle_reruns(tmp_path, capsys):
    shape = Shape(size=64, slices=(16, 24), head_mm=(8, 14))
    r = rehearse("smoke", EVERY_TRACK, shape, tmp_path / "run", tmp_path / "data")
    names = [s.name for s in r.steps]
    assert names == [
        "phantoms",
        *STAGE_NAMES,
        "package-kaggle",
        "kaggle public rerun",
        "kaggle hidden rerun",
    ]
    assert not any(s.skipped for s in r.steps)
    assert all(s.seconds > 0 and s.peak_bytes > 100e6 for s in r.steps)
    assert r.artifacts["crops"]["per_study"] > 0 and r.artifacts["slice cache"]["per_study"] > 0
    assert {p["stage"] for p in r.projection} >= {"prepare", "train-slices", "extract", "train-crops"}
    assert [k["limit"] for k in r.kaggle] == [
        "working disk",
        "memory (RAM)",
        "hidden rerun time (this machine)",
    ]
    saved = json.loads((tmp_path / "run" / "rehearsal" / "rehearsal.json").read_text())
    assert [c["exit"] for c in saved["checks"]] == [0, 0]
    assert "| train-crops |" in capsys.readouterr().out
    # the phantoms: the shape asked for, some numbered feet to head, masks that reach the thorax
    truth = pd.read_csv(tmp_path / "data" / "truth" / "vertebrae.csv")
    assert truth.groupby("StudyInstanceUID").size().between(16, 24 * 1.3).all()
    assert (truth["level"] >= 8).any()
    log = (tmp_path / "run" / "rehearsal" / "kaggle" / "public-rerun.log").read_text()
    assert "cspine self-test: 1 training studies" in log
    again = rehearse("smoke", EVERY_TRACK, shape, tmp_path / "run", tmp_path / "data")  # resumes
    assert all(s.skipped for s in again.steps if s.name in STAGE_NAMES[:-2])


def test_a_slice_range_draws_the_phantoms_slices_and_reversed_files(tmp_path):
    from cspine.synthetic import make_competition

    cfg = load_config(
        "smoke",
        [
            "synth.n_train=4",
            "synth.n_test=1",
            "synth.n_slices=0",
            "synth.slice_range=[30,40]",
            "synth.reversed_fraction=1",
        ],
    )
    root = make_competition(tmp_path / "c", cfg.synth)
    check_synthetic(cfg, root)  # made with these settings: reused (tuples recorded as JSON lists)
    truth = pd.read_csv(root / "truth" / "vertebrae.csv")
    counts = truth.groupby("StudyInstanceUID").size()
    assert counts.between(30, 40 * 1.3).all() and counts.nunique() > 1
    for uid, rows in truth.groupby("StudyInstanceUID"):
        numbers = rows["slice_number"].to_numpy()
        assert np.all(np.diff(numbers) < 0), uid  # head to feet, numbered from the feet
