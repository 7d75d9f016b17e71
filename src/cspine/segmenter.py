"""The segmentation model and how it reads a study: what `segment` trains and `predict` runs.

A U-Net (segmentation-models-pytorch, a timm encoder) reads sagittal planes of a cached study and labels
each pixel background, C1..C7 or T1; the labels become each slice's vertebrae and each vertebra's extent.
Trained on a dozen masks, the network finds the spine well and counts it badly: a vertebra's label drifts
onto the next body down a long scan. `count_levels` therefore counts the vertebral bodies between the discs
(dips in the spine's pixels per slice) from C2 down, and each vertebra's label is kept to its own bodies.
Inference imports this module, never the training stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.signal import find_peaks

from cspine import VERTEBRAE
from cspine.config import SegConfig
from cspine.inputs import MEAN, STD
from cspine.runs import atomic_path

SEG_CLASSES = 9  # background, C1..C7, T1 (the competition's masks: 1..7 = C1..C7, 8+ = thoracic)
# Half segmentation-models-pytorch's default decoder widths: at 96×64 planes on a 2-core CPU it trains
# 1.4× as many steps a second (9.8 against 6.8 at 64 rows), and nine classes of bone need no more.
DECODER_CHANNELS = (128, 64, 32, 16, 16)


@dataclass(frozen=True)
class SegReading:
    """How a segmentation model reads a study and turns its labels into vertebrae; kept in its checkpoint,
    read by `predict`: sagittal planes with ``context`` neighbours on each side, at ``row_mm`` mm a row, every
    ``plane_stride``-th plane read; with ``count``, the vertebrae counted between the discs (`count_levels`,
    each label reaching ``count_margin`` of a vertebra's pitch past its own slices); a vertebra present on a
    slice with ``min_pixels`` of its pixels."""

    context: int
    row_mm: float
    plane_stride: int
    count: bool
    count_margin: float
    min_pixels: int


def build_segmenter(encoder: str, context: int) -> torch.nn.Module:
    """A U-Net with a timm encoder, reading 3·(2·context + 1) channels, giving `SEG_CLASSES` logits a pixel."""
    import segmentation_models_pytorch as smp

    model = smp.Unet(
        encoder_name=f"tu-{encoder}",
        encoder_weights=None,
        in_channels=3 * (2 * context + 1),
        classes=SEG_CLASSES,
        decoder_channels=DECODER_CHANNELS,
    )
    model.arch = {"encoder": encoder, "context": context}  # what rebuilds it (`cspine.checkpoints`)
    return model


def plane_rows(n: int, dz: float, row_mm: float) -> int:
    """Rows of a study's sagittal plane: its N slices, ``dz`` mm apart, at ``row_mm`` mm a row.

    At a fixed height a row, every vertebra spans the same rows in every study, whether the scan stops at
    C7 or runs on into T4: resampling each scan to one row count instead squeezes the long ones, and the
    network then counts the vertebrae of a long scan wrongly.

    Raises:
        ValueError: ``dz`` is not a positive number (slices without positions give NaN).
    """
    if not np.isfinite(dz) or dz <= 0:
        raise ValueError(
            f"slice spacing {dz} mm: the segmentation reads a scan at fixed mm a row, and needs "
            "the slices' positions (ImagePositionPatient)"
        )
    return max(1, int(round(n * dz / row_mm)))


def padded_rows(rows: int) -> int:
    """Rows rounded up to a multiple of 32, as the U-Net's five poolings need (padded below the scan)."""
    return -(-rows // 32) * 32


def sagittal_planes(
    study: np.ndarray, xs: np.ndarray, context: int, rows: int, pad_to: int | None = None
) -> torch.Tensor:
    """float [B, 3·(2c+1), pad_to, W]: sagittal planes ``xs`` of a cached study, with neighbours as channels.

    Args:
        study: uint8 [N, S, S, 3], head to feet (rows y, columns x).
        xs: int [B], the columns whose sagittal planes are wanted.
        context: neighbouring planes on each side; beyond the image's edge the edge plane repeats.
        rows: the N slices are resampled to this many rows (linear; `plane_rows`).
        pad_to: rows of the output (at least ``rows``; by default `padded_rows`): the rows below the scan
            are black, as air is.

    W is S rounded up to a multiple of 32, as the U-Net's five poolings need (linear resampling).
    """
    cols = np.clip(np.asarray(xs)[:, None] + np.arange(-context, context + 1)[None], 0, study.shape[2] - 1)
    planes = np.asarray(study[:, :, cols.ravel()])  # [N, S, B·k, 3]
    n, s = planes.shape[:2]
    x = torch.from_numpy(planes).reshape(n, s, len(xs), -1).permute(2, 3, 0, 1).float().div_(255.0)
    x = F.interpolate(x, size=(rows, plane_width(s)), mode="bilinear", align_corners=False)
    x = F.pad(x, (0, 0, 0, (pad_to or padded_rows(rows)) - rows))  # black below the scan
    return (x - MEAN) / STD  # [B, k·3, pad_to, W]


def plane_width(side: int) -> int:
    """A sagittal plane's width for the U-Net: the cache's side rounded up to a multiple of 32."""
    return -(-side // 32) * 32


@torch.inference_mode()
def plane_probabilities(
    models: list[torch.nn.Module],
    study: np.ndarray,
    dz: float,
    how: SegReading,
    device: torch.device,
    batch_size: int = 32,
) -> torch.Tensor:
    """float [SEG_CLASSES, N, S, P]: the models' mean class probabilities of every ``plane_stride``-th
    sagittal plane (P of them) of a cached study uint8 [N, S, S, 3], its slices ``dz`` mm apart.

    ``how`` is how the models read a study (`reading`, saved in their checkpoints): every
    ``plane_stride``-th sagittal plane, at ``row_mm`` mm a row.
    """
    n, size = study.shape[:2]
    rows = plane_rows(n, dz, how.row_mm)
    read = np.arange(0, size, how.plane_stride)
    probs = torch.zeros(SEG_CLASSES, n, size, len(read))  # [class, slice, y, read plane]
    for model in models:
        for start in range(0, len(read), batch_size):
            xs = read[start : start + batch_size]
            planes = sagittal_planes(study, xs, how.context, rows).to(device)
            logits = model(planes.contiguous(memory_format=torch.channels_last)).float()[:, :, :rows]
            back = (
                F.interpolate(logits, size=(n, size), mode="bilinear", align_corners=False).softmax(1).cpu()
            )
            probs[..., start : start + len(xs)] += back.permute(1, 2, 3, 0)
    return probs.div_(len(models))


def plane_labels(probs: torch.Tensor, dz: float, how: SegReading) -> tuple[np.ndarray, bool]:
    """uint8 [N, S, S] labels from `plane_probabilities`' [C, N, S, P] of a study whose slices lie ``dz`` mm
    apart, and whether its vertebrae were counted: each read plane's most probable class, among the classes
    `count_levels` allows each slice where ``how.count`` and the spine can be counted; the planes between two
    read ones take the nearest one's labels."""
    allowed = count_levels(probs, dz, how.count_margin) if how.count else None
    if allowed is None:
        labels = probs.argmax(0)
    else:
        labels = torch.zeros(probs.shape[1:], dtype=torch.long)
        spine = probs[0] < 0.5
        for z in range(probs.shape[1]):  # a slice at a time: no copy of the probabilities (400 MB at 256 px)
            classes = torch.from_numpy(np.flatnonzero(allowed[:, z]) + 1)
            if len(classes):
                labels[z] = torch.where(spine[z], classes[probs[classes, z].argmax(0)], 0)
    size = probs.shape[2]
    nearest = np.clip(np.rint(np.arange(size) / how.plane_stride).astype(int), 0, probs.shape[3] - 1)
    return labels.numpy().astype(np.uint8)[:, :, nearest], allowed is not None


# How `count_levels` reads a spine. A disc is a dip in the spine's pixels per slice, deeper than
# `DISC_DEPTH` of a typical slice's and `DISC_MM` from the next. A vertebra's pitch (disc to disc, or the
# scan's end) against the study's median pitch: C3..C7 alike (the phantoms' 0.83-1.17, so two bodies never
# pass for one), C2 somewhat taller, C1 anything from a thin ring to C2's height (the phantoms: C1
# 0.44-1.33, C2 0.88-1.62). C1 and C2 need no disc between them (the dens rises into the atlas).
DISC_DEPTH = 0.25
DISC_MM = 6.0
PITCH_RATIO = {"C1": (0.3, 1.5), "C2": (0.8, 1.8), **{v: (0.6, 1.45) for v in VERTEBRAE[2:]}}
SPINE_CLASSES = SEG_CLASSES - 1  # C1..C7 and T1: the classes a slice's level takes


def spine_discs(pixels: np.ndarray, dz: float) -> np.ndarray:
    """int [D]: the slices of the discs between the first and the last slice that show the spine, from its
    pixels per slice ``pixels`` float [N] (slices ``dz`` mm apart): the dips of `DISC_DEPTH` and `DISC_MM`."""
    smooth = np.convolve(np.pad(pixels, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
    shown = np.flatnonzero(pixels > 0.05 * pixels.max())
    typical = np.median(smooth[smooth > 0.2 * pixels.max()])
    dips, _ = find_peaks(-smooth, prominence=DISC_DEPTH * typical, distance=max(1, int(DISC_MM / dz)))
    return dips[(dips > shown[0]) & (dips < shown[-1])]


def count_levels(probs: torch.Tensor, dz: float, margin: float) -> np.ndarray | None:
    """bool [8, N]: which of C1..C7 and T1 each slice of a study may show, from `plane_probabilities`' [C, N,
    S, P], its slices ``dz`` mm apart; None where the spine cannot be counted (fewer than five discs, or no
    counting fits `PITCH_RATIO`).

    Each vertebra takes a run of slices: C1 from anywhere, then C2, each of C2..C7 ending at a disc (C7 at
    the scan's end, if the scan stops in it), the thoracic class the rest. The network's votes (its
    probability of a class on each spine pixel, of all spine classes) choose the runs, best summed over the
    slices, and two constraints it cannot break: C2 ends at the disc where its votes split best into C1 or
    C2 above and lower vertebrae below (it finds C2, the most distinctive vertebra, well), and every pitch
    fits `PITCH_RATIO` against the study's median one, so that below C2 each body is one vertebra. A label
    may reach ``margin`` of the median pitch past its run's ends: a real vertebra's arch overlaps the next
    body's slices.
    """
    spine = probs[0] < 0.5
    pixels = spine.sum((1, 2)).double().numpy()
    if pixels.max() == 0:
        return None
    discs = spine_discs(pixels, dz)
    if len(discs) < 5:
        return None
    n, pitch = len(pixels), float(np.median(np.diff(discs))) * dz
    share = probs[0].neg().add_(1).clamp_(min=1e-3).reciprocal_().mul_(spine)  # 1 / P(spine) on the spine
    votes = torch.stack([(probs[c] * share).sum((1, 2)) for c in range(1, SEG_CLASSES)]).double().numpy()
    before = np.concatenate([np.zeros((SPINE_CLASSES, 1)), np.cumsum(votes, 1)], 1)  # [class, boundary]
    above = before[:2].sum(0)  # C1's and C2's votes above each boundary
    below = before[2:, n].sum() - before[2:].sum(0)  # the lower vertebrae's below it
    c2_end = discs[int(np.argmax((above + below)[discs]))]
    ends_of = {1: np.arange(n + 1), 2: np.array([c2_end])}
    runs = _best_runs(before, ends_of, np.concatenate([discs, [n]]), dz / pitch)
    if runs is None:
        return None
    reach = int(round(margin * pitch / dz))
    allowed = np.zeros((SPINE_CLASSES, n), bool)
    for level, (z0, z1) in enumerate(runs):
        if z1 > z0:
            allowed[level, max(0, z0 - reach) : z1 + reach] = True
    return allowed


def _best_runs(
    before: np.ndarray, ends_of: dict[int, np.ndarray], discs: np.ndarray, rows: float
) -> list[tuple[int, int]] | None:
    """`count_levels`' dynamic programme: the runs [z0, z1) of C1..C7 and of the thoracic rest that sum the
    most votes (``before[c, b]``: class c+1's votes above boundary b), each vertebra ending at one of
    ``ends_of`` (default: ``discs``, the discs and the scan's end) and its pitch, ``rows`` median pitches a
    slice, within `PITCH_RATIO`; None if none fits."""
    n = before.shape[1] - 1
    starts, score = np.arange(n + 1), np.zeros(n + 1)  # above C1: no votes
    chosen = []
    for level, name in enumerate(VERTEBRAE, start=1):
        ends = ends_of.get(level, discs)
        low, high = PITCH_RATIO[name]
        pitch = (ends[:, None] - starts[None, :]) * rows
        fits = (pitch > 0) & (pitch <= high) & ((pitch >= low) | (ends[:, None] == n))
        gain = before[level - 1, ends][:, None] - before[level - 1, starts][None, :]
        total = np.where(fits, score[None, :] + gain, -np.inf)
        best = total.argmax(1)
        chosen.append((ends, starts[best]))
        starts, score = ends, total[np.arange(len(ends)), best]
    score = score + before[SPINE_CLASSES - 1, n] - before[SPINE_CLASSES - 1, starts]  # the thoracic rest
    if not np.isfinite(score.max()):
        return None
    end = int(starts[score.argmax()])
    runs = [(end, n)]
    for ends, begins in reversed(chosen):
        start = int(begins[np.flatnonzero(ends == end)[0]])
        runs.insert(0, (start, end))
        end = start
    return runs


def spine_confidence(probs: torch.Tensor) -> float:
    """How sure the models are of a study's vertebrae: the mean probability of the chosen class over the
    pixels of `plane_probabilities` labelled C1..C7 (0 where none is)."""
    top, chosen = probs.max(0)
    spine = (chosen >= 1) & (chosen <= len(VERTEBRAE))
    return float(top[spine].mean()) if spine.any() else 0.0


def segment_study(
    models: list[torch.nn.Module],
    study: np.ndarray,
    dz: float,
    how: SegReading,
    device: torch.device,
    batch_size: int = 32,
) -> np.ndarray:
    """uint8 [N, S, S] labels of a cached study uint8 [N, S, S, 3], its slices ``dz`` mm apart: the models'
    mean probabilities (`plane_probabilities`) read as `plane_labels` reads them."""
    return plane_labels(plane_probabilities(models, study, dz, how, device, batch_size), dz, how)[0]


def vertebra_extents(labels: np.ndarray, min_pixels: int) -> tuple[np.ndarray, list[dict]]:
    """Per-slice presence of C1..C7 and each vertebra's extent, from a label volume uint8 [N, S, S].

    A vertebra is present on a slice with at least ``min_pixels`` of its pixels; of its slices, only the
    longest unbroken run counts (a vertebra is one piece along z; stray pixels elsewhere are noise).

    Returns:
        bool [N, 7] presence, and for each vertebra found a dict: vertebra, z0, z1 (orders, inclusive),
        y0, y1, x0, x1 (pixels, exclusive ends).
    """
    presence = np.zeros((len(labels), len(VERTEBRAE)), bool)
    extents = []
    for i, name in enumerate(VERTEBRAE):
        on = (labels == i + 1).sum(axis=(1, 2)) >= min_pixels
        if not on.any():
            continue
        edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(int), [0]])))
        starts, ends = edges[::2], edges[1::2]
        longest = int(np.argmax(ends - starts))
        z0, z1 = int(starts[longest]), int(ends[longest]) - 1
        presence[z0 : z1 + 1, i] = True
        ys, xs = np.nonzero((labels[z0 : z1 + 1] == i + 1).any(axis=0))
        extents.append(
            {
                "vertebra": name,
                "z0": z0,
                "z1": z1,
                "y0": int(ys.min()),
                "y1": int(ys.max()) + 1,
                "x0": int(xs.min()),
                "x1": int(xs.max()) + 1,
            }
        )
    return presence, extents


# A plausible cervical spine, as `check_vertebrae` reads one: each vertebra's height (slices × spacing) against
# the study's median of C3..C7, from C1's ring to C2 with its dens; the phantoms' true vertebrae stay well
# inside (C1 0.57-0.86, C2 1.9-2.5, C3..C7 0.78-1.29 on the demo's 96 studies)
HEIGHT_RATIO = {"C1": (0.4, 1.3), "C2": (1.3, 3.5), **{v: (0.6, 1.6) for v in VERTEBRAE[2:]}}
MEDIAN_MM = (6.0, 30.0)  # the median of C3..C7's heights (the phantoms' 11.7-16.2 mm)
GAP_MM = 12.0  # the most between one vertebra's last slice and the next one's first (a disc is a few mm)


def check_vertebrae(extents: list[dict], dz: float) -> list[str]:
    """What is wrong with a study's segmentation, as its vertebrae's extents (`vertebra_extents`) show it,
    slices ``dz`` mm apart: C1..C7 each present, in order from head to feet, of plausible heights
    (`HEIGHT_RATIO`, `MEDIAN_MM`) and without a gap (`GAP_MM`). Empty: the study passes."""
    found = {e["vertebra"]: e for e in extents}
    missing = [v for v in VERTEBRAE if v not in found]
    if missing:
        return [f"no {', '.join(missing)}"]
    heights = {v: (found[v]["z1"] - found[v]["z0"] + 1) * dz for v in VERTEBRAE}
    median = float(np.median([heights[v] for v in VERTEBRAE[2:]]))
    problems = []
    centres = [(found[v]["z0"] + found[v]["z1"]) / 2 for v in VERTEBRAE]
    if any(b <= a for a, b in zip(centres, centres[1:])):
        problems.append("out of order from head to feet")
    if not MEDIAN_MM[0] <= median <= MEDIAN_MM[1]:
        problems.append(f"C3..C7 {median:.0f} mm high")
    odd = [v for v in VERTEBRAE if not HEIGHT_RATIO[v][0] <= heights[v] / median <= HEIGHT_RATIO[v][1]]
    if odd:
        problems.append(f"implausible heights: {', '.join(f'{v} {heights[v]:.0f} mm' for v in odd)}")
    gaps = [
        f"{a}-{b} {(found[b]['z0'] - found[a]['z1'] - 1) * dz:.0f} mm"
        for a, b in zip(VERTEBRAE, VERTEBRAE[1:])
        if (found[b]["z0"] - found[a]["z1"] - 1) * dz > GAP_MM
    ]
    if gaps:
        problems.append(f"gaps: {', '.join(gaps)}")
    return problems


def dice_per_vertebra(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Dice of each of C1..C7 between two label volumes (NaN where a vertebra is in neither)."""
    out = {}
    for i, name in enumerate(VERTEBRAE):
        p, t = pred == i + 1, true == i + 1
        total = int(p.sum() + t.sum())
        out[name] = 2 * float((p & t).sum()) / total if total else float("nan")
    return out


def slice_levels(labels: np.ndarray, min_pixels: int) -> np.ndarray:
    """int [N]: each slice's level, the label with most pixels (1..7 = C1..C7, 8 = T1; 0 = none shown)."""
    counts = np.stack([(labels == k).sum(axis=(1, 2)) for k in range(1, SEG_CLASSES)], axis=1)
    return np.where(counts.max(axis=1) >= min_pixels, counts.argmax(axis=1) + 1, 0)


def reading(seg: SegConfig) -> SegReading:
    """How the segmentation models of ``seg`` read a study."""
    return SegReading(seg.context, seg.row_mm, seg.plane_stride, seg.count, seg.count_margin, seg.min_pixels)


def save_labels(path: Path, labels: np.ndarray) -> None:
    """A study's labels, compressed (a label volume is mostly background: 1-2% of its raw size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, labels=labels)


def load_labels(path: str | os.PathLike) -> np.ndarray:
    """uint8 [N, S, S] labels saved by `save_labels`."""
    with np.load(path) as data:
        return data["labels"]
