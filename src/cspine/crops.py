"""Crops of each vertebra, cut from a study's HU volume where the segmentation put it: the crop track's input.

Imported by the `crop` stage (training studies) and by `predict` (test studies); no torch.

A vertebra's place comes from the `segment` stage's labels in the cache's frame: the slices it spans and
its in-plane box (`place_vertebrae`; a vertebra the segmentation missed is placed between its neighbours
and marked ``found=False``). `cut_study` then cuts, for each of C1..C7, ``slices`` slices spaced evenly
over its extent, each as ``context`` neighbours on each side plus itself in the standard bone window, and
the vertebra's own label as the last channel, from the full-resolution volume: the vertebra fills the
crop whatever the cache's size. The spec of a cut (`crop_spec`) travels in every crop model's checkpoint,
so `predict` cuts test studies exactly as the training crops were cut.

A cut is made in two steps, for training and `predict` alike: `cut_planes` keeps each distinct plane once,
as the scan's pixels under its square, and `assemble` resizes them into the model's input. The `crop`
stage stores the first step's parts (`write_crop_store`, deflated: a fifth of the model's input or less at
the real shape) and training reads a vertebra back with `read_crop_store`.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cspine import VERTEBRAE
from cspine.preprocess import CHUNK, WINDOWS, Box, _window_u8
from cspine.runs import atomic_path

BONE = WINDOWS[1]  # the standard bone window: cortex and the dark line of a break both keep contrast
PLACE_COLUMNS = ["vertebra", "found", "z0", "z1", "y0", "y1", "x0", "x1"]


@dataclass(frozen=True)
class CropSpec:
    """How a vertebra is cut into crops (`CropConfig`'s settings of the same names); kept in each crop
    model's checkpoint, read by `predict`: ``slices`` slices of ``size`` px, each with ``context``
    neighbours on each side, ``margin`` of the vertebra's height and box wider."""

    size: int
    slices: int
    context: int
    margin: float


def crop_spec(size: int, slices: int, context: int, margin: float) -> CropSpec:
    """How crops are cut, as plain numbers (a YAML value may be any number type)."""
    return CropSpec(int(size), int(slices), int(context), float(margin))


def crop_channels(spec: CropSpec) -> int:
    """Channels of a crop slice: the slice with its neighbours, and the vertebra's label."""
    return 2 * spec.context + 2


def bone_u8(hu: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W]: a study's HU in the standard bone window (`CHUNK` slices at a time: no float copy
    of the whole study)."""
    out = np.empty(hu.shape, np.uint8)
    for start in range(0, len(hu), CHUNK):
        out[start : start + CHUNK] = _window_u8(np.asarray(hu[start : start + CHUNK], np.float32), *BONE[1:])
    return out


def place_vertebrae(found: list[dict], n: int, size: int) -> list[dict]:
    """Every vertebra's place, C1..C7, from those the segmentation found (`cspine.segmenter.vertebra_extents`).

    A vertebra it missed is placed where its neighbours say it is: its centre interpolated (or extrapolated
    along the column) from the found ones' centres, its height their mean, its box between theirs; with none
    found, the whole study. Such places carry ``found=False`` and are counted in the report.

    Args:
        found: dicts with vertebra, z0, z1 (slices, inclusive), y0, y1, x0, x1 (cache pixels, exclusive).
        n: the study's slices.
        size: the cache's side.

    Returns:
        seven dicts with `PLACE_COLUMNS`.
    """
    by_name = {e["vertebra"]: e for e in found}
    index = np.array([i for i, v in enumerate(VERTEBRAE) if v in by_name], dtype=float)
    if not len(index):
        return [
            {"vertebra": v, "found": False, "z0": 0, "z1": n - 1, "y0": 0, "y1": size, "x0": 0, "x1": size}
            for v in VERTEBRAE
        ]
    rows = [by_name[VERTEBRAE[int(i)]] for i in index]
    centre = np.array([(e["z0"] + e["z1"]) / 2 for e in rows])
    height = float(np.mean([e["z1"] - e["z0"] + 1 for e in rows]))
    # slices from one vertebra to the next
    step = np.polyfit(index, centre, 1)[0] if len(index) > 1 else height
    places = []
    for i, name in enumerate(VERTEBRAE):
        if name in by_name:
            places.append(
                {"vertebra": name, "found": True, **{k: int(by_name[name][k]) for k in PLACE_COLUMNS[2:]}}
            )
            continue
        if index[0] < i < index[-1]:
            c = float(np.interp(i, index, centre))
        else:
            edge = 0 if i < index[0] else -1
            c = centre[edge] + (i - index[edge]) * step
        z0 = int(np.clip(round(c - height / 2), 0, n - 1))
        z1 = int(np.clip(round(c + height / 2), z0, n - 1))
        box = {k: int(round(np.interp(i, index, [e[k] for e in rows]))) for k in ("y0", "y1", "x0", "x1")}
        places.append({"vertebra": name, "found": False, "z0": z0, "z1": z1, **box})
    return places


def slice_picks(z0: int, z1: int, n: int, slices: int, margin: float) -> np.ndarray:
    """int [slices]: slices spaced evenly over [z0, z1], ``margin`` of its height wider on each side."""
    pad = margin * (z1 - z0 + 1)
    return np.clip(np.rint(np.linspace(z0 - pad, z1 + pad, slices)), 0, n - 1).astype(int)


def _square(place: dict, margin: float) -> tuple[float, float, float]:
    """(centre y, centre x, half side) of a vertebra's in-plane box, square, ``margin`` wider, cache pixels."""
    cy, cx = (place["y0"] + place["y1"]) / 2, (place["x0"] + place["x1"]) / 2
    half = max(place["y1"] - place["y0"], place["x1"] - place["x0"], 4) / 2 * (1 + 2 * margin)
    return cy, cx, half


def _cache_to_volume(crop: Box, size: int) -> tuple[float, float, float]:
    """(scale, y offset, x offset): volume pixel = cache pixel × scale + offset, for a slice cropped by ``crop``
    (padded to a square, resized to ``size``) as `cspine.preprocess.preprocess_study` did."""
    y0, y1, x0, x1 = crop
    h, w = y1 - y0, x1 - x0
    side = max(h, w)
    scale = side / size
    return scale, y0 - (side - h) // 2, x0 - (side - w) // 2


def _warp(image: np.ndarray, cy: float, cx: float, half: float, out: int, interpolation: int) -> np.ndarray:
    """The square of ``image`` centred at (cy, cx) with half side ``half`` (pixel centres at integers),
    resized to ``out`` px; outside the image is 0."""
    a = 2 * half / out
    m = np.array([[a, 0, cx - half + a / 2 - 0.5], [0, a, cy - half + a / 2 - 0.5]], np.float32)
    return cv2.warpAffine(
        image,
        m,
        (out, out),
        flags=interpolation | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def volume_square(place: dict, crop: Box, cache_size: int, margin: float) -> tuple[float, float, float]:
    """(centre y, centre x, half side) of a vertebra's crop in the pixels of the study's slices, for a slice
    the cache cropped with ``crop``."""
    cy, cx, half = _square(place, margin)
    scale, oy, ox = _cache_to_volume(crop, cache_size)
    return cy * scale + oy, cx * scale + ox, half * scale


def _patch(image: np.ndarray, cy: float, cx: float, half: float) -> tuple[np.ndarray, float, float]:
    """The pixels of ``image`` that `_warp` reads for the square at (cy, cx) with half side ``half``, two
    more on each side (0 beyond the image, as the warp's border), and the square's centre in the patch."""
    y0, x0 = int(np.floor(cy - half)) - 2, int(np.floor(cx - half)) - 2
    y1, x1 = int(np.ceil(cy + half)) + 3, int(np.ceil(cx + half)) + 3
    h, w = image.shape
    patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    if sy1 > sy0 and sx1 > sx0:
        patch[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return patch, cy - y0, cx - x0


def cut_planes(
    bone: np.ndarray, labels: np.ndarray, place: dict, crops: list[Box], cache_size: int, spec: CropSpec
) -> dict[str, np.ndarray]:
    """One vertebra's crops as they are stored: each distinct plane once, at the scan's own resolution.

    The ``slices`` picks lie closer together than their ``context`` neighbours reach on a thin-sliced
    scan, so a neighbour channel often repeats a plane another pick holds: each (slice, square) is kept
    once. And each is kept as the scan's pixels under its square (a vertebra's square is 100-200 px of a
    512 px slice), not resized to ``size``: `assemble` resizes them, for the store and for `predict` alike.

    Args: as `cut_vertebra`.

    Returns:
        ``patches`` uint8 [P] (every plane's pixels, one after the other), ``frames`` float [U, 5] (each
        plane's height and width, and its square's centre y, x and half side in the plane; a centre of −1:
        a square wider than ``size``, whose plane is kept resized, the smaller of the two), ``index`` int16
        [slices, 2·context + 1] (the plane of each pick's every neighbour, head to feet) and ``own`` uint8
        [slices, size, size] (the vertebra's own label, 0 or 255, at ``size``).
    """
    n, size, context = len(bone), spec.size, spec.context
    label = VERTEBRAE.index(place["vertebra"]) + 1
    cy, cx, half = _square(place, spec.margin)
    picks = slice_picks(place["z0"], place["z1"], n, spec.slices, spec.margin)
    index = np.zeros((len(picks), 2 * context + 1), np.int16)
    own = np.zeros((len(picks), size, size), np.uint8)
    patches: list[np.ndarray] = []
    frames: list[tuple] = []
    seen: dict[tuple, int] = {}
    for j, k in enumerate(picks):
        square = volume_square(place, crops[k] if len(crops) > 1 else crops[0], cache_size, spec.margin)
        for c, z in enumerate(np.clip(np.arange(k - context, k + context + 1), 0, n - 1)):
            key = (int(z), square)
            if key not in seen:
                seen[key] = len(patches)
                patch, py, px = _patch(bone[z], *square)
                if 2 * square[2] > size:  # a square wider than the crop: the resized plane is the smaller
                    patch, py, px = _warp(patch, py, px, square[2], size, cv2.INTER_AREA), -1.0, -1.0
                patches.append(patch)
                frames.append((*patch.shape, py, px, square[2]))
            index[j, c] = seen[key]
        own[j] = _warp((labels[k] == label).astype(np.uint8) * 255, cy, cx, half, size, cv2.INTER_LINEAR)
    return {
        "patches": np.concatenate([p.ravel() for p in patches]),
        "frames": np.array(frames, np.float64),
        "index": index,
        "own": own,
    }


def assemble(patches: np.ndarray, frames: np.ndarray, index: np.ndarray, own: np.ndarray) -> np.ndarray:
    """uint8 [slices, channels, size, size]: the model's input from `cut_planes`' parts: each plane resized
    to ``size`` once, each pick's planes head to feet, then the vertebra's label."""
    size = own.shape[-1]
    planes, start = [], 0
    for h, w, py, px, half in frames:
        patch = patches[start : start + int(h) * int(w)].reshape(int(h), int(w))
        planes.append(patch if py < 0 else _warp(patch, py, px, half, size, cv2.INTER_AREA))
        start += int(h) * int(w)
    return np.concatenate([np.stack(planes)[index], own[:, None]], axis=1)


def cut_vertebra(
    bone: np.ndarray, labels: np.ndarray, place: dict, crops: list[Box], cache_size: int, spec: CropSpec
) -> np.ndarray:
    """uint8 [slices, channels, size, size]: one vertebra's crops (`crop_channels` per slice).

    Args:
        bone: uint8 [N, H, W], the study in the bone window (`bone_u8`), head to feet.
        labels: uint8 [N, S, S], the segmentation in the cache's frame (S = ``cache_size``).
        place: the vertebra's place (`place_vertebrae`).
        crops: the cache's crop box of every slice, or one for the whole study (the cache's JSON).
        cache_size: the cache's side.
        spec: `crop_spec`.
    """
    return assemble(**cut_planes(bone, labels, place, crops, cache_size, spec))


def cut_study(
    bone: np.ndarray,
    labels: np.ndarray,
    places: list[dict],
    crops: list[Box],
    cache_size: int,
    spec: CropSpec,
) -> np.ndarray:
    """uint8 [7, slices, channels, size, size]: the crops of C1..C7 of one study (`cut_vertebra`)."""
    return np.stack(
        [assemble(**parts) for parts in cut_study_planes(bone, labels, places, crops, cache_size, spec)]
    )


def cut_study_planes(
    bone: np.ndarray,
    labels: np.ndarray,
    places: list[dict],
    crops: list[Box],
    cache_size: int,
    spec: CropSpec,
) -> list[dict[str, np.ndarray]]:
    """`cut_planes` of C1..C7 of one study."""
    if len(labels) != len(bone):
        raise ValueError(f"the segmentation has {len(labels)} slices and the study {len(bone)}")
    return [cut_planes(bone, labels, place, crops, cache_size, spec) for place in places]


def write_crop_store(path: str | os.PathLike, parts: list[dict[str, np.ndarray]]) -> Path:
    """Writes one study's crops (`cut_study_planes`) compressed, atomically: an ``.npz`` whose members
    ``<part><k>`` (``patches``, ``frames``, ``index``, ``own``) are vertebra k's, so that training reads one
    vertebra alone.

    Deflate on distinct planes at the scan's resolution: at the `rsna` geometry a study's 41 MB of model
    input takes a fifth of it or less (the rehearsal measures it at the real shape, docs/gpu.md).
    """
    arrays = {f"{name}{k}": array for k, part in enumerate(parts) for name, array in part.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return Path(path)


PARTS = ("patches", "frames", "index", "own")


def read_crop_store(path: str | os.PathLike, vertebra: int | None = None) -> np.ndarray:
    """A stored study's crops as the model reads them: uint8 [7, slices, channels, size, size], or one
    vertebra's [slices, channels, size, size] (0 = C1).

    Raises:
        CropStoreError: the file is missing, damaged or truncated (the message names it).
    """
    try:
        with np.load(path) as store:
            if vertebra is not None:
                return assemble(**{p: store[f"{p}{vertebra}"] for p in PARTS})
            return np.stack([assemble(**{p: store[f"{p}{k}"] for p in PARTS}) for k in range(len(VERTEBRAE))])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise CropStoreError(
            f"{path}: damaged or incomplete crop store ({type(exc).__name__}: {exc}); run `python -m "
            "cspine crop` again (it cuts the studies whose crops are missing)"
        ) from None


class CropStoreError(OSError):
    """A stored study's crops that cannot be read; the message names the file."""
