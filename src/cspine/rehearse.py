"""`python -m cspine rehearse`: a recipe rehearsed at the competition's shapes, its time cut, every cost measured.

    python -m cspine rehearse                         # the rsna config on 512² phantoms of 250-450 slices
    python -m cspine rehearse --config paper
    python -m cspine rehearse --config smoke --size 64 --slices 16,24 --head 8,14   # the least size

A recipe meant for hours on a GPU runs here first at its real shapes, so that a crash, a memory peak or a
full disk shows in minutes. It writes real-shaped phantoms (the competition's size, slice counts, transfer
syntaxes, reversed numbering, masks reaching T2, boxes for some), then runs every stage of the config
(`cspine.pipeline.STAGES`) with its own models, sizes, channels, precisions, worker counts, cache format and
crop geometry. Only what scales with time is cut (`time_cuts`): steps, epochs, validation slices, self-test
studies, and the folds (two, inner folds included). Then `package-kaggle`, and the bundle's own script in
an offline Kaggle layout, installed into a fresh environment: the public rerun (no test images: the
self-test) and the hidden one (a submission, validated).

Each step is measured (`cspine.measure`): seconds, the peak memory of the whole process tree, the peak GPU
memory, the bytes of every artifact a study. From the rates, `project` gives the full competition on this
machine, and `kaggle_limits` what fits Kaggle's. Writes ``<run>/rehearsal/``: ``rehearsal.json``, ``table.md``
(printed too), ``submission.csv``, the bundle and the Kaggle layout.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import shutil
import site
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cspine.cache import read_meta
from cspine.competition import is_complete, read_test
from cspine.config import Config, load_config
from cspine.crops import (
    bone_u8,
    crop_spec,
    cut_study_planes,
    place_vertebrae,
    read_crop_store,
    write_crop_store,
)
from cspine.dicom import load_series
from cspine.kaggle import package_kaggle
from cspine.measure import Measured, folder_bytes
from cspine.pipeline import STAGES, Job, check_synthetic, setup_run
from cspine.preprocess import preprocess_study
from cspine.runs import Run, check_writable, run_lock, write_json, write_text
from cspine.segmenter import vertebra_extents
from cspine.submission import validate_submission
from cspine.synthetic import make_competition

log = logging.getLogger(__name__)

# The full competition the projection is for (docs/competition.md).
REAL_TRAIN_STUDIES = 2019
REAL_TRAIN_SLICES = 711_600
REAL_HIDDEN_STUDIES = 1500
# Kaggle's limits: the working disk, a GPU notebook's memory (29-32 GB by the sources found; the lower
# taken), the hidden rerun's time.
KAGGLE_DISK = 20e9
KAGGLE_RAM = 29e9
KAGGLE_HOURS = 9.0
TRUE_CROPS = "crops, cut at the true vertebrae"  # the artifact the disk projection counts for crops


@dataclass(frozen=True)
class Shape:
    """The phantoms of a rehearsal: the real competition's shape by default."""

    size: int = 512
    slices: tuple[int, int] = (250, 450)  # the scan's top to T1; a third of the scans go on into T2
    # the head above the skull base the scans cover: with 250-450 slices, 0.5-1 mm a slice, as the real ones
    head_mm: tuple[float, float] = (60.0, 140.0)
    train: int = 6  # two folds of three: a fractured, a healthy and a third study in each
    test: int = 2
    masks: int = 4  # every segmentation fold trains (two folds need four)
    seed: int = 7


def time_cuts(cfg: Config, shape: Shape) -> list[str]:
    """The overrides that cut only what scales with time, and the phantoms' settings.

    Kept: every model, size, channel count, precision, worker count, the cache format, the crop geometry.
    """
    return [
        f"name=rehearse-{cfg.name}",
        "device=auto",  # the rehearsal runs where it is, on a GPU when there is one
        "folds.n_splits=2",
        "folds.folds=[]",
        "seg.folds=2",
        "seg.steps=2",
        "slice.epochs=1",
        "slice.steps_per_epoch=1",
        f"slice.val_max_slices={cfg.slice.batch_size}",
        "seq.epochs=1",
        "seq.inner_folds=2",
        "vert.epochs=1",
        "vert.inner_folds=2",
        "crop.epochs=1",
        "crop.steps_per_epoch=1",
        "predict.self_test=1",
        f"synth.n_train={shape.train}",
        f"synth.n_test={shape.test}",
        f"synth.image_size={shape.size}",
        "synth.n_slices=0",
        f"synth.slice_range=[{shape.slices[0]},{shape.slices[1]}]",
        f"synth.head_mm=[{shape.head_mm[0]},{shape.head_mm[1]}]",
        "synth.reversed_fraction=0.5",
        "synth.box_fraction=0.5",
        "synth.mask_fraction=0",
        f"synth.min_masks={shape.masks}",
        f"synth.seed={shape.seed}",
    ]


@dataclass
class Step:
    """One measured step: a stage of the pipeline, or the phantoms, the bundle, a Kaggle rerun."""

    name: str
    seconds: float = 0.0
    peak_bytes: int = 0
    gpu_peak_bytes: int | None = None
    written: int = 0  # bytes the step added to the run folder (or wrote, for the bundle and Kaggle)
    skipped: bool = False
    note: str = ""


@dataclass
class Rehearsal:
    """Everything a rehearsal measured."""

    config: str
    device: str
    shape: dict
    steps: list[Step] = field(default_factory=list)
    artifacts: dict[str, dict] = field(default_factory=dict)  # name -> {bytes, per, count}
    rates: dict[str, float] = field(default_factory=dict)
    projection: list[dict] = field(default_factory=list)
    kaggle: list[dict] = field(default_factory=list)


def _measure(name: str, work, *args, folder: Path | None = None, apart: bool = False) -> tuple[Step, object]:
    """Runs ``work(*args)`` measured; ``written`` is what ``folder`` grew by; ``apart``: the work runs in
    processes of its own, and only their memory counts."""
    before = folder_bytes(folder) if folder else 0
    with Measured(children_only=apart) as m:
        result = work(*args)
    step = Step(
        name, m.seconds, m.peak_bytes, m.gpu_peak_bytes, (folder_bytes(folder) - before) if folder else 0
    )
    log.info("rehearse: %s in %.1f s, peak memory %.2f GB", name, m.seconds, m.peak_bytes / 1e9)
    return step, result


def phantoms(cfg: Config, data_dir: Path) -> Path:
    """The rehearsal's synthetic competition (kept and reused when made with the same settings)."""
    if is_complete(data_dir):
        check_synthetic(cfg, data_dir)
        return data_dir
    return make_competition(data_dir, cfg.synth, workers=max(1, min(os.cpu_count() or 1, cfg.synth.n_train)))


def decode_rates(data_dir: Path, uid: str, size: int) -> dict[str, float]:
    """Seconds a slice to decode one study's DICOM (one process) and to preprocess it (windows, crop)."""
    started = time.perf_counter()
    series = load_series(data_dir / "train_images" / uid, workers=1)
    decoded = time.perf_counter()
    preprocess_study(series.hu, size)
    done = time.perf_counter()
    n = len(series)
    return {"decode_s_per_slice": (decoded - started) / n, "preprocess_s_per_slice": (done - decoded) / n}


def artifacts(run: Run, cfg: Config, studies: int) -> dict[str, dict]:
    """Bytes of each kind of artifact the run wrote, and per study where it grows with the studies."""
    per_study = {
        "slice cache": run.cache.root,
        "segmentation labels": run.seg_labels_dir,
        "crops": run.crop_studies,
        "features": run.root / "features",
    }
    per_model = {
        "slice CNN checkpoints": (run.root / "slice", "*.pt"),
        "segmentation models": (run.root / "segment", "*.pt"),
        "crop models": (run.crop_dir, "*.pt"),
        "BLSTMs": (run.root / "seq", "*.pt"),
        "vertebra models": (run.root / "vertebra", "*.pt"),
        "blend": (run.blend_dir, "*.pt"),
    }
    out = {
        name: {"bytes": folder_bytes(path), "per_study": folder_bytes(path) / studies}
        for name, path in per_study.items()
    }
    # the masks a masked study keeps in the cache: 4% of the real studies, most of the phantoms
    masks = folder_bytes(run.cache.root, "*.mask.npy")
    out["slice cache"] = {"bytes": out["slice cache"]["bytes"] - masks}
    out["slice cache"]["per_study"] = out["slice cache"]["bytes"] / studies
    for name, (path, pattern) in per_model.items():
        out[name] = {"bytes": folder_bytes(path, pattern), "per_fold": folder_bytes(path, pattern) / 2}
    return out


def run_pipeline(cfg: Config, data_dir: Path, run: Run, submission: Path) -> list[Step]:
    """Every stage of `cspine.pipeline.STAGES`, each measured (a stage already done is listed as skipped)."""
    steps = []
    with run_lock(run):
        train = setup_run(cfg, data_dir, run)
        job = Job(cfg, data_dir, run, submission, train)
        for stage in STAGES:
            if stage.done(job):
                steps.append(
                    Step(stage.name, skipped=True, note="done before: delete the run folder to measure it")
                )
                continue
            step, _ = _measure(stage.name, stage.run, job, folder=run.root)
            steps.append(step)
    return steps


def kaggle_python(folder: Path, hide: tuple[str, ...] = ()) -> Path:
    """A fresh Python environment that sees this one's packages as Kaggle's image has its own, less the
    distributions named in ``hide`` (what an image lacks), so that the bundle's script installs into it,
    never into this environment; returns its python."""
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True)
    python = folder / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(
        subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    )
    host = [
        p for p in dict.fromkeys([*site.getsitepackages(), site.getusersitepackages()]) if Path(p).is_dir()
    ]
    if hide:
        host = [_without(Path(p), hide, folder / f"host{i}") for i, p in enumerate(host)]
    write_text(purelib / "host-packages.pth", "\n".join(map(str, host)) + "\n")
    return python


def _without(site_dir: Path, hide: tuple[str, ...], farm: Path) -> Path:
    """A folder of links to ``site_dir``'s entries, less every file and folder of the distributions
    ``hide`` names (found from their records)."""
    hidden = set()
    for dist in importlib.metadata.distributions(path=[str(site_dir)]):
        if dist.metadata["Name"] and dist.metadata["Name"].lower().replace("_", "-") in hide:
            hidden |= {Path(f).parts[0] for f in dist.files or []}
    farm.mkdir(parents=True)
    for entry in site_dir.iterdir():
        if entry.name not in hidden:
            (farm / entry.name).symlink_to(entry)
    return farm


def competition_copy(data_dir: Path, folder: Path, with_test_images: bool) -> Path:
    """The competition as a Kaggle notebook mounts it: links to ``data_dir``'s files, and for the public
    rerun without ``test_images/`` (test.csv lists studies whose images are absent)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for entry in data_dir.iterdir():
        if entry.name != "test_images" or with_test_images:
            (folder / entry.name).symlink_to(entry.resolve())
    return folder


def kaggle_rerun(bundle: Path, python: Path, data: Path, submission: Path) -> subprocess.CompletedProcess:
    """The bundle's script as a Kaggle notebook cell runs it, offline."""
    env = {
        **os.environ,
        "CSPINE_BUNDLE": str(bundle),
        "CSPINE_DATA": str(data),
        "CSPINE_SUBMISSION": str(submission),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/none",  # nothing may be downloaded
    }
    code = f"exec(compile(open({str(bundle / 'kaggle_inference.py')!r}).read(), 'cell', 'exec'), {{'__name__': '__main__'}})"
    return subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True)


def rehearse_kaggle(cfg: Config, run: Run, data_dir: Path, out: Path) -> tuple[list[Step], list[dict]]:
    """`package-kaggle`, then the public and the hidden rerun of its script; raises when either fails."""
    step, bundle = _measure(
        "package-kaggle", package_kaggle, cfg, run.root, out / "input" / "cspine-bundle", False
    )
    step.written = folder_bytes(bundle)
    steps, checks = [step], []
    python = kaggle_python(out / "kaggle-python")
    for name, with_images in (("kaggle public rerun", False), ("kaggle hidden rerun", True)):
        data = competition_copy(
            data_dir, out / "input" / "rsna-2022-cervical-spine-fracture-detection", with_images
        )
        submission = out / "working" / f"{name.split()[1]}-submission.csv"
        submission.unlink(missing_ok=True)
        step, done = _measure(name, kaggle_rerun, bundle, python, data, submission, apart=True)
        write_text(out / f"{name.split()[1]}-rerun.log", done.stdout + done.stderr)
        ok = done.returncode == 0 and submission.is_file()
        if ok:
            validate_submission(pd.read_csv(submission), read_test(data))
        if ok and not with_images:
            ok = "cspine self-test: " in done.stdout
        if not ok:
            raise RuntimeError(
                f"rehearse: the bundle's script failed the {name} (exit {done.returncode}); its log: "
                f"{out / (name.split()[1] + '-rerun.log')}\n{done.stderr[-2000:]}"
            )
        step.written = folder_bytes(submission)
        steps.append(step)
        checks.append(
            {"rerun": name, "exit": done.returncode, "submission_rows": len(pd.read_csv(submission))}
        )
    return steps, checks


def true_crops(cfg: Config, run: Run, data_dir: Path, out: Path) -> dict[str, float]:
    """The crop store measured where a trained segmentation puts the vertebrae: each masked study cut at
    its true vertebrae (the rehearsal's own segmentation trains a few steps and places them anywhere);
    bytes a study, and seconds to read one vertebra back as the training loader does."""
    spec = crop_spec(cfg.crop.size, cfg.crop.slices, cfg.crop.context, cfg.crop.margin)
    sizes, reads = [], []
    masked = [u for u in run.cache.read_index()["StudyInstanceUID"].unique() if run.cache.mask(u).is_file()]
    for uid in masked:
        meta, labels = read_meta(run.cache.root, uid), np.load(run.cache.mask(uid))
        places = place_vertebrae(
            vertebra_extents(labels, cfg.seg.min_pixels)[1], len(labels), labels.shape[1]
        )
        bone = bone_u8(load_series(data_dir / "train_images" / uid).hu)
        parts = cut_study_planes(bone, labels, places, meta["crop"], labels.shape[1], spec)
        path = write_crop_store(out / f"{uid}.npz", parts)
        sizes.append(path.stat().st_size)
        for k in range(len(places)):
            started = time.perf_counter()
            read_crop_store(path, k)
            reads.append(time.perf_counter() - started)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "true_crops_bytes_per_study": float(np.mean(sizes)),
        "crop_read_s_per_vertebra": float(np.mean(reads)),
        "true_crops_studies": len(sizes),
    }


def _history(paths: list[Path]) -> pd.DataFrame:
    frames = [pd.read_json(p) if p.suffix == ".json" else pd.read_csv(p) for p in paths if p.is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def measured_rates(cfg: Config, run: Run, steps: dict[str, Step], data_dir: Path) -> dict[str, float]:
    """The per-unit rates the projection rests on, from the steps and the run's own training histories."""
    index = run.cache.read_index()
    slices, studies = len(index), index["StudyInstanceUID"].nunique()
    rates = decode_rates(data_dir, index["StudyInstanceUID"].iat[0], cfg.prepare.size)
    rates["slices_per_study"] = slices / studies

    def per(name: str, units: float) -> float | None:
        step = steps.get(name)
        return step.seconds / units if step and not step.skipped and units else None

    rates["prepare_s_per_slice"] = per("prepare", slices)
    rates["segment_s_per_study"] = per("segment", studies)
    rates["extract_s_per_slice"] = per("extract", slices)
    rates["crop_s_per_study"] = per("crop", studies)
    tests = read_test(data_dir)["StudyInstanceUID"].nunique()
    rates["predict_s_per_study"] = per("predict", tests)
    slice_history = _history([run.slice_file(k, "history.csv") for k in cfg.folds.trained])
    if len(slice_history):
        rates["slice_train_images_per_s"] = float(slice_history["images_per_s"].mean())
    crop_history = _history([run.crop_file(k, "history.json") for k in cfg.folds.trained])
    if len(crop_history):
        images = crop_history["vertebrae"].sum() * cfg.crop.slices
        rates["crop_train_images_per_s"] = float(images / crop_history["seconds"].sum())
    return {k: v for k, v in rates.items() if v is not None}


def project(full: Config, rates: dict[str, float]) -> list[dict]:
    """The full competition on this machine, stage by stage: its work divided by the measured rates.

    Args:
        full: the recipe's own config (before the time cuts): its epochs, steps and folds.
    """
    s, c, k = full.slice, full.crop, full.folds.n_splits
    slice_images = k * s.epochs * (s.steps_per_epoch or REAL_TRAIN_SLICES // s.batch_size) * s.batch_size
    crop_images = k * c.epochs * REAL_TRAIN_STUDIES * (k - 1) / k * 7 * c.slices

    def seconds_per(rate: str) -> float | None:
        return 1 / rates[rate] if rate in rates else None

    rows = [
        ("prepare", "slices", REAL_TRAIN_SLICES, rates.get("prepare_s_per_slice")),
        (
            "segment",
            "studies (inference; the U-Nets' training steps not projected)",
            REAL_TRAIN_STUDIES,
            rates.get("segment_s_per_study"),
        ),
        (
            "train-slices",
            f"images ({k} folds × {s.epochs} epochs)",
            slice_images,
            seconds_per("slice_train_images_per_s"),
        ),
        ("extract", "slices", REAL_TRAIN_SLICES, rates.get("extract_s_per_slice")),
        ("crop", "studies", REAL_TRAIN_STUDIES, rates.get("crop_s_per_study")),
        (
            "train-crops",
            f"crop slices ({k} folds × {c.epochs} epochs)",
            crop_images,
            seconds_per("crop_train_images_per_s"),
        ),
        ("predict (hidden test)", "studies", REAL_HIDDEN_STUDIES, rates.get("predict_s_per_study")),
    ]
    return [
        {"stage": name, "unit": unit, "units": units, "s_per_unit": rate, "hours": units * rate / 3600}
        for name, unit, units, rate in rows
        if rate is not None
    ]


def kaggle_limits(full: Config, arts: dict[str, dict], projection: list[dict], peak: int) -> list[dict]:
    """For each of Kaggle's limits, what the recipe needs and whether it fits: the disk (every per-study
    artifact × 2,019, and five folds' models), the memory peak, the hidden rerun on this machine."""
    per_study = {a: v["per_study"] for a, v in arts.items() if "per_study" in v}
    if TRUE_CROPS in per_study:  # what a trained segmentation's crops take, not this one's
        per_study.pop("crops")
    disk = sum(per_study.values()) * REAL_TRAIN_STUDIES + sum(
        v["per_fold"] * full.folds.n_splits for v in arts.values() if "per_fold" in v
    )
    hours = next((p["hours"] for p in projection if p["stage"].startswith("predict")), None)
    return [
        {"limit": "working disk", "kaggle": KAGGLE_DISK, "needed": disk, "fits": disk <= KAGGLE_DISK},
        {"limit": "memory (RAM)", "kaggle": KAGGLE_RAM, "needed": peak, "fits": peak <= KAGGLE_RAM},
        {
            "limit": "hidden rerun time (this machine)",
            "kaggle": KAGGLE_HOURS,
            "needed": hours,
            "fits": hours is not None and hours <= KAGGLE_HOURS,
        },
    ]


def _gb(n: float | None) -> str:
    return "—" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def table(r: Rehearsal) -> str:
    """The rehearsal as Markdown: steps, artifacts, rates, the projection and Kaggle's limits."""
    lines = [
        f"# Rehearsal of `{r.config}` on {r.device}",
        "",
        f"Phantoms: {r.shape['train']} training and {r.shape['test']} test studies of {r.shape['size']}² × "
        f"{r.shape['slices'][0]}–{r.shape['slices'][1]} slices (to T1; a third go on into T2). Only what scales "
        "with time was cut (steps, epochs, validation slices, self-test studies, two folds).",
        "",
        "| step | seconds | peak memory (process tree) | peak GPU memory | written |",
        "|---|---|---|---|---|",
    ]
    for s in r.steps:
        lines.append(
            f"| {s.name} | {'skipped' if s.skipped else f'{s.seconds:.1f}'} | {_gb(s.peak_bytes or None)} | "
            f"{_gb(s.gpu_peak_bytes)} | {_gb(s.written or None)} |"
        )
    lines += ["", "| artifact | in all | a study | a fold |", "|---|---|---|---|"]
    for name, a in r.artifacts.items():
        lines.append(f"| {name} | {_gb(a['bytes'])} | {_gb(a.get('per_study'))} | {_gb(a.get('per_fold'))} |")
    lines += ["", "| rate | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4g} |" for name, value in r.rates.items()]
    lines += [
        "",
        f"Projection to the full competition on this machine ({REAL_TRAIN_STUDIES:,} training studies, "
        f"{REAL_TRAIN_SLICES:,} slices, {REAL_HIDDEN_STUDIES:,} hidden studies):",
        "",
        "| stage | work | seconds a unit | hours |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {p['stage']} | {p['units']:,.0f} {p['unit']} | {p['s_per_unit']:.4g} | {p['hours']:,.1f} |"
        for p in r.projection
    ]
    lines += ["", "| Kaggle's limit | Kaggle | the recipe | fits |", "|---|---|---|---|"]
    for k in r.kaggle:
        unit = (lambda v: f"{v:.1f} h") if "time" in k["limit"] else _gb
        lines.append(
            f"| {k['limit']} | {unit(k['kaggle'])} | {unit(k['needed']) if k['needed'] is not None else '—'} | "
            f"{'yes' if k['fits'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def rehearse(
    config: str,
    overrides: list[str] | None = None,
    shape: Shape = Shape(),
    run_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
) -> Rehearsal:
    """The rehearsal of a config (a shipped name or a YAML file); returns what it measured.

    Args:
        overrides: ``key=value`` words applied after the time cuts (they win).
        shape: the phantoms (the real competition's by default).
        run_dir: the run folder (default ``runs/rehearse-<name>``); a finished stage there is not redone.
        data_dir: the phantoms' folder (default ``input/rehearsal-<size>``; reused when its settings match).

    Raises:
        RuntimeError: the bundle's script failed a rerun (its log is named).
    """
    full = load_config(config, overrides)
    cfg = load_config(config, [*time_cuts(full, shape), *(overrides or [])])
    run = Run(run_dir or Path("runs") / cfg.name)
    out = run.root / "rehearsal"
    check_writable(run.root)
    data = Path(data_dir or f"input/rehearsal-{shape.size}")
    device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    r = Rehearsal(config=full.name, device=device_name(device), shape=dataclasses.asdict(shape))
    step, data = _measure("phantoms", phantoms, cfg, data, folder=data)
    r.steps.append(step)
    r.steps += run_pipeline(cfg, data, run, out / "submission.csv")
    kaggle_steps, checks = rehearse_kaggle(cfg, run, data, out / "kaggle")
    r.steps += kaggle_steps
    by_name = {s.name: s for s in r.steps}
    r.artifacts = artifacts(run, cfg, shape.train)
    r.rates = measured_rates(cfg, run, by_name, data)
    if cfg.crop.enabled:
        r.rates.update(true_crops(cfg, run, data, out / "true-crops"))
        per_study = r.rates["true_crops_bytes_per_study"]
        r.artifacts[TRUE_CROPS] = {"bytes": per_study * r.rates["true_crops_studies"], "per_study": per_study}
    r.projection = project(full, r.rates)
    r.kaggle = kaggle_limits(full, r.artifacts, r.projection, max(s.peak_bytes for s in r.steps))
    write_json({**dataclasses.asdict(r), "checks": checks}, out / "rehearsal.json")
    text = table(r)
    write_text(out / "table.md", text)
    print(text)
    return r


def device_name(device: str) -> str:
    """The machine, in words: the GPU's name, or the CPU's cores."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU)"
    return f"a CPU with {os.cpu_count()} cores, no GPU"
