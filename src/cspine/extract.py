"""Stage `extract`: out-of-fold slice features and probabilities from each fold's slice CNN.

    python -m cspine extract --config configs/demo.yaml

For fold k, CNN k (trained on the other folds) reads only fold k's studies, so every study's features
come from a network that never trained on it. Per study, ``<run>/features/fold<k>/<uid>.npz`` holds
``features`` float16 [N, D] and ``probs`` float16 [N, 15] (SLICE_OUTPUTS), head to feet;
``provenance.json`` records the checkpoint and the studies it trained on, so the no-leak rule can be checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cspine.config import Config
from cspine.data import MEAN, STD, slice_stack
from cspine.models import SliceNet
from cspine.prepare import load_study_images
from cspine.runtime import amp_dtype, autocast, pick_device
from cspine.train_slices import fold_dir, load_slice_model

log = logging.getLogger(__name__)


def features_dir(run_dir: str | os.PathLike, fold: int) -> Path:
    return Path(run_dir) / "features" / f"fold{fold}"


def to_tensor(images: np.ndarray, size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, H, W, C] → normalised float [B, C, size, size] on the device (resized if needed).

    C is 3, or 3·(2·context + 1) for a `slice_stack`; every channel is normalised alike.
    """
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - MEAN) / STD
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.inference_mode()
def study_features(model: SliceNet, images: np.ndarray, size: int, device: torch.device, batch_size: int,
                   dtype: torch.dtype | None = None, channels_last: bool = False,
                   tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features float16 [N, D] and probabilities float16 [N, 15] of one study's preprocessed slices.

    ``images`` is the whole study, uint8 [N, H, W, 3], head to feet: a CNN with context reads each slice's
    neighbours from it. With ``tta`` each slice is also read mirrored left-right (the CNN trained with
    horizontal flips) and the two readings' log-odds and features are averaged: a false positive that one
    reading alone produces is damped, which matters because a study's score hangs on its highest slices.
    """
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        batch = slice_stack(images, np.arange(start, min(start + batch_size, len(images))), model.context)
        x = to_tensor(batch, size, device, channels_last)
        with autocast(device, dtype):
            f, logits = model.features_and_logits(x)
            if tta:
                f_mirror, logits_mirror = model.features_and_logits(x.flip(-1))
                f, logits = (f.float() + f_mirror.float()) / 2, (logits.float() + logits_mirror.float()) / 2
        feats.append(f.float().cpu().numpy().astype(np.float16))
        probs.append(torch.sigmoid(logits.float()).cpu().numpy().astype(np.float16))
    return np.concatenate(feats), np.concatenate(probs)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def extract_fold(cfg: Config, run_dir: str | os.PathLike, fold: int) -> Path:
    """Writes the out-of-fold features of one fold (skipping studies already extracted by this checkpoint)."""
    run_dir = Path(run_dir)
    checkpoint = fold_dir(run_dir, fold) / "best.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} not found: train the slice CNN of fold {fold} first")
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"StudyInstanceUID": str})
    index = pd.read_csv(run_dir / "cache" / "index.csv", dtype={"StudyInstanceUID": str})
    cached = set(index["StudyInstanceUID"])
    held_out = [u for u in folds.loc[folds["fold"] == fold, "StudyInstanceUID"] if u in cached]
    trained_on = sorted(folds.loc[folds["fold"] != fold, "StudyInstanceUID"])
    out = features_dir(run_dir, fold)
    out.mkdir(parents=True, exist_ok=True)
    sha, tta = _sha(checkpoint), cfg.predict.tta
    provenance_path = out / "provenance.json"
    if provenance_path.is_file():
        old = json.loads(provenance_path.read_text())
        if old["checkpoint_sha"] != sha or old.get("tta", False) != tta:
            for stale in out.glob("*.npz"):  # another checkpoint's or reading's features must not mix in
                stale.unlink()
    provenance = {"fold": fold, "checkpoint": str(checkpoint), "checkpoint_sha": sha, "tta": tta,
                  "trained_on": trained_on, "studies": held_out}
    provenance_path.write_text(json.dumps(provenance, indent=1))

    device = pick_device(cfg.device)
    model = load_slice_model(checkpoint, device)
    channels_last = cfg.slice.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(device, cfg.slice.amp)
    size = cfg.slice.input_size or cfg.prepare.size
    todo = [u for u in held_out if not (out / f"{u}.npz").is_file()]
    slices, started = 0, time.perf_counter()
    for uid in tqdm(todo, desc=f"extract fold {fold}", unit="study"):
        images = load_study_images(run_dir / "cache", uid)
        feats, probs = study_features(model, images, size, device, cfg.predict.batch_size, dtype,
                                      channels_last, tta)
        tmp = out / f"{uid}.part.npz"
        np.savez(tmp, features=feats, probs=probs)
        os.replace(tmp, out / f"{uid}.npz")
        slices += len(images)
    if todo:
        elapsed = time.perf_counter() - started
        log.info("extract fold %d: %d studies, %d slices, %.0f slices/s", fold, len(todo), slices,
                 slices / max(elapsed, 1e-9))
    return out


def load_features(run_dir: str | os.PathLike, fold: int, uid: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, probs) of one study as extracted by fold ``fold``'s CNN (float32)."""
    with np.load(features_dir(run_dir, fold) / f"{uid}.npz") as data:
        return data["features"].astype(np.float32), data["probs"].astype(np.float32)


def features_signature(run_dir: str | os.PathLike) -> dict[str, dict]:
    """{fold: its checkpoint's hash and reading}: what the run's features are, to tell when they change."""
    signature = {}
    for provenance in sorted(Path(run_dir, "features").glob("fold*/provenance.json")):
        info = json.loads(provenance.read_text())
        signature[str(info["fold"])] = {"checkpoint_sha": info.get("checkpoint_sha"),
                                        "tta": info.get("tta", False)}
    return signature


def extracted_with_tta(signature: dict[str, dict]) -> bool:
    """Whether a run's features (its `features_signature`) were read with `predict.tta`; folds must agree."""
    settings = {info["tta"] for info in signature.values()}
    if len(settings) > 1:
        mirrored = sorted(fold for fold, info in signature.items() if info["tta"])
        raise RuntimeError(f"some folds were extracted with predict.tta (folds {', '.join(mirrored)}) and "
                           "some without; run extract again with one setting")
    return settings.pop() if settings else False


def oof_sources(run_dir: str | os.PathLike) -> dict[str, int]:
    """{study: the fold whose CNN extracted its out-of-fold features}."""
    sources = {}
    for provenance in sorted(Path(run_dir, "features").glob("fold*/provenance.json")):
        info = json.loads(provenance.read_text())
        for uid in info["studies"]:
            sources[uid] = info["fold"]
    return sources
