"""The slice cache's format: what `prepare` writes and every later stage reads.

Per study, ``<uid>.npy`` (or, with ``prepare.format: zarr``, the compressed store ``<uid>.zarr``) holds
uint8 [N, size, size, 3] head to feet, and ``<uid>.json`` its slice numbers, positions, labels, crop, boxes,
spacing, the bytes its images took and the segmentation it was made with; ``index.csv`` has one row per
slice. This module writes and reads those files and tells a whole entry from a damaged or stale one; the
`prepare` stage decides what to cache. Every stage, and inference, reads the cache through it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from cspine import VERTEBRAE
from cspine.config import PrepareConfig
from cspine.labels import UNKNOWN
from cspine.runs import Cache, atomic_path, write_csv

MIN_SLICES = (
    2  # fewer readable slices make no crop and no sequence: prepare skips the study, predict gives the prior
)


FORMATS = ("npy", "zarr")


ZARR_RATIO = (
    2.45  # zarr against .npy on real CT slices at 256 px, the least of those measured (benchmarks/README.md)
)


ZARR_CLEVEL = 3  # zstd level: 5 saves 2-5% more and encodes 2-3x slower (benchmarks/bench_cache.py)


INDEX_COLUMNS = [
    "StudyInstanceUID",
    "order",
    "slice_number",
    "z",
    "label",
    *[f"{v}_present" for v in VERTEBRAE],
    *[f"{v}_fracture" for v in VERTEBRAE],
]


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
        return (
            f"its images take {stored:,} bytes on disk and took {meta.get('stored_bytes')} when written "
            "(damaged, or cached by an older cspine)"
        )
    if meta.get("mask") != mask_record(mask_path):
        now = mask_path.name if mask_path else "none"
        return (
            f"its segmentation is {now} now and was {(meta.get('mask') or ['none'])[0]} when cached (a "
            "segment stage already run keeps what it learnt without it: delete its folder to retrain)"
        )
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
        store = zarr.create_array(
            str(tmp),
            shape=images.shape,
            dtype=np.uint8,
            chunks=(1, *images.shape[1:]),
            shards=images.shape,
            compressors=BloscCodec(cname="zstd", clevel=ZARR_CLEVEL, shuffle="noshuffle"),
        )
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
        return CacheError(
            f"{self.path}: the cached study cannot be read ({type(exc).__name__}: {first[:200]}); "
            f"delete it and {self.path.with_suffix('.json').name} beside it, and run prepare again"
        )

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        try:
            if isinstance(key, (list, np.ndarray)) and np.ndim(key) == 1:
                return self._take(np.asarray(key, dtype=int))
            return self._array[key]
        except Exception as exc:
            raise self._damaged(exc) from None

    def _take(self, orders: np.ndarray) -> np.ndarray:
        """Slices by number. zarr's own integer-array indexing is slow (1.6 s for 32 slices of a 256 px
        study, against 0.02 s for the range that holds them), so nearby slices (a batch, a slice with its
        neighbours) are read as their range and picked in memory, scattered ones one by one."""
        if not len(orders):
            return np.empty((0, *self.shape[1:]), self.dtype)
        orders = np.where(orders < 0, orders + self.shape[0], orders)
        lo, hi = int(orders.min()), int(orders.max()) + 1
        if hi - lo <= 4 * len(orders):
            return self._array[lo:hi][orders - lo]
        return np.stack([self._array[int(k)] for k in orders])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def _index_rows(meta: dict) -> pd.DataFrame:
    n = meta["n"]
    present = np.array(meta["present"]) if meta["present"] is not None else np.full((n, 7), UNKNOWN)
    fracture = np.array(meta["fracture"])
    df = pd.DataFrame(
        {
            "StudyInstanceUID": meta["uid"],
            "order": np.arange(n),
            "slice_number": meta["slice_numbers"],
            "z": meta["z"],
            "label": meta["label"],
        }
    )
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
    try:
        return np.load(cache.images(uid), mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:  # numpy's own messages name no file
        raise CacheError(
            f"{cache.images(uid)}: the cached study cannot be read ({type(exc).__name__}: {exc}); delete it "
            f"and {cache.meta(uid).name} beside it, and run prepare again"
        ) from None


def build_index(cache_dir: Path, uids: list[str]) -> pd.DataFrame:
    """One row per cached slice, in study then head-to-feet order; written to index.csv."""
    frames = [_index_rows(read_meta(cache_dir, uid)) for uid in uids if is_cached(cache_dir, uid)]
    index = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=INDEX_COLUMNS)
    write_csv(index, Cache(cache_dir).index)
    return index


def cache_bytes(cache_dir: Path, uids) -> int:
    """Bytes on disk of the studies' cached slices (not their JSON or masks)."""
    return sum(study_bytes(Cache(cache_dir), uid) for uid in uids)
