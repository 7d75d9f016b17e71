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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cspine import TARGETS
from cspine.cache import MIN_SLICES
from cspine.competition import is_complete, list_test_studies, read_test
from cspine.config import Config
from cspine.crops import cut_study, place_vertebrae
from cspine.dicom import default_workers
from cspine.ensemble import BLSTM, CROP, VERTEBRA, Ensemble, check_complete, check_config, load_ensemble
from cspine.features import study_features
from cspine.inputs import combine, study_input, vertebra_inputs
from cspine.models import crop_probabilities
from cspine.progress import progress
from cspine.runs import check_writable
from cspine.runtime import amp_dtype, pick_devices
from cspine.segmenter import check_vertebrae, segment_study, vertebra_extents
from cspine.stacking import Blend, study_inputs
from cspine.studies import NoSpineError, ReadStudy, StudyReader
from cspine.submission import PredictionError, make_submission, prior_from_train, write_submission

log = logging.getLogger(__name__)

KAGGLE_WORKING = Path("/kaggle/working")  # present only inside a Kaggle notebook


# {fold: (features [N, D], probabilities [N, 15])} of each CNN
PerFold = dict[int, tuple[np.ndarray, np.ndarray]]


@torch.inference_mode()
def blstm_outputs(per_fold: PerFold, ensemble: Ensemble, hidden: int, device: torch.device) -> dict:
    """{source fold: [float [8] of each BLSTM of size ``hidden``]} for one study.

    A BLSTM trained within fold k (``seq.train_on="own_fold"``) reads CNN k's outputs, as in training; one
    trained across folds (source None) reads the mean of every CNN's probabilities.
    """
    outputs: dict = {}
    folds_mean = None
    for meta, model in ensemble.blstms[hidden]:
        key = meta.fold
        if key is None:
            if folds_mean is None:  # one mean for all such BLSTMs
                folds_mean = np.mean([probs.astype(np.float32) for _, probs in per_fold.values()], axis=0)
            feats, probs = None, folds_mean
        elif key in per_fold:
            feats, probs = per_fold[key]
        else:
            continue
        x = torch.from_numpy(study_input(feats, probs, ensemble.input, ensemble.bins))[None].to(device)
        outputs.setdefault(key, []).append(
            torch.sigmoid(model(x, torch.tensor([x.shape[1]]))).cpu().numpy()[0]
        )
    return outputs


@torch.inference_mode()
def vertebra_outputs(
    per_fold: PerFold, extents: dict[str, tuple[int, int]], ensemble: Ensemble, device: torch.device
) -> dict[int, list[np.ndarray]]:
    """{source fold: [float [7] of each vertebra-track BiLSTM]}: C1..C7 from each vertebra's own slices."""
    outputs: dict[int, list[np.ndarray]] = {}
    for meta, model in ensemble.vertebra:
        if meta.fold not in per_fold:
            continue
        x = torch.from_numpy(vertebra_inputs(per_fold[meta.fold][1], extents, meta.margin, meta.bins)).to(
            device
        )
        p = torch.sigmoid(model(x, torch.full((len(x),), x.shape[1]))[:, 0]).cpu().numpy()
        outputs.setdefault(meta.fold, []).append(p)
    return outputs


def _pooled(outputs: dict) -> np.ndarray:
    """The mean of every model's output, whatever its fold."""
    return np.mean([p for ps in outputs.values() for p in ps], axis=0)


def _fold_mean(outputs: dict, fold: int) -> np.ndarray:
    """Fold ``fold``'s models' mean output; models trained across folds (source None) serve every fold."""
    return np.mean(outputs[fold] if fold in outputs else outputs[None], axis=0)


@torch.inference_mode()
def crop_outputs(
    crops: np.ndarray,
    ensemble: Ensemble,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
) -> dict[int, list[np.ndarray]]:
    """{fold: [float [7]]}: each fold's crop model on one study's crops uint8 [7, slices, channels, size, size]."""
    return {
        meta.fold: [crop_probabilities(model, crops[None], device, dtype, channels_last)[0]]
        for meta, model in ensemble.crops
    }


def blend_inputs(
    fold: int,
    blend: Blend,
    per_fold: PerFold,
    extents: dict | None,
    blstm: dict,
    vert: dict | None,
    crop: dict | None = None,
) -> dict[str, float]:
    """What the blend reads of one study through fold ``fold``'s models: its CNN's outputs, its BLSTMs (of
    the sizes the blend read, each size's models of the fold averaged), its vertebra track and its crop
    model, as the `blend` stage read every study through its own fold's models."""
    return study_inputs(
        per_fold[fold][1],
        extents if blend.extents else None,
        {h: _fold_mean(blstm[h], fold) for h in blend.sizes},
        _fold_mean(vert, fold) if blend.vertebra else None,
        blend.top_k,
        blend.margin,
        _fold_mean(crop, fold) if blend.crop else None,
    )


def _alone(ensemble: Ensemble, blstm: dict, vert: dict | None, crop: dict | None) -> dict[str, np.ndarray]:
    """float [8] of each model that answers alone, on one study (``blstm``, ``vert``, ``crop``: its models'
    outputs by fold): "blstm", the BLSTMs of size ``hidden``; "vertebra" and "crop", the tracks' C1..C7 and
    their 1 − Π(1 − p_k) as patient_overall."""
    alone = {BLSTM: _pooled(blstm[ensemble.hidden])}
    alone.update({name: combine(_pooled(a)[None])[0] for name, a in ((VERTEBRA, vert), (CROP, crop)) if a})
    return alone


def _submitted(
    ensemble: Ensemble,
    per_fold: PerFold,
    extents: dict | None,
    blstm: dict,
    vert: dict | None,
    crop: dict | None,
) -> np.ndarray:
    """What `predict` submits of one study, from every model's outputs: each target from the model
    `Ensemble.answers` names."""
    if ensemble.blend:
        rows = [
            {"fold": k, **blend_inputs(k, ensemble.blend, per_fold, extents, blstm, vert, crop)}
            for k in ensemble.blend.folds
        ]
        return ensemble.blend.answer(pd.DataFrame(rows)).mean(axis=0)
    alone = _alone(ensemble, blstm, vert, crop)
    return np.array([alone[model][i] for i, model in enumerate(ensemble.answers().values())])


def combine_outputs(
    per_fold: PerFold,
    extents: dict | None,
    ensemble: Ensemble,
    device: torch.device,
    crop: dict | None = None,
) -> np.ndarray:
    """float [8] in TARGETS order from the CNNs' outputs on one study (its vertebrae's extents, and the crop
    models' outputs `crop_outputs` with the crop track).

    With a blend, it answers once through each fold's CNN, BLSTMs and tracks, and the folds' answers are
    averaged; without, the BLSTMs of size ``hidden`` answer, and a track gives C1..C7: the crop track where
    there is one, else the vertebra track (patient_overall from 1 − Π(1 − p) with ``vert.overall="vertebrae"``).
    """
    blstm = {h: blstm_outputs(per_fold, ensemble, h, device) for h in ensemble.blstms}
    vert = vertebra_outputs(per_fold, extents or {}, ensemble, device) if ensemble.vertebra else None
    return _submitted(ensemble, per_fold, extents, blstm, vert, crop)


def track_outputs(
    per_fold: PerFold,
    extents: dict | None,
    ensemble: Ensemble,
    device: torch.device,
    crop: dict | None = None,
) -> dict[str, np.ndarray]:
    """float [8] of each model that could answer alone, and of what is submitted, on one study: "paper"
    (the CNNs and the BLSTMs of size ``hidden``), "vertebra" and "crop" (their C1..C7; patient_overall as
    ``vert.overall`` says), "submitted" (`combine_outputs`). What `python -m cspine holdout` scores."""
    blstm = {h: blstm_outputs(per_fold, ensemble, h, device) for h in ensemble.blstms}
    vert = vertebra_outputs(per_fold, extents or {}, ensemble, device) if ensemble.vertebra else None
    alone = _alone(ensemble, blstm, vert, crop)
    tracks = {"paper": alone.pop(BLSTM)}
    for name, p in alone.items():  # a track's patient_overall as `vert.overall` says
        tracks[name] = p if ensemble.overall == "vertebrae" else np.concatenate([tracks["paper"][:1], p[1:]])
    tracks["submitted"] = _submitted(ensemble, per_fold, extents, blstm, vert, crop)
    return tracks


@torch.inference_mode()
def model_outputs(
    study: ReadStudy, ensemble: Ensemble, cfg: Config
) -> tuple[PerFold, dict | None, dict | None]:
    """Every model's reading of one study, as the checkpoints record (`cspine.studies.read_study`; with the
    crop track, its bone window and crop boxes too): (each fold's CNN outputs, the vertebrae's extents, the
    crop models' outputs). ``cfg`` gives the batch size, mixed precision and channels_last only.

    With several devices, one thread per device runs the folds that sit there: the GPUs work at once.
    """
    images = study.images
    i, devices, folds = ensemble.reading, ensemble.devices, list(ensemble.cnns)

    def on_device(g: int) -> PerFold:
        device = devices[g]
        channels_last = cfg.slice.channels_last and device.type == "cuda"
        return {
            k: study_features(
                ensemble.cnns[k],
                images,
                i.input_size,
                device,
                cfg.predict.batch_size,
                amp_dtype(device, cfg.slice.amp),
                channels_last,
                tta=ensemble.tta,
            )
            for k in folds[g :: len(devices)]
        }

    if len(devices) > 1:
        with ThreadPoolExecutor(len(devices)) as pool:
            parts = list(pool.map(on_device, range(len(devices))))
    else:
        parts = [on_device(0)]
    per_fold = {k: part[k] for k in folds for part in parts if k in part}
    extents, crop = None, None
    if ensemble.segmenters:
        labels = segment_study(ensemble.segmenters, images, study.dz, ensemble.seg_reading, devices[0])
        _, found = vertebra_extents(labels, ensemble.seg_reading.min_pixels)
        if not found:  # bone, but no vertebra: nothing per vertebra to read, and no spine to answer about
            raise NoSpineError("no spine to read: the segmentation found none of C1..C7")
        problems = check_vertebrae(found, study.dz)
        if problems:
            study.warnings.append(f"its vertebrae fail the segmentation's check ({'; '.join(problems)})")
        extents = {e["vertebra"]: (e["z0"], e["z1"]) for e in found}
        if ensemble.crops:
            if study.bone is None:
                raise ValueError("the crop track needs the study's bone window; read it with bone=True")
            crops = cut_study(
                study.bone,
                labels,
                place_vertebrae(found, len(labels), labels.shape[1]),
                study.boxes,
                labels.shape[1],
                ensemble.crop_spec,
            )
            device = devices[0]
            crop = crop_outputs(
                crops,
                ensemble,
                device,
                amp_dtype(device, cfg.crop.amp),
                cfg.crop.channels_last and device.type == "cuda",
            )
    return per_fold, extents, crop


@torch.inference_mode()
def predict_images(study: ReadStudy, ensemble: Ensemble, cfg: Config) -> dict[str, float]:
    """The 8 probabilities `predict` submits of one study (`model_outputs`, `combine_outputs`)."""
    per_fold, extents, crop = model_outputs(study, ensemble, cfg)
    p = combine_outputs(per_fold, extents, ensemble, ensemble.devices[0], crop)
    return {t: float(p[i]) for i, t in enumerate(TARGETS)}


@torch.inference_mode()
def predict_tracks(study: ReadStudy, ensemble: Ensemble, cfg: Config) -> dict[str, dict[str, float]]:
    """{track: its 8 probabilities} of one study (`track_outputs`): what each model alone would answer, and
    what `predict` submits ("submitted")."""
    per_fold, extents, crop = model_outputs(study, ensemble, cfg)
    tracks = track_outputs(per_fold, extents, ensemble, ensemble.devices[0], crop)
    return {name: {t: float(p[i]) for i, t in enumerate(TARGETS)} for name, p in tracks.items()}


def predict_studies(
    paths: list[Path],
    uids: list[str],
    ensemble: Ensemble,
    cfg: Config,
    what: str = "predict",
    answer: Callable[[ReadStudy, Ensemble, Config], dict] = predict_images,
) -> tuple[dict[str, dict], dict[str, str]]:
    """Each study's answer (``answer``: by default its 8 probabilities, `predict_images`), read ahead by
    worker processes; a study that fails anywhere (reading, a dead reading process, the models) is logged
    and left out.

    Returns:
        ({uid: {target: probability}}, {uid: why it failed}).
    """
    i = ensemble.reading
    workers = cfg.predict.workers or default_workers()
    probs: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    with StudyReader(workers, i.size, i.crop, i.margin, MIN_SLICES, bone=bool(ensemble.crops)) as reader:
        for uid, study in zip(progress(uids, what, unit="study"), reader.read(paths, ahead=2 * workers)):
            try:
                if isinstance(study, Exception):
                    raise study
                for warning in study.warnings:  # the reading's
                    log.warning("%s", warning)
                read = len(study.warnings)
                probs[uid] = answer(study, ensemble, cfg)
                for warning in study.warnings[read:]:  # the models'
                    log.warning("%s: study %s: %s", what, uid, warning)
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
    uids = (
        sorted(p.name for p in folder.iterdir() if p.is_dir())[: cfg.predict.self_test]
        if folder.is_dir()
        else []
    )
    if not uids:
        print(f"cspine self-test: no study under {folder}; the models did not run before the hidden test")
        return {}
    device = ensemble.devices[0]
    started = time.perf_counter()
    probs, failed = predict_studies([folder / u for u in uids], uids, ensemble, cfg, "self-test")
    seconds = (time.perf_counter() - started) / len(uids)
    dtype = amp_dtype(device, cfg.slice.amp)
    print(
        f"cspine self-test: {len(uids)} training studies on {', '.join(map(str, ensemble.devices))} "
        f"({str(dtype).replace('torch.', '') if dtype else 'float32'}), {seconds:.1f} s a study (the pool's start "
        f"included), {len(failed)} failed"
    )
    for uid, cause in failed.items():
        print(f"cspine self-test FAILED on {uid}: {cause}")
    for uid, p in probs.items():
        print(f"  {uid}: " + ", ".join(f"{t} {v:.3f}" for t, v in p.items()))
    return failed


def check_failures(failed: dict[str, str], tried: int, limit: float) -> None:
    """Raises PredictionError when more than ``limit`` of ``tried`` studies failed, naming the first causes."""
    if tried and len(failed) > limit * tried:
        causes = "; ".join(f"{uid}: {cause[:300]}" for uid, cause in list(failed.items())[:3])
        raise PredictionError(
            f"{len(failed)} of {tried} test studies failed (more than predict.max_failed="
            f"{limit:g} of them), so no submission was written: it would score as the prior. "
            f"First causes: {causes}. predict.max_failed=1 writes one anyway"
        )


def warn_setting(cfg: Config, data_dir: Path, devices: list[torch.device]) -> None:
    """Says when the models or the machine are not what the data calls for: models of a CPU demo on a
    real test set (its scores mean little), or a Kaggle notebook with no GPU (hours on its CPU)."""
    if cfg.meant_for == "synthetic" and not is_complete(data_dir):
        log.warning(
            "predict: the models come from config %r, a CPU demo made for the synthetic phantoms, and "
            "%s is not a synthetic competition: expect little of its scores (README, 'The real "
            "competition')",
            cfg.name,
            data_dir,
        )
    if devices[0].type == "cpu" and KAGGLE_WORKING.is_dir():
        log.warning(
            "predict: no GPU is visible in this Kaggle notebook, so the models run on its CPU (hours "
            "on the hidden test set); switch the notebook's accelerator on"
        )


def predict(
    cfg: Config,
    data_dir: str | os.PathLike,
    models_dir: str | os.PathLike,
    out_csv: str | os.PathLike,
    train: pd.DataFrame | None = None,
) -> pd.DataFrame:
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
    ensemble = load_ensemble(
        models_dir, cfg.seq.hidden, devices, cfg.vert.enabled, cfg.blend.enabled, cfg.crop.enabled
    )
    check_config(cfg, ensemble)
    check_complete(cfg, ensemble, models_dir)
    if cfg.slice.channels_last:
        for k, cnn in enumerate(ensemble.cnns.values()):
            if devices[k % len(devices)].type == "cuda":
                cnn.to(memory_format=torch.channels_last)
    test = read_test(data_dir)
    uids = list_test_studies(data_dir, test)
    if not uids and cfg.predict.self_test:
        failed = self_test(data_dir, ensemble, cfg)
        if failed:  # a bundle that cannot read a study must fail the public rerun, not the hidden one
            raise PredictionError(
                f"self-test: {len(failed)} training studies failed with the bundle's models; no submission "
                "written. First causes: " + "; ".join(f"{u}: {c}" for u, c in list(failed.items())[:3])
            )
    started = time.perf_counter()
    log.info(
        "predict: %d studies on %s, read by %d worker processes",
        len(uids),
        ", ".join(map(str, devices)),
        cfg.predict.workers or default_workers(),
    )
    probs, failed = predict_studies([data_dir / "test_images" / u for u in uids], uids, ensemble, cfg)
    elapsed = time.perf_counter() - started
    check_failures(failed, len(uids), cfg.predict.max_failed)
    sub = make_submission(test, probs, prior=prior_from_train(train), clip=cfg.predict.clip)
    path = write_submission(sub, test, out_csv)
    log.info(
        "predict: %d studies in %.1f s (%.2f s/study), %d failed, %d listed but absent; wrote %s",
        len(uids),
        elapsed,
        elapsed / max(len(uids), 1),
        len(failed),
        test["StudyInstanceUID"].nunique() - len(uids),
        path,
    )
    return sub
