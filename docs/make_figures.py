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
from cspine.viz import plot_window_functions, show_crop_steps, show_windows  # noqa: E402

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
    shutil.copy(Run(args.run).report / "roc.png", DOCS / "roc.png")
    shutil.copy(Run(args.run).report / "vertebrae.png", DOCS / "vertebrae.png")
    shutil.copy(Run(args.run).report / "calibration.png", DOCS / "calibration.png")
    print("figures written to", DOCS)


if __name__ == "__main__":
    main()
