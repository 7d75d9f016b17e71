"""Stage `predict`: test studies → submission.csv, one study at a time, never losing a submission.

    python -m cspine predict --config configs/demo.yaml --data DIR --models runs/demo --out submissions/submission.csv

Per study: DICOM → preprocessing → every fold's slice CNN → the BLSTMs → 8 probabilities. The next study
is decoded in a background thread while the models work on the current one, so memory holds at most two
studies. A study that fails anywhere is logged and gets the prior; every row_id of test.csv is written,
validated, and the file replaced atomically.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cspine import TARGETS
from cspine.competition import list_test_studies, read_test
from cspine.config import Config
from cspine.dicom import Series, load_series
from cspine.extract import study_features
from cspine.models import SequenceNet, SliceNet
from cspine.preprocess import preprocess_study
from cspine.runtime import amp_dtype, pick_device
from cspine.submission import make_submission, prior_from_train, write_submission
from cspine.train_seq import CNN_OUTPUTS, load_sequence_model, seq_dir, study_input
from cspine.train_slices import fold_dir, load_slice_model

log = logging.getLogger(__name__)


@dataclass
class Ensemble:
    """Every fold's slice CNN and the BLSTMs of the configured size."""

    cnns: dict[int, SliceNet]
    blstms: list[tuple[dict, SequenceNet]]
    input: str
    tta: bool  # the CNNs read each slice mirrored too, as when the BLSTMs' training features were extracted


def load_ensemble(cfg: Config, run_dir: str | os.PathLike, device: torch.device) -> Ensemble:
    """Loads ``slice/fold*/best.pt`` and ``seq/h<hidden>/fold*/*.pt`` of a run (or a Kaggle bundle)."""
    run_dir = Path(run_dir)
    cnns = {}
    for k in range(cfg.folds.n_splits):
        checkpoint = fold_dir(run_dir, k) / "best.pt"
        if checkpoint.is_file():
            cnns[k] = load_slice_model(checkpoint, device)
    blstms = []
    for path in sorted(seq_dir(run_dir, cfg.seq.hidden).glob("fold*/*.pt")):
        model, meta = load_sequence_model(path, device)
        blstms.append((meta, model))
    if not cnns or not blstms:
        raise FileNotFoundError(f"no trained models under {run_dir} (slice/fold*/best.pt: {len(cnns)}, "
                                f"seq/h{cfg.seq.hidden}/fold*/*.pt: {len(blstms)}); run the training stages first")
    tta = {meta.get("tta", False) for meta, _ in blstms}  # BLSTMs saved before the key read plain slices
    if len(tta) > 1:
        raise ValueError(f"{seq_dir(run_dir, cfg.seq.hidden)}: BLSTMs trained on features with and without "
                         "predict.tta; train them again on one extraction")
    return Ensemble(cnns, blstms, blstms[0][0]["input"], tta.pop())


@torch.inference_mode()
def blstm_probabilities(per_fold: dict[int, tuple[np.ndarray, np.ndarray]], ensemble: Ensemble,
                        device: torch.device) -> np.ndarray:
    """float [8] in TARGETS order: the mean of the ensemble's BLSTMs over one study's CNN outputs.

    Args:
        per_fold: {fold: (features [N, D], probabilities [N, 15])} from each fold's CNN, head to feet.
    """
    outputs, folds_mean = [], None
    for meta, model in ensemble.blstms:
        key = meta.get("source_fold")
        if key is None:  # trained on other folds' CNNs (seq.train_on="other_folds"): reads every CNN's mean
            if folds_mean is None:  # one mean for all such BLSTMs
                folds_mean = np.mean([probs.astype(np.float32) for _, probs in per_fold.values()], axis=0)
            feats, probs = None, folds_mean
        elif key in per_fold:  # trained on CNN k's reading (own_fold): reads CNN k's, as in training
            feats, probs = per_fold[key]
        else:
            continue
        if ensemble.input == "features" or meta.get("probs_as_logits"):
            x = study_input(feats, probs, ensemble.input, meta.get("bins", 0))  # exactly as in training
        else:  # a BLSTM saved before log-odds inputs, which read raw probabilities
            x = probs[:, :CNN_OUTPUTS[ensemble.input]]
        x = torch.from_numpy(x)[None].to(device)
        outputs.append(torch.sigmoid(model(x, torch.tensor([x.shape[1]]))).cpu().numpy()[0])
    return np.mean(outputs, axis=0)


@torch.inference_mode()
def predict_series(series: Series, ensemble: Ensemble, cfg: Config, device: torch.device) -> dict[str, float]:
    """The 8 probabilities of one loaded study."""
    images, _ = preprocess_study(series.hu, cfg.prepare.size, cfg.prepare.crop, cfg.prepare.margin)
    size = cfg.slice.input_size or cfg.prepare.size
    dtype = amp_dtype(device, cfg.slice.amp)
    per_fold = {k: study_features(cnn, images, size, device, cfg.predict.batch_size, dtype, tta=ensemble.tta)
                for k, cnn in ensemble.cnns.items()}
    p = blstm_probabilities(per_fold, ensemble, device)
    return {t: float(p[i]) for i, t in enumerate(TARGETS)}


def _load(path: Path) -> Series:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        series = load_series(path, on_error="skip")
    for w in caught:
        log.warning("%s", w.message)
    return series


def predict(cfg: Config, data_dir: str | os.PathLike, models_dir: str | os.PathLike,
            out_csv: str | os.PathLike, train: pd.DataFrame | None = None) -> pd.DataFrame:
    """Writes a complete, validated submission for the test set of ``data_dir``; returns it.

    Args:
        train: training labels for the prior of failed or absent studies (default: the real data's).
    """
    data_dir = Path(data_dir)
    device = pick_device(cfg.device)
    ensemble = load_ensemble(cfg, models_dir, device)
    test = read_test(data_dir)
    uids = list_test_studies(data_dir, test)
    prior = prior_from_train(train)
    probs: dict[str, dict[str, float]] = {}
    failed: list[str] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending: Future | None = reader.submit(_load, data_dir / "test_images" / uids[0]) if uids else None
        for i, uid in enumerate(tqdm(uids, desc="predict", unit="study")):
            current = pending
            pending = reader.submit(_load, data_dir / "test_images" / uids[i + 1]) if i + 1 < len(uids) else None
            try:
                series = current.result()
                if len(series) < 2:
                    raise ValueError(f"only {len(series)} readable slice(s)")
                probs[uid] = predict_series(series, ensemble, cfg, device)
            except Exception as exc:  # one bad study must never cost the submission: it gets the prior
                log.error("predict: study %s failed (%s: %s); it gets the prior", uid, type(exc).__name__, exc)
                failed.append(uid)
            del current
    elapsed = time.perf_counter() - started
    sub = make_submission(test, probs, prior=prior, clip=cfg.predict.clip)
    path = write_submission(sub, test, out_csv)
    log.info("predict: %d studies in %.1f s (%.2f s/study), %d failed, %d listed but absent; wrote %s",
             len(uids), elapsed, elapsed / max(len(uids), 1), len(failed),
             test["StudyInstanceUID"].nunique() - len(uids), path)
    return sub
