"""The paper's preprocessing: three CT windows as channels, an Otsu crop around the spine, 384×384.

Salehinejad et al., §2.1: soft tissue (w300/c80), standard bone (w1800/c500) and gross bone (w650/c400)
windows are stacked as channels; the gross bone window is thresholded by Otsu's method to find the spine,
which is cropped with a 5% margin on each side, zero-padded to a square and resized.

    from cspine.preprocess import preprocess_study
    images, boxes = preprocess_study(series.hu, size=384)   # uint8 [N, 384, 384, 3]
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

# (name, center, width) in HU, the paper's Fig. 2; channel order of every preprocessed image.
WINDOWS: tuple[tuple[str, float, float], ...] = (
    ("soft_tissue", 80.0, 300.0),
    ("standard_bone", 500.0, 1800.0),
    ("gross_bone", 400.0, 650.0),
)
GROSS_BONE = WINDOWS[2]
BODY_HU = -500.0  # above this is patient (or table); below is air and field-of-view padding
SPINE_BAND = 0.22  # bone within this fraction of the body's width from its centre line can be spine
JOIN_GAP = 0.08  # bone this close (fraction of body width) to the spine box joins it
MIN_BONE_FRACTION = 2e-4  # smaller bone components are noise
MIN_BONE_HU = (
    150.0  # Otsu's threshold is not allowed below this: a slice without bone must not threshold noise
)
ANTERIOR_PENALTY = 2.0  # distance in front of the body's centre weighs this much more when seeding
SEED_SPREAD = 0.3  # the spine seed is the bone component with most area near the body's centre (× body size)

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open, in pixels


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear CT window: HU → [0, 1].

    Args:
        hu: HU values, any shape.
        center, width: the window in HU; center − width/2 maps to 0, center + width/2 to 1.

    Returns:
        float32, same shape, clipped to [0, 1].
    """
    lo = center - width / 2.0
    out = (np.asarray(hu, np.float32) - np.float32(lo)) * np.float32(1.0 / width)
    return np.clip(out, 0.0, 1.0, out=out)


def _window_u8(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """The same window as uint8 0..255 (rounded), computed without a float copy of the input."""
    scale = np.float32(255.0 / width)
    out = (hu - np.float32(center - width / 2.0)) * scale
    np.clip(out, 0, 255, out=out)
    return np.rint(out, out=out).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values (OpenCV's implementation)."""
    threshold, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return int(threshold)


BODY_GRID = (
    128  # the body is found on a grid this coarse (a strided view): it is large, and labelling is the cost
)


def _body(hu: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int], tuple[float, float]] | None:
    """The patient's largest connected region above BODY_HU (drops the table and padding).

    Labelled on a strided grid of about BODY_GRID² (a 512² slice: every 4th pixel), then scaled back.
    Returns the full-size region, its (x, y, w, h) box and its centroid (x, y), or None for a blank slice.
    """
    step = max(1, max(hu.shape) // BODY_GRID)
    fg = (hu[::step, ::step] > BODY_HU).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(fg, connectivity=4)
    if n <= 1:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) * step for v in stats[largest, :4])
    small = (labels == largest).astype(np.uint8)
    inside = cv2.resize(
        small, (small.shape[1] * step, small.shape[0] * step), interpolation=cv2.INTER_NEAREST
    )
    inside = inside[: hu.shape[0], : hu.shape[1]] > 0
    cx, cy = centroids[largest]
    return inside, (x, y, w, h), (float(cx * step + (step - 1) / 2), float(cy * step + (step - 1) / 2))


def _spine_components(hu: np.ndarray):
    """Bone components of the spine: (labels of the body's box, stats in image coordinates, chosen ids, box
    offset), or None. See `spine_mask` for the rules."""
    body = _body(hu)
    if body is None:
        return None
    inside, (bx, by, bw, bh), (body_x, body_y) = body
    y0, y1, x0, x1 = by, min(by + bh, hu.shape[0]), bx, min(bx + bw, hu.shape[1])
    region = hu[y0:y1, x0:x1]
    region_inside = inside[y0:y1, x0:x1]
    gross = _window_u8(region, *GROSS_BONE[1:])
    _, center, width = GROSS_BONE
    floor = int(np.clip((MIN_BONE_HU - (center - width / 2)) * 255 / width, 0, 255))
    threshold = max(otsu_threshold(gross[region_inside]) if region_inside.sum() > 1 else 127, floor)
    bone = ((gross > threshold) & region_inside).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStatsWithAlgorithm(
        bone, 8, cv2.CV_32S, cv2.CCL_GRANA
    )
    stats = stats.copy()
    stats[:, 0] += x0
    stats[:, 1] += y0
    centroids = centroids + [x0, y0]
    min_area = max(3, int(MIN_BONE_FRACTION * hu.size))
    band = SPINE_BAND * bw
    candidates = [
        i
        for i in range(1, n)
        if stats[i, cv2.CC_STAT_AREA] >= min_area
        and stats[i, cv2.CC_STAT_LEFT] <= body_x + band
        and stats[i, cv2.CC_STAT_LEFT] + stats[i, cv2.CC_STAT_WIDTH] >= body_x - band
    ]
    if not candidates:
        return None
    spread = SEED_SPREAD * max(bw, bh)

    def weight(i: int) -> float:
        # supine scans (rows run to the back): the spine lies at or behind the body's centre, the
        # mandible and larynx in front of it, so distance to the front counts double
        dy = centroids[i][1] - body_y
        dist2 = (centroids[i][0] - body_x) ** 2 + (dy if dy > 0 else ANTERIOR_PENALTY * dy) ** 2
        return float(stats[i, cv2.CC_STAT_AREA] * np.exp(-dist2 / spread**2))

    seed = max(candidates, key=weight)
    sx0, sy0 = stats[seed, 0], stats[seed, 1]
    sx1, sy1 = sx0 + stats[seed, 2], sy0 + stats[seed, 3]
    chosen, gap = {seed}, JOIN_GAP * bw
    grew = True
    while grew:
        grew = False
        for i in candidates:
            if i in chosen:
                continue
            cx0, cy0 = stats[i, 0], stats[i, 1]
            cx1, cy1 = cx0 + stats[i, 2], cy0 + stats[i, 3]
            if (
                cx0 <= sx1 + gap
                and cx1 >= sx0 - gap
                and cy0 <= sy1 + gap
                and cy1 >= sy0 - gap
                and abs(centroids[i][0] - body_x) <= band
            ):
                chosen.add(i)
                sx0, sy0, sx1, sy1 = min(sx0, cx0), min(sy0, cy0), max(sx1, cx1), max(sy1, cy1)
                grew = True
    return labels, stats, chosen, (y0, x0)


def spine_mask(hu: np.ndarray) -> np.ndarray | None:
    """Bone that belongs to the spine (or, on a head slice, the skull), as a boolean [H, W] mask.

    Otsu's threshold on the gross bone window gives bone; bone outside the patient (table, padding,
    stray pixels) is dropped; of the rest, the largest component near the body's centre line seeds the
    spine, and nearby central components join it (posterior arch, dens, processes). Lateral bones such as
    ribs, clavicles and shoulders lie outside the central band and never join; the mandible, though
    central, lies at the body's front edge and loses the seed to the spine near the centre. None for a
    blank slice.
    """
    found = _spine_components(hu)
    if found is None:
        return None
    labels, _, chosen, (y0, x0) = found
    mask = np.zeros(hu.shape, bool)
    mask[y0 : y0 + labels.shape[0], x0 : x0 + labels.shape[1]] = np.isin(labels, list(chosen))
    return mask


def otsu_crop_box(hu: np.ndarray, margin: float = 0.05) -> Box:
    """The crop around the detected spine, as the paper does it.

    Args:
        hu: float [H, W] in HU.
        margin: added on each side, as a fraction of the detected box's height and width.

    Returns:
        (y0, y1, x0, x1), half-open and clamped to the image; the full image for a blank slice.
    """
    h, w = hu.shape
    found = _spine_components(hu)
    if found is None:
        return 0, h, 0, w
    _, stats, chosen, _ = found
    chosen = list(chosen)
    x0, y0 = stats[chosen, 0].min(), stats[chosen, 1].min()
    x1 = (stats[chosen, 0] + stats[chosen, 2]).max()
    y1 = (stats[chosen, 1] + stats[chosen, 3]).max()
    my, mx = margin * (y1 - y0), margin * (x1 - x0)
    return (
        max(0, int(np.floor(y0 - my))),
        min(h, int(np.ceil(y1 + my))),
        max(0, int(np.floor(x0 - mx))),
        min(w, int(np.ceil(x1 + mx))),
    )


def study_crop_box(boxes: list[Box], shape: tuple[int, int]) -> Box:
    """One box for a study: the 10th/90th percentiles of its slices' boxes, blank slices ignored.

    Percentiles, not the union: the skull's box on the top slices and a failed detection on one slice
    must not blow the crop up for the whole study.
    """
    h, w = shape
    found = np.array([b for b in boxes if b != (0, h, 0, w)])
    if len(found) == 0:
        return 0, h, 0, w
    y0, x0 = np.percentile(found[:, [0, 2]], 10, axis=0)
    y1, x1 = np.percentile(found[:, [1, 3]], 90, axis=0)
    return int(np.floor(y0)), int(np.ceil(y1)), int(np.floor(x0)), int(np.ceil(x1))


def _square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads [h, w, C] to a centred square, then resizes to [size, size, C]."""
    h, w = image.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = cv2.copyMakeBorder(
        image, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=0
    )
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(padded, (size, size), interpolation=interpolation)


# slices windowed at once: a reading process (8 of them in `prepare`) held a float32 copy of the cropped
# study for each window, up to 367 MB at 512² × 350; 32 slices hold 34 MB (the rehearsal, docs/gpu.md)
CHUNK = 32


def windows_u8(hu: np.ndarray) -> np.ndarray:
    """The three windows of a [..., H, W] HU array as uint8 [..., H, W, 3]."""
    return np.stack([_window_u8(hu, c, w) for _, c, w in WINDOWS], axis=-1)


def preprocess_slice(
    hu: np.ndarray, size: int = 384, box: Box | None = None, margin: float = 0.05
) -> np.ndarray:
    """One slice: crop → three windows → zero-pad to square → resize.

    Args:
        hu: float [H, W] in HU.
        size: output side in pixels (the paper: 384).
        box: crop to use; None detects it with `otsu_crop_box`.
        margin: the crop margin when detecting.

    Returns:
        uint8 [size, size, 3], channels = `WINDOWS` order.
    """
    y0, y1, x0, x1 = box if box is not None else otsu_crop_box(hu, margin)
    return _square_resize(windows_u8(hu[y0:y1, x0:x1]), size)


def preprocess_study(
    hu: np.ndarray,
    size: int = 384,
    crop: Literal["study", "slice"] = "study",
    margin: float = 0.05,
) -> tuple[np.ndarray, list[Box]]:
    """A whole study at once.

    Args:
        hu: float [N, H, W] in HU, head to feet.
        size: output side in pixels.
        crop: "study" (default) detects the spine on every slice and crops all slices with one robust
            box, so a vertebra keeps its scale from slice to slice: the BLSTM sees steady features, and
            slices where detection fails (skull, shoulders, blank) are cropped like their neighbours.
            "slice" crops each slice with its own box, exactly as the paper describes.
        margin: fraction added on each side of the detected box.

    Returns:
        uint8 [N, size, size, 3], and the box used for each slice.
    """
    if crop not in ("study", "slice"):
        raise ValueError(f"crop must be 'study' or 'slice', not {crop!r}")
    boxes = [otsu_crop_box(s, margin) for s in hu]
    if crop == "study":
        boxes = [study_crop_box(boxes, hu.shape[1:])] * len(hu)
        y0, y1, x0, x1 = boxes[0]
        out = np.zeros((len(hu), size, size, 3), np.uint8)
        for start in range(0, len(hu), CHUNK):  # a float copy of CHUNK slices at a time, not of the study
            for k, c in enumerate(windows_u8(hu[start : start + CHUNK, y0:y1, x0:x1]), start):
                out[k] = _square_resize(c, size)
        return out, boxes
    out = np.zeros((len(hu), size, size, 3), np.uint8)
    for k, (s, box) in enumerate(zip(hu, boxes)):
        out[k] = preprocess_slice(s, size, box)
    return out, boxes


def boxes_in_cache_frame(
    boxes: list[dict], crop: tuple[int, int, int, int], size: int
) -> list[tuple[float, ...]]:
    """Maps competition boxes (pixels of the original slice) into the cropped, padded, resized image."""
    y0, y1, x0, x1 = crop
    h, w = y1 - y0, x1 - x0
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    scale = size / side
    return [
        ((b["x"] - x0 + left) * scale, (b["y"] - y0 + top) * scale, b["width"] * scale, b["height"] * scale)
        for b in boxes
    ]


def labels_in_cache_frame(labels: np.ndarray, boxes: list[Box], size: int) -> np.ndarray:
    """A label volume cropped, padded and resized exactly as its study's slices were (nearest neighbour).

    Args:
        labels: uint8 [N, H, W] aligned with the study's HU (e.g. `cspine.competition.read_mask`).
        boxes: the crop of each slice, as `preprocess_study` returned them.
        size: the cache's side.

    Returns:
        uint8 [N, size, size], the labels of each cached pixel.
    """
    out = np.zeros((len(labels), size, size), np.uint8)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        crop = np.ascontiguousarray(labels[k, y0:y1, x0:x1])
        h, w = crop.shape
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        padded = cv2.copyMakeBorder(
            crop, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=0
        )
        out[k] = cv2.resize(padded, (size, size), interpolation=cv2.INTER_NEAREST)
    return out
