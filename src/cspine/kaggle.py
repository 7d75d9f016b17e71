"""`python -m cspine package-kaggle`: a folder to upload as a Kaggle dataset for offline inference.

    python -m cspine package-kaggle --models runs/rsna --out kaggle_package [--python 3.11]
    kaggle datasets create -p kaggle_package --dir-mode zip

The folder holds ``wheels/`` (cspine's own wheel, and the wheels of the inference packages a Kaggle GPU
image may lack, `BUNDLED`, for one Python version on manylinux x86-64, without their dependencies: never
torch), ``models/`` (every fold's models, the resolved config, the training prior), ``cspine-bundle.json``
(what the wheels were built for and what inference needs; also the mark that the folder is a bundle),
``dataset-metadata.json`` (for the Kaggle API's upload) and ``kaggle_inference.py``, the notebook cell that
finds the bundle under ``/kaggle/input/*`` whatever the dataset is called, checks the interpreter and the
installed packages, installs offline only what is missing (nothing installed is upgraded, downgraded or
replaced) and writes ``/kaggle/working/submission.csv``. Nothing is downloaded at inference time.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from cspine import __version__
from cspine.config import Config, save_config
from cspine.ensemble import check_complete, check_config, load_ensemble
from cspine.runs import Run, replace_folder, write_json

log = logging.getLogger(__name__)

# What inference imports, each with the least version the kit works with (pyproject.toml's bounds). The
# bundle's script checks every installed one against its bound and refuses, naming it, where one is too old:
# it never upgrades, downgrades or replaces an installed package (a constraints file pins them all).
# Training-only packages (albumentations, iterative-stratification, grad-cam, python-gdcm, zarr) are never
# needed offline: the predict path imports none of them (a test checks).
INFERENCE_REQUIREMENTS = [
    # a Kaggle GPU image has these (its CUDA torch above all): never in the bundle
    "torch>=2.4",
    "torchvision>=0.19",
    "timm>=1.0",
    "numpy>=1.26",
    "pandas>=2.0",
    "scikit-learn>=1.3",
    "scipy>=1.10",
    "psutil>=5.9",
    "tqdm>=4.66",
    # what it may lack: their own wheels only (`BUNDLED`); their dependencies are the ones above
    "pydicom>=3.0",
    "pylibjpeg>=2.0",
    "pylibjpeg-libjpeg>=2.1",
    "pylibjpeg-openjpeg>=2.3",
    "pylibjpeg-rle>=2.0",
    "dicomsdl>=0.109",
    "opencv-python-headless>=4.8",
    "nibabel>=5.0",
    "tabulate>=0.9",
    "pyyaml>=6.0",
    "segmentation-models-pytorch>=0.6",
]
BUNDLED = INFERENCE_REQUIREMENTS[INFERENCE_REQUIREMENTS.index("pydicom>=3.0") :]
# an installed distribution that stands for a requirement (the same module under another name): Kaggle's
# image has opencv-python, and a headless wheel over it would overwrite its cv2
PROVIDED_BY = {
    "opencv-python-headless": ["opencv-python", "opencv-contrib-python", "opencv-contrib-python-headless"]
}
# The bundle's manifest, a plain visible file (a dotfile may not survive an upload): the script finds the
# bundle by it, and `package_kaggle` replaces only a folder that holds it.
MARKER = "cspine-bundle.json"
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_28_x86_64"]


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
    for what, folder in (
        ("the models being bundled", models_dir.resolve()),
        ("the working directory", Path.cwd()),
        ("the cspine repository", repo),
    ):
        if _inside(folder, target):
            raise FileExistsError(f"--out {out} holds {what} ({folder}); choose another bundle folder")
    if target.exists() and (
        not target.is_dir() or (any(target.iterdir()) and not (target / MARKER).is_file())
    ):
        raise FileExistsError(
            f"--out {out} exists and is not a cspine bundle (no {MARKER} in it); "
            "choose an empty or new folder"
        )


def _verified_checkpoints(cfg: Config, models: Run) -> tuple[list[Path], list[Path]]:
    """Every checkpoint `predict` reads, after loading them all as `predict` does (each is whole, they agree
    with each other and with ``cfg``, and every fold's models are there); returns (slice CNNs, the others).

    Raises:
        FileNotFoundError: no trained models.
        CheckpointError: a damaged checkpoint, or models the config's folds need that are missing.
        ConfigError: the config contradicts the models.
    """
    ensemble = load_ensemble(
        models.root,
        cfg.seq.hidden,
        [torch.device("cpu")],
        cfg.vert.enabled,
        cfg.blend.enabled,
        cfg.crop.enabled,
    )
    check_config(cfg, ensemble)
    check_complete(cfg, ensemble, models.root)
    others = [p for size in ensemble.blstms for p in models.blstm_checkpoints(size)]
    others += (models.vert_models() if ensemble.vertebra else []) + (
        models.seg_models() if ensemble.segmenters else []
    )
    others += models.crop_models() if ensemble.crops else []
    others += [models.blend_model] if ensemble.blend else []
    return list(models.slice_checkpoints().values()), others


def dataset_metadata(dataset: str) -> dict:
    """The Kaggle API's dataset-metadata.json: the id takes $KAGGLE_USERNAME when set (edit it otherwise)."""
    user = os.environ.get("KAGGLE_USERNAME", "YOUR-KAGGLE-USERNAME")
    return {"title": dataset, "id": f"{user}/{dataset}", "licenses": [{"name": "other"}]}


def build_cspine_wheel(wheel_dir: Path) -> None:
    """cspine's own wheel, built from this checkout with the installed setuptools (no package index needed)."""
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(root),
        ],
        check=True,
    )


def download_wheels(wheel_dir: Path, python: str) -> None:
    """The wheels of `BUNDLED` for ``python`` on manylinux x86-64, without their dependencies (torch and the
    rest of Kaggle's image); needs the package index."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary=:all:",
            "--python-version",
            python,
            *platforms,
            "--no-deps",
            "-d",
            str(wheel_dir),
            *BUNDLED,
        ],
        check=True,
    )


def package_kaggle(
    cfg: Config,
    models_dir: str | os.PathLike,
    out: str | os.PathLike,
    wheels: bool = True,
    dataset: str = "cspine-bundle",
    python: str | None = None,
) -> Path:
    """Writes the bundle; returns its folder.

    Args:
        cfg: the run's config (saved resolved into the bundle).
        models_dir: the run folder with ``slice/fold*/best.pt`` and ``seq/h<hidden>/fold*/*.pt``.
        out: the bundle folder: new, empty, or a bundle written before (replaced).
        wheels: False leaves out the dependencies' wheels (a machine without a package index, or a notebook
            that has them); cspine's own wheel is always there, and the script then checks the dependencies
            are installed.
        dataset: the Kaggle dataset's name (its slug in ``dataset-metadata.json``).
        python: the Python version ("3.11") the notebook runs; default: this interpreter's.

    Raises:
        FileNotFoundError: no trained models in ``models_dir``.
        FileExistsError: ``out`` is not safe to replace (`check_bundle_folder`).
        CheckpointError: a checkpoint is damaged; nothing is written.
        PackagingError: building a wheel or downloading one failed; ``out`` is as it was.
    """
    models_dir, out = Path(models_dir), Path(out)
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    models = Run(models_dir)
    check_bundle_folder(out, models_dir)
    checkpoints, blstms = _verified_checkpoints(cfg, models)
    # built beside the old bundle and swapped in whole: a failure (no package index, a full disk, an
    # interrupt) leaves the old bundle as it was
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_bundle(partial, cfg, models, [*checkpoints, *blstms], wheels, dataset, python)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise PackagingError(
            f"package-kaggle: `pip {exc.cmd[3]}` failed (exit {exc.returncode}; pip's "
            f"message above says why); {out} is unchanged. Without the package index, --no-wheels bundles "
            "cspine alone"
        ) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    replace_folder(partial, out)
    log.info("%s", bundle_contents(out, python))
    return out


def bundle_contents(out: Path, python: str) -> str:
    """What a bundle holds and weighs, in a few lines: what `package-kaggle` prints."""
    size = {
        part: sum(p.stat().st_size for p in (out / part).rglob("*") if p.is_file()) / 1e6
        for part in ("models", "wheels")
    }
    wheels = sorted(w.name.split("-")[0] for w in (out / "wheels").glob("*.whl"))
    return (
        f"Kaggle bundle in {out} for Python {python}: {size['models'] + size['wheels']:.1f} MB\n"
        f"  models/ {size['models']:.1f} MB: {len(list((out / 'models').rglob('*.pt')))} checkpoints, the "
        "config, the training prior\n"
        f"  wheels/ {size['wheels']:.1f} MB: {', '.join(wheels)} (what a Kaggle image may lack; torch, "
        "numpy and the rest of the image are used as installed)\n"
        f"upload it with `kaggle datasets create -p {out} --dir-mode zip`"
    )


class PackagingError(OSError):
    """A bundle that could not be built; the old one, if any, is kept."""


def _write_bundle(
    out: Path, cfg: Config, models: Run, checkpoints: list[Path], wheels: bool, dataset: str, python: str
) -> None:
    """Writes a whole bundle into the new folder ``out``; the manifest last (it marks the folder a bundle)."""
    out.mkdir(parents=True)
    bundle = Run(out / "models")
    for path in checkpoints:
        _copy(path, bundle.root / path.relative_to(models.root))
    for src, dst in ((models.labels, bundle.labels), (models.folds, bundle.folds)):
        if src.is_file():
            _copy(src, dst)
    save_config(cfg, bundle.config)
    _copy(Path(__file__).with_name("kaggle_inference.py"), out / "kaggle_inference.py")
    metadata = write_json(dataset_metadata(dataset), out / "dataset-metadata.json")
    if "KAGGLE_USERNAME" not in os.environ:
        log.warning(
            "dataset-metadata.json names the owner YOUR-KAGGLE-USERNAME: set $KAGGLE_USERNAME before "
            "packaging, or edit the id in %s, before `kaggle datasets create`",
            metadata,
        )
    build_cspine_wheel(out / "wheels")
    if wheels:
        download_wheels(out / "wheels", python)
    write_json(
        {
            "python": python,
            "platforms": PLATFORMS,
            "requirements": INFERENCE_REQUIREMENTS,
            "provided_by": PROVIDED_BY,
            "cspine": __version__,
            "wheels": wheels,
        },
        out / MARKER,
    )
