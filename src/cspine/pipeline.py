"""`python -m cspine run`: the whole baseline, each stage skipped when its outputs exist.

    python -m cspine run                                   # synthetic data when no competition data is found
    python -m cspine run --data /path/to/rsna-2022-cervical-spine-fracture-detection
    python -m cspine run --config paper       # the paper's settings, for a GPU

Stages (`STAGES`), after the run folder is set up (synthetic data when none is found, labels, folds):
prepare → segment (with ``slice.labels="vertebrae"`` or ``vert.enabled``) → train-slices (every fold) → extract → train-seq
(every BLSTM size) → train-vertebrae (with ``vert.enabled``) → blend (with ``blend.enabled``, the default) →
evaluate → predict. A second run resumes:
each stage whose outputs are complete is skipped, and within a stage finished studies and folds are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cspine.blend import blend, is_blended
from cspine.cache import bytes_per_slice, is_cached, stale_reason
from cspine.competition import (
    DataError,
    find_data_dir,
    find_mask,
    is_complete,
    make_folds,
    read_boxes,
    read_test,
    read_train,
    select_studies,
    write_folds,
)
from cspine.config import Config, ConfigError, check_unchanged, load_config, save_config
from cspine.crop import crop, is_cropped
from cspine.evaluate import evaluate
from cspine.extract import extract_fold, is_extracted
from cspine.predict import predict
from cspine.prepare import prepare
from cspine.runs import Run, check_writable, run_lock, write_csv, write_text
from cspine.runtime import pick_device
from cspine.segment import is_segmented, segment
from cspine.submission import default_submission_path
from cspine.synthetic import make_competition, synthetic_settings
from cspine.train_crops import is_crop_trained, train_crop_fold
from cspine.train_seq import is_seq_trained, train_seq
from cspine.train_slices import is_trained, train_fold
from cspine.train_vertebrae import is_vert_trained, train_vertebra_fold

log = logging.getLogger(__name__)

SYNTHETIC_DIR = Path("input/synthetic")
DEFAULT_SYNTHETIC = "demo"  # the config whose synthetic competition is `SYNTHETIC_DIR` itself


def synthetic_dir(cfg: Config) -> Path:
    """Where `run` writes the synthetic competition of a config: ``input/synthetic`` for the demo,
    ``input/synthetic-<name>`` for any other, so configs of different sizes (``bench``) never share one."""
    return (
        SYNTHETIC_DIR if cfg.name == DEFAULT_SYNTHETIC else SYNTHETIC_DIR.with_name(f"synthetic-{cfg.name}")
    )


def resolve_data(cfg: Config, data: str | os.PathLike | None, synthetic: Path | None = None) -> Path:
    """The competition data: the named folder, or one found, or (none found) a synthetic competition
    (in the folder ``synthetic``, by default the config's own, `synthetic_dir`)."""
    if data is not None:
        return find_data_dir(data)
    folder = synthetic or synthetic_dir(cfg)
    try:
        return find_data_dir()
    except DataError as exc:
        if is_complete(folder):
            check_synthetic(cfg, folder)
            log.info("no competition data found; using the synthetic competition in %s", folder)
            return folder
        log.info("%s\n→ generating a synthetic competition in %s", exc, folder)
        s = cfg.synth
        return make_competition(folder, s, workers=max(1, min(cfg.prepare.workers, os.cpu_count() or 1)))


def check_synthetic(cfg: Config, root: Path) -> None:
    """Refuses a synthetic competition made with other `synth` settings than ``cfg`` asks for."""
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg.synth)))  # as recorded: tuples are lists in JSON
    made = synthetic_settings(root)
    differ = [
        f"synth.{k}={v!r} (it has {made.get(k)!r})" for k, v in wanted.items() if made and made.get(k) != v
    ]
    if made is None or differ:
        raise ConfigError(
            f"{root} holds a synthetic competition made with other settings than this config's: "
            + (", ".join(differ) if made else "its settings are not recorded")
            + f"; delete {root} to generate it anew, or pass --data {root} to use it as it is"
        )


def bind_config(cfg: Config, run: Run) -> None:
    """Records ``cfg`` as the run's config, unless it contradicts what the run's artifacts were made with.

    The run's ``config.yaml`` always describes its artifacts. A setting may change in an existing run only
    while nothing it shapes exists yet, or when its stage redoes its work by itself (`is_free`: the BLSTMs
    retrain on changed ``seq`` settings, extraction re-reads on ``predict.tta``).

    Raises:
        ConfigError: naming every setting that differs from the one the run's artifacts were made with.
    """
    if run.config.is_file():
        check_unchanged(
            load_config(run.config), cfg, str(run.root), lambda key: _shaped(run, key) is not None
        )
    save_config(cfg, run.config)


def _shaped(run: Run, key: str) -> Path | None:
    """The first artifact of the run that setting ``key`` shaped, if one exists."""
    section = key.split(".", 1)[0]
    if section == "prepare":
        return next(run.cache.root.glob("*.json"), None)
    if section == "folds":
        return run.folds if run.folds.is_file() else None
    if section == "slice":
        return next(iter(run.slice_states()), None)
    if section == "seg":
        return next(iter(run.seg_states()), None)
    return None


def check_meant_for(cfg: Config, data_dir: Path) -> None:
    """Refuses a config made for the synthetic phantoms (``meant_for: synthetic``) on other data.

    Raises:
        ConfigError: naming the data, the config and the config to use instead.
    """
    if cfg.meant_for not in ("synthetic", "real", "any"):
        raise ConfigError(f"meant_for={cfg.meant_for!r}: one of 'synthetic', 'real', 'any'")
    if cfg.meant_for == "synthetic" and not is_complete(data_dir):
        raise ConfigError(
            f"{data_dir} is not a synthetic competition, and config {cfg.name!r} is a CPU demo made for the "
            f"phantoms (prepare.size={cfg.prepare.size}, {cfg.slice.backbone}, {cfg.slice.steps_per_epoch or 'all'} "
            "steps an epoch). For the real competition use `--config rsna` (README, 'The real competition'); "
            "to run this one on it anyway, add meant_for=any"
        )


def run_studies(cfg: Config, data_dir: Path) -> pd.DataFrame:
    """train.csv's rows that the run uses: all, or the subset ``prepare.studies``/``prepare.study_list`` asks for."""
    p = cfg.prepare
    return select_studies(read_train(data_dir), data_dir, p.studies, p.study_list, cfg.folds.seed)


def studies_a_fold_needs(cfg: Config) -> int:
    """The least studies a fold can hold: its BLSTMs train in ``seq.inner_folds`` inner folds of them."""
    return cfg.seq.inner_folds if cfg.seq.train_on == "own_fold" else 2


def check_inputs(cfg: Config, data_dir: Path, train: pd.DataFrame) -> None:
    """What `run` validates before its first stage, so that no mistake waits until after hours of training.

    Reads test.csv and the boxes (each reader names the file and rows it rejects) and checks the fold
    counts against the studies.

    Raises:
        ConfigError: fold settings that cannot work.
        DataError: a table that cannot be used, or too few studies for the folds.
    """
    read_boxes(data_dir, read_train(data_dir))  # boxes may name studies a subset leaves out
    read_test(data_dir)
    k, inner = cfg.folds.n_splits, cfg.seq.inner_folds
    if k < 2:
        raise ConfigError(f"folds.n_splits={k}: cross-validation needs at least 2 folds")
    if cfg.seq.train_on == "own_fold" and inner < 2:
        raise ConfigError(f"seq.inner_folds={inner}: the BLSTMs train in at least 2 inner folds of each fold")
    if any(f not in range(k) for f in cfg.folds.folds):
        raise ConfigError(f"folds.folds={list(cfg.folds.folds)}: folds are numbered 0 to {k - 1}")
    if needs_vertebrae(cfg):
        masked = sum(find_mask(data_dir, u) is not None for u in train["StudyInstanceUID"])
        if masked < cfg.seg.least_masks:
            raise DataError(
                f"{masked} of the {len(train)} studies the run uses have a segmentation in "
                f"{data_dir / 'segmentations'}, and the segment stage's {cfg.seg.folds} folds need at least "
                f"{cfg.seg.least_masks} (the real data has 87); add them, or run without the stages that need vertebrae: "
                "slice.labels=boxes vert.enabled=false crop.enabled=false"
            )
    per_fold = len(train) // k
    needed = studies_a_fold_needs(cfg)
    if per_fold < needed:
        raise DataError(
            f"{len(train)} training studies make {k} folds of about {per_fold}: each needs at least "
            f"{needed} (seq.inner_folds) for its BLSTMs; lower folds.n_splits"
        )


def check_images(cfg: Config, data_dir: Path, train: pd.DataFrame, cache: Path) -> None:
    """Every study the run uses has its folder under ``train_images/``, and the disk holds the cache.

    A study without images would make `prepare` log an error and go on, and the run die later in a stage
    that names another cause ("more studies with boxes are needed"); a full disk would stop it mid-cache.
    The cache's size is estimated from the files in each folder (one a slice) and `bytes_per_slice`.

    Raises:
        DataError: naming how many folders are missing and the first of them, or the disk's shortfall.
    """
    images = data_dir / "train_images"
    missing = [u for u in train["StudyInstanceUID"] if not (images / u).is_dir()]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(train)} studies the run uses have no folder in {images} "
            f"(first: {', '.join(missing[:3])}); add the images, or take a subset that has them "
            "(prepare.study_list=FILE, prepare.studies=N)"
        )
    todo = [u for u in train["StudyInstanceUID"] if not is_cached(cache, u)]
    slices = sum(sum(1 for _ in os.scandir(images / u)) for u in todo)
    needed = slices * bytes_per_slice(cfg.prepare)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if needed > free:
        raise DataError(
            f"the cache of {len(todo)} studies ({slices:,} slices at prepare.size={cfg.prepare.size}, "
            f"{cfg.prepare.format}) needs about {needed / 1e9:.1f} GB, and {cache} has "
            f"{free / 1e9:.1f} GB free; use prepare.format=zarr, a smaller prepare.size, or a subset "
            "(prepare.studies=0.25)"
        )


def warn_from_scratch(cfg: Config) -> None:
    """Says, for a config meant for the real data, which CNNs will train from scratch for want of a local
    pretrained file: every winning solution started from ImageNet weights."""
    unset = [
        f"{name}.pretrained_file"
        for name, section, used in (("slice", cfg.slice, True), ("crop", cfg.crop, cfg.crop.enabled))
        if used and not section.pretrained_file
    ]
    if cfg.meant_for == "real" and unset:
        log.warning(
            "%s not set: the %s from scratch, slower and weaker than from ImageNet weights; the README's "
            "'Pretrained weights' says how to get a local file once",
            " and ".join(unset),
            "CNN trains" if len(unset) == 1 else "CNNs train",
        )


def setup_run(cfg: Config, data_dir: Path, run_dir: str | os.PathLike) -> pd.DataFrame:
    """The run folder: its config (bound to its artifacts), training labels, folds (kept if present: CV
    stays comparable), after checking every input the stages will need."""
    run = Run(run_dir)
    check_writable(run.root)
    check_meant_for(cfg, data_dir)
    # a config made for a GPU (device: cuda) stops here without one, naming device=auto
    pick_device(cfg.device)
    warn_from_scratch(cfg)
    train = run_studies(cfg, data_dir)
    check_inputs(cfg, data_dir, train)
    check_images(cfg, data_dir, train, run.cache.root)
    bind_config(cfg, run)
    write_text(run.data_dir_file, str(data_dir.resolve()) + "\n")
    write_csv(train, run.labels)
    if not run.folds.is_file():
        write_folds(make_folds(train, cfg.folds.n_splits, cfg.folds.seed), run.folds)
    return train


@dataclass(frozen=True)
class Job:
    """What every stage of one `run` reads: the config, the data, the run folder, where the submission goes."""

    cfg: Config
    data_dir: Path
    run: Run
    submission: Path
    train: pd.DataFrame | None = None

    @property
    def folds(self) -> list[int]:
        return self.cfg.folds.trained


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: its command's name, whether its outputs are complete, and how to make them."""

    name: str
    done: Callable[[Job], bool]
    run: Callable[[Job], object]


def check_cached(job: Job) -> None:
    """After `prepare`: enough studies of each fold were read for the stages that follow (the BLSTMs' inner
    folds, the segmentation's folds), so that a run with many unreadable studies stops here, naming them,
    and not hours later in a scikit-learn traceback.

    Raises:
        DataError: naming the fold, its readable studies, and the list of the failed ones.
    """
    cfg, run = job.cfg, job.run
    cached = set(run.cache.read_index()["StudyInstanceUID"])
    folds = run.read_folds()
    needed = studies_a_fold_needs(cfg)
    for k in job.folds:
        read = int(folds.loc[folds["fold"] == k, "StudyInstanceUID"].isin(cached).sum())
        if read < needed:
            raise DataError(
                f"prepare read {read} studies of fold {k}, and its BLSTMs train in {needed} inner folds "
                f"(seq.inner_folds): {len(cached)} of {len(folds)} studies could be read, the others are "
                f"listed in {run.cache.failed}; mend them, or lower folds.n_splits"
            )
    if needs_vertebrae(cfg):
        masked = sum(run.cache.mask(u).is_file() for u in cached)
        if masked < cfg.seg.least_masks:
            raise DataError(
                f"prepare read {masked} studies with a segmentation, and seg.folds={cfg.seg.folds} needs "
                f"{cfg.seg.least_masks}; the unread studies are listed in {run.cache.failed}"
            )


def _prepared(job: Job) -> bool:
    train = job.train if job.train is not None else run_studies(job.cfg, job.data_dir)
    cache = job.run.cache.root
    return job.run.cache.index.is_file() and all(
        is_cached(cache, u) and stale_reason(cache, u, find_mask(job.data_dir, u)) is None
        for u in train["StudyInstanceUID"]
    )


def needs_vertebrae(cfg: Config) -> bool:
    """Whether a run needs the `segment` stage: for slice labels from vertebrae, the vertebra or the crop track."""
    return cfg.slice.labels == "vertebrae" or cfg.vert.enabled or cfg.crop.enabled


def _always(job: Job) -> bool:
    return False  # cheap stages whose inputs may have changed: evaluate and predict run every time


# A new stage is one entry here; `run` and `run_stages` need nothing else.
STAGES: tuple[Stage, ...] = (
    Stage("prepare", _prepared, lambda j: (prepare(j.cfg, j.data_dir, j.run.cache.root), check_cached(j))),
    Stage(
        "segment",
        lambda j: not needs_vertebrae(j.cfg) or is_segmented(j.cfg, j.run),
        lambda j: segment(j.cfg, j.run),
    ),
    Stage(
        "train-slices",
        lambda j: all(is_trained(j.run, k) for k in j.folds),
        lambda j: [train_fold(j.cfg, j.run, k) for k in j.folds if not is_trained(j.run, k)],
    ),
    Stage(
        "extract",
        lambda j: all(is_extracted(j.cfg, j.run, k) for k in j.folds),
        lambda j: [extract_fold(j.cfg, j.run, k) for k in j.folds],
    ),
    Stage(
        "train-seq",
        lambda j: all(is_seq_trained(j.cfg, j.run, k, h) for h in j.cfg.seq.sizes for k in j.folds),
        lambda j: [train_seq(j.cfg, j.run, k) for k in j.folds],
    ),
    Stage(
        "train-vertebrae",
        lambda j: not j.cfg.vert.enabled or all(is_vert_trained(j.cfg, j.run, k) for k in j.folds),
        lambda j: [
            train_vertebra_fold(j.cfg, j.run, k) for k in j.folds if not is_vert_trained(j.cfg, j.run, k)
        ],
    ),
    Stage(
        "crop",
        lambda j: not j.cfg.crop.enabled or is_cropped(j.cfg, j.run),
        lambda j: crop(j.cfg, j.run, j.data_dir),
    ),
    Stage(
        "train-crops",
        lambda j: not j.cfg.crop.enabled or all(is_crop_trained(j.cfg, j.run, k) for k in j.folds),
        lambda j: [train_crop_fold(j.cfg, j.run, k) for k in j.folds if not is_crop_trained(j.cfg, j.run, k)],
    ),
    Stage(
        "blend",
        lambda j: not j.cfg.blend.enabled or is_blended(j.cfg, j.run, j.folds),
        lambda j: blend(j.cfg, j.run, j.folds),
    ),
    Stage("evaluate", _always, lambda j: evaluate(j.cfg, j.run)),
    Stage("predict", _always, lambda j: predict(j.cfg, j.data_dir, j.run, j.submission, train=j.train)),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


LAST_PER_FOLD = "train-crops"  # the stages up to here train fold by fold; the blend and after need them all


def missing_folds(cfg: Config) -> list[int]:
    """The folds a run of ``cfg`` leaves untrained (``folds.folds`` a subset: a GPU session's share)."""
    return sorted(set(range(cfg.folds.n_splits)) - set(cfg.folds.trained))


def run_stages(
    cfg: Config,
    data_dir: Path,
    run_dir: str | os.PathLike,
    until: str = "predict",
    submission: Path | None = None,
    train: pd.DataFrame | None = None,
) -> None:
    """Runs the stages in order through ``until``, skipping those whose outputs are complete.

    With ``folds.folds`` a subset of the folds, it stops after the per-fold stages (`LAST_PER_FOLD`): the
    blend scores each fold with the others' blend, and `predict` averages every fold's models.
    """
    if until not in STAGE_NAMES:
        raise ValueError(f"until must be one of {STAGE_NAMES}, not {until!r}")
    if missing_folds(cfg) and STAGE_NAMES.index(until) > STAGE_NAMES.index(LAST_PER_FOLD):
        log.warning(
            "folds.folds=%s: this run trains those folds only; the blend, the report and the submission "
            "need every fold's models, and come with the run that trains the last of them (folds %s "
            "left; folds.folds=[] trains what is missing)",
            list(cfg.folds.folds),
            missing_folds(cfg),
        )
        until = LAST_PER_FOLD
    job = Job(cfg, Path(data_dir), Run(run_dir), Path(submission or default_submission_path()), train)
    for stage in STAGES[: STAGE_NAMES.index(until) + 1]:
        if stage.done(job):
            log.info("stage %s: nothing to do", stage.name)
            continue
        started = time.perf_counter()
        stage.run(job)
        log.info("stage %s: %.1f s", stage.name, time.perf_counter() - started)


def run(
    cfg: Config,
    data: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    submission: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """The whole baseline; returns where each output is."""
    started = time.perf_counter()
    data_dir = resolve_data(cfg, data)
    run_folder = Run(run_dir or Path("runs") / cfg.name)
    submission = Path(submission or default_submission_path())
    check_writable(submission.parent)
    with run_lock(run_folder):
        train = setup_run(cfg, data_dir, run_folder)
        log.info("run %s: data %s, outputs %s", cfg.name, data_dir, run_folder.root)
        run_stages(cfg, data_dir, run_folder, "predict", submission, train)
    outputs = {
        "submission": submission,
        "report": run_folder.report / "report.md",
        "figures": run_folder.report,
        "run": run_folder.root,
    }
    if missing_folds(cfg):  # the per-fold stages only (`run_stages`)
        outputs = {"run": run_folder.root}
    minutes = (time.perf_counter() - started) / 60
    print(f"\ncspine run '{cfg.name}' finished in {minutes:.1f} min")
    for name, path in outputs.items():
        print(f"  {name:<10} {path}")
    return outputs
