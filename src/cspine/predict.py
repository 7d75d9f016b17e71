"""Stage `predict`: test studies → submission.csv, one study at a time, never losing a submission.

    python -m cspine predict --config demo --data DIR --models runs/demo --out submissions/submission.csv

Per study: DICOM → preprocessing → every fold's slice CNN → the BLSTMs → 8 probabilities; with the
vertebra track, the study is also segmented and C1..C7 come from each vertebra's own slices. Worker
processes (``predict.workers``) decode and preprocess the next studies while the models work on the
current one (`cspine.studies`). With several GPUs the folds' CNNs are spread over them and run at once.
A study that fails anywhere is logged and gets the prior; every row_id of test.csv is written,
validated, and the file replaced atomically.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cspine import TARGETS
from cspine.checkpoints import CheckpointError, load_sequence_model, load_slice_model, load_vertebra_model
from cspine.competition import list_test_studies, read_test
from cspine.config import Config, ConfigError
from cspine.dicom import default_workers
from cspine.extract import study_features
from cspine.inputs import combine, study_input, vertebra_inputs
from cspine.models import SequenceNet, SliceNet
from cspine.prepare import MIN_SLICES
from cspine.runs import Run, check_writable
from cspine.progress import progress
from cspine.runtime import amp_dtype, pick_devices
from cspine.segmenter import load_segmenter, segment_study, vertebra_extents
from cspine.studies import read_ahead, reading_pool
from cspine.submission import make_submission, prior_from_train, write_submission

log = logging.getLogger(__name__)


@dataclass
class Ensemble:
    """Every fold's slice CNN, the BLSTMs of one size, and how they read a study (from their checkpoints).

    The k-th CNN sits on ``devices[k % len(devices)]`` (folds spread over the GPUs); everything else on the
    first.
    """

    cnns: dict[int, SliceNet]
    blstms: list[tuple[dict, SequenceNet]]
    inputs: dict  # the CNNs' preprocessing and reading: size, crop, margin, input_size, context
    arch: dict  # the CNNs' architecture: backbone, width, ...
    input: str  # what the BLSTMs read: "features", "probs" or "fracture"
    bins: int
    tta: bool  # the CNNs read each slice mirrored too, as when the BLSTMs' training features were extracted
    segmenters: list[torch.nn.Module] = field(default_factory=list)  # with the vertebra track only
    seg_reading: dict = field(default_factory=dict)  # how they read a study (`cspine.segmenter.reading`)
    vertebra: list[tuple[dict, SequenceNet]] = field(default_factory=list)  # the vertebra track's BiLSTMs
    overall: str = "blstm"  # where the vertebra track takes patient_overall from (`VertebraConfig.overall`)
    devices: list[torch.device] = field(default_factory=lambda: [torch.device("cpu")])


def _one(values: dict, what: str, where: Path):
    """The single value every checkpoint records for ``what``; an error naming the disagreeing files."""
    distinct = {repr(v) for v in values.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{path}: {value}" for path, value in values.items())
        raise CheckpointError(f"{where}: the checkpoints disagree on {what} ({listing}); train them again together")
    return next(iter(values.values()))


def load_ensemble(run_dir: str | os.PathLike, hidden: int, devices: list[torch.device]) -> Ensemble:
    """Loads every ``slice/fold*/best.pt`` and the ``seq/h<hidden>/fold*/*.pt`` of a run (or a Kaggle bundle).

    The k-th CNN goes to ``devices[k % len(devices)]``; the BLSTMs and the vertebra track to ``devices[0]``.

    Raises:
        FileNotFoundError: no slice CNN or no BLSTM of that size.
        CheckpointError: a damaged checkpoint, or checkpoints that disagree on how to read a study.
    """
    run = Run(run_dir)
    device = devices[0]
    cnns, cnn_meta = {}, {}
    for k, (fold, path) in enumerate(run.slice_checkpoints().items()):
        cnns[fold], cnn_meta[path] = load_slice_model(path, devices[k % len(devices)])
    blstms, blstm_meta = [], {}
    for path in run.blstm_checkpoints(hidden):
        model, meta = load_sequence_model(path, device)
        blstms.append((meta, model))
        blstm_meta[path] = meta
    if not cnns or not blstms:
        raise FileNotFoundError(f"no trained models under {run.root} (slice CNNs: {len(cnns)}, BLSTMs of size "
                                f"{hidden}: {len(blstms)}); run the training stages first")
    ensemble = Ensemble(
        cnns, blstms,
        inputs=_one({p: m["inputs"] for p, m in cnn_meta.items()}, "preprocessing", run.root),
        arch=_one({p: m["arch"] for p, m in cnn_meta.items()}, "architecture", run.root),
        input=_one({p: m["input"] for p, m in blstm_meta.items()}, "BLSTM input", run.root),
        bins=_one({p: m["bins"] for p, m in blstm_meta.items()}, "seq.bins", run.root),
        tta=_one({p: m["tta"] for p, m in blstm_meta.items()}, "predict.tta", run.root),
        devices=list(devices))
    if run.vert_models():
        _add_vertebra_track(ensemble, run, device)
    return ensemble


def _add_vertebra_track(ensemble: Ensemble, run: Run, device: torch.device) -> None:
    """The vertebra track's BiLSTMs and the segmentation models they need to find each vertebra."""
    metas = {}
    for path in run.vert_models():
        model, meta = load_vertebra_model(path, device)
        ensemble.vertebra.append((meta, model))
        metas[path] = meta
    readings = {}
    for path in run.seg_models():
        model, meta = load_segmenter(path, device)
        ensemble.segmenters.append(model)
        readings[path] = meta["reading"]
    if not ensemble.segmenters:
        raise FileNotFoundError(f"{run.root}: vertebra-track models but no segmentation model (segment/fold*.pt)")
    ensemble.seg_reading = _one(readings, "segmentation reading", run.root)
    ensemble.overall = _one({p: m["overall"] for p, m in metas.items()}, "vert.overall", run.root)
    if _one({p: m["tta"] for p, m in metas.items()}, "predict.tta of the vertebra track", run.root) != ensemble.tta:
        raise CheckpointError(f"{run.root}: the vertebra track and the BLSTMs read slices differently (tta)")


def check_config(cfg: Config, ensemble: Ensemble) -> None:
    """Raises ConfigError naming every setting of ``cfg`` that contradicts the checkpoints.

    Inference reads its settings from the checkpoints; a config that says otherwise would describe models
    that do not exist, so it is refused rather than silently overridden.
    """
    i, a = ensemble.inputs, ensemble.arch
    pairs = {"prepare.size": (cfg.prepare.size, i["size"]), "prepare.crop": (cfg.prepare.crop, i["crop"]),
             "prepare.margin": (cfg.prepare.margin, i["margin"]),
             "slice.input_size": (cfg.slice.input_size or cfg.prepare.size, i["input_size"]),
             "slice.context": (cfg.slice.context, i["context"]), "slice.backbone": (cfg.slice.backbone, a["backbone"]),
             "slice.width": (cfg.slice.width, a["width"]), "seq.input": (cfg.seq.input, ensemble.input),
             "seq.bins": (cfg.seq.bins, ensemble.bins), "predict.tta": (cfg.predict.tta, ensemble.tta),
             "vert.enabled": (cfg.vert.enabled, bool(ensemble.vertebra)),
             **({"vert.overall": (cfg.vert.overall, ensemble.overall)} if ensemble.vertebra else {})}
    differ = [f"{key}={mine!r} (the models: {theirs!r})" for key, (mine, theirs) in pairs.items() if mine != theirs]
    if differ:
        raise ConfigError("the config contradicts the trained models: " + ", ".join(differ)
                          + "; predict with the run's own config (the default) or train again")


@torch.inference_mode()
def blstm_probabilities(per_fold: dict[int, tuple[np.ndarray, np.ndarray]], ensemble: Ensemble,
                        device: torch.device) -> np.ndarray:
    """float [8] in TARGETS order: the mean of the ensemble's BLSTMs over one study's CNN outputs.

    Args:
        per_fold: {fold: (features [N, D], probabilities [N, 15])} from each fold's CNN, head to feet.
    """
    outputs, folds_mean = [], None
    for meta, model in ensemble.blstms:
        key = meta["source_fold"]
        if key is None:  # trained on other folds' CNNs (seq.train_on="other_folds"): reads every CNN's mean
            if folds_mean is None:  # one mean for all such BLSTMs
                folds_mean = np.mean([probs.astype(np.float32) for _, probs in per_fold.values()], axis=0)
            feats, probs = None, folds_mean
        elif key in per_fold:  # trained on CNN k's reading (own_fold): reads CNN k's, as in training
            feats, probs = per_fold[key]
        else:
            continue
        x = torch.from_numpy(study_input(feats, probs, ensemble.input, ensemble.bins))[None].to(device)
        outputs.append(torch.sigmoid(model(x, torch.tensor([x.shape[1]]))).cpu().numpy()[0])
    return np.mean(outputs, axis=0)


@torch.inference_mode()
def predict_images(images: np.ndarray, ensemble: Ensemble, cfg: Config) -> dict[str, float]:
    """The 8 probabilities of one study, preprocessed as the checkpoints record (`cspine.studies.read_study`);
    ``cfg`` gives the batch size, mixed precision and channels_last only.

    With several devices, one thread per device runs the folds that sit there: the GPUs work at once.
    """
    i, devices, folds = ensemble.inputs, ensemble.devices, list(ensemble.cnns)

    def on_device(g: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        device = devices[g]
        channels_last = cfg.slice.channels_last and device.type == "cuda"
        return {k: study_features(ensemble.cnns[k], images, i["input_size"], device, cfg.predict.batch_size,
                                  amp_dtype(device, cfg.slice.amp), channels_last, tta=ensemble.tta)
                for k in folds[g::len(devices)]}

    if len(devices) > 1:
        with ThreadPoolExecutor(len(devices)) as pool:
            parts = list(pool.map(on_device, range(len(devices))))
    else:
        parts = [on_device(0)]
    per_fold = {k: part[k] for k in folds for part in parts if k in part}
    p = vertebra_probabilities(images, per_fold, ensemble, devices[0]) if ensemble.vertebra else \
        blstm_probabilities(per_fold, ensemble, devices[0])
    return {t: float(p[i]) for i, t in enumerate(TARGETS)}


@torch.inference_mode()
def vertebra_probabilities(images: np.ndarray, per_fold: dict[int, tuple[np.ndarray, np.ndarray]],
                           ensemble: Ensemble, device: torch.device) -> np.ndarray:
    """float [8] in TARGETS order from the vertebra track: segment the study, read each vertebra's slices.

    Args:
        images: the study preprocessed as the CNNs read it, uint8 [N, S, S, 3].
        per_fold: {fold: (features, probabilities [N, 15])} from each fold's CNN.
    """
    labels = segment_study(ensemble.segmenters, images, ensemble.seg_reading, device)
    _, found = vertebra_extents(labels, ensemble.seg_reading["min_pixels"])
    extents = {e["vertebra"]: (e["z0"], e["z1"]) for e in found}
    outputs = []
    for meta, model in ensemble.vertebra:
        if meta["source_fold"] not in per_fold:
            continue
        x = torch.from_numpy(vertebra_inputs(per_fold[meta["source_fold"]][1], extents, meta["margin"],
                                             meta["bins"])).to(device)
        outputs.append(torch.sigmoid(model(x, torch.full((len(x),), x.shape[1]))[:, 0]).cpu().numpy())
    p = combine(np.mean(outputs, axis=0)[None])[0]
    if ensemble.overall == "blstm":
        p[0] = blstm_probabilities(per_fold, ensemble, device)[0]
    return p


def predict(cfg: Config, data_dir: str | os.PathLike, models_dir: str | os.PathLike,
            out_csv: str | os.PathLike, train: pd.DataFrame | None = None) -> pd.DataFrame:
    """Writes a complete, validated submission for the test set of ``data_dir``; returns it.

    Args:
        train: training labels for the prior of failed or absent studies (default: the real data's).
    """
    data_dir = Path(data_dir)
    check_writable(Path(out_csv).parent)
    devices = pick_devices(cfg.device)
    ensemble = load_ensemble(models_dir, cfg.seq.hidden, devices)
    check_config(cfg, ensemble)
    if cfg.slice.channels_last:
        for k, cnn in enumerate(ensemble.cnns.values()):
            if devices[k % len(devices)].type == "cuda":
                cnn.to(memory_format=torch.channels_last)
    test = read_test(data_dir)
    uids = list_test_studies(data_dir, test)
    prior = prior_from_train(train)
    probs: dict[str, dict[str, float]] = {}
    failed: list[str] = []
    started = time.perf_counter()
    i = ensemble.inputs
    workers = cfg.predict.workers or default_workers()
    log.info("predict: %d studies on %s, read by %d worker processes", len(uids), ", ".join(map(str, devices)),
             workers)
    with reading_pool(workers) as pool:
        reads = read_ahead(pool, [data_dir / "test_images" / u for u in uids], i["size"], i["crop"], i["margin"],
                           MIN_SLICES, ahead=2 * workers)
        for uid, future in zip(progress(uids, "predict", unit="study"), reads):
            try:
                study = future.result()
                for warning in study.warnings:
                    log.warning("%s", warning)
                probs[uid] = predict_images(study.images, ensemble, cfg)
            except Exception as exc:  # one bad study must never cost the submission: it gets the prior
                log.error("predict: study %s failed (%s: %s); it gets the prior", uid, type(exc).__name__, exc)
                failed.append(uid)
    elapsed = time.perf_counter() - started
    sub = make_submission(test, probs, prior=prior, clip=cfg.predict.clip)
    path = write_submission(sub, test, out_csv)
    log.info("predict: %d studies in %.1f s (%.2f s/study), %d failed, %d listed but absent; wrote %s",
             len(uids), elapsed, elapsed / max(len(uids), 1), len(failed),
             test["StudyInstanceUID"].nunique() - len(uids), path)
    return sub
