"""Dataset statistics for exploration: one row per study, read from headers only (fast on real data)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from cspine import VERTEBRAE
from cspine.progress import progress


def study_summary(root: str | os.PathLike, split: str = "train", limit: int | None = None) -> pd.DataFrame:
    """Per study: slices, rows × columns, pixel spacing, slice thickness against position spacing,
    whether file numbers run feet to head, the first file number, and the transfer syntax.

    Reads headers only (no pixel data), so it takes seconds per thousand files.
    """
    folders = sorted(p for p in (Path(root) / f"{split}_images").iterdir() if p.is_dir())[:limit]
    rows = []
    for folder in progress(folders, "headers", unit="study"):
        files = sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)
        if not files:
            continue
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        last = pydicom.dcmread(files[-1], stop_before_pixels=True)
        z_first, z_last = float(first.ImagePositionPatient[2]), float(last.ImagePositionPatient[2])
        rows.append(
            {
                "StudyInstanceUID": folder.name,
                "slices": len(files),
                "rows": int(first.Rows),
                "columns": int(first.Columns),
                "pixel_spacing": float(first.PixelSpacing[0]),
                "thickness": float(first.SliceThickness),
                "position_spacing": abs(z_first - z_last) / max(len(files) - 1, 1),
                "feet_to_head_numbering": z_first < z_last,
                "first_number": int(files[0].stem) if files[0].stem.isdigit() else -1,
                "syntax": first.file_meta.TransferSyntaxUID.name,
                "intercept": float(first.RescaleIntercept),
            }
        )
    return pd.DataFrame(rows)


def cooccurrence(train: pd.DataFrame) -> pd.DataFrame:
    """How often each pair of vertebrae is fractured in the same study (counts, C1..C7 × C1..C7)."""
    y = train[list(VERTEBRAE)].to_numpy()
    return pd.DataFrame(y.T @ y, index=list(VERTEBRAE), columns=list(VERTEBRAE))


def box_table(boxes: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Boxes with their centre as a fraction of the image, and their area in mm² (from the pixel spacing)."""
    merged = boxes.merge(
        summary[["StudyInstanceUID", "rows", "columns", "pixel_spacing"]], on="StudyInstanceUID"
    )
    merged["cx"] = (merged["x"] + merged["width"] / 2) / merged["columns"]
    merged["cy"] = (merged["y"] + merged["height"] / 2) / merged["rows"]
    merged["area_mm2"] = merged["width"] * merged["height"] * merged["pixel_spacing"] ** 2
    return merged


def fractured_per_study(train: pd.DataFrame) -> pd.Series:
    """Number of studies by how many vertebrae are fractured (0..7)."""
    return train[list(VERTEBRAE)].sum(axis=1).value_counts().reindex(range(8), fill_value=0).astype(np.int64)
