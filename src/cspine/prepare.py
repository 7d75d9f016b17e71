"""Stage `prepare`: every training study → a cache of preprocessed uint8 slices and one index table.

    python -m cspine prepare --config demo --data input/synthetic --out runs/demo/cache

Per study, ``<uid>.npy`` (or, with ``prepare.format: zarr``, the compressed store ``<uid>.zarr``) holds
uint8 [N, size, size, 3] head to feet, ``<uid>.json`` its slice
numbers, positions, labels, crop and fracture boxes (in the cached image's pixels), and, for a study with
a segmentation, ``<uid>.mask.npy`` its vertebra labels in the same frame; ``index.csv`` has one row per
slice. Studies run in parallel; a finished study (its JSON written last, by rename) is skipped on
the next run, so a killed run resumes and never leaves a half-written study that reads as finished. The
JSON records the bytes its images took and the segmentation it was made with: a study whose images changed
size since (truncated, damaged) or whose segmentation appeared or changed is named and cached again. A
study that fails is logged and listed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cspine import TARGETS, VERTEBRAE
from cspine.competition import (
    find_mask,
    read_boxes,
    read_mask,
    read_train,
    select_studies,
    slice_labels,
    vertebra_presence,
)
from cspine.config import Config, ConfigError, PrepareConfig, check_unchanged, load_config, save_config
from cspine.dicom import load_series
from cspine.preprocess import boxes_in_cache_frame, labels_in_cache_frame, preprocess_study
from cspine.runs import Cache, atomic_path, write_csv, write_text
from cspine.processes import die_with_parent
from cspine.progress import progress

log = logging.getLogger(__name__)

UNKNOWN = -1  # a label that the data cannot give (no boxes, or no mask, for that study)
MIN_SLICES = 2  # fewer readable slices make no crop and no sequence: prepare skips the study, predict gives the prior
FORMATS = ("npy", "zarr")
ZARR_RATIO = 2.45  # zarr against .npy on real CT slices at 256 px, the least of those measured (benchmarks/README.md)
ZARR_CLEVEL = 3  # zstd level: 5 saves 2-5% more and encodes 2-3x slower (benchmarks/bench_cache.py)
INDEX_COLUMNS = ["StudyInstanceUID", "order", "slice_number", "z", "label",
                 *[f"{v}_present" for v in VERTEBRAE], *[f"{v}_fracture" for v in VERTEBRAE]]


@dataclass(frozen=True)
class StudyJob:
    """What one worker needs to cache one study."""

    uid: str
    image_dir: Path
    out_dir: Path
    labels: dict | None  # the study's train.csv row (None for test studies)
    boxes: list[dict]
    mask_path: Path | None
    prepare: PrepareConfig


def bytes_per_slice(p: PrepareConfig) -> float:
    """What one cached slice takes on disk: three windows of size² uint8, divided by zarr's compression."""
    raw = 3 * p.size * p.size
    return raw / ZARR_RATIO if p.format == "zarr" else raw


def is_cached(cache_dir: Path, uid: str) -> bool:
    """A study is cached when its JSON exists: it is written (by rename) only after its array."""
    cache = Cache(cache_dir)
    return (cache.images(uid).is_file() or cache.zarr(uid).is_dir()) and cache.meta(uid).is_file()


def study_bytes(cache: Cache, uid: str) -> int:
    """Bytes on disk of one cached study's slices (``.npy`` file, or every file of its zarr store)."""
    total = sum(f.stat().st_size for f in cache.zarr(uid).rglob("*") if f.is_file())
    return total + (cache.images(uid).stat().st_size if cache.images(uid).is_file() else 0)


def mask_record(mask_path: Path | None) -> list | None:
    """What identifies the segmentation a study was cached with: its file name and size."""
    return [mask_path.name, mask_path.stat().st_size] if mask_path is not None else None


def stale_reason(cache_dir: Path, uid: str, mask_path: Path | None) -> str | None:
    """Why a cached study must be cached again (its images damaged, its segmentation new), or None."""
    cache = Cache(cache_dir)
    try:
        meta = read_meta(cache_dir, uid)
    except (OSError, ValueError) as exc:
        return f"{cache.meta(uid)} cannot be read ({type(exc).__name__})"
    stored = study_bytes(cache, uid)
    if meta.get("stored_bytes") != stored:
        return (f"its images take {stored:,} bytes on disk and took {meta.get('stored_bytes')} when written "
                "(damaged, or cached by an older cspine)")
    if meta.get("mask") != mask_record(mask_path):
        now = mask_path.name if mask_path else "none"
        return (f"its segmentation is {now} now and was {(meta.get('mask') or ['none'])[0]} when cached (a "
                "segment stage already run keeps what it learnt without it: delete its folder to retrain)")
    return None


def write_study_images(cache: Cache, uid: str, images: np.ndarray, fmt: str) -> Path:
    """Writes a study's uint8 [N, H, W, 3] slices in ``fmt`` (`FORMATS`), atomically; returns the path.

    ``zarr``: one chunk per slice (a slice is read alone), all in one shard file per study (two files a
    study, not hundreds), zstd through Blosc without shuffle (bytes are the unit of uint8 images; shuffling
    them changes nothing). The store is built in a ``.part`` folder and renamed into place, so a killed
    run leaves no store that a later one would read.
    """
    if fmt == "npy":
        with atomic_path(cache.images(uid)) as tmp, open(tmp, "wb") as f:
            np.save(f, images)
        return cache.images(uid)
    import zarr  # training-only: inference never reads the cache
    from zarr.codecs import BloscCodec

    final = cache.zarr(uid)
    tmp = final.with_name(final.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        store = zarr.create_array(str(tmp), shape=images.shape, dtype=np.uint8, chunks=(1, *images.shape[1:]),
                                  shards=images.shape,
                                  compressors=BloscCodec(cname="zstd", clevel=ZARR_CLEVEL, shuffle="noshuffle"))
        store[:] = images
        shutil.rmtree(final, ignore_errors=True)  # a store without its JSON is unfinished: replace it
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class CacheError(OSError):
    """A cached study that cannot be read (a damaged shard); the message names it and how to redo it."""


class ZarrStudy:
    """A zarr-cached study read like the memory map of a ``.npy`` one: ``len``, ``shape``, ``study[k]``,
    ``study[lo:hi]``, ``study[int_array]`` and ``np.asarray(study)``, each decoding only the slices asked for.

    Raises:
        CacheError: on any read of a damaged store (zarr's own errors name no file).
    """

    def __init__(self, path: Path):
        import zarr

        self.path = path
        try:
            self._array = zarr.open_array(str(path), mode="r")
        except Exception as exc:
            raise self._damaged(exc) from None
        self.shape = self._array.shape
        self.dtype = self._array.dtype

    def _damaged(self, exc: Exception) -> CacheError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return CacheError(f"{self.path}: the cached study cannot be read ({type(exc).__name__}: {first[:200]}); "
                          f"delete it and {self.path.with_suffix('.json').name} beside it, and run prepare again")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        try:
            return self._array[key]
        except Exception as exc:
            raise self._damaged(exc) from None

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def _slice_targets(labels: dict | None, slice_label: np.ndarray, presence: np.ndarray | None,
                   has_boxes: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice slice label and per-vertebra fracture labels, UNKNOWN where the data cannot tell."""
    n = len(slice_label)
    if labels is None:
        return np.full(n, UNKNOWN), np.full((n, 7), UNKNOWN)
    fractured = np.array([labels[v] for v in VERTEBRAE], dtype=int)
    if labels["patient_overall"] == 0:
        return np.zeros(n, int), np.zeros((n, 7), int)
    if not has_boxes:
        return np.full(n, UNKNOWN), np.full((n, 7), UNKNOWN)
    label = slice_label.astype(int)
    if presence is not None:
        return label, (label[:, None] & presence.astype(int) & fractured[None, :]).astype(int)
    if fractured.sum() == 1:  # one fractured vertebra: every fractured slice is that vertebra's
        return label, label[:, None] * fractured[None, :]
    return label, np.where(label[:, None] == 1, UNKNOWN, 0) * np.ones((1, 7), int)


def cached_boxes(boxes: list[dict], slice_numbers: np.ndarray, crops: list, size: int) -> list[list[float]]:
    """Competition boxes as [order, x0, y0, x1, y1] in the cached image's pixels (boxes on absent slices dropped)."""
    order = {int(n): k for k, n in enumerate(slice_numbers)}
    out = []
    for box in boxes:
        k = order.get(int(box["slice_number"]))
        if k is None:
            continue
        crop = crops[0] if len(crops) == 1 else crops[k]
        ((x, y, w, h),) = boxes_in_cache_frame([box], tuple(crop), size)
        out.append([k, *(round(float(v), 2) for v in (x, y, x + w, y + h))])
    return out


def _mask(mask_path: Path, series) -> np.ndarray | None:
    """A study's segmentation aligned with its slices; None, with a warning, when the file is unusable.

    A damaged or empty mask costs the study its per-vertebra labels, never its images and study labels.
    """
    try:
        mask = read_mask(mask_path, series)
    except Exception as exc:  # nibabel raises many types on a damaged file
        log.warning("prepare: segmentation %s cannot be read (%s: %s); the study is kept without it",
                    mask_path, type(exc).__name__, exc)
        return None
    if not mask.any():
        log.warning("prepare: segmentation %s labels no vertebra; the study is kept without it", mask_path)
        return None
    return mask


def cache_study(job: StudyJob) -> tuple[str, int, str | None]:
    """Loads, preprocesses and writes one study; returns (uid, slices, error or None)."""
    cache = Cache(job.out_dir)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            series = load_series(job.image_dir, workers=1, on_error="skip")
        for w in caught:
            log.warning("%s", w.message)
        if len(series) < MIN_SLICES:
            raise ValueError(f"only {len(series)} readable slice(s)")
        images, boxes = preprocess_study(series.hu, job.prepare.size, job.prepare.crop, job.prepare.margin)
        box_df = pd.DataFrame(job.boxes, columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"])
        slice_label = slice_labels(series.slice_numbers, box_df, job.uid)
        mask = _mask(job.mask_path, series) if job.mask_path else None
        presence = vertebra_presence(mask) if mask is not None else None
        label, fracture = _slice_targets(job.labels, slice_label, presence, bool(job.boxes))
        if mask is not None:  # the segmentation stage trains on it, in the cached images' frame
            with atomic_path(cache.mask(job.uid)) as tmp, open(tmp, "wb") as f:
                np.save(f, labels_in_cache_frame(mask, boxes, job.prepare.size))
        write_study_images(cache, job.uid, images, job.prepare.format)
        stored = study_bytes(cache, job.uid)
        crops = [list(map(int, b)) for b in (boxes[:1] if job.prepare.crop == "study" else boxes)]
        meta = {
            "uid": job.uid,
            "n": len(images),
            "slice_numbers": series.slice_numbers.tolist(),
            "z": np.nan_to_num(series.positions[:, 2], nan=0.0).tolist(),
            "spacing": list(series.spacing),
            "crop": crops,
            "label": label.tolist(),
            "boxes": cached_boxes(job.boxes, series.slice_numbers, crops, job.prepare.size),
            "present": presence.tolist() if presence is not None else None,
            "fracture": fracture.tolist(),
            "targets": job.labels,
            "skipped": [str(p) for p, _ in series.skipped],
            "stored_bytes": stored,
            "mask": mask_record(job.mask_path),
        }
        write_text(cache.meta(job.uid), json.dumps(meta))
        return job.uid, len(images), None
    except Exception as exc:  # one bad study must never stop the run: it is reported at the end
        return job.uid, 0, f"{type(exc).__name__}: {exc}"


def _index_rows(meta: dict) -> pd.DataFrame:
    n = meta["n"]
    present = np.array(meta["present"]) if meta["present"] is not None else np.full((n, 7), UNKNOWN)
    fracture = np.array(meta["fracture"])
    df = pd.DataFrame({"StudyInstanceUID": meta["uid"], "order": np.arange(n),
                       "slice_number": meta["slice_numbers"], "z": meta["z"], "label": meta["label"]})
    for i, v in enumerate(VERTEBRAE):
        df[f"{v}_present"] = present[:, i]
        df[f"{v}_fracture"] = fracture[:, i]
    return df


def read_meta(cache_dir: Path, uid: str) -> dict:
    return json.loads(Cache(cache_dir).meta(uid).read_text())


def load_study_images(cache_dir: Path, uid: str, mmap: bool = True) -> np.ndarray | ZarrStudy:
    """uint8 [N, size, size, 3] of one cached study: memory-mapped by default, or read lazily from zarr
    (``mmap=False`` reads the whole study into memory either way)."""
    cache = Cache(cache_dir)
    if cache.zarr(uid).is_dir():
        study = ZarrStudy(cache.zarr(uid))
        return study if mmap else np.asarray(study)
    return np.load(cache.images(uid), mmap_mode="r" if mmap else None)


def build_index(cache_dir: Path, uids: list[str]) -> pd.DataFrame:
    """One row per cached slice, in study then head-to-feet order; written to index.csv."""
    frames = [_index_rows(read_meta(cache_dir, uid)) for uid in uids if is_cached(cache_dir, uid)]
    index = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=INDEX_COLUMNS)
    write_csv(index, Cache(cache_dir).index)
    return index


def bind_cache(cfg: Config, cache: Cache) -> None:
    """Records the settings of a new cache once; refuses other preprocessing for a cache that holds studies.

    Raises:
        ConfigError: naming each ``prepare`` setting that differs from the one the cache was made with.
    """
    if cache.config.is_file() and any(cache.root.glob("*.json")):
        check_unchanged(load_config(cache.config), cfg, str(cache.root), lambda key: key.startswith("prepare."))
        return
    save_config(cfg, cache.config)


def prepare(cfg: Config, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
            studies: list[str] | None = None) -> pd.DataFrame:
    """Caches the run's training studies (`select_studies`: all, or ``prepare.studies``), or ``studies``, and
    returns the slice index.

    Raises:
        RuntimeError: when every study failed (the failures are listed in ``failed.txt``).
    """
    if cfg.prepare.format not in FORMATS:
        raise ConfigError(f"prepare.format: {cfg.prepare.format!r} is not one of {', '.join(FORMATS)}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bind_cache(cfg, Cache(out_dir))
    every = read_train(data_dir)
    boxes = read_boxes(data_dir, every)
    train = select_studies(every, data_dir, cfg.prepare.studies, cfg.prepare.study_list, cfg.folds.seed)
    if studies is not None:
        train = train[train["StudyInstanceUID"].isin(studies)]
    jobs, again = [], []
    for row in train.to_dict("records"):
        uid = row["StudyInstanceUID"]
        mask_path = find_mask(data_dir, uid)
        if is_cached(out_dir, uid):
            reason = stale_reason(out_dir, uid, mask_path)
            if reason is None:
                continue
            again.append(uid)
            if len(again) <= 3:
                log.warning("prepare: study %s is cached again: %s", uid, reason)
            Cache(out_dir).meta(uid).unlink()  # first: a run killed now sees the study as not cached
        jobs.append(StudyJob(uid=uid, image_dir=data_dir / "train_images" / uid, out_dir=out_dir,
                             labels={k: int(row[k]) for k in TARGETS},
                             boxes=boxes[boxes["StudyInstanceUID"] == uid].to_dict("records"),
                             mask_path=mask_path, prepare=cfg.prepare))
    if len(again) > 3:
        log.warning("prepare: %d studies in all are cached again, for reasons like those above", len(again))
    uids = train["StudyInstanceUID"].tolist()
    log.info("prepare: %d studies, %d cached already, %d to do", len(uids), len(uids) - len(jobs), len(jobs))
    failures = []
    if jobs:
        bar = progress(total=len(jobs), desc="prepare", unit="study")
        workers = max(1, min(cfg.prepare.workers, len(jobs)))
        pool = (ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),))
                if workers > 1 else None)
        try:
            for uid, n, error in (pool.map if pool else map)(cache_study, jobs):  # in-process: easier to debug
                bar.update()
                bar.set_postfix(slices=n, refresh=False)
                if error:
                    log.error("prepare: study %s failed: %s", uid, error)
                    failures.append(f"{uid}\t{error}")
        finally:
            if pool:
                pool.shutdown()
            bar.close()
    failed_path = write_text(Cache(out_dir).failed, "\n".join(failures) + ("\n" if failures else ""))
    index = build_index(out_dir, uids)
    if failures:
        log.warning("prepare: %d studies failed (listed in %s)", len(failures), failed_path)
    if index.empty:
        raise RuntimeError(f"prepare: no study could be cached; see {failed_path}")
    on_disk = cache_bytes(out_dir, index["StudyInstanceUID"].unique())
    log.info("prepare: %d slices of %d studies cached in %s (%s): %.1f GB, %d bytes per slice (%.1fx smaller "
             "than raw)", len(index), index["StudyInstanceUID"].nunique(), out_dir, cfg.prepare.format,
             on_disk / 1e9, on_disk / len(index), len(index) * cfg.prepare.size ** 2 * 3 / max(on_disk, 1))
    return index


def cache_bytes(cache_dir: Path, uids) -> int:
    """Bytes on disk of the studies' cached slices (not their JSON or masks)."""
    return sum(study_bytes(Cache(cache_dir), uid) for uid in uids)

