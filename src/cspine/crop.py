"""Stage `crop`: every training study's crops of C1..C7, cut from its DICOM where the segmentation put them.

    python -m cspine crop --config bench

The cache holds each study at the slice CNN's size (64 px in the demo): a C1 ring there spans a few pixels.
This stage reads each study's DICOM again and cuts each vertebra at ``crop.size`` px from the full-resolution
volume (`cspine.crops`), where the `segment` stage's labels place it. It writes ``<run>/crop/``:
- ``studies/<uid>.npz``: C1..C7's crops, each distinct plane once, compressed (`cspine.crops.write_crop_store`;
  `cspine.crops.read_crop_store` gives uint8 [7, slices, channels, size, size] back);
- ``places.csv``: per study and vertebra, the slices and box it was cut from, whether the segmentation
  found it (``found=0``: placed between its neighbours), and the study file's bytes (a file deleted or
  truncated since is cut again);
- ``record.json``: the cut's settings and the segmentation's digest, written last; when either changes the
  crops are cut again. A killed stage resumes: a study's file is written whole or not at all.

Crops, not coordinates, are stored: training reads every crop once an epoch, and cutting them again from
DICOM each time would cost a decode of the whole study per epoch. At the `rsna` recipe's size the model
reads 7 × 15 × 6 × 256² bytes = 41 MB a study; stored without the neighbour planes that picks share and
compressed, a study takes what docs/gpu.md's rehearsal table gives (measured at the real shape).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cspine.cache import read_meta
from cspine.competition import DataError
from cspine.config import Config
from cspine.crops import (
    PLACE_COLUMNS,
    CropSpec,
    bone_u8,
    crop_spec,
    cut_study_planes,
    place_vertebrae,
    write_crop_store,
)
from cspine.dicom import default_workers, load_series
from cspine.processes import die_with_parent
from cspine.progress import progress
from cspine.runs import Run, digest, read_json, write_csv, write_json
from cspine.segmenter import load_labels, vertebra_extents

log = logging.getLogger(__name__)
# the crop store's format (`cspine.crops.write_crop_store`): a store of another is cut anew
STORE = "npz-distinct-patches"


@dataclass(frozen=True)
class CropJob:
    """What one worker needs to cut one study's crops."""

    uid: str
    image_dir: Path
    run: Path
    spec: CropSpec
    min_pixels: int


def cut_one(job: CropJob) -> tuple[str, list[dict] | None, str | None]:
    """Cuts and writes one study's crops; returns (uid, its places, error or None)."""
    run = Run(job.run)
    try:
        meta = read_meta(run.cache.root, job.uid)
        labels = load_labels(run.seg_labels(job.uid))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # prepare has reported this study's warnings already
            series = load_series(job.image_dir, workers=1, on_error="skip")
        if len(series) != meta["n"] or len(labels) != meta["n"]:
            raise ValueError(
                f"{len(series)} readable slices now, {meta['n']} cached, {len(labels)} segmented"
            )
        _, found = vertebra_extents(labels, job.min_pixels)
        places = place_vertebrae(found, len(labels), labels.shape[1])
        bone = bone_u8(series.hu)
        del series  # the float32 volume (367 MB at 512² × 350) is not held while cutting
        parts = cut_study_planes(bone, labels, places, meta["crop"], labels.shape[1], job.spec)
        write_crop_store(run.crop_study(job.uid), parts)
        return job.uid, places, None
    except Exception as exc:  # one bad study must not stop the stage: it is reported, and gets the prior
        return job.uid, None, f"{type(exc).__name__}: {exc}"


def _record(run: Run, cfg: Config) -> dict:
    return {
        "store": STORE,
        "spec": dataclasses.asdict(
            crop_spec(cfg.crop.size, cfg.crop.slices, cfg.crop.context, cfg.crop.margin)
        ),
        "segmentation": digest(run.seg_file("extents.csv")),
        "min_pixels": cfg.seg.min_pixels,
    }


def stored_whole(run: Run, places: pd.DataFrame) -> set[str]:
    """The studies of ``places`` whose crop file is there at the size it was written (a deleted or truncated
    file is cut again, not trained without or read as garbage)."""
    recorded = places.groupby("StudyInstanceUID")["bytes"].first() if "bytes" in places else {}
    return {
        uid
        for uid, size in dict(recorded).items()
        if run.crop_study(uid).is_file() and run.crop_study(uid).stat().st_size == size
    }


def is_cropped(cfg: Config, run_dir: str | os.PathLike) -> bool:
    """Whether the crops exist whole, cut with the current settings from the current segmentation."""
    run = Run(run_dir)
    if not (run.crop_record.is_file() and read_json(run.crop_record) == _record(run, cfg)):
        return False
    places = pd.read_csv(run.crop_places, dtype={"StudyInstanceUID": str})
    return stored_whole(run, places) == set(places["StudyInstanceUID"])


def crop(cfg: Config, run_dir: str | os.PathLike, data_dir: str | os.PathLike) -> pd.DataFrame:
    """The stage: cuts every cached training study's crops; returns the places table.

    Raises:
        DataError: when no study could be cut.
    """
    run, data_dir = Run(run_dir), Path(data_dir)
    record = _record(run, cfg)
    if run.crop_record.is_file() and read_json(run.crop_record) != record:
        log.info("crop: settings or segmentation changed since the crops were cut; cutting them again")
        for stale in run.crop_studies.glob("*"):
            stale.unlink()
    run.crop_record.unlink(missing_ok=True)
    uids = run.cache.read_index()["StudyInstanceUID"].unique().tolist()
    places = (
        pd.read_csv(run.crop_places, dtype={"StudyInstanceUID": str})
        if run.crop_places.is_file()
        else pd.DataFrame(columns=["StudyInstanceUID", *PLACE_COLUMNS, "bytes"])
    )
    done = stored_whole(run, places) & set(uids)
    places = places[places["StudyInstanceUID"].isin(done)]
    jobs = [
        CropJob(u, data_dir / "train_images" / u, run.root, CropSpec(**record["spec"]), cfg.seg.min_pixels)
        for u in uids
        if u not in done
    ]
    log.info(
        "crop: %d studies, %d cut already, %d to cut at %d px", len(uids), len(done), len(jobs), cfg.crop.size
    )
    rows, failures = [places], []
    if jobs:
        workers = max(1, min(cfg.crop.workers or default_workers(), len(jobs)))
        pool = (
            ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),))
            if workers > 1
            else None
        )
        try:
            for uid, found, error in progress(
                (pool.map if pool else map)(cut_one, jobs), "crop", total=len(jobs), unit="study"
            ):
                if error:
                    log.error("crop: study %s failed: %s", uid, error)
                    failures.append(uid)
                    continue
                size = run.crop_study(uid).stat().st_size
                rows.append(pd.DataFrame([{"StudyInstanceUID": uid, **p, "bytes": size} for p in found]))
                if len(rows) % 50 == 0:  # progress survives a kill
                    write_csv(pd.concat(rows, ignore_index=True), run.crop_places)
        finally:
            if pool:
                pool.shutdown()
    table = pd.concat(rows, ignore_index=True)
    if table.empty:
        raise DataError(
            f"crop: none of the {len(uids)} studies could be cut (their errors are logged above); no crops, "
            "so the crop track cannot train: mend the studies, or crop.enabled=false"
        )
    table["found"] = table["found"].astype(bool)
    write_csv(table, run.crop_places)
    write_json(record, run.crop_record)  # last: the stage is done
    missed = int((~table["found"]).sum())
    log.info(
        "crop: %d studies cut (%d failed); %d of %d vertebrae placed between their neighbours (the "
        "segmentation missed them)",
        table["StudyInstanceUID"].nunique(),
        len(failures),
        missed,
        len(table),
    )
    return table
