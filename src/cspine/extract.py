"""Stage `extract`: out-of-fold slice features and probabilities from each fold's slice CNN.

    python -m cspine extract --config demo

For fold k, CNN k (trained on the other folds) reads only fold k's studies, so every study's features
come from a network that never trained on it. Per study, ``<run>/features/fold<k>/<uid>.npz`` holds
``features`` float16 [N, D] and ``probs`` float16 [N, 15] (SLICE_OUTPUTS), head to feet;
``provenance.json`` records the checkpoint, the studies it trained on (from the checkpoint itself) and the
studies it read, so the no-leak rule can be checked from the files alone. How a study is read, and how the
files are read back, is `cspine.features`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from cspine.cache import load_study_images
from cspine.checkpoints import load_slice_model
from cspine.config import Config
from cspine.features import study_features
from cspine.progress import progress
from cspine.runs import Run, atomic_path, digest, read_json, write_json
from cspine.runtime import amp_dtype, pick_device

log = logging.getLogger(__name__)


def extract_fold(cfg: Config, run_dir: str | os.PathLike, fold: int) -> Path:
    """Writes the out-of-fold features of one fold (skipping studies already extracted by this checkpoint).

    Raises:
        RuntimeError: the fold's CNN trained on a study it would read (a leak: folds.csv changed after training).
    """
    run = Run(run_dir)
    checkpoint = run.slice_best(fold)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} not found: train the slice CNN of fold {fold} first")
    model, meta = load_slice_model(checkpoint, pick_device(cfg.device))
    folds = run.read_folds()
    cached = set(run.cache.read_index()["StudyInstanceUID"])
    held_out = [u for u in folds.loc[folds["fold"] == fold, "StudyInstanceUID"] if u in cached]
    leaked = sorted(set(meta.trained_on) & set(held_out))
    if leaked:
        raise RuntimeError(
            f"{checkpoint} trained on {len(leaked)} of fold {fold}'s studies (e.g. {leaked[0]}): "
            f"{run.folds} changed after training; train the fold again"
        )
    out = run.features_dir(fold)
    sha, tta = digest(checkpoint), cfg.predict.tta
    if run.provenance(fold).is_file():
        old = read_json(run.provenance(fold))
        if old["checkpoint_sha"] != sha or old["tta"] != tta:
            for stale in out.glob("*.npz"):  # another checkpoint's or reading's features must not mix in
                stale.unlink()
    write_json(
        {
            "fold": fold,
            "checkpoint": str(checkpoint),
            "checkpoint_sha": sha,
            "tta": tta,
            "trained_on": meta.trained_on,
            "studies": held_out,
        },
        run.provenance(fold),
    )

    device = next(model.parameters()).device
    channels_last = cfg.slice.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(device, cfg.slice.amp)
    size = meta.reading.input_size
    todo = [u for u in held_out if not run.features_file(fold, u).is_file()]
    slices, started = 0, time.perf_counter()
    for uid in progress(todo, f"extract fold {fold}", unit="study"):
        images = load_study_images(run.cache.root, uid)
        feats, probs = study_features(
            model, images, size, device, cfg.predict.batch_size, dtype, channels_last, tta
        )
        with atomic_path(run.features_file(fold, uid)) as tmp, open(tmp, "wb") as f:
            np.savez(f, features=feats, probs=probs)
        slices += len(images)
    if todo:
        elapsed = time.perf_counter() - started
        log.info(
            "extract fold %d: %d studies, %d slices, %.0f slices/s",
            fold,
            len(todo),
            slices,
            slices / max(elapsed, 1e-9),
        )
    return out


def is_extracted(cfg: Config, run_dir: str | os.PathLike, fold: int) -> bool:
    """Whether every study of the fold has features from its current checkpoint, read as ``cfg`` says."""
    run = Run(run_dir)
    if not run.provenance(fold).is_file() or not run.slice_best(fold).is_file():
        return False
    recorded = read_json(run.provenance(fold))
    return (
        recorded["checkpoint_sha"] == digest(run.slice_best(fold))
        and recorded["tta"] == cfg.predict.tta
        and all(run.features_file(fold, u).is_file() for u in recorded["studies"])
    )
