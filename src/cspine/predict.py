"""Stage `predict`: test studies → submission.csv, one study at a time, never losing a submission.

    python -m cspine predict --config demo --data DIR --models runs/demo --out submissions/submission.csv

Per study: DICOM → preprocessing → every fold's slice CNN → the BLSTMs (and, with the vertebra track, the
study segmented and each vertebra's own slices read; with the crop track, each vertebra cut from the
full-resolution study where the segmentation puts it, `cspine.crops`) → with a blend (`cspine.blend`),
the blend applied through each fold's models and the folds' answers averaged → 8 probabilities. Worker
processes (``predict.workers``) decode and preprocess the next studies while the models work on the
current one (`cspine.studies`). With several GPUs the folds' CNNs are spread over them and run at once.
A study that fails anywhere is logged and gets the prior; every row_id of test.csv is written,
validated, and the file replaced atomically, unless more than ``predict.max_failed`` of the studies fail
(then nothing is written and the causes are named). With no listed test study present (Kaggle's public
rerun) a few training studies are predicted first, to show the models run (`self_test`).
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
from cspine.checkpoints import (
    CheckpointError,
    load_blend,
    load_crop_model,
    load_sequence_model,
    load_slice_model,
    load_vertebra_model,
)
from cspine.competition import is_complete, list_test_studies, read_test
from cspine.config import Config, ConfigError
from cspine.crops import cut_study, place_vertebrae
from cspine.dicom import default_workers
from cspine.extract import study_features
from cspine.inputs import combine, study_input, vertebra_inputs
from cspine.models import CropNet, SequenceNet, SliceNet, crop_probabilities
from cspine.prepare import MIN_SLICES
from cspine.progress import progress
from cspine.runs import Run, check_writable
from cspine.runtime import amp_dtype, pick_devices
from cspine.segmenter import load_segmenter, segment_study, vertebra_extents
from cspine.stacking import apply_blend, study_inputs
from cspine.studies import ReadStudy, StudyReader
from cspine.submission import PredictionError, make_submission, prior_from_train, write_submission

log = logging.getLogger(__name__)

KAGGLE_WORKING = Path("/kaggle/working")  # present only inside a Kaggle notebook


@dataclass
class Ensemble:
    """Every fold's slice CNN, the BLSTMs, the blend, and how they read a study (from their checkpoints).

    The k-th CNN sits on ``devices[k % len(devices)]`` (folds spread over the GPUs); everything else on the
    first.
    """

    cnns: dict[int, SliceNet]
    blstms: dict[int, list[tuple[dict, SequenceNet]]]  # {size: BLSTMs}: seq.hidden, and those a blend reads
    hidden: int  # the size that answers without a blend
    inputs: dict  # the CNNs' preprocessing and reading: size, crop, margin, input_size, context
    arch: dict  # the CNNs' architecture: backbone, width, ...
    input: str  # what the BLSTMs read: "features", "probs" or "fracture"
    bins: int
    tta: bool  # the CNNs read each slice mirrored too, as when the BLSTMs' training features were extracted
    segmenters: list[torch.nn.Module] = field(default_factory=list)  # with the vertebra track only
    seg_reading: dict = field(default_factory=dict)  # how they read a study (`cspine.segmenter.reading`)
    vertebra: list[tuple[dict, SequenceNet]] = field(default_factory=list)  # the vertebra track's BiLSTMs
    overall: str = "blstm"  # where the vertebra track takes patient_overall from (`VertebraConfig.overall`)
    crops: list[tuple[dict, CropNet]] = field(default_factory=list)  # the crop track's models, one a fold
    crop_spec: dict = field(default_factory=dict)  # how they cut a vertebra (`cspine.crops.crop_spec`)
    blend: dict | None = None  # the level-2 blend, applied to each fold's models; it answers when present
    devices: list[torch.device] = field(default_factory=lambda: [torch.device("cpu")])


def _one(values: dict, what: str, where: Path):
    """The single value every checkpoint records for ``what``; an error naming the disagreeing files."""
    distinct = {repr(v) for v in values.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{path}: {value}" for path, value in values.items())
        raise CheckpointError(f"{where}: the checkpoints disagree on {what} ({listing}); train them again together")
    return next(iter(values.values()))


def load_ensemble(run_dir: str | os.PathLike, hidden: int, devices: list[torch.device], with_vertebra: bool = True,
                  with_blend: bool = True, with_crop: bool = True) -> Ensemble:
    """Loads every ``slice/fold*/best.pt``, the BLSTMs of size ``hidden`` (and of every size the blend reads),
    the vertebra track, the crop track, their segmentation models, and the blend, of a run (or a Kaggle
    bundle).

    The k-th CNN goes to ``devices[k % len(devices)]``; the other models to ``devices[0]``. ``with_vertebra``,
    ``with_crop`` and ``with_blend`` False leave those out (a run whose config turned them off after
    training them).

    Raises:
        FileNotFoundError: no slice CNN or no BLSTM of a size needed.
        CheckpointError: a damaged checkpoint, or checkpoints that disagree on how to read a study.
    """
    run = Run(run_dir)
    device = devices[0]
    cnns, cnn_meta = {}, {}
    for k, (fold, path) in enumerate(run.slice_checkpoints().items()):
        cnns[fold], cnn_meta[path] = load_slice_model(path, devices[k % len(devices)])
    blend = load_blend(run.blend_model) if with_blend and run.blend_model.is_file() else None
    sizes = sorted({hidden, *(blend["sizes"] if blend else [])})
    blstms, blstm_meta = {}, {}
    for size in sizes:
        blstms[size] = []
        for path in run.blstm_checkpoints(size):
            model, meta = load_sequence_model(path, device)
            blstms[size].append((meta, model))
            blstm_meta[path] = meta
    empty = [size for size, models in blstms.items() if not models]
    if not cnns or empty:
        raise FileNotFoundError(f"no trained models under {run.root} (slice CNNs: {len(cnns)}, BLSTMs of size "
                                f"{', '.join(map(str, empty)) or hidden}: none); run the training stages first")
    ensemble = Ensemble(
        cnns, blstms, hidden,
        inputs=_one({p: m["inputs"] for p, m in cnn_meta.items()}, "preprocessing", run.root),
        arch=_one({p: m["arch"] for p, m in cnn_meta.items()}, "architecture", run.root),
        input=_one({p: m["input"] for p, m in blstm_meta.items()}, "BLSTM input", run.root),
        bins=_one({p: m["bins"] for p, m in blstm_meta.items()}, "seq.bins", run.root),
        tta=_one({p: m["tta"] for p, m in blstm_meta.items()}, "predict.tta", run.root),
        blend=blend, devices=list(devices))
    if with_vertebra and run.vert_models():
        _add_vertebra_track(ensemble, run, device)
    if with_crop and run.crop_models():
        _add_crop_track(ensemble, run, device)
    if not ensemble.segmenters and blend and blend["extents"]:
        _add_segmenters(ensemble, run, device)
    if blend:
        _check_blend(ensemble, run)
    return ensemble


def _add_segmenters(ensemble: Ensemble, run: Run, device: torch.device) -> None:
    """The segmentation models that find each vertebra's slices (for the vertebra track or a blend)."""
    readings = {}
    for path in run.seg_models():
        model, meta = load_segmenter(path, device)
        ensemble.segmenters.append(model)
        readings[path] = meta["reading"]
    if not ensemble.segmenters:
        raise FileNotFoundError(f"{run.root}: models that read each vertebra's slices, but no segmentation model "
                                "(segment/fold*.pt)")
    ensemble.seg_reading = _one(readings, "segmentation reading", run.root)


def _check_blend(ensemble: Ensemble, run: Run) -> None:
    """The blend reads each of its folds' models: a slice CNN, and the vertebra track where it read one."""
    missing = []
    for fold in ensemble.blend["folds"]:
        if fold not in ensemble.cnns:
            missing.append(f"fold {fold}'s slice CNN")
        if ensemble.blend["vertebra"] and not any(m["source_fold"] == fold for m, _ in ensemble.vertebra):
            missing.append(f"fold {fold}'s vertebra track")
        if ensemble.blend.get("crop") and not any(m["fold"] == fold for m, _ in ensemble.crops):
            missing.append(f"fold {fold}'s crop model")
    if missing:
        raise CheckpointError(f"{run.blend_model}: the blend reads {', '.join(missing)}, which {run.root} lacks")


def _add_vertebra_track(ensemble: Ensemble, run: Run, device: torch.device) -> None:
    """The vertebra track's BiLSTMs and the segmentation models they need to find each vertebra."""
    metas = {}
    for path in run.vert_models():
        model, meta = load_vertebra_model(path, device)
        ensemble.vertebra.append((meta, model))
        metas[path] = meta
    _add_segmenters(ensemble, run, device)
    ensemble.overall = _one({p: m["overall"] for p, m in metas.items()}, "vert.overall", run.root)
    if _one({p: m["tta"] for p, m in metas.items()}, "predict.tta of the vertebra track", run.root) != ensemble.tta:
        raise CheckpointError(f"{run.root}: the vertebra track and the BLSTMs read slices differently (tta)")


def _add_crop_track(ensemble: Ensemble, run: Run, device: torch.device) -> None:
    """The crop track's models (one a fold) and the segmentation models that place each vertebra."""
    specs = {}
    for path in run.crop_models():
        model, meta = load_crop_model(path, device)
        ensemble.crops.append((meta, model))
        specs[path] = meta["crops"]
    ensemble.crop_spec = _one(specs, "how crops are cut", run.root)
    if not ensemble.segmenters:
        _add_segmenters(ensemble, run, device)


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
             "crop.enabled": (cfg.crop.enabled, bool(ensemble.crops)),
             "blend.enabled": (cfg.blend.enabled, ensemble.blend is not None),
             **({"vert.overall": (cfg.vert.overall, ensemble.overall)} if ensemble.vertebra else {})}
    differ = [f"{key}={mine!r} (the models: {theirs!r})" for key, (mine, theirs) in pairs.items() if mine != theirs]
    if differ:
        raise ConfigError("the config contradicts the trained models: " + ", ".join(differ)
                          + "; predict with the run's own config (the default) or train again")


PerFold = dict[int, tuple[np.ndarray, np.ndarray]]  # {fold: (features [N, D], probabilities [N, 15])} of each CNN


def check_complete(cfg: Config, ensemble: Ensemble, where: str | os.PathLike) -> None:
    """Raises CheckpointError naming every model the config's folds need and ``where`` lacks.

    A bundle missing one fold's CNN would otherwise predict with the others, moving every answer without a
    word; each trained fold must have its CNN and BLSTMs (and, with the track, its vertebra models), and
    the segmentation its ``seg.folds`` models.
    """
    folds = cfg.folds.trained
    missing = [f"slice/fold{k}/best.pt" for k in folds if k not in ensemble.cnns]
    sources = {meta["source_fold"] for meta, _ in ensemble.blstms[ensemble.hidden]}
    if None not in sources:  # BLSTMs trained within each fold: one set per fold
        missing += [f"seq/h{ensemble.hidden}/fold{k}/*.pt" for k in folds if k not in sources]
    if ensemble.vertebra:
        tracked = {meta["source_fold"] for meta, _ in ensemble.vertebra}
        missing += [f"vertebra/fold{k}/*.pt" for k in folds if k not in tracked]
    if ensemble.crops:
        cropped = {meta["fold"] for meta, _ in ensemble.crops}
        missing += [f"crop/fold{k}/model.pt" for k in folds if k not in cropped]
    if ensemble.segmenters and len(ensemble.segmenters) < cfg.seg.folds:
        missing.append(f"segment/fold*.pt ({len(ensemble.segmenters)} of {cfg.seg.folds})")
    if missing:
        raise CheckpointError(f"{where}: models its config's folds need are missing: {', '.join(missing)}; "
                              "train them, or package the run again")


@torch.inference_mode()
def blstm_outputs(per_fold: PerFold, ensemble: Ensemble, hidden: int, device: torch.device) -> dict:
    """{source fold: [float [8] of each BLSTM of size ``hidden``]} for one study.

    A BLSTM trained within fold k (``seq.train_on="own_fold"``) reads CNN k's outputs, as in training; one
    trained across folds (source None) reads the mean of every CNN's probabilities.
    """
    outputs: dict = {}
    folds_mean = None
    for meta, model in ensemble.blstms[hidden]:
        key = meta["source_fold"]
        if key is None:
            if folds_mean is None:  # one mean for all such BLSTMs
                folds_mean = np.mean([probs.astype(np.float32) for _, probs in per_fold.values()], axis=0)
            feats, probs = None, folds_mean
        elif key in per_fold:
            feats, probs = per_fold[key]
        else:
            continue
        x = torch.from_numpy(study_input(feats, probs, ensemble.input, ensemble.bins))[None].to(device)
        outputs.setdefault(key, []).append(torch.sigmoid(model(x, torch.tensor([x.shape[1]]))).cpu().numpy()[0])
    return outputs


@torch.inference_mode()
def vertebra_outputs(per_fold: PerFold, extents: dict[str, tuple[int, int]], ensemble: Ensemble,
                     device: torch.device) -> dict[int, list[np.ndarray]]:
    """{source fold: [float [7] of each vertebra-track BiLSTM]}: C1..C7 from each vertebra's own slices."""
    outputs: dict[int, list[np.ndarray]] = {}
    for meta, model in ensemble.vertebra:
        if meta["source_fold"] not in per_fold:
            continue
        x = torch.from_numpy(vertebra_inputs(per_fold[meta["source_fold"]][1], extents, meta["margin"],
                                             meta["bins"])).to(device)
        p = torch.sigmoid(model(x, torch.full((len(x),), x.shape[1]))[:, 0]).cpu().numpy()
        outputs.setdefault(meta["source_fold"], []).append(p)
    return outputs


def _pooled(outputs: dict) -> np.ndarray:
    """The mean of every model's output, whatever its fold."""
    return np.mean([p for ps in outputs.values() for p in ps], axis=0)


def _fold_mean(outputs: dict, fold: int) -> np.ndarray:
    """Fold ``fold``'s models' mean output; models trained across folds (source None) serve every fold."""
    return np.mean(outputs[fold] if fold in outputs else outputs[None], axis=0)


@torch.inference_mode()
def crop_outputs(crops: np.ndarray, ensemble: Ensemble, device: torch.device, dtype: torch.dtype | None,
                 channels_last: bool) -> dict[int, list[np.ndarray]]:
    """{fold: [float [7]]}: each fold's crop model on one study's crops uint8 [7, slices, channels, size, size]."""
    return {meta["fold"]: [crop_probabilities(model, crops[None], device, dtype, channels_last)[0]]
            for meta, model in ensemble.crops}


def blend_inputs(fold: int, blend: dict, per_fold: PerFold, extents: dict | None, blstm: dict,
                 vert: dict | None, crop: dict | None = None) -> dict[str, float]:
    """What the blend reads of one study through fold ``fold``'s models: its CNN's outputs, its BLSTMs (of
    the sizes the blend read, each size's models of the fold averaged), its vertebra track and its crop
    model, as the `blend` stage read every study through its own fold's models."""
    return study_inputs(per_fold[fold][1], extents if blend["extents"] else None,
                        {h: _fold_mean(blstm[h], fold) for h in blend["sizes"]},
                        _fold_mean(vert, fold) if blend["vertebra"] else None, blend["top_k"], blend["margin"],
                        _fold_mean(crop, fold) if blend.get("crop") else None)


def combine_outputs(per_fold: PerFold, extents: dict | None, ensemble: Ensemble, device: torch.device,
                    crop: dict | None = None) -> np.ndarray:
    """float [8] in TARGETS order from the CNNs' outputs on one study (its vertebrae's extents, and the crop
    models' outputs `crop_outputs` with the crop track).

    With a blend, it answers once through each fold's CNN, BLSTMs and tracks, and the folds' answers are
    averaged; without, the BLSTMs of size ``hidden`` answer, and a track gives C1..C7: the crop track where
    there is one, else the vertebra track (patient_overall from 1 − Π(1 − p) with ``vert.overall="vertebrae"``).
    """
    blstm = {h: blstm_outputs(per_fold, ensemble, h, device) for h in ensemble.blstms}
    vert = vertebra_outputs(per_fold, extents or {}, ensemble, device) if ensemble.vertebra else None
    if ensemble.blend:
        rows = [blend_inputs(k, ensemble.blend, per_fold, extents, blstm, vert, crop) for k in ensemble.blend["folds"]]
        return apply_blend(ensemble.blend, pd.DataFrame(rows)).mean(axis=0)
    p = _pooled(blstm[ensemble.hidden])
    answer = crop or vert
    if not answer:
        return p
    track = combine(_pooled(answer)[None])[0]
    if ensemble.overall == "blstm":
        track[0] = p[0]
    return track


@torch.inference_mode()
def predict_images(study: ReadStudy, ensemble: Ensemble, cfg: Config) -> dict[str, float]:
    """The 8 probabilities of one study, read as the checkpoints record (`cspine.studies.read_study`; with
    the crop track, its bone window and crop boxes too); ``cfg`` gives the batch size, mixed precision and
    channels_last only.

    With several devices, one thread per device runs the folds that sit there: the GPUs work at once.
    """
    images = study.images
    i, devices, folds = ensemble.inputs, ensemble.devices, list(ensemble.cnns)

    def on_device(g: int) -> PerFold:
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
    extents, crop = None, None
    if ensemble.segmenters:
        labels = segment_study(ensemble.segmenters, images, ensemble.seg_reading, devices[0])
        _, found = vertebra_extents(labels, ensemble.seg_reading["min_pixels"])
        extents = {e["vertebra"]: (e["z0"], e["z1"]) for e in found}
        if ensemble.crops:
            if study.bone is None:
                raise ValueError("the crop track needs the study's bone window; read it with bone=True")
            crops = cut_study(study.bone, labels, place_vertebrae(found, len(labels), labels.shape[1]), study.boxes,
                              labels.shape[1], ensemble.crop_spec)
            device = devices[0]
            crop = crop_outputs(crops, ensemble, device, amp_dtype(device, cfg.crop.amp),
                                cfg.crop.channels_last and device.type == "cuda")
    p = combine_outputs(per_fold, extents, ensemble, devices[0], crop)
    return {t: float(p[i]) for i, t in enumerate(TARGETS)}


def predict_studies(paths: list[Path], uids: list[str], ensemble: Ensemble, cfg: Config,
                    what: str = "predict") -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Each study's 8 probabilities, read ahead by worker processes; a study that fails anywhere (reading,
    a dead reading process, the models) is logged and left out.

    Returns:
        ({uid: {target: probability}}, {uid: why it failed}).
    """
    i = ensemble.inputs
    workers = cfg.predict.workers or default_workers()
    probs: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    with StudyReader(workers, i["size"], i["crop"], i["margin"], MIN_SLICES, bone=bool(ensemble.crops)) as reader:
        for uid, study in zip(progress(uids, what, unit="study"), reader.read(paths, ahead=2 * workers)):
            try:
                if isinstance(study, Exception):
                    raise study
                for warning in study.warnings:
                    log.warning("%s", warning)
                probs[uid] = predict_images(study, ensemble, cfg)
            except Exception as exc:  # one bad study must never cost the submission: it gets the prior
                failed[uid] = f"{type(exc).__name__}: {exc}"
                log.error("%s: study %s failed (%s); it gets the prior", what, uid, failed[uid])
    return probs, failed


def self_test(data_dir: Path, ensemble: Ensemble, cfg: Config) -> dict[str, str]:
    """Predicts a few training studies with the real models when no listed test study is present.

    Kaggle's public rerun lists test studies whose images it does not have, so a bundle would never run its
    models before the hidden rerun, whose log nobody sees. This runs them on ``predict.self_test`` studies of
    ``train_images/`` and prints seconds per study, the device, the precision and every failure.

    Returns:
        {uid: why it failed} of the studies tried.
    """
    folder = data_dir / "train_images"
    uids = sorted(p.name for p in folder.iterdir() if p.is_dir())[:cfg.predict.self_test] if folder.is_dir() else []
    if not uids:
        print(f"cspine self-test: no study under {folder}; the models did not run before the hidden test")
        return {}
    device = ensemble.devices[0]
    started = time.perf_counter()
    probs, failed = predict_studies([folder / u for u in uids], uids, ensemble, cfg, "self-test")
    seconds = (time.perf_counter() - started) / len(uids)
    dtype = amp_dtype(device, cfg.slice.amp)
    print(f"cspine self-test: {len(uids)} training studies on {', '.join(map(str, ensemble.devices))} "
          f"({str(dtype).replace('torch.', '') if dtype else 'float32'}), {seconds:.1f} s a study (the pool's start "
          f"included), {len(failed)} failed")
    for uid, cause in failed.items():
        print(f"cspine self-test FAILED on {uid}: {cause}")
    for uid, p in probs.items():
        print(f"  {uid}: " + ", ".join(f"{t} {v:.3f}" for t, v in p.items()))
    return failed


def check_failures(failed: dict[str, str], tried: int, limit: float) -> None:
    """Raises PredictionError when more than ``limit`` of ``tried`` studies failed, naming the first causes."""
    if tried and len(failed) > limit * tried:
        causes = "; ".join(f"{uid}: {cause[:300]}" for uid, cause in list(failed.items())[:3])
        raise PredictionError(f"{len(failed)} of {tried} test studies failed (more than predict.max_failed="
                              f"{limit:g} of them), so no submission was written: it would score as the prior. "
                              f"First causes: {causes}. predict.max_failed=1 writes one anyway")


def warn_setting(cfg: Config, data_dir: Path, devices: list[torch.device]) -> None:
    """Says when the models or the machine are not what the data calls for: models of a CPU demo on a
    real test set (its scores mean little), or a Kaggle notebook with no GPU (hours on its CPU)."""
    if cfg.meant_for == "synthetic" and not is_complete(data_dir):
        log.warning("predict: the models come from config %r, a CPU demo made for the synthetic phantoms, and "
                    "%s is not a synthetic competition: expect little of its scores (README, 'The real "
                    "competition')", cfg.name, data_dir)
    if devices[0].type == "cpu" and KAGGLE_WORKING.is_dir():
        log.warning("predict: no GPU is visible in this Kaggle notebook, so the models run on its CPU (hours "
                    "on the hidden test set); switch the notebook's accelerator on")


def predict(cfg: Config, data_dir: str | os.PathLike, models_dir: str | os.PathLike,
            out_csv: str | os.PathLike, train: pd.DataFrame | None = None) -> pd.DataFrame:
    """Writes a complete, validated submission for the test set of ``data_dir``; returns it.

    Args:
        train: training labels for the prior of failed or absent studies (default: the real data's).

    Raises:
        PredictionError: more than ``predict.max_failed`` of the present test studies failed.
    """
    data_dir = Path(data_dir)
    check_writable(Path(out_csv).parent)
    devices = pick_devices(cfg.device)
    warn_setting(cfg, data_dir, devices)
    ensemble = load_ensemble(models_dir, cfg.seq.hidden, devices, cfg.vert.enabled, cfg.blend.enabled,
                             cfg.crop.enabled)
    check_config(cfg, ensemble)
    check_complete(cfg, ensemble, models_dir)
    if cfg.slice.channels_last:
        for k, cnn in enumerate(ensemble.cnns.values()):
            if devices[k % len(devices)].type == "cuda":
                cnn.to(memory_format=torch.channels_last)
    test = read_test(data_dir)
    uids = list_test_studies(data_dir, test)
    if not uids and cfg.predict.self_test:
        self_test(data_dir, ensemble, cfg)
    started = time.perf_counter()
    log.info("predict: %d studies on %s, read by %d worker processes", len(uids), ", ".join(map(str, devices)),
             cfg.predict.workers or default_workers())
    probs, failed = predict_studies([data_dir / "test_images" / u for u in uids], uids, ensemble, cfg)
    elapsed = time.perf_counter() - started
    check_failures(failed, len(uids), cfg.predict.max_failed)
    sub = make_submission(test, probs, prior=prior_from_train(train), clip=cfg.predict.clip)
    path = write_submission(sub, test, out_csv)
    log.info("predict: %d studies in %.1f s (%.2f s/study), %d failed, %d listed but absent; wrote %s",
             len(uids), elapsed, elapsed / max(len(uids), 1), len(failed),
             test["StudyInstanceUID"].nunique() - len(uids), path)
    return sub
