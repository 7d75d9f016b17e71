"""Series loading speed: `load_series(backend="auto")` against a plain pydicom loop and the codec's limit.

A study shaped like the real ones (`real_shaped.py`: 512², real CT noise) is written uncompressed, RLE
Lossless, JPEG Lossless SV1 (the real data's compressed syntax) and JPEG 2000 Lossless. Each is loaded by
the plain loop (dcmread, pixel_array, rescale, sort by z) and by cspine; the arrays are compared. The
codec's limit is dicomsdl's decoder alone (open + pixelData, nothing else) on one core, and on every core
as independent processes, one share of the files each: no loader can beat that. Best of --repeats runs.

    python benchmarks/bench_dicom.py [--slices 350] [--repeats 3] [--syntaxes explicit,rle,jpeg_lossless,j2k]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import dicomsdl
import numpy as np
import pydicom

from cspine.dicom import default_workers, load_series
from real_shaped import write_real_shaped_study


def plain_pydicom(study_dir: Path) -> np.ndarray:
    """What most public notebooks do: read every file, rescale, sort by z (head first)."""
    slices = []
    for path in study_dir.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((float(ds.ImagePositionPatient[2]), hu))
    slices.sort(key=lambda item: -item[0])
    return np.stack([hu for _, hu in slices])


def codec_only(paths: list[str]) -> int:
    """dicomsdl's decoder and nothing else: the fastest any loader could go on one core."""
    for path in paths:
        dicomsdl.open(path).pixelData(storedvalue=True)
    return len(paths)


def codec_all_cores(paths: list[str], pool: ProcessPoolExecutor, cores: int) -> int:
    return sum(pool.map(codec_only, [paths[k::cores] for k in range(cores)]))


def volume(folder: Path, **kwargs) -> np.ndarray:
    """The study's HU volume through `load_series`."""
    return load_series(folder, **kwargs).hu


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=350)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--syntaxes", default="explicit,rle,jpeg_lossless,j2k")
    args = parser.parse_args()

    cores = default_workers()
    print(
        f"machine: {platform.processor() or platform.machine()}, {cores} cores; {args.slices} slices of 512², "
        "real CT noise\n"
    )
    print(
        f"| syntax | KB a file | plain pydicom loop | codec alone, 1 core | codec alone, {cores} cores | "
        f"auto, workers=1 | auto, default ({cores}) | auto / plain | auto / codec limit | identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with (
        tempfile.TemporaryDirectory() as tmp,
        ProcessPoolExecutor(cores, mp_context=mp.get_context("fork")) as pool,
    ):
        for syntax in args.syntaxes.split(","):
            folder = write_real_shaped_study(Path(tmp) / syntax, args.slices, syntax)
            paths = sorted(str(p) for p in folder.glob("*.dcm"))
            kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
            codec_all_cores(paths[:cores], pool, cores)  # the pool's processes started
            t_codec, _ = timed(partial(codec_only, paths), args.repeats)
            t_limit, _ = timed(partial(codec_all_cores, paths, pool, cores), args.repeats)
            t_plain, plain = timed(partial(plain_pydicom, folder), args.repeats)
            t_one, one = timed(partial(volume, folder, workers=1), args.repeats)
            t_auto, auto = timed(partial(volume, folder), args.repeats)
            same = np.array_equal(plain, auto) and np.array_equal(one, auto)
            rate = lambda t: f"{args.slices / t:,.0f}"  # noqa: E731
            print(
                f"| {syntax} | {kb:.0f} | {rate(t_plain)} | {rate(t_codec)} | {rate(t_limit)} | {rate(t_one)} | "
                f"{rate(t_auto)} | {t_plain / t_auto:.1f}× | {t_limit / t_auto:.0%} | {'yes' if same else 'NO'} |"
            )


if __name__ == "__main__":
    main()
