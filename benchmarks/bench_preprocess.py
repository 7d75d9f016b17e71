"""Preprocessing speed: cspine against a plain reference, and `prepare` end to end.

1. 512×512 HU slices → 384×384×3 uint8 with `preprocess_slice` (OpenCV Otsu, uint8 windows, cv2 resize)
   against a plain reference in the same run (float windowing, `skimage.filters.threshold_otsu`,
   `skimage.measure.label` for the same spine selection, `skimage.transform.resize`); boxes compared,
   and pixels where the boxes agree.
2. `prepare` end to end (decode, preprocess, write) on a 512² synthetic set with 2 workers, slices/s.

    python benchmarks/bench_preprocess.py [--slices 200] [--studies 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops
from skimage.transform import resize

from cspine.config import load_config
from cspine.phantom import PhantomConfig, render_study
from cspine.preprocess import (
    ANTERIOR_PENALTY,
    BODY_GRID,
    BODY_HU,
    JOIN_GAP,
    MIN_BONE_FRACTION,
    MIN_BONE_HU,
    SEED_SPREAD,
    SPINE_BAND,
    WINDOWS,
    preprocess_slice,
)


def reference_box(hu: np.ndarray, margin: float = 0.05) -> tuple[int, int, int, int]:
    """The same spine selection written plainly with scikit-image, in float."""
    h, w = hu.shape
    step = max(1, max(h, w) // BODY_GRID)  # the body on the same strided grid
    body_labels = label(hu[::step, ::step] > BODY_HU, connectivity=1)
    regions = regionprops(body_labels)
    if not regions:
        return 0, h, 0, w
    body = max(regions, key=lambda r: r.area)
    by0, bx0, by1, bx1 = (v * step for v in body.bbox)
    bw, bh = bx1 - bx0, by1 - by0
    body_y, body_x = (c * step + (step - 1) / 2 for c in body.centroid)
    inside = np.kron(body_labels == body.label, np.ones((step, step), bool))[:h, :w]
    _, center, width = WINDOWS[2]
    gross = np.round(np.clip((hu - (center - width / 2)) / width, 0, 1) * 255)
    floor = int(np.clip((MIN_BONE_HU - (center - width / 2)) * 255 / width, 0, 255))
    bone = (gross > max(threshold_otsu(gross[inside]), floor)) & inside
    comps = [
        r
        for r in regionprops(label(bone, connectivity=2))
        if r.area >= max(3, int(MIN_BONE_FRACTION * hu.size))
    ]
    band = SPINE_BAND * bw
    cands = [r for r in comps if r.bbox[1] <= body_x + band and r.bbox[3] >= body_x - band]
    if not cands:
        return 0, h, 0, w
    spread = SEED_SPREAD * max(bw, bh)

    def weight(r):
        dy = r.centroid[0] - body_y
        return r.area * np.exp(
            -((r.centroid[1] - body_x) ** 2 + (dy if dy > 0 else ANTERIOR_PENALTY * dy) ** 2) / spread**2
        )

    seed = max(cands, key=weight)
    y0, x0, y1, x1 = seed.bbox
    chosen, grew, gap = {seed.label}, True, JOIN_GAP * bw
    while grew:
        grew = False
        for r in cands:
            cy0, cx0, cy1, cx1 = r.bbox
            if (
                r.label not in chosen
                and cx0 <= x1 + gap
                and cx1 >= x0 - gap
                and cy0 <= y1 + gap
                and cy1 >= y0 - gap
                and abs(r.centroid[1] - body_x) <= band
            ):
                chosen.add(r.label)
                y0, x0, y1, x1 = min(y0, cy0), min(x0, cx0), max(y1, cy1), max(x1, cx1)
                grew = True
    my, mx = margin * (y1 - y0), margin * (x1 - x0)
    return (
        max(0, int(np.floor(y0 - my))),
        min(h, int(np.ceil(y1 + my))),
        max(0, int(np.floor(x0 - mx))),
        min(w, int(np.ceil(x1 + mx))),
    )


def reference_slice(hu: np.ndarray, size: int = 384) -> tuple[np.ndarray, tuple]:
    box = reference_box(hu)
    y0, y1, x0, x1 = box
    crop = hu[y0:y1, x0:x1].astype(np.float64)
    channels = np.stack([np.clip((crop - (c - w / 2)) / w, 0, 1) for _, c, w in WINDOWS], axis=-1)
    side = max(channels.shape[:2])
    padded = np.zeros((side, side, 3))
    top, left = (side - channels.shape[0]) // 2, (side - channels.shape[1]) // 2
    padded[top : top + channels.shape[0], left : left + channels.shape[1]] = channels
    out = resize(padded, (size, size), order=1, anti_aliasing=side > size)
    return np.round(out * 255).astype(np.uint8), box


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--studies", type=int, default=4)
    args = parser.parse_args()
    import cv2

    cv2.setNumThreads(1)  # one core, as the target is stated
    study = render_study(np.random.default_rng(1), PhantomConfig(image_size=512, n_slices=args.slices))
    hu = study.hu

    from cspine.preprocess import otsu_crop_box

    start = time.perf_counter()
    fast = [preprocess_slice(s, 384) for s in hu]
    t_fast = time.perf_counter() - start
    fast_boxes = [otsu_crop_box(s) for s in hu]
    start = time.perf_counter()
    ref = [reference_slice(s, 384) for s in hu]
    t_ref = time.perf_counter() - start
    agree = [k for k in range(len(hu)) if fast_boxes[k] == ref[k][1]]
    diffs = [np.abs(fast[k].astype(int) - ref[k][0].astype(int)) for k in agree]
    within = np.mean([(d <= 1).mean() for d in diffs]) if diffs else float("nan")
    print(f"preprocess_slice, 512² HU → 384²×3 uint8, one core ({len(hu)} slices of a synthetic study)")
    print(f"  cspine:    {len(hu) / t_fast:7.1f} slices/s")
    print(f"  reference: {len(hu) / t_ref:7.1f} slices/s   (float windows, skimage Otsu/label/resize)")
    print(
        f"  speed-up:  {t_ref / t_fast:.1f}×; boxes identical on {len(agree)}/{len(hu)} slices; "
        f"pixels within 1 grey level where they agree: {within:.2%}; max diff {max(d.max() for d in diffs) if diffs else 0}"
    )

    from cspine.config import SynthConfig
    from cspine.prepare import prepare
    from cspine.synthetic import make_competition

    with tempfile.TemporaryDirectory() as tmp:
        root = make_competition(
            Path(tmp) / "data",
            SynthConfig(n_train=args.studies, n_test=0, seed=3, image_size=512, n_slices=args.slices // 2),
            workers=2,
        )
        cfg = load_config(None, ["prepare.workers=2"])
        start = time.perf_counter()
        index = prepare(cfg, root, Path(tmp) / "cache")
        elapsed = time.perf_counter() - start
        print(
            f"prepare end to end (decode + preprocess + write), 512² → 384², 2 workers: "
            f"{len(index) / elapsed:.1f} slices/s ({len(index)} slices, {elapsed:.1f} s)"
        )


if __name__ == "__main__":
    main()
