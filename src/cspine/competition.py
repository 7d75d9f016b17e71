"""The competition's data contract: where the data is, its CSVs checked, labels per slice, masks, folds.

Every reader raises `DataError` (a ValueError) naming the file, the column and the bad rows, so a wrong
path or a hand-edited CSV fails at once and says where.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from cspine import TARGETS, VERTEBRAE
from cspine.dicom import Series
from cspine.runs import write_csv

log = logging.getLogger(__name__)

COMPETITION = "rsna-2022-cervical-spine-fracture-detection"
DATA_ENV = "CSPINE_DATA"
TRAIN_COLUMNS = ["StudyInstanceUID", *TARGETS]
BOX_COLUMNS = ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
TEST_COLUMNS = ["row_id", "StudyInstanceUID", "prediction_type"]
MASK_OUTSIDE_TOLERANCE = 0.01  # share of series voxels allowed to fall outside the mask volume
THORACIC = 8  # the one label the kit keeps for every thoracic vertebra (the masks' T1..T12 are 8..19)
MASK_LABELS = 19  # the competition's masks: 0 background, 1..7 C1..C7, 8..19 T1..T12


COMPLETE_MARKER = ".complete"  # a synthetic competition's mark, written last (`cspine.synthetic`)
# a synthetic competition's folder of answers: the true vertebra of every slice; no training code may read it
# (a test audits this)
TRUTH_DIR = "truth"


def is_complete(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a synthetic competition that `cspine.synthetic.make_competition` finished."""
    return (Path(root) / COMPLETE_MARKER).is_file()


class DataError(ValueError):
    """Competition data that is missing or malformed; the message names the file and the rows."""


def candidate_data_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Where competition data is looked for, in order."""
    paths = []
    if explicit:
        paths.append(Path(explicit))
    if os.environ.get(DATA_ENV):
        paths.append(Path(os.environ[DATA_ENV]))
    paths += [
        Path("input") / COMPETITION,
        Path("/kaggle/input") / COMPETITION,
        Path("/kaggle/input/competitions") / COMPETITION,
    ]
    return paths


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The competition root: an explicit path, then $CSPINE_DATA, then ./input/<competition>, then Kaggle's.

    Raises:
        DataError: listing every path tried, when none holds train.csv or test.csv.
    """
    tried = candidate_data_dirs(explicit)
    if explicit:
        tried = tried[:1]  # a path the user named must be right, not silently replaced
    for path in tried:
        if (path / "train.csv").is_file() or (path / "test.csv").is_file():
            return path
    raise DataError(
        "no competition data (train.csv or test.csv) found; tried: " + ", ".join(str(p) for p in tried)
    )


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype={"StudyInstanceUID": str, "row_id": str, "prediction_type": str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; expected columns {columns}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV table ({str(exc).splitlines()[0]})") from None
    missing = [c for c in columns if c not in df.columns]
    extra = [c for c in df.columns if c not in columns]
    if missing or extra:
        raise DataError(f"{path}: expected columns {columns}; missing {missing}, unexpected {extra}")
    return df


def _bad_rows(path: Path, column: str, mask: pd.Series, what: str) -> None:
    if mask.any():
        rows = [int(i) for i in np.flatnonzero(mask.to_numpy())[:10]]
        raise DataError(f"{path}: column {column!r} {what} in {int(mask.sum())} rows (first rows: {rows})")


def read_train(root: str | os.PathLike) -> pd.DataFrame:
    """train.csv, checked: the 9 columns, unique studies, 0/1 labels, patient_overall = max(C1..C7)."""
    path = Path(root) / "train.csv"
    df = _read_csv(path, TRAIN_COLUMNS)
    _bad_rows(path, "StudyInstanceUID", df["StudyInstanceUID"].duplicated(), "repeats a study")
    for col in TARGETS:
        _bad_rows(path, col, ~df[col].isin([0, 1]), "is not 0/1")
    df[list(TARGETS)] = df[list(TARGETS)].astype(int)
    _bad_rows(
        path,
        "patient_overall",
        df["patient_overall"] != df[list(VERTEBRAE)].max(axis=1),
        "differs from the max of C1..C7",
    )
    return df


def read_boxes(root: str | os.PathLike, train: pd.DataFrame | None = None) -> pd.DataFrame:
    """train_bounding_boxes.csv, checked; an absent file is an empty table (a test-only root)."""
    path = Path(root) / "train_bounding_boxes.csv"
    if not path.is_file():
        return pd.DataFrame(columns=BOX_COLUMNS)
    df = _read_csv(path, BOX_COLUMNS)
    for col in ("x", "y", "width", "height", "slice_number"):
        _bad_rows(path, col, ~pd.to_numeric(df[col], errors="coerce").notna(), "is not a number")
    _bad_rows(path, "width", df["width"] <= 0, "is not positive")
    _bad_rows(path, "height", df["height"] <= 0, "is not positive")
    df["slice_number"] = df["slice_number"].astype(int)
    if train is not None:
        _bad_rows(
            path,
            "StudyInstanceUID",
            ~df["StudyInstanceUID"].isin(train["StudyInstanceUID"]),
            "names a study not in train.csv",
        )
        positive = set(train.loc[train["patient_overall"] == 1, "StudyInstanceUID"])
        _bad_rows(
            path,
            "StudyInstanceUID",
            ~df["StudyInstanceUID"].isin(positive),
            "names a study without a fracture in train.csv",
        )
    return df


def read_test(root: str | os.PathLike) -> pd.DataFrame:
    """test.csv, checked: row_id = <uid>_<prediction_type>, prediction_type one of the 8 targets."""
    path = Path(root) / "test.csv"
    df = _read_csv(path, TEST_COLUMNS)
    _bad_rows(path, "prediction_type", ~df["prediction_type"].isin(TARGETS), f"is not one of {TARGETS}")
    _bad_rows(
        path,
        "row_id",
        df["row_id"] != df["StudyInstanceUID"] + "_" + df["prediction_type"],
        "is not <StudyInstanceUID>_<prediction_type>",
    )
    _bad_rows(path, "row_id", df["row_id"].duplicated(), "repeats a row")
    return df


def list_test_studies(root: str | os.PathLike, test: pd.DataFrame | None = None) -> list[str]:
    """Test studies to predict: those listed in test.csv and present in test_images/.

    The public test lists studies that are not in its test_images/ (they get the prior); studies present
    but unlisted are not scored. Both are logged.
    """
    root = Path(root)
    test = read_test(root) if test is None else test
    listed = list(dict.fromkeys(test["StudyInstanceUID"]))
    images = root / "test_images"
    present = {p.name for p in images.iterdir() if p.is_dir()} if images.is_dir() else set()
    absent = [uid for uid in listed if uid not in present]
    if absent:
        log.warning(
            "%d of %d studies in test.csv have no folder in %s (they get the prior): %s",
            len(absent),
            len(listed),
            images,
            ", ".join(absent[:5]) + (" …" if len(absent) > 5 else ""),
        )
    unlisted = sorted(present - set(listed))
    if unlisted:
        log.info("%d studies in %s are not in test.csv and are not predicted", len(unlisted), images)
    return [uid for uid in listed if uid in present]


def truth_labels_dir(data_dir: str | os.PathLike) -> Path:
    """Where a synthetic competition keeps every study's true labels (``<uid>.npz``; evaluation only)."""
    return Path(data_dir) / TRUTH_DIR / "labels"


def read_truth_labels(data_dir: str | os.PathLike, uid: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A synthetic study's true labels (``truth/labels/<uid>.npz``, evaluation only): uint8 [N, H, W] head to
    feet in the competition's scheme, and each slice's slice_number; None where the data has none (the real
    competition)."""
    path = truth_labels_dir(data_dir) / f"{uid}.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        return data["labels"], data["slice_numbers"]


def find_mask(data_dir: str | os.PathLike, uid: str) -> Path | None:
    """A study's segmentation, ``segmentations/<uid>.nii`` as the competition ships it, or ``.nii.gz``."""
    for suffix in (".nii", ".nii.gz"):
        path = Path(data_dir) / "segmentations" / f"{uid}{suffix}"
        if path.is_file():
            return path
    return None


def mask_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """uint8 labels of a raw mask volume: 0 background, 1..7 C1..C7, and every thoracic vertebra (the
    competition's 8..19, T1..T12) as one class, `THORACIC`.

    The segmenter learns where C7 ends, not which thoracic vertebra follows; one class keeps that and the
    segmenter small. Labels stored as floats are rounded (a cast would turn 0.9999 into 0).

    Raises:
        DataError: labels that are not whole numbers, negative, or beyond T12, naming the file and values.
    """
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            raise DataError(f"{path}: the mask holds NaN or infinite labels")
        rounded = np.rint(data)
        off = np.abs(data - rounded).max() if data.size else 0.0
        if off > 0.01:
            raise DataError(
                f"{path}: mask labels are not whole numbers (one is {off:.3f} away from the nearest)"
            )
        data = rounded
    # the range first, on the data as stored: a 512² × 350 mask is 92 MB as uint8 and 734 MB as int64
    if data.size and (data.min() < 0 or data.max() > MASK_LABELS):
        bad = np.unique(data[(data < 0) | (data > MASK_LABELS)])
        raise DataError(
            f"{path}: mask labels {bad[:5].astype(np.int64).tolist()} are outside 0..{MASK_LABELS} "
            "(background, C1..C7 as 1..7, T1..T12 as 8..19)"
        )
    labels = data.astype(np.uint8)
    return np.minimum(labels, THORACIC, out=labels)


def check_mask_order(mask: np.ndarray, path: Path) -> None:
    """Raises DataError when an aligned mask (head to feet) puts C7 above C1: flipped, or another scheme."""
    levels = [np.flatnonzero((mask == k).any(axis=(1, 2))) for k in (1, 7)]
    if all(len(z) for z in levels) and levels[0].mean() > levels[1].mean():
        raise DataError(
            f"{path}: C1 lies below C7 once aligned with its series (head to feet): the mask is "
            "flipped or labels the vertebrae another way"
        )


def read_mask(nii_path: str | os.PathLike, series: Series) -> np.ndarray:
    """A NIfTI label volume resampled voxel for voxel onto ``series.hu`` (head to feet).

    Each series voxel's patient position (from ImagePositionPatient, ImageOrientationPatient and
    PixelSpacing) goes through the inverse of the NIfTI affine to the nearest mask voxel. No axis flip is
    assumed, so studies numbered feet to head and masks written by other tools align alike.

    Returns:
        uint8 [N, H, W] labels (1..7 = C1..C7, 8 = thoracic, 0 = background; `mask_labels`).

    Raises:
        DataError: the series lacks positions, more than 1% of its voxels fall outside the mask, labels
            outside the competition's scheme, or C7 above C1 once aligned.
    """
    nii_path = Path(nii_path)
    try:
        image = nib.load(nii_path)
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise DataError(f"{nii_path}: cannot read the NIfTI mask ({type(exc).__name__}: {exc})") from None
    if data.ndim != 3:
        raise DataError(f"{nii_path}: mask has {data.ndim} dimensions, expected 3")
    data = mask_labels(data, nii_path)
    if np.isnan(series.positions).any():
        raise DataError(f"{nii_path}: series {series.uid} has no ImagePositionPatient; cannot align the mask")
    n, h, w = series.hu.shape
    _, dy, dx = series.spacing
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    to_voxel = np.linalg.inv(image.affine)
    m, t = to_voxel[:3, :3] @ lps_to_ras, to_voxel[:3, 3]
    step_col = m @ (series.orientation[:3] * dx)  # moving one column along a row
    step_row = m @ (series.orientation[3:] * dy)  # moving one row down a column
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((n, h, w), np.uint8)
    outside = 0
    shape = np.array(data.shape)
    for k in range(n):
        base = m @ series.positions[k] + t
        idx = [base[a] + cols * step_col[a] + rows * step_row[a] for a in range(3)]
        idx = [np.rint(i).astype(np.int64) for i in idx]
        inside = np.ones((h, w), bool)
        for a in range(3):
            inside &= (idx[a] >= 0) & (idx[a] < shape[a])
        outside += int((~inside).sum())
        out[k][inside] = data[idx[0][inside], idx[1][inside], idx[2][inside]]
    if outside > MASK_OUTSIDE_TOLERANCE * out.size:
        raise DataError(
            f"{nii_path}: mask extent {tuple(data.shape)} does not match series {series.uid} "
            f"{(n, h, w)}: {outside / out.size:.0%} of its voxels fall outside the mask"
        )
    check_mask_order(out, nii_path)
    return out


def select_studies(
    train: pd.DataFrame, data_dir: str | os.PathLike, studies: float = 0, study_list: str = "", seed: int = 42
) -> pd.DataFrame:
    """The training studies a run uses: all, a listed set, or a stratified subset (``prepare.studies``).

    Args:
        train: train.csv's rows.
        data_dir: the competition folder (its ``segmentations/`` decides which studies are always kept).
        studies: 0 = all; a number >= 1 = that many studies; below 1 = that share of them.
        study_list: a file of StudyInstanceUIDs (one per line, or a CSV with that column); applied first.
        seed: the draw's seed (the folds' seed: the same subset every time).

    Every study with a segmentation stays in the subset; the others are drawn stratified on the eight
    targets, so the fracture shares, and so the folds, stay those of the whole set.

    Raises:
        DataError: a list naming studies train.csv lacks, or a size that is not a count or a share.
    """
    if study_list:
        path = Path(study_list)
        if not path.is_file():
            raise DataError(f"prepare.study_list: {path} not found")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        header = lines[0].split(",") if lines else []
        listed = (
            pd.read_csv(path, dtype=str)["StudyInstanceUID"].tolist()
            if "StudyInstanceUID" in header
            else lines
        )
        if not listed:
            raise DataError(
                f"prepare.study_list: {path} lists no study (one StudyInstanceUID a line, or a CSV "
                "with that column)"
            )
        unknown = sorted(set(listed) - set(train["StudyInstanceUID"]))
        if unknown:
            raise DataError(f"{path}: {len(unknown)} studies are not in train.csv (first: {unknown[:3]})")
        train = train[train["StudyInstanceUID"].isin(listed)]
    if studies < 0 or (studies >= 1 and not float(studies).is_integer()):
        raise DataError(f"prepare.studies={studies}: give a count (>= 1), a share (< 1), or 0 for all")
    n = int(studies) if studies >= 1 else round(studies * len(train)) if studies > 0 else len(train)
    if n >= len(train):
        return train.reset_index(drop=True)
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    kept = train["StudyInstanceUID"].map(lambda u: find_mask(data_dir, u) is not None).to_numpy(bool)
    rest = train[~kept]
    take = n - int(kept.sum())
    chosen = np.zeros(len(rest), bool)
    if take >= len(rest):
        chosen[:] = True
    elif take > 0:
        splitter = MultilabelStratifiedShuffleSplit(
            n_splits=1, train_size=take, test_size=len(rest) - take, random_state=seed
        )
        picked, _ = next(splitter.split(np.zeros(len(rest)), rest[list(TARGETS)].to_numpy()))
        chosen[picked] = True
    keep = set(train.loc[kept, "StudyInstanceUID"]) | set(rest.loc[chosen, "StudyInstanceUID"])
    return train[train["StudyInstanceUID"].isin(keep)].reset_index(drop=True)


def make_folds(train: pd.DataFrame, n_splits: int = 5, seed: int = 42, attempts: int = 16) -> pd.DataFrame:
    """Study-level folds, multilabel-stratified on all 8 targets together; deterministic for a seed.

    Iterative stratification balances the rare labels first and can leave the common patient_overall a few
    points off; of ``attempts`` seeded splits, the one whose worst per-fold prevalence gap is smallest wins.

    Returns:
        A frame of StudyInstanceUID and fold (0..n_splits-1), in train.csv's order.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    if len(train) < n_splits:
        raise DataError(f"{len(train)} training studies cannot make {n_splits} folds")
    labels = train[list(TARGETS)].to_numpy()
    best, best_gap = None, np.inf
    for attempt in np.random.default_rng(seed).integers(0, 2**31 - 1, size=attempts):
        folds = np.full(len(train), -1, dtype=int)
        splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=int(attempt))
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(train)), labels)):
            folds[held_out] = fold
        gap = max(
            np.abs(labels[folds == f].mean(axis=0) - labels.mean(axis=0)).max() for f in range(n_splits)
        )
        if gap < best_gap:
            best, best_gap = folds, gap
    return pd.DataFrame({"StudyInstanceUID": train["StudyInstanceUID"].to_numpy(), "fold": best})


def write_folds(folds: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Writes folds.csv (commit it: CV scores are comparable across forks only on the same folds)."""
    return write_csv(folds, path)
