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

from cspine.config import Config, save_config
from cspine.train_seq import seq_dir

log = logging.getLogger(__name__)

# What inference imports beyond Kaggle's image (torch, timm, numpy, pandas, scikit-learn, matplotlib are
# there). Downloaded with their own dependencies; cspine itself installs with --no-deps, so training-only
# packages (grad-cam, python-gdcm) are never needed offline.
INFERENCE_REQUIREMENTS = ["pydicom>=3.0", "pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1", "pylibjpeg-openjpeg>=2.3",
                          "pylibjpeg-rle>=2.0", "dicomsdl>=0.109", "albumentations>=2.0,<2.1",
                          "opencv-python-headless>=4.8", "nibabel>=5.0", "iterative-stratification>=0.1.9",
                          "tabulate>=0.9", "pyyaml>=6.0"]

INFERENCE_SCRIPT = '''"""Kaggle notebook cell (internet off): install cspine from this dataset, write the submission."""
import os, subprocess, sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent if "__file__" in globals() else Path("/kaggle/input/{dataset}")
os.environ["HF_HUB_OFFLINE"] = "1"  # no hub call, ever
pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(BUNDLE / "wheels")]
subprocess.run(pip + ["--no-deps", "cspine"], check=True)
subprocess.run(pip + {requirements!r}, check=True)
subprocess.run([sys.executable, "-m", "cspine", "predict", "--config", str(BUNDLE / "models" / "config.yaml"),
                "--models", str(BUNDLE / "models"), "--out", "/kaggle/working/submission.csv"], check=True)
'''


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def package_kaggle(cfg: Config, models_dir: str | os.PathLike, out: str | os.PathLike, wheels: bool = True,
                   dataset: str = "cspine-bundle") -> Path:
    """Writes the bundle; returns its folder.

    Args:
        cfg: the run's config (saved resolved into the bundle).
        models_dir: the run folder with ``slice/fold*/best.pt`` and ``seq/h<hidden>/fold*/*.pt``.
        out: the bundle folder (replaced).
        wheels: False skips building and downloading wheels (a machine without a package index).
        dataset: the Kaggle dataset's name, for the script's default path.

    Raises:
        FileNotFoundError: no trained models in ``models_dir``.
    """
    models_dir, out = Path(models_dir), Path(out)
    checkpoints = sorted(models_dir.glob("slice/fold*/best.pt"))
    blstms = sorted(seq_dir(models_dir, cfg.seq.hidden).glob("fold*/*.pt"))
    if not checkpoints or not blstms:
        raise FileNotFoundError(f"no trained models under {models_dir}: train them first (python -m cspine run)")
    if out.exists():
        shutil.rmtree(out)
    bundle = out / "models"
    for path in [*checkpoints, *blstms]:
        _copy(path, bundle / path.relative_to(models_dir))
    for name in ("labels.csv", "folds.csv"):
        if (models_dir / name).is_file():
            _copy(models_dir / name, bundle / name)
    save_config(cfg, bundle / "config.yaml")
    (out / "kaggle_inference.py").write_text(INFERENCE_SCRIPT.format(dataset=dataset, requirements=INFERENCE_REQUIREMENTS))
    if wheels:
        wheel_dir = out / "wheels"
        root = Path(__file__).resolve().parents[2]
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheel_dir), str(root)], check=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", "3.11",
                        "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
                        "-d", str(wheel_dir), *INFERENCE_REQUIREMENTS], check=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("Kaggle bundle in %s: %d slice CNNs, %d BLSTMs, %.1f MB", out, len(checkpoints), len(blstms), size / 1e6)
    return out
