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
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from cspine.dicom import default_workers, load_series
from cspine.preprocess import preprocess_study


@dataclass
class ReadStudy:
    """One test study as the CNNs read it."""

    images: np.ndarray  # uint8 [N, size, size, 3], head to feet
    warnings: list[str] = field(default_factory=list)  # what loading warned about (skipped files, tilt)


def read_study(path: str | os.PathLike, size: int, crop: str, margin: float, min_slices: int) -> ReadStudy:
    """Decodes one study in this process (one core: the pool runs several studies at once) and preprocesses it.

    Raises:
        DicomError: the folder holds no readable slice.
        ValueError: fewer than ``min_slices`` readable slices.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        series = load_series(path, workers=1, on_error="skip")
    if len(series) < min_slices:
        raise ValueError(f"only {len(series)} readable slice(s)")
    images, _ = preprocess_study(series.hu, size, crop, margin)
    return ReadStudy(images, [str(w.message) for w in caught])


def _one_thread() -> None:
    """A reading process uses one core: the pool, not OpenCV's threads, spreads the work over the cores."""
    import cv2

    cv2.setNumThreads(1)


def reading_pool(workers: int = 0) -> ProcessPoolExecutor:
    """``workers`` processes (0: every core) that each read whole studies, one thread each.

    Spawned, not forked: the parent holds CUDA and threads, which a forked child must not inherit. A spawned
    process imports cspine's reading modules (no torch) once, in about a second; the pool lives for a
    whole `predict`.
    """
    return ProcessPoolExecutor(workers or default_workers(), mp_context=mp.get_context("spawn"),
                               initializer=_one_thread)


def read_ahead(pool: ProcessPoolExecutor, paths: list[Path], size: int, crop: str, margin: float,
               min_slices: int, ahead: int) -> Iterator[Future]:
    """Yields, in order, one future per study whose result is `read_study`'s (or its exception).

    At most ``ahead`` studies are being read or waiting, so memory holds a bounded number: each is
    3·size²·slices bytes (155 MB for 352 slices at 384 px).
    """
    queue: deque[Future] = deque()
    todo = iter(paths)
    for path in todo:
        queue.append(pool.submit(read_study, path, size, crop, margin, min_slices))
        if len(queue) >= ahead:
            break
    while queue:
        done = queue.popleft()
        following = next(todo, None)
        if following is not None:
            queue.append(pool.submit(read_study, following, size, crop, margin, min_slices))
        yield done
