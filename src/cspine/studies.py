"""Test studies read ahead in worker processes: DICOM folder → the CNN's uint8 images, while the GPU works.

`predict` spends about as long on a study's CPU side (decoding JPEG Lossless, windows, crop, resize) as
a GPU spends on its CNNs (benchmarks/README.md), so the CPU side runs here, a whole study per process,
several studies ahead. The module imports no torch, so a spawned worker starts in about a second.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cspine.crops import bone_u8
from cspine.dicom import default_workers, load_series
from cspine.preprocess import CHUNK, preprocess_study
from cspine.processes import die_with_parent


@dataclass
class ReadStudy:
    """One test study as the CNNs read it."""

    images: np.ndarray  # uint8 [N, size, size, 3], head to feet
    dz: float = 1.0  # the slice spacing in mm (the segmentation reads the scan at fixed mm a row)
    warnings: list[str] = field(default_factory=list)  # what loading warned about (skipped files, tilt)
    bone: np.ndarray | None = (
        None  # uint8 [N, H, W], full resolution, the bone window: the crop track cuts it
    )
    boxes: list | None = None  # the crop box of each slice (`preprocess_study`): maps the cache's frame to it


BONE_HU = 300.0  # cortical and cancellous bone lie above; soft tissue, fluid, a CT table's carbon below
# a neck CT's bone is 1-3% of its voxels (the phantoms' too); a scan with less holds no spine to read
MIN_BONE_FRACTION = 1e-3


class NoSpineError(ValueError):
    """A scan with (almost) no bone: whatever the models answer on it, it is not an answer about a spine."""


def check_bone(hu: np.ndarray) -> None:
    """Raises NoSpineError when fewer than `MIN_BONE_FRACTION` of a study's voxels reach `BONE_HU`.

    A scan of air, or of soft tissue alone, otherwise got confident answers (patient_overall 0.9999 on
    pure air): it must get the prior and count as failed (`predict.max_failed`), said by name.
    """
    bone = sum(int(np.count_nonzero(hu[k : k + CHUNK] >= BONE_HU)) for k in range(0, len(hu), CHUNK))
    if bone < MIN_BONE_FRACTION * hu.size:
        raise NoSpineError(
            f"no spine to read: {bone:,} of its {hu.size:,} voxels reach {BONE_HU:.0f} HU (bone; a neck CT "
            f"has 1-3%, at least {MIN_BONE_FRACTION:.1%} is asked)"
        )


def read_study(
    path: str | os.PathLike, size: int, crop: str, margin: float, min_slices: int, bone: bool = False
) -> ReadStudy:
    """Decodes one study in this process (one core: the pool runs several studies at once) and preprocesses it;
    with ``bone``, keeps its full-resolution bone window and crop boxes for the crop track.

    Raises:
        DicomError: the folder holds no readable slice.
        ValueError: fewer than ``min_slices`` readable slices.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        series = load_series(path, workers=1, on_error="skip")
    if len(series) < min_slices:
        raise ValueError(f"only {len(series)} readable slice(s)")
    check_bone(series.hu)
    images, boxes = preprocess_study(series.hu, size, crop, margin)
    return ReadStudy(
        images,
        float(series.spacing[0]),
        [str(w.message) for w in caught],
        bone_u8(series.hu) if bone else None,
        boxes if bone else None,
    )


def _one_thread(parent: int) -> None:
    """A reading process uses one core: the pool, not OpenCV's threads, spreads the work over the cores; and
    it ends with `predict`, however that ends."""
    import cv2

    die_with_parent(parent)
    cv2.setNumThreads(1)


class WorkerDied(RuntimeError):
    """A reading process died on a study (killed by the OOM killer, or a decoder crashed)."""


class StudyReader:
    """Worker processes that read whole studies ahead of the models, in order; a dead one costs one study.

        with StudyReader(workers, size, crop, margin, min_slices) as reader:
            for path, study in zip(paths, reader.read(paths, ahead=4)):
                ...  # study: a ReadStudy, or the exception reading it raised

    ``workers`` processes (0: every core) each read a whole study with one thread. Spawned, not forked: the
    parent holds CUDA and threads, which a forked child must not inherit; a spawned process imports
    cspine's reading modules (no torch) once, in about a second, and the pool lives for a whole `predict`.

    When a process dies, every study waiting in the pool is lost with it. The pool is then rebuilt, the
    study at the head is read again alone (a death that repeats is that study's: it yields `WorkerDied`),
    and the others are read anew; reading goes on.
    """

    def __init__(
        self,
        workers: int,
        size: int,
        crop: str,
        margin: float,
        min_slices: int,
        reader=read_study,
        bone: bool = False,
    ):
        self.workers = workers or default_workers()
        self.args = (size, crop, margin, min_slices, bone)
        self.reader = reader  # a module-level function of (path, *args), importable by a spawned process
        self.pool = self._pool(self.workers)

    def _pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            workers, mp_context=mp.get_context("spawn"), initializer=_one_thread, initargs=(os.getpid(),)
        )

    def __enter__(self) -> StudyReader:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(cancel_futures=True)

    def _submit(self, path: Path) -> Future:
        try:
            return self.pool.submit(self.reader, path, *self.args)
        except BrokenProcessPool as exc:  # the pool died since the last study: handled where it is read
            future: Future = Future()
            future.set_exception(exc)
            return future

    def _alone(self, path: Path) -> ReadStudy | Exception:
        """One study read in a process of its own: its result, its exception, or `WorkerDied`."""
        with self._pool(1) as solo:
            try:
                return solo.submit(self.reader, path, *self.args).result()
            except BrokenProcessPool:
                return WorkerDied(
                    f"{path}: the reading process died on this study (killed, or its decoder crashed)"
                )
            except Exception as exc:
                return exc

    def read(self, paths: list[Path], ahead: int) -> Iterator[ReadStudy | Exception]:
        """Yields, in order, each study's `ReadStudy` or the exception reading it raised; never raises.

        At most ``ahead`` studies are being read or waiting, so memory holds a bounded number: each is
        3·size²·slices bytes (155 MB for 352 slices at 384 px).
        """
        todo = iter(paths)
        queue: deque[tuple[Path, Future]] = deque()
        while True:
            while len(queue) < ahead and (path := next(todo, None)) is not None:
                queue.append((path, self._submit(path)))
            if not queue:
                return
            path, future = queue.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                waiting = [p for p, _ in queue]
                self.pool.shutdown(cancel_futures=True)
                self.pool = self._pool(self.workers)
                result = self._alone(path)
                queue = deque((p, self._submit(p)) for p in waiting)
            except Exception as exc:
                result = exc
            yield result
