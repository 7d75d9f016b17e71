"""The segmentation model and how it reads a study: what `segment` trains and `predict` runs.

A U-Net (segmentation-models-pytorch, a timm encoder) reads sagittal planes of a cached study and labels
each pixel background, C1..C7 or T1; the labels become each slice's vertebrae and each vertebra's extent.
Inference imports this module, never the training stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
    ``plane_stride``-th plane read; a vertebra present on a slice with ``min_pixels`` of its pixels."""

    context: int
    row_mm: float
    plane_stride: int
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


def plane_labels(probs: torch.Tensor, stride: int) -> np.ndarray:
    """uint8 [N, S, S] labels from `plane_probabilities`' [C, N, S, P]: each read plane's argmax, and the
    planes between take the nearest one's."""
    size = probs.shape[2]
    nearest = np.clip(np.rint(np.arange(size) / stride).astype(int), 0, probs.shape[3] - 1)
    return probs.argmax(0).numpy().astype(np.uint8)[:, :, nearest]


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
    mean probabilities (`plane_probabilities`), argmax, every plane between two read ones taking the
    nearest one's (`plane_labels`)."""
    return plane_labels(plane_probabilities(models, study, dz, how, device, batch_size), how.plane_stride)


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
    return SegReading(seg.context, seg.row_mm, seg.plane_stride, seg.min_pixels)


def save_labels(path: Path, labels: np.ndarray) -> None:
    """A study's labels, compressed (a label volume is mostly background: 1-2% of its raw size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, labels=labels)


def load_labels(path: str | os.PathLike) -> np.ndarray:
    """uint8 [N, S, S] labels saved by `save_labels`."""
    with np.load(path) as data:
        return data["labels"]
