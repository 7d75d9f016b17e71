"""A synthetic RSNA 2022 competition, written in the real data's exact layout.

    python -m cspine synth --out input/synthetic --train 48 --test 6

writes ``train.csv``, ``train_bounding_boxes.csv``, ``test.csv``, ``sample_submission.csv``,
``train_images/<uid>/<n>.dcm``, ``test_images/<uid>/<n>.dcm`` and ``segmentations/<uid>.nii`` for a
subset of training studies, so every stage runs unchanged on it and on the real data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from cspine import TARGETS, VERTEBRAE
from cspine.competition import COMPLETE_MARKER, TRUTH_DIR, truth_labels_dir
from cspine.config import SynthConfig
from cspine.dicom_writer import Encoding, write_series
from cspine.phantom import T2_LABEL, PhantomConfig, render_study
from cspine.progress import progress
from cspine.runs import atomic_path, replace_folder, write_csv, write_text

log = logging.getLogger(__name__)

UID_ROOT = "1.2.826.0.1.3680043."


@dataclass(frozen=True)
class StudyFiles:
    """How one study's files are written: the scanner and file variety of the real data."""

    encoding: Encoding
    numbering: str  # "head_to_feet" or "feet_to_head"
    first_number: int
    gaps: bool  # non-contiguous file numbers
    origin: tuple[float, float, float]


def draw_study_files(rng: np.random.Generator, fov: float, reversed_fraction: float = 0.1) -> StudyFiles:
    """File variety in the real data's proportions (docs/competition.md): ~10% reversed numbering, etc."""
    syntax = rng.choice(["explicit", "rle", "j2k", "jpeg_lossless"], p=[0.4, 0.2, 0.2, 0.2])
    if rng.random() < 0.6:
        encoding = Encoding(str(syntax), signed=False, intercept=-1024.0, bits_stored=12)
    else:
        encoding = Encoding(str(syntax), signed=True, intercept=0.0, bits_stored=16)
    return StudyFiles(
        encoding=encoding,
        numbering="feet_to_head" if rng.random() < reversed_fraction else "head_to_feet",
        first_number=1 if rng.random() < 0.85 else int(rng.integers(2, 80)),
        gaps=bool(rng.random() < 0.03),
        origin=(-fov / 2 + rng.uniform(-5, 5), -fov / 2 + rng.uniform(-20, 5), rng.uniform(-60, 120)),
    )


def mask_affine(
    shape: tuple[int, int, int], origin: tuple[float, float, float], spacing: tuple[float, float, float]
) -> np.ndarray:
    """RAS affine of a mask stored as the competition's NIfTIs are: data[col, reversed row, feet→head].

    Args:
        shape: the head-to-feet volume's (N, H, W).
        origin: ImagePositionPatient (LPS, mm) of the head-most slice.
        spacing: (dz, dy, dx) in mm.
    """
    n, h, _ = shape
    dz, dy, dx = spacing
    x0, y0, z_head = origin
    return np.array(
        [
            [-dx, 0, 0, -x0],
            [0, dy, 0, -(y0 + (h - 1) * dy)],
            [0, 0, dz, z_head - (n - 1) * dz],
            [0, 0, 0, 1],
        ]
    )


def write_mask(
    path: str | os.PathLike,
    labels: np.ndarray,
    origin: tuple[float, float, float],
    spacing: tuple[float, float, float],
) -> Path:
    """Writes head-to-feet labels uint8 [N, H, W] as a NIfTI in the real segmentations' axis order."""
    data = np.ascontiguousarray(labels[::-1, ::-1, :].transpose(2, 1, 0))
    image = nib.Nifti1Image(data, mask_affine(labels.shape, origin, spacing))
    image.header.set_data_dtype(np.uint8)
    with atomic_path(path) as tmp:
        tmp.write_bytes(image.to_bytes())
    return Path(path)


def _study_uid(index: int, seed: int) -> str:
    """Competition-style UID (root + one number); the number is unique per (seed, index), no leading zero."""
    return f"{UID_ROOT}{(seed % 9000 + 1) * 100000 + index}"


def _file_numbers(files: StudyFiles, n: int, rng: np.random.Generator) -> np.ndarray:
    step = np.ones(n, dtype=int)
    if files.gaps:
        step[rng.choice(np.arange(1, n), size=max(1, n // 30), replace=False)] = 2
    numbers = files.first_number + np.concatenate([[0], np.cumsum(step[1:])])
    return numbers if files.numbering == "head_to_feet" else numbers[::-1]


def make_study(
    root: str | os.PathLike,
    split: str,
    uid: str,
    seed: tuple[int, ...],
    config: PhantomConfig,
    with_boxes: bool,
    with_mask: bool,
    reversed_fraction: float = 0.1,
) -> dict:
    """Renders and writes one study; returns its label row and box rows (for the CSVs).

    A study folder is written under a temporary name and renamed when whole, so a killed run never
    leaves a half-written study that reads as finished.
    """
    rng = np.random.default_rng(seed)
    study = render_study(rng, config)
    n, h, w = study.hu.shape
    files = draw_study_files(rng, fov=study.spacing[1] * w, reversed_fraction=reversed_fraction)
    numbers = _file_numbers(files, n, rng)
    root = Path(root)
    final = root / f"{split}_images" / uid
    partial = final.with_name(uid + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_series(
        study.hu,
        partial,
        spacing=study.spacing,
        study_uid=uid,
        encoding=files.encoding,
        origin=files.origin,
        slice_thickness=study.slice_thickness,
        file_numbers=numbers,
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    if with_mask:
        (root / "segmentations").mkdir(exist_ok=True)
        write_mask(root / "segmentations" / f"{uid}.nii", study.labels, files.origin, study.spacing)
    truth = vertebra_truth(uid, study.labels, numbers)
    write_truth_labels(root, uid, study.labels, numbers)
    fractured = set(study.fractured_levels)
    row = {"StudyInstanceUID": uid, "patient_overall": int(bool(fractured))}
    row.update({v: int(i + 1 in fractured) for i, v in enumerate(VERTEBRAE)})
    boxes = []
    if with_boxes and fractured:
        # a fractured study with boxes has at least one; at coarse resolutions a break may not pass the
        # visibility rule on any slice, and then its most-covered slices are boxed
        found = study.fracture_boxes() or study.fracture_boxes(min_coverage=0.1, min_pixels=1)
        boxes = [
            {
                "StudyInstanceUID": uid,
                "x": float(x),
                "y": float(y),
                "width": float(bw),
                "height": float(bh),
                "slice_number": int(numbers[k]),
            }
            for k, x, y, bw, bh in found
        ]
    return {"row": row, "boxes": boxes, "truth": truth, "reversed": files.numbering == "feet_to_head"}


def write_truth_labels(root: Path, uid: str, labels: np.ndarray, numbers: np.ndarray) -> None:
    """Every study's true labels (``truth/labels/<uid>.npz``: ``labels`` uint8 [N, H, W] head to feet, in the
    competition's scheme to T2; ``slice_numbers`` of those slices), for scoring a segmentation on every
    study (`cspine.competition.read_truth_labels`), not only the masked ones."""
    path = truth_labels_dir(root) / f"{uid}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, labels=labels.astype(np.uint8), slice_numbers=np.asarray(numbers, np.int64))


def vertebra_truth(uid: str, labels: np.ndarray, numbers: np.ndarray) -> list[dict]:
    """One row per slice: its file's slice_number, which of C1..C7 it shows, and its level.

    ``level`` is the vertebra with the most voxels on the slice (1..7 = C1..C7, 8 = T1, 9 = T2, 0 = none).
    """
    counts = np.stack([(labels == k).sum(axis=(1, 2)) for k in range(1, T2_LABEL + 1)], axis=1)
    level = np.where(counts.max(axis=1) > 0, counts.argmax(axis=1) + 1, 0)
    return [
        {
            "StudyInstanceUID": uid,
            "slice_number": int(numbers[k]),
            "level": int(level[k]),
            **{v: int(counts[k, i] > 0) for i, v in enumerate(VERTEBRAE)},
        }
        for k in range(len(labels))
    ]


def _make_study_star(kwargs: dict) -> dict:
    return make_study(**kwargs)


def _study_jobs(root: Path, synth: SynthConfig) -> list[dict]:
    """`make_study`'s arguments for every study, train then test: which have boxes and masks (the real data's
    shares, drawn before the fractures) and each one's seed."""
    n_train = synth.n_train
    config = PhantomConfig(
        image_size=synth.image_size,
        n_slices=synth.n_slices or None,
        slice_range=tuple(synth.slice_range),
        head_mm=tuple(synth.head_mm) or None,
        difficulty=synth.difficulty,
    )
    plan_rng = np.random.default_rng([synth.seed, 1])
    boxed = plan_rng.random(n_train) < synth.box_fraction
    masked = set(
        plan_rng.choice(
            n_train, min(n_train, max(synth.min_masks, round(synth.mask_fraction * n_train))), replace=False
        ).tolist()
    )
    return [
        dict(
            root=root,
            split="train" if i < n_train else "test",
            uid=_study_uid(i, synth.seed),
            seed=(synth.seed, 2, i),
            config=config,
            with_boxes=i < n_train and bool(boxed[i]),
            with_mask=i in masked,
            reversed_fraction=synth.reversed_fraction,
        )
        for i in range(n_train + synth.n_test)
    ]


def _write_tables(root: Path, results: list[dict], test_uids: list[str], n_train: int) -> pd.DataFrame:
    """The competition's tables (train.csv, the boxes, test.csv, the sample submission) and the truth beside
    them (every slice's vertebrae, every study's labels); returns train.csv's frame."""
    train = pd.DataFrame([r["row"] for r in results[:n_train]], columns=["StudyInstanceUID", *TARGETS])
    write_csv(train, root / "train.csv")
    boxes = pd.DataFrame(
        [b for r in results[:n_train] for b in r["boxes"]],
        columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"],
    )
    write_csv(boxes, root / "train_bounding_boxes.csv")
    types = [*VERTEBRAE, "patient_overall"]
    test = pd.DataFrame(
        [
            {"row_id": f"{uid}_{t}", "StudyInstanceUID": uid, "prediction_type": t}
            for uid in test_uids
            for t in types
        ],
        columns=["row_id", "StudyInstanceUID", "prediction_type"],
    )
    write_csv(test, root / "test.csv")
    write_csv(pd.DataFrame({"row_id": test["row_id"], "fractured": 0.5}), root / "sample_submission.csv")
    truth = pd.DataFrame(
        [t for r in results for t in r["truth"]],
        columns=["StudyInstanceUID", "slice_number", "level", *VERTEBRAE],
    )
    write_csv(truth, root / TRUTH_DIR / "vertebrae.csv")  # outside the competition layout: evaluation only
    # every study's labels, the test studies' too (`python -m cspine holdout` scores against them)
    labels = pd.DataFrame([r["row"] for r in results], columns=["StudyInstanceUID", *TARGETS])
    write_csv(labels, root / TRUTH_DIR / "labels.csv")
    return train


def make_competition(
    out_dir: str | os.PathLike,
    synth: SynthConfig | None = None,
    workers: int = 1,
) -> Path:
    """Writes a synthetic competition in the real layout and returns its root.

    Args:
        out_dir: the competition root (created).
        synth: what to generate (`cspine.config.SynthConfig`, the one source of the settings and their
            defaults): the studies, the seed everything is a function of, the image size, the difficulty,
            the real data's shares of boxes and masks, the slices a study (0 draws them from ``slice_range``), the share of reversed studies.
        workers: processes; the output is identical for any number.
    """
    synth = synth or SynthConfig()
    final = Path(out_dir)
    check_synthetic_folder(final)
    root = final.with_name(final.name + ".part")  # written whole, then put in place of the old one
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("train_images", "test_images"):
        (root / sub).mkdir(parents=True)
    jobs = _study_jobs(root, synth)
    bar = dict(total=len(jobs), desc="synthetic studies", unit="study")
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(progress(pool.map(_make_study_star, jobs), **bar))
    else:
        results = [make_study(**job) for job in progress(jobs, **bar)]
    train = _write_tables(root, results, [job["uid"] for job in jobs[synth.n_train :]], synth.n_train)
    # written last: the folder is whole
    write_text(root / COMPLETE_MARKER, json.dumps(dataclasses.asdict(synth), indent=1) + "\n")
    replace_folder(root, final)
    log.info(
        "synthetic competition at %s: %d train (%d positive, %d reversed), %d test",
        final,
        synth.n_train,
        int(train["patient_overall"].sum()),
        sum(r["reversed"] for r in results[: synth.n_train]),
        synth.n_test,
    )
    return final


# what a synthetic competition holds: a folder with anything else is not one, and is never written over
SYNTHETIC_NAMES = frozenset(
    {
        "train_images",
        "test_images",
        "segmentations",
        "train.csv",
        "train_bounding_boxes.csv",
        "test.csv",
        "sample_submission.csv",
        TRUTH_DIR,
        COMPLETE_MARKER,
    }
)


def check_synthetic_folder(root: Path) -> None:
    """Refuses to write a synthetic competition over a folder that holds something else: the real data (a
    ``train.csv`` without the synthetic marker), a run folder, anything not `SYNTHETIC_NAMES`. An empty
    folder, a finished synthetic competition, or one interrupted before its tables are replaced whole.

    Raises:
        FileExistsError: naming the folder and what it holds.
    """
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if not names or (root / COMPLETE_MARKER).is_file():
        return
    others = [n for n in names if n not in SYNTHETIC_NAMES]
    if others or (root / "train.csv").exists():
        raise FileExistsError(
            f"{root} is not a synthetic competition (it holds {', '.join((others or names)[:4])}"
            f"{', …' if len(others or names) > 4 else ''}); a synthetic one is written only into a new "
            "or empty folder, or over one written before: choose another --out"
        )


def synthetic_settings(root: str | os.PathLike) -> dict | None:
    """The `synth` settings a finished synthetic competition was made with (None: unknown)."""
    try:
        return json.loads((Path(root) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
