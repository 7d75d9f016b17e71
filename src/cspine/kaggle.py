"""`python -m cspine package-kaggle`: a folder to upload as a Kaggle dataset for offline inference.

    python -m cspine package-kaggle --config configs/paper.yaml --models runs/paper --out kaggle_package

The folder holds ``wheels/`` (cspine, and the inference dependencies Kaggle's image lacks or has too old
with theirs, for Python 3.11 manylinux), ``models/`` (every fold's slice CNN and BLSTMs, the resolved config, the
training prior) and ``kaggle_inference.py``, the notebook cell that installs offline and writes
``/kaggle/working/submission.csv``. Nothing is downloaded at inference time.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cspine.checkpoints import load_sequence_model, load_slice_model, load_vertebra_model
from cspine.config import Config, save_config
from cspine.runs import Run, write_text
from cspine.segmenter import load_segmenter

log = logging.getLogger(__name__)

# What inference imports beyond Kaggle's image (torch, timm, numpy, pandas, scikit-learn, matplotlib are
# there). Downloaded with their own dependencies; cspine itself installs with --no-deps, so training-only
# packages (albumentations, iterative-stratification, grad-cam, python-gdcm) are never needed offline: the
# predict path imports none of them (a test checks).
INFERENCE_REQUIREMENTS = ["pydicom>=3.0", "pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1", "pylibjpeg-openjpeg>=2.3",
                          "pylibjpeg-rle>=2.0", "dicomsdl>=0.109", "opencv-python-headless>=4.8", "nibabel>=5.0",
                          "tabulate>=0.9", "pyyaml>=6.0", "segmentation-models-pytorch>=0.6"]
MARKER = ".cspine-bundle"  # written into every bundle folder: only a folder holding it is ever replaced

INFERENCE_SCRIPT = '''"""Kaggle notebook cell (internet off): install cspine from this dataset, write the submission."""
import os, subprocess, sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent if "__file__" in globals() else Path("/kaggle/input/{dataset}")
os.environ.update(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")  # no network call, ever
pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(BUNDLE / "wheels")]
subprocess.run(pip + ["--no-deps", "cspine"], check=True)
subprocess.run(pip + {requirements!r}, check=True)
subprocess.run([sys.executable, "-m", "cspine", "predict", "--config", str(BUNDLE / "models" / "config.yaml"),
                "--models", str(BUNDLE / "models"), "--out", "/kaggle/working/submission.csv"], check=True)
'''


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies within it."""
    return path == folder or folder in path.parents


def check_bundle_folder(out: Path, models_dir: Path) -> None:
    """Refuses a bundle folder whose replacement would destroy something else.

    Raises:
        FileExistsError: ``out`` holds (or is) the models being bundled, the repository or the working
            directory, or is a non-empty folder that `package_kaggle` did not create (no `MARKER` in it).
    """
    target = out.resolve()
    repo = Path(__file__).resolve().parents[2]
    for what, folder in (("the models being bundled", models_dir.resolve()), ("the working directory", Path.cwd()),
                         ("the cspine repository", repo)):
        if _inside(folder, target):
            raise FileExistsError(f"--out {out} holds {what} ({folder}); choose another bundle folder")
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MARKER).is_file())):
        raise FileExistsError(f"--out {out} exists and is not a cspine bundle (no {MARKER} in it); "
                              "choose an empty or new folder")


def _verified_checkpoints(models: Run, hidden: int) -> tuple[list[Path], list[Path]]:
    """Every checkpoint `predict` reads (slice CNNs, BLSTMs, and the vertebra track's models with their
    segmentation models), each loaded once to prove it is whole; returns (slice CNNs, the others)."""
    checkpoints, blstms = list(models.slice_checkpoints().values()), models.blstm_checkpoints(hidden)
    if not checkpoints or not blstms:
        raise FileNotFoundError(f"no trained models under {models.root}: train them first (python -m cspine run)")
    vertebra = models.vert_models()
    segmenters = models.seg_models() if vertebra else []
    for path in checkpoints:
        load_slice_model(path)
    for path in blstms:
        load_sequence_model(path)
    for path in vertebra:
        load_vertebra_model(path)
    for path in segmenters:
        load_segmenter(path)
    return checkpoints, [*blstms, *vertebra, *segmenters]


def package_kaggle(cfg: Config, models_dir: str | os.PathLike, out: str | os.PathLike, wheels: bool = True,
                   dataset: str = "cspine-bundle") -> Path:
    """Writes the bundle; returns its folder.

    Args:
        cfg: the run's config (saved resolved into the bundle).
        models_dir: the run folder with ``slice/fold*/best.pt`` and ``seq/h<hidden>/fold*/*.pt``.
        out: the bundle folder: new, empty, or a bundle written before (replaced).
        wheels: False skips building and downloading wheels (a machine without a package index).
        dataset: the Kaggle dataset's name, for the script's default path.

    Raises:
        FileNotFoundError: no trained models in ``models_dir``.
        FileExistsError: ``out`` is not safe to replace (`check_bundle_folder`).
        CheckpointError: a checkpoint is damaged; nothing is written.
    """
    models_dir, out = Path(models_dir), Path(out)
    models = Run(models_dir)
    check_bundle_folder(out, models_dir)
    checkpoints, blstms = _verified_checkpoints(models, cfg.seq.hidden)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_text(out / MARKER, "written by python -m cspine package-kaggle; replaced on the next run\n")
    bundle = Run(out / "models")
    for path in [*checkpoints, *blstms]:
        _copy(path, bundle.root / path.relative_to(models_dir))
    for src, dst in ((models.labels, bundle.labels), (models.folds, bundle.folds)):
        if src.is_file():
            _copy(src, dst)
    save_config(cfg, bundle.config)
    write_text(out / "kaggle_inference.py", INFERENCE_SCRIPT.format(dataset=dataset, requirements=INFERENCE_REQUIREMENTS))
    if wheels:
        wheel_dir = out / "wheels"
        root = Path(__file__).resolve().parents[2]
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheel_dir), str(root)], check=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", "3.11",
                        "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
                        "-d", str(wheel_dir), *INFERENCE_REQUIREMENTS], check=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("Kaggle bundle in %s: %d slice CNNs, %d other models, %.1f MB", out, len(checkpoints), len(blstms),
             size / 1e6)
    return out
