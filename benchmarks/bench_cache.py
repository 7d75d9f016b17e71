"""The slice cache's formats: bytes per slice on real CT, and the cost of reading a compressed slice.

1. The three real 512² CT slices of the test fixtures (tests/fixtures) (a GE chest slice, two NEMA CT slices), each
   preprocessed as `prepare` does (three windows, Otsu crop, resize), written as `.npy` and as zarr
   (`prepare.format: zarr`: zstd through Blosc, one chunk a slice), at 384 (the paper) and 256 (`rsna`).
   Bytes per slice, and encode time, against plain `.npy`.
2. Reading: a 300-slice study built from those slices, read one random slice at a time as
   `SliceDataset` reads it, from a warm page cache: the memory-mapped `.npy` is the baseline.

    python benchmarks/bench_cache.py [--reads 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cspine.cache import cache_bytes, load_study_images, write_study_images
from cspine.dicom import read_hu
from cspine.preprocess import preprocess_slice
from cspine.runs import Cache

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ct-transfer-syntaxes"
SLICES = ["CTImage.dcm", "CT1_J2KR", "CT2_J2KR"]


def sizes(hu: list[np.ndarray], size: int, root: Path) -> None:
    images = np.stack([preprocess_slice(h, size) for h in hu])
    raw = images[0].nbytes
    print(f"\n{size}x{size}x3 ({raw:,} bytes raw a slice)")
    print("| slice | npy bytes | zarr bytes | npy / zarr |")
    print("|---|---|---|---|")
    ratios, totals = [], np.zeros(2)
    for name, image in zip(SLICES, images):
        cache = Cache(root / f"{size}-{name}")
        write_study_images(cache, "s", image[None], "zarr")
        zarr_bytes = cache_bytes(cache.root, ["s"])
        write_study_images(cache, "n", image[None], "npy")
        npy_bytes = cache_bytes(cache.root, ["n"])
        ratios.append(npy_bytes / zarr_bytes)
        totals += (npy_bytes, zarr_bytes)
        print(f"| {name} | {npy_bytes:,} | {zarr_bytes:,} | {ratios[-1]:.2f}x |")
    print(
        f"all three: {totals[0] / totals[1]:.2f}x smaller, {totals[1] / len(images):,.0f} bytes a slice in zarr "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}x)"
    )
    study = np.concatenate([np.roll(images, k, axis=1) for k in range(100)])  # 300 distinct slices
    cache = Cache(root / f"{size}-study")
    timings = {}
    for fmt in ("npy", "zarr"):
        started = time.perf_counter()
        write_study_images(cache, fmt, study, fmt)
        timings[fmt] = (time.perf_counter() - started) / len(study) * 1e3
    print(
        f"write a 300-slice study: npy {timings['npy']:.2f} ms a slice, zarr {timings['zarr']:.2f} ms a slice "
        f"({timings['zarr'] / timings['npy']:.1f}x)"
    )


def reads(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    cache = Cache(root / "384-study")
    order = rng.integers(0, 300, n)
    timings = {}
    for fmt in ("npy", "zarr"):
        study = load_study_images(cache.root, fmt)
        np.asarray(study[order[:50]])  # warm
        started = time.perf_counter()
        for k in order:
            np.asarray(study[int(k)])
        timings[fmt] = (time.perf_counter() - started) / n * 1e3
    print(
        f"\nrandom slice read at 384 (warm page cache): npy memory map {timings['npy']:.3f} ms, zarr "
        f"{timings['zarr']:.2f} ms ({timings['zarr'] / timings['npy']:.0f}x)"
    )
    study = load_study_images(cache.root, "zarr")
    started = time.perf_counter()
    np.asarray(study)
    print(
        f"whole 300-slice study from zarr: {(time.perf_counter() - started) * 1e3:.0f} ms "
        f"({(time.perf_counter() - started) / 300 * 1e3:.2f} ms a slice)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=1000)
    args = parser.parse_args()
    hu = [read_hu(FIXTURES / name) for name in SLICES]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in (384, 256):
            sizes(hu, size, root)
        reads(root, args.reads)


if __name__ == "__main__":
    main()
