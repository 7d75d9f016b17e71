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
study that fails is logged and listed. The format itself (writing, reading and checking an entry) is
`cspine.cache`, which every later stage reads through.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cspine import TARGETS
from cspine.cache import (
    FORMATS,
    MIN_SLICES,
    build_index,
    cache_bytes,
    is_cached,
    mask_record,
    stale_reason,
    study_bytes,
    write_study_images,
)
from cspine.competition import (
    find_mask,
    read_boxes,
    read_mask,
    read_train,
    select_studies,
)
from cspine.config import Config, ConfigError, PrepareConfig, check_unchanged, load_config, save_config
from cspine.dicom import load_series
from cspine.labels import slice_labels, slice_targets, vertebra_presence
from cspine.preprocess import boxes_in_cache_frame, labels_in_cache_frame, preprocess_study
from cspine.processes import die_with_parent
from cspine.progress import progress
from cspine.runs import Cache, atomic_path, write_text

log = logging.getLogger(__name__)


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
        log.warning(
            "prepare: segmentation %s cannot be read (%s: %s); the study is kept without it",
            mask_path,
            type(exc).__name__,
            exc,
        )
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
        box_df = pd.DataFrame(
            job.boxes, columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
        )
        slice_label = slice_labels(series.slice_numbers, box_df, job.uid)
        mask = _mask(job.mask_path, series) if job.mask_path else None
        presence = vertebra_presence(mask) if mask is not None else None
        label, fracture = slice_targets(job.labels, slice_label, presence, bool(job.boxes))
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


def bind_cache(cfg: Config, cache: Cache) -> None:
    """Records the settings of a new cache once; refuses other preprocessing for a cache that holds studies.

    Raises:
        ConfigError: naming each ``prepare`` setting that differs from the one the cache was made with.
    """
    if cache.config.is_file() and any(cache.root.glob("*.json")):
        check_unchanged(
            load_config(cache.config), cfg, str(cache.root), lambda key: key.startswith("prepare.")
        )
        return
    save_config(cfg, cache.config)


def _jobs(
    cfg: Config, data_dir: Path, out_dir: Path, train: pd.DataFrame, boxes: pd.DataFrame
) -> tuple[list[StudyJob], list[str]]:
    """What to cache of ``train``'s studies (``boxes``: the competition's boxes): every study not cached, or
    cached from other inputs (its stale cache entry is removed first); and the latter's UIDs."""
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
        jobs.append(
            StudyJob(
                uid=uid,
                image_dir=data_dir / "train_images" / uid,
                out_dir=out_dir,
                labels={k: int(row[k]) for k in TARGETS},
                boxes=boxes[boxes["StudyInstanceUID"] == uid].to_dict("records"),
                mask_path=mask_path,
                prepare=cfg.prepare,
            )
        )
    return jobs, again


def cache_studies(jobs: list[StudyJob], workers: int) -> list[str]:
    """Caches the studies of ``jobs`` in ``workers`` processes (one: in this process, easier to debug);
    returns "uid\terror" of each that failed."""
    failures = []
    if not jobs:
        return failures
    bar = progress(total=len(jobs), desc="prepare", unit="study")
    workers = max(1, min(workers, len(jobs)))
    pool = (
        ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),))
        if workers > 1
        else None
    )
    try:
        for uid, n, error in (pool.map if pool else map)(cache_study, jobs):
            bar.update()
            bar.set_postfix(slices=n, refresh=False)
            if error:
                log.error("prepare: study %s failed: %s", uid, error)
                failures.append(f"{uid}\t{error}")
    finally:
        if pool:
            pool.shutdown()
        bar.close()
    return failures


def prepare(
    cfg: Config, data_dir: str | os.PathLike, out_dir: str | os.PathLike, studies: list[str] | None = None
) -> pd.DataFrame:
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
    jobs, again = _jobs(cfg, data_dir, out_dir, train, boxes)
    if len(again) > 3:
        log.warning("prepare: %d studies in all are cached again, for reasons like those above", len(again))
    uids = train["StudyInstanceUID"].tolist()
    log.info("prepare: %d studies, %d cached already, %d to do", len(uids), len(uids) - len(jobs), len(jobs))
    failures = cache_studies(jobs, cfg.prepare.workers)
    failed_path = write_text(Cache(out_dir).failed, "\n".join(failures) + ("\n" if failures else ""))
    index = build_index(out_dir, uids)
    if failures:
        log.warning("prepare: %d studies failed (listed in %s)", len(failures), failed_path)
    if index.empty:
        raise RuntimeError(f"prepare: no study could be cached; see {failed_path}")
    on_disk = cache_bytes(out_dir, index["StudyInstanceUID"].unique())
    log.info(
        "prepare: %d slices of %d studies cached in %s (%s): %.1f GB, %d bytes per slice (%.1fx smaller "
        "than raw)",
        len(index),
        index["StudyInstanceUID"].nunique(),
        out_dir,
        cfg.prepare.format,
        on_disk / 1e9,
        on_disk / len(index),
        len(index) * cfg.prepare.size**2 * 3 / max(on_disk, 1),
    )
    return index
