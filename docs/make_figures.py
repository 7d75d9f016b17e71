"""Regenerates the README's figures from a finished run (default: the demo's), with the kit's own code.

python docs/make_figures.py [--run runs/demo]
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from cspine.competition import read_boxes  # noqa: E402
from cspine.dicom import load_series  # noqa: E402
from cspine.explain import explain_fold  # noqa: E402
from cspine.runs import Run  # noqa: E402
from cspine.viz import counting_figure, plot_window_functions, show_crop_steps, show_windows  # noqa: E402

DOCS = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    data_dir = Path((args.run / "data_dir.txt").read_text().strip())
    boxes = read_boxes(data_dir)
    uid = boxes["StudyInstanceUID"].iloc[0]
    series = load_series(data_dir / "train_images" / uid)
    k = list(series.slice_numbers).index(
        int(boxes.loc[boxes["StudyInstanceUID"] == uid, "slice_number"].median())
    )
    plot_window_functions().savefig(DOCS / "windows.png", dpi=110)
    show_windows(series.hu[k]).savefig(DOCS / "windows_slice.png", dpi=90)
    show_crop_steps(series.hu[k]).savefig(DOCS / "crop.png", dpi=90)
    cams = explain_fold(args.run, 0, data_dir, n=1)
    if cams:
        shutil.copy(cams[0], DOCS / "gradcam.png")
    counting(Run(args.run), data_dir).savefig(DOCS / "counting.png", dpi=90)
    shutil.copy(Run(args.run).report / "roc.png", DOCS / "roc.png")
    shutil.copy(Run(args.run).report / "vertebrae.png", DOCS / "vertebrae.png")
    shutil.copy(Run(args.run).report / "calibration.png", DOCS / "calibration.png")
    print("figures written to", DOCS)


def counting(run: Run, data_dir: Path):
    """The long scan whose labels counting changed most: its truth, the fold models' own labels, and the
    labels counted between its discs (`cspine.segmenter.count_levels`), at its middle sagittal plane."""
    import dataclasses

    import numpy as np
    import pandas as pd
    import torch

    from cspine.cache import load_study_images
    from cspine.checkpoints import load_segmenter
    from cspine.competition import THORACIC
    from cspine.scoring import study_truth_labels
    from cspine.segment import slice_spacing
    from cspine.segmenter import load_labels, plane_labels, plane_probabilities

    loaded = [load_segmenter(path) for path in run.seg_models()]
    models, how = [m for m, _ in loaded], loaded[0][1].reading
    masked = set(pd.read_csv(run.seg_file("dice.csv"), dtype={"StudyInstanceUID": str})["StudyInstanceUID"])
    best = None
    for uid in run.cache.read_index()["StudyInstanceUID"].unique():
        counted = load_labels(run.seg_labels(uid))
        truth = study_truth_labels(run, data_dir, uid, counted.shape[1])
        if uid in masked or truth is None or truth.max() <= THORACIC:
            continue
        truth = np.minimum(truth, THORACIC)  # the segmentation's one thoracic class
        images, dz = np.asarray(load_study_images(run.cache.root, uid)), slice_spacing(run, uid)
        probs = plane_probabilities(models, images, dz, how, torch.device("cpu"))
        own = plane_labels(probs, dz, dataclasses.replace(how, count=False))[0]
        changed = float((own != counted)[truth > 0].mean())
        if best is None or changed > best[0]:
            best = (changed, uid, images, truth, own, counted)
    _, uid, images, truth, own, counted = best
    x = int(np.median(np.nonzero(truth)[2]))
    return counting_figure(
        images[:, :, x],
        {
            "the truth": truth[:, :, x],
            "the network's own": own[:, :, x],
            "counted between the discs": counted[:, :, x],
        },
        f"{uid}: a scan reaching T2, one of the demo's studies without a mask",
    )


if __name__ == "__main__":
    main()
