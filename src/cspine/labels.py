"""Per-slice labels: from boxes, from masks, and, for every fractured study, from its vertebrae.

`slice_labels` reads a study's boxes onto its slices, `vertebra_presence` a mask's vertebrae, and
`slice_targets` turns them and train.csv's row into what `prepare` caches (UNKNOWN where the data cannot
tell). Then, with ``slice.labels="vertebrae"``, `vertebra_slice_labels` fills the unknown ones:

In the real data 235 of 961 fractured studies have boxes; the others say only which vertebrae are broken.
With the vertebrae of each slice known (a study's own segmentation, else the `segment` stage's), a slice
of a fractured study is labelled positive where it shows a vertebra that train.csv says is fractured.
Boxes stay the label where a study has them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from cspine import VERTEBRAE

UNKNOWN = -1  # a label that the data cannot give (no boxes, or no mask, for that study)


def vertebra_slice_labels(index: pd.DataFrame, labels: pd.DataFrame, vertebrae: pd.DataFrame) -> pd.DataFrame:
    """The cache index with every unknown fracture label filled from the slices' vertebrae.

    Args:
        index: the cache's index (``label``, ``C*_present``, ``C*_fracture``; UNKNOWN where not known).
        labels: train.csv, indexed by StudyInstanceUID.
        vertebrae: per slice (StudyInstanceUID, order) which of C1..C7 it shows, as `segment` writes it;
            a study's own segmentation (``C*_present`` in the index) wins where it has one.

    Returns:
        A copy of ``index``: ``C*_fracture`` = the vertebra is on the slice and fractured in the study,
        wherever it was unknown; ``label`` = any of them, where the slice label was unknown. Presence
        columns are left as they were (the CNN's presence heads learn from true masks only).
    """
    out = index.copy()
    predicted = vertebrae.set_index(["StudyInstanceUID", "order"])[list(VERTEBRAE)]
    keys = pd.MultiIndex.from_frame(out[["StudyInstanceUID", "order"]])
    shown = predicted.reindex(keys).to_numpy(dtype=float)  # NaN: the slice was not segmented
    true = out[[f"{v}_present" for v in VERTEBRAE]].to_numpy()
    present = np.where(true != UNKNOWN, true, shown)
    fractured = labels.loc[out["StudyInstanceUID"], list(VERTEBRAE)].to_numpy()
    known = ~np.isnan(present)
    fracture = np.where(known, (np.nan_to_num(present) > 0) & (fractured > 0), UNKNOWN).astype(int)
    columns = [f"{v}_fracture" for v in VERTEBRAE]
    old = out[columns].to_numpy()
    out[columns] = np.where(old == UNKNOWN, fracture, old)
    fill = (out["label"].to_numpy() == UNKNOWN) & known.all(axis=1)
    out.loc[fill, "label"] = (fracture[fill] == 1).any(axis=1).astype(int)
    return out


def slice_labels(slice_numbers: np.ndarray, boxes: pd.DataFrame, uid: str | None = None) -> np.ndarray:
    """Slice fracture labels in series order: 1 where a box lies on the slice's file number.

    Args:
        slice_numbers: int [N], the file number of each slice in head-to-feet order (`Series.slice_numbers`).
        boxes: box rows (of one study, or all studies with ``uid`` given).
        uid: select this study's boxes.

    Returns:
        uint8 [N]. Boxes on file numbers that are not in the series are reported, not silently dropped.
    """
    if uid is not None:
        boxes = boxes[boxes["StudyInstanceUID"] == uid]
    numbers = np.asarray(slice_numbers)
    boxed = boxes["slice_number"].astype(int).unique()
    unknown = np.setdiff1d(boxed, numbers)
    if len(unknown):
        warnings.warn(
            f"study {uid}: {len(unknown)} boxes name slice numbers absent from the series "
            f"({unknown[:5].tolist()})",
            stacklevel=2,
        )
    return np.isin(numbers, boxed).astype(np.uint8)


def vertebra_presence(mask: np.ndarray) -> np.ndarray:
    """uint8 [N, 7]: whether each of C1..C7 appears on each slice of an aligned mask."""
    return np.stack([(mask == level).any(axis=(1, 2)) for level in range(1, 8)], axis=1).astype(np.uint8)


def slice_targets(
    labels: dict | None, slice_label: np.ndarray, presence: np.ndarray | None, has_boxes: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice slice label and per-vertebra fracture labels, UNKNOWN where the data cannot tell."""
    n = len(slice_label)
    if labels is None:
        return np.full(n, UNKNOWN), np.full((n, 7), UNKNOWN)
    fractured = np.array([labels[v] for v in VERTEBRAE], dtype=int)
    if labels["patient_overall"] == 0:
        return np.zeros(n, int), np.zeros((n, 7), int)
    if not has_boxes:
        return np.full(n, UNKNOWN), np.full((n, 7), UNKNOWN)
    label = slice_label.astype(int)
    if presence is not None:
        return label, (label[:, None] & presence.astype(int) & fractured[None, :]).astype(int)
    if fractured.sum() == 1:  # one fractured vertebra: every fractured slice is that vertebra's
        return label, label[:, None] * fractured[None, :]
    return label, np.where(label[:, None] == 1, UNKNOWN, 0) * np.ones((1, 7), int)
