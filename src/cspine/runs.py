"""The run folder: every path in it, and how files are written there.

    run = Run("runs/demo")
    run.slice_best(0)          # runs/demo/slice/fold0/best.pt

Layout of ``runs/<name>/``::

    config.yaml  data_dir.txt  labels.csv  folds.csv  run.log
    cache/            index.csv, config.yaml, failed.txt, <uid>.npy (or .zarr) + <uid>.json per study   (prepare)
    slice/fold<k>/    best.pt, last.pt, done, history.csv, oof_slices.csv, table2.*        (train-slices)
    features/fold<k>/ <uid>.npz, provenance.json                                           (extract)
    seq/h<H>/fold<k>/ inner<i>.pt or model.pt, oof.csv, features.json, history.json        (train-seq)
    seq/h<H>/oof.csv                                                                       (evaluate)
    segment/          fold<k>.pt, vertebrae.csv, extents.csv, dice.csv, checks.csv, labels/<uid>.npz  (segment)
    segment/round1/   fold<k>.pt, pseudo<k>.csv (segment, self-training)
    vertebra/fold<k>/ inner<i>.pt, oof.csv, record.json, history.json                      (train-vertebrae)
    crop/             studies/<uid>.npy, places.csv, record.json                           (crop)
    crop/fold<k>/     model.pt, last.pt, oof.csv, record.json, history.json                (train-crops)
    blend/            blend.pt, fold<k>.pt, inputs.csv, oof.csv, record.json              (blend)
    report/           report.md, tables, figures                                           (evaluate)
    explain/          Grad-CAM figures                                                     (explain)

What checkpoints hold is `cspine.checkpoints`'s business. Every file goes through a temporary name and a
rename (`atomic_path`), so a crash never leaves half a file under the real name. This module imports no
torch: `prepare`'s worker processes use it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd


class RunLocked(OSError):
    """Another live process holds the run folder (`run_lock`); the message names it."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or was written by another version of cspine (`cspine.checkpoints`)."""


# the records a stage keeps beside its models; `Run.slice_file` and `Run.seq_file` accept only these
SLICE_FILES = ("history.csv", "oof_slices.csv", "table2", "report.json", "train.log", "config.yaml")
SEQ_FILES = ("oof.csv", "features.json", "history.json")
SEG_FILES = ("vertebrae.csv", "extents.csv", "dice.csv", "checks.csv")
VERT_FILES = ("oof.csv", "record.json", "history.json")
CROP_FILES = ("oof.csv", "record.json", "history.json")
BLEND_FILES = ("inputs.csv", "oof.csv", "record.json")


class Cache:
    """The slice cache written by `prepare` (by default ``<run>/cache``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def index(self) -> Path:
        return self.root / "index.csv"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def failed(self) -> Path:
        return self.root / "failed.txt"

    def images(self, uid: str) -> Path:
        """A study's slices as plain ``.npy`` (``prepare.format: npy``)."""
        return self.root / f"{uid}.npy"

    def zarr(self, uid: str) -> Path:
        """A study's slices as a compressed zarr store, a folder (``prepare.format: zarr``)."""
        return self.root / f"{uid}.zarr"

    def meta(self, uid: str) -> Path:
        return self.root / f"{uid}.json"

    def mask(self, uid: str) -> Path:
        """uint8 [N, size, size] vertebra labels of a study with a segmentation, in the cached images' frame."""
        return self.root / f"{uid}.mask.npy"

    def read_index(self) -> pd.DataFrame:
        """One row per cached slice (`cspine.cache.INDEX_COLUMNS`)."""
        return pd.read_csv(self.index, dtype={"StudyInstanceUID": str})


class Run:
    """Paths of one run folder; nothing outside this class spells them."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data_dir_file(self) -> Path:
        return self.root / "data_dir.txt"

    def data_dir(self) -> Path | None:
        """The competition folder the run was set up with (`data_dir_file`), or None before it was."""
        return Path(self.data_dir_file.read_text().strip()) if self.data_dir_file.is_file() else None

    @property
    def labels(self) -> Path:
        return self.root / "labels.csv"

    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def holdout_dir(self) -> Path:
        """The held-out score (`cspine.holdout`): each study's answers, the tables, what they were made with."""
        return self.root / "holdout"

    @property
    def explain(self) -> Path:
        return self.root / "explain"

    @property
    def cache(self) -> Cache:
        return Cache(self.root / "cache")

    def slice_dir(self, fold: int) -> Path:
        return self.root / "slice" / f"fold{fold}"

    def slice_best(self, fold: int) -> Path:
        return self.slice_dir(fold) / "best.pt"

    def slice_last(self, fold: int) -> Path:
        return self.slice_dir(fold) / "last.pt"

    def slice_done(self, fold: int) -> Path:
        return self.slice_dir(fold) / "done"

    def slice_file(self, fold: int, name: str) -> Path:
        """One of a fold's training records (`SLICE_FILES`)."""
        return _record(self.slice_dir(fold), name, SLICE_FILES, "slice record")

    def slice_states(self) -> list[Path]:
        """Every slice-CNN checkpoint of the run, best.pt and last.pt, of every fold."""
        return sorted(self.root.glob("slice/fold*/*.pt"))

    def slice_checkpoints(self) -> dict[int, Path]:
        """{fold: best.pt} for every fold that has one."""
        return {int(p.parent.name[4:]): p for p in sorted(self.root.glob("slice/fold*/best.pt"))}

    def seg_model(self, fold: int) -> Path:
        """The segmentation model of one fold (`cspine.segment`)."""
        return self.root / "segment" / f"fold{fold}.pt"

    def seg_models(self) -> list[Path]:
        """Every fold's segmentation model that exists."""
        return sorted(self.root.glob("segment/fold*.pt"))

    def seg_first(self, fold: int) -> Path:
        """One fold's round-1 segmentation model, when self-training (``seg.rounds: 2``) goes on from it."""
        return self.root / "segment" / "round1" / f"fold{fold}.pt"

    def seg_pseudo(self, fold: int) -> Path:
        """What one fold's round-1 model labelled for self-training, and what of it was used."""
        return self.root / "segment" / "round1" / f"pseudo{fold}.csv"

    def seg_pseudo_files(self) -> list[Path]:
        """Every fold's `seg_pseudo` table that exists."""
        return sorted(self.root.glob("segment/round1/pseudo*.csv"))

    def seg_states(self) -> list[Path]:
        """Every segmentation model of the run, of either round."""
        return self.seg_models() + sorted(self.root.glob("segment/round1/fold*.pt"))

    def seg_file(self, name: str) -> Path:
        """One of the segmentation stage's tables (`SEG_FILES`)."""
        return _record(self.root / "segment", name, SEG_FILES, "segmentation table")

    @property
    def seg_labels_dir(self) -> Path:
        return self.root / "segment" / "labels"

    def seg_labels(self, uid: str) -> Path:
        """A study's predicted labels, uint8 [N, size, size] in the cache's frame (`cspine.segment`)."""
        return self.seg_labels_dir / f"{uid}.npz"

    @property
    def crop_dir(self) -> Path:
        return self.root / "crop"

    @property
    def crop_studies(self) -> Path:
        return self.crop_dir / "studies"

    def crop_study(self, uid: str) -> Path:
        """A study's crops of C1..C7, each distinct plane once, compressed (`cspine.crops.write_crop_store`)."""
        return self.crop_studies / f"{uid}.npz"

    @property
    def crop_places(self) -> Path:
        """Where every study's crops were cut: slices, box, and whether the segmentation found the vertebra."""
        return self.crop_dir / "places.csv"

    @property
    def crop_record(self) -> Path:
        """What the crops were cut with (settings, segmentation): the stage redoes them when it changes."""
        return self.crop_dir / "record.json"

    def crop_fold_dir(self, fold: int) -> Path:
        return self.crop_dir / f"fold{fold}"

    def crop_model(self, fold: int) -> Path:
        """Fold ``fold``'s crop model, trained on the other folds' studies (`cspine.train_crops`)."""
        return self.crop_fold_dir(fold) / "model.pt"

    def crop_last(self, fold: int) -> Path:
        """The crop model under training, with its optimizer: a killed `train-crops` resumes from it."""
        return self.crop_fold_dir(fold) / "last.pt"

    def crop_file(self, fold: int, name: str) -> Path:
        """One of a fold's crop-track records (`CROP_FILES`)."""
        return _record(self.crop_fold_dir(fold), name, CROP_FILES, "crop-track record")

    def crop_models(self) -> list[Path]:
        return sorted(self.root.glob("crop/fold*/model.pt"))

    def crop_oof(self) -> Path:
        """Every fold's out-of-fold crop-track predictions, together."""
        return self.crop_dir / "oof.csv"

    def vert_dir(self, fold: int) -> Path:
        return self.root / "vertebra" / f"fold{fold}"

    def vert_model(self, fold: int, inner: int) -> Path:
        """A vertebra-track BiLSTM, trained in inner fold ``inner`` of fold ``fold`` (`cspine.train_vertebrae`)."""
        return self.vert_dir(fold) / f"inner{inner}.pt"

    def vert_file(self, fold: int, name: str) -> Path:
        """One of a fold's vertebra-track records (`VERT_FILES`)."""
        return _record(self.vert_dir(fold), name, VERT_FILES, "vertebra-track record")

    def vert_models(self) -> list[Path]:
        return sorted(self.root.glob("vertebra/fold*/inner*.pt"))

    def vert_oof(self) -> Path:
        """Every fold's out-of-fold vertebra-track predictions, together."""
        return self.root / "vertebra" / "oof.csv"

    @property
    def blend_dir(self) -> Path:
        return self.root / "blend"

    @property
    def blend_model(self) -> Path:
        """The level-2 blend `predict` applies, fitted on every study (`cspine.blend`)."""
        return self.blend_dir / "blend.pt"

    def blend_scorer(self, fold: int) -> Path:
        """The blend that scored fold ``fold`` out of fold, fitted on the other folds' studies."""
        return self.blend_dir / f"fold{fold}.pt"

    def blend_file(self, name: str) -> Path:
        """One of the blend's records (`BLEND_FILES`)."""
        return _record(self.blend_dir, name, BLEND_FILES, "blend record")

    def features_dir(self, fold: int) -> Path:
        return self.root / "features" / f"fold{fold}"

    def features_file(self, fold: int, uid: str) -> Path:
        return self.features_dir(fold) / f"{uid}.npz"

    def provenance(self, fold: int) -> Path:
        return self.features_dir(fold) / "provenance.json"

    def provenances(self) -> list[Path]:
        return sorted(self.root.glob("features/fold*/provenance.json"))

    def seq_dir(self, hidden: int) -> Path:
        return self.root / "seq" / f"h{hidden}"

    def seq_fold_dir(self, hidden: int, fold: int) -> Path:
        return self.seq_dir(hidden) / f"fold{fold}"

    def seq_file(self, hidden: int, fold: int, name: str) -> Path:
        """One of a fold's BLSTM records (`SEQ_FILES`; features.json: what they trained on)."""
        return _record(self.seq_fold_dir(hidden, fold), name, SEQ_FILES, "BLSTM record")

    def blstm(self, hidden: int, fold: int, inner: int | None) -> Path:
        """A BLSTM checkpoint: ``inner<i>.pt`` (trained in inner fold i of the fold) or ``model.pt`` (on other folds)."""
        return self.seq_fold_dir(hidden, fold) / ("model.pt" if inner is None else f"inner{inner}.pt")

    def seq_oof(self, hidden: int) -> Path:
        """Every fold's out-of-fold BLSTM predictions of one size, together."""
        return self.seq_dir(hidden) / "oof.csv"

    def blstm_checkpoints(self, hidden: int) -> list[Path]:
        return sorted(self.seq_dir(hidden).glob("fold*/*.pt"))

    def blend_reads(
        self, folds: list[int], sizes: list[int], vertebra: bool, crop: bool, segment: bool
    ) -> list[Path]:
        """The checkpoints whose outputs a blend of ``folds`` reads: each fold's slice CNN and BLSTMs of
        ``sizes``, with ``vertebra`` and ``crop`` those tracks' models, with ``segment`` the segmentation's
        (existing or not: a missing one is part of what a blend was not fitted through)."""
        paths = [self.slice_best(k) for k in folds]
        paths += [p for h in sizes for p in self.blstm_checkpoints(h) if int(p.parent.name[4:]) in folds]
        if vertebra:
            paths += [p for p in self.vert_models() if int(p.parent.name[4:]) in folds]
        if crop:
            paths += [self.crop_model(k) for k in folds]
        if segment:
            paths += self.seg_models()
        return paths

    def model_files(self) -> list[Path]:
        """Every checkpoint `predict` may read: the slice CNNs, the BLSTMs, the tracks, the segmentation,
        the blend."""
        patterns = (
            "slice/fold*/best.pt",
            "seq/h*/fold*/*.pt",
            "vertebra/fold*/inner*.pt",
            "crop/fold*/model.pt",
        )
        return sorted(
            p
            for pattern in (*patterns, "segment/fold*.pt", "blend/blend.pt")
            for p in self.root.glob(pattern)
        )

    def digests(self, paths: list[Path]) -> dict[str, str]:
        """{path relative to the run: `digest`, or "missing"} of ``paths``: what a blend was fitted through."""
        return {p.relative_to(self.root).as_posix(): digest(p) if p.is_file() else "missing" for p in paths}

    def read_folds(self) -> pd.DataFrame:
        """StudyInstanceUID → fold, as `make_folds` wrote it."""
        return pd.read_csv(self.folds, dtype={"StudyInstanceUID": str})

    def read_checks(self) -> pd.DataFrame:
        """The segment stage's check of every study (StudyInstanceUID, counted, passed as bool, problems)."""
        checks = pd.read_csv(self.seg_file("checks.csv"), dtype={"StudyInstanceUID": str})
        return checks.assign(passed=checks["passed"].astype(bool))

    def read_labels(self) -> pd.DataFrame:
        """The training labels (train.csv's columns), indexed by StudyInstanceUID."""
        return pd.read_csv(self.labels, dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")


def _record(folder: Path, name: str, allowed: tuple[str, ...], what: str) -> Path:
    """``folder / name`` for one of a stage's record files; any other name is a ValueError (a typo)."""
    if name not in allowed:
        raise ValueError(f"{name!r} is not a {what}; one of {allowed}")
    return folder / name


def default_work_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where a notebook puts ``input/`` (a synthetic competition) and ``runs/``, without changing directory:
    ``explicit``; else ``/kaggle/working`` on Kaggle; else the repository root when started in its
    ``notebooks/`` folder; else the working directory."""
    if explicit is not None:
        return Path(explicit)
    if Path("/kaggle/working").is_dir():
        return Path("/kaggle/working")
    here = Path.cwd()
    if here.name == "notebooks" and (here.parent / "pyproject.toml").is_file():
        return here.parent
    return here


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` only if the block succeeds.

    A crash or an exception leaves ``path`` as it was (absent, or the previous complete version), never
    half written. The temporary name ends in ``.part``, so no glob for the real files (``*.pt``, ``*.npz``)
    meets one left by a killed process; give NumPy an open file, not this path, or it appends a suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def digest(path: str | os.PathLike) -> str:
    """A short content hash of a file: tells when an artifact was made anew."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Writes a table atomically, without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def write_json(data, path: str | os.PathLike) -> Path:
    """Writes JSON atomically."""
    return write_text(path, json.dumps(data, indent=1))


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Saves a matplotlib figure atomically, in the format its suffix names."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip("."))
    return path


def check_writable(*paths: Path) -> None:
    """Creates each path's folder and proves it writable now, not after hours of work.

    Raises:
        OSError: naming the folder that cannot be written.
    """
    for folder in {Path(p) for p in paths}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_text(folder / ".cspine-write-check", "")
            (folder / ".cspine-write-check").unlink()
        except OSError as exc:
            raise OSError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def replace_folder(new: Path, out: Path) -> None:
    """Puts the whole folder ``new`` in the place of ``out`` (which may not exist), the old one removed
    after: a failure before this keeps the old folder as it was."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


UNNAMED_LOCK_SECONDS = 10.0  # a lock that names no process this long after it was made is left over


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def run_lock(run: Run) -> Iterator[Path]:
    """Holds ``run.lock`` (this process's PID and host) while the block runs, so that a second `run` in the
    same folder refuses at once instead of writing the same ``.part`` files.

    A lock left by a process of this host that is no longer alive (killed with -9) is stale and taken
    over; one from another host (a shared disk) is respected, and the message says how to remove it.

    Raises:
        RunLocked: naming the holder.
    """
    run.root.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(run.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(run.lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if (
                holder.get("host") == me["host"]
                and isinstance(holder.get("pid"), int)
                and not _alive(holder["pid"])
            ) or (not holder and _age(run.lock) > UNNAMED_LOCK_SECONDS):
                # stale: its process is gone, or it names none (a process killed between creating the
                # lock and writing its name, or a file made by hand)
                run.lock.unlink(missing_ok=True)
                continue
            who = f"process {holder['pid']} on {holder.get('host', '?')}" if "pid" in holder else "a process"
            raise RunLocked(
                f"{run.root} is in use by {who} ({run.lock}); wait for it, or delete the lock file if no "
                "cspine command is running there"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield run.lock
    finally:
        run.lock.unlink(missing_ok=True)
