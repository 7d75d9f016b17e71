"""A study shaped like the real ones, for the benchmarks: 512², ~350 slices, real CT noise.

The phantom's slices are smoother than real CT, so they compress further and decode faster than the
competition's files. Here every slice is the real GE CT slice of the test fixtures (tests/fixtures) (`CTImage.dcm`),
shifted by one more pixel each time: a JPEG Lossless file of it is 194 KB, as the fixture's own (199 KB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cspine.dicom import read_hu
from cspine.dicom_writer import Encoding, write_series

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ct-transfer-syntaxes" / "CTImage.dcm"
REAL_MEAN_SLICES = 352  # 711,600 slices over 2,019 training studies
REAL_SPACING_MM = (0.8, 0.35, 0.35)  # (dz, dy, dx): typical of the competition's scans (0.5-1 mm slices)


def write_real_shaped_study(
    folder: Path, slices: int = REAL_MEAN_SLICES, syntax: str = "jpeg_lossless"
) -> Path:
    """Writes the study to ``folder`` (one file a slice, head first) in ``syntax``; returns the folder."""
    hu = read_hu(FIXTURE)
    volume = np.stack([np.roll(hu, k, axis=1) for k in range(slices)])
    write_series(
        volume,
        folder,
        spacing=REAL_SPACING_MM,
        study_uid="1.2.826.0.1.3680043.99997",
        encoding=Encoding(syntax, signed=True, intercept=-1024.0),
    )
    return folder
