"""Series loading speed: `load_series(backend="auto")` against a plain pydicom loop, same process.

A 300-slice 512×512 synthetic CT series is written uncompressed, RLE Lossless and JPEG 2000 Lossless;
each is loaded by the plain loop (dcmread, pixel_array, rescale, sort by z) and by cspine, the arrays are
compared, and slices/s with the ratio are printed as a Markdown table. Best of --repeats runs each.

    python benchmarks/bench_dicom.py [--slices 300] [--size 512] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from cspine.dicom import load_series
from cspine.dicom_writer import Encoding, write_series
from cspine.phantom import PhantomConfig, render_study


def plain_pydicom(study_dir: Path) -> np.ndarray:
    """What most public notebooks do: read every file, rescale, sort by z (head first)."""
    slices = []
    for path in study_dir.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((float(ds.ImagePositionPatient[2]), hu))
    slices.sort(key=lambda item: -item[0])
    return np.stack([hu for _, hu in slices])


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    study = render_study(np.random.default_rng(0), PhantomConfig(image_size=args.size, n_slices=args.slices))
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores; "
          f"{args.slices} slices of {args.size}²\n")
    print("| syntax | plain pydicom loop (slices/s) | auto, workers=1 | auto, default workers | "
          "auto/plain | identical arrays |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for syntax in ("explicit", "rle", "j2k"):
            folder = Path(tmp) / syntax
            write_series(study.hu, folder, spacing=study.spacing, study_uid="1.2.826.0.1.3680043.99999",
                         encoding=Encoding(syntax, signed=True, intercept=-1024.0), numbering="feet_to_head")
            t_plain, plain = timed(lambda: plain_pydicom(folder), args.repeats)
            t_one, one = timed(lambda: load_series(folder, workers=1).hu, args.repeats)
            t_auto, auto = timed(lambda: load_series(folder).hu, args.repeats)
            same = np.array_equal(plain, auto) and np.array_equal(one, auto)
            rate = lambda t: f"{args.slices / t:,.0f}"  # noqa: E731
            print(f"| {syntax} | {rate(t_plain)} | {rate(t_one)} | {rate(t_auto)} | "
                  f"{t_plain / t_auto:.1f}× | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
