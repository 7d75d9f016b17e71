"""What a piece of work costs: seconds, the peak memory of the whole process tree, the peak GPU memory, and
the bytes a folder holds. Used by the rehearsal (`cspine.rehearse`); no stage imports it.

    with Measured() as m:
        prepare(...)
    m.seconds, m.peak_bytes, m.gpu_peak_bytes
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil
import torch


def tree_memory(process: psutil.Process, children_only: bool = False) -> int:
    """Bytes of memory a process and all its descendants hold (or its descendants alone): the proportional
    set size (a page shared by n processes counts 1/n in each, so forked workers are not counted twice),
    or the resident set where the kernel gives no PSS."""
    total = 0
    for p in (*(() if children_only else (process,)), *process.children(recursive=True)):
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a worker that ended between the listing and the reading
    return total


class Measured:
    """A context that samples this process tree's memory every ``interval`` seconds in a thread, and reads
    the peak GPU memory allocated by this process (CUDA only; the workers' is not seen). With
    ``children_only``, only the processes this one starts count (work run in a fresh process: a notebook)."""

    def __init__(self, interval: float = 0.2, children_only: bool = False):
        self.interval = interval
        self.children_only = children_only
        self.seconds = 0.0
        self.peak_bytes = 0
        self.gpu_peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process(os.getpid())
        while True:
            self.peak_bytes = max(self.peak_bytes, tree_memory(me, self.children_only))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Measured:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._started
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, tree_memory(psutil.Process(os.getpid()), self.children_only))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.gpu_peak_bytes = int(torch.cuda.max_memory_allocated())


def folder_bytes(path: str | os.PathLike, pattern: str = "*") -> int:
    """Bytes of every file under ``path`` whose name matches ``pattern`` (0 for a missing folder)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file()) if path.is_dir() else 0
