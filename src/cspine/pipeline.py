"""`python -m cspine run`: the whole baseline, each stage skipped when its outputs exist.

    python -m cspine run                                   # synthetic data when no competition data is found
    python -m cspine run --data /path/to/rsna-2022-cervical-spine-fracture-detection
    python -m cspine run --config configs/paper.yaml       # the paper's settings, for a GPU

Stages: synth (only without real data) → prepare → folds → train-slices (every fold) → extract →
train-seq → evaluate → predict. A second run resumes: finished studies, folds and stages are skipped.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pandas as pd

from cspine.competition import DataError, find_data_dir, make_folds, read_train, write_folds
from cspine.config import Config, save_config
from cspine.evaluate import evaluate
from cspine.extract import extract_fold
from cspine.predict import predict
from cspine.prepare import prepare
from cspine.synthetic import is_complete, make_competition
from cspine.train_seq import is_seq_trained, train_seq_fold
from cspine.train_slices import is_trained, train_fold

log = logging.getLogger(__name__)

SYNTHETIC_DIR = Path("input/synthetic")


def default_submission_path() -> Path:
    """Kaggle's /kaggle/working/submission.csv inside a Kaggle notebook, else submissions/submission.csv."""
    kaggle = Path("/kaggle/working")
    return kaggle / "submission.csv" if kaggle.is_dir() else Path("submissions/submission.csv")


def resolve_data(cfg: Config, data: str | os.PathLike | None, synthetic_dir: Path = SYNTHETIC_DIR) -> Path:
    """The competition data: the named folder, or one found, or (none found) a synthetic competition."""
    if data is not None:
        return find_data_dir(data)
    try:
        return find_data_dir()
    except DataError as exc:
        if is_complete(synthetic_dir):
            log.info("no competition data found; using the synthetic competition in %s", synthetic_dir)
            return synthetic_dir
        log.info("%s\n→ generating a synthetic competition in %s", exc, synthetic_dir)
        s = cfg.synth
        return make_competition(synthetic_dir, n_train=s.n_train, n_test=s.n_test, seed=s.seed,
                                image_size=s.image_size, difficulty=s.difficulty, box_fraction=s.box_fraction,
                                mask_fraction=s.mask_fraction, n_slices=s.n_slices or None,
                                workers=max(1, min(cfg.prepare.workers, os.cpu_count() or 1)))


def setup_run(cfg: Config, data_dir: Path, run_dir: Path) -> pd.DataFrame:
    """The run folder: resolved config, training labels, and folds (kept if present: CV stays comparable)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "data_dir.txt").write_text(str(data_dir.resolve()) + "\n")
    train = read_train(data_dir)
    train.to_csv(run_dir / "labels.csv", index=False)
    folds_path = run_dir / "folds.csv"
    if not folds_path.is_file():
        write_folds(make_folds(train, cfg.folds.n_splits, cfg.folds.seed), folds_path)
    return train


def fold_list(cfg: Config) -> list[int]:
    return list(cfg.folds.folds) if cfg.folds.folds else list(range(cfg.folds.n_splits))


STAGES = ("prepare", "train-slices", "extract", "train-seq", "evaluate", "predict")


def run_stages(cfg: Config, data_dir: Path, run_dir: Path, until: str = "predict",
               submission: Path | None = None, train: pd.DataFrame | None = None) -> Path | None:
    """Runs the stages in order through ``until``, skipping finished work; returns the report folder if made."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, not {until!r}")
    last = STAGES.index(until)
    report = None

    def stage(name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        log.info("stage %s: %.1f s", name, time.perf_counter() - t)
        return result

    stage("prepare", prepare, cfg, data_dir, run_dir / "cache")
    if last >= 1:
        for fold in fold_list(cfg):
            if not is_trained(run_dir, fold):
                stage(f"train-slices fold {fold}", train_fold, cfg, run_dir, fold)
    if last >= 2:
        for fold in fold_list(cfg):
            stage(f"extract fold {fold}", extract_fold, cfg, run_dir, fold)
    if last >= 3:
        for fold in fold_list(cfg):
            if not is_seq_trained(run_dir, cfg.seq.hidden, fold, cfg.seq):
                stage(f"train-seq fold {fold}", train_seq_fold, cfg, run_dir, fold)
    if last >= 4:
        report = stage("evaluate", evaluate, cfg, run_dir)
    if last >= 5:
        stage("predict", predict, cfg, data_dir, run_dir, submission or default_submission_path(), train=train)
    return report


def run(cfg: Config, data: str | os.PathLike | None = None, run_dir: str | os.PathLike | None = None,
        submission: str | os.PathLike | None = None) -> dict[str, Path]:
    """The whole baseline; returns where each output is."""
    started = time.perf_counter()
    data_dir = resolve_data(cfg, data)
    run_dir = Path(run_dir or Path("runs") / cfg.name)
    submission = Path(submission or default_submission_path())
    train = setup_run(cfg, data_dir, run_dir)
    log.info("run %s: data %s, outputs %s", cfg.name, data_dir, run_dir)
    report = run_stages(cfg, data_dir, run_dir, "predict", submission, train)
    outputs = {"submission": submission, "report": report / "report.md", "figures": report, "run": run_dir}
    minutes = (time.perf_counter() - started) / 60
    print(f"\ncspine run '{cfg.name}' finished in {minutes:.1f} min")
    for name, path in outputs.items():
        print(f"  {name:<10} {path}")
    return outputs
