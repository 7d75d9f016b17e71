"""Slice labels for every fractured study, not only the quarter with boxes (``slice.labels="vertebrae"``).

In the real data 235 of 961 fractured studies have boxes; the others say only which vertebrae are broken.
With the vertebrae of each slice known (a study's own segmentation, else the `segment` stage's), a slice
of a fractured study is labelled positive where it shows a vertebra that train.csv says is fractured.
Boxes stay the label where a study has them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cspine import VERTEBRAE
from cspine.prepare import UNKNOWN


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
