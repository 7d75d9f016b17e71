"""Slice features: how one study's slices become features and probabilities, and how a run's feature files
are read. The `extract` stage writes them; the BLSTMs, the vertebra track, the blend, the report and
inference read them through this module.

Per study, ``<run>/features/fold<k>/<uid>.npz`` holds ``features`` float16 [N, D] and ``probs`` float16
[N, 15] (SLICE_OUTPUTS), head to feet, read by fold k's CNN; each fold's ``provenance.json`` records the
checkpoint, the studies it trained on and the studies it read.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from cspine.inputs import slice_stack, to_tensor
from cspine.models import SliceNet
from cspine.runs import Run, read_json
from cspine.runtime import autocast


@torch.inference_mode()
def study_features(
    model: SliceNet,
    images: np.ndarray,
    size: int,
    device: torch.device,
    batch_size: int,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
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


def load_features(run_dir: str | os.PathLike, fold: int, uid: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, probs) of one study as extracted by fold ``fold``'s CNN (float32)."""
    with np.load(Run(run_dir).features_file(fold, uid)) as data:
        return data["features"].astype(np.float32), data["probs"].astype(np.float32)


def features_signature(run_dir: str | os.PathLike) -> dict[str, dict]:
    """{fold: its checkpoint's hash and reading}: what the run's features are, to tell when they change."""
    signature = {}
    for provenance in Run(run_dir).provenances():
        info = read_json(provenance)
        signature[str(info["fold"])] = {"checkpoint_sha": info["checkpoint_sha"], "tta": info["tta"]}
    return signature


def extracted_with_tta(signature: dict[str, dict]) -> bool:
    """Whether a run's features (its `features_signature`) were read with `predict.tta`; folds must agree."""
    settings = {info["tta"] for info in signature.values()}
    if len(settings) > 1:
        mirrored = sorted(fold for fold, info in signature.items() if info["tta"])
        raise RuntimeError(
            f"some folds were extracted with predict.tta (folds {', '.join(mirrored)}) and "
            "some without; run extract again with one setting"
        )
    return settings.pop() if settings else False


def oof_sources(run_dir: str | os.PathLike) -> dict[str, int]:
    """{study: the fold whose CNN extracted its out-of-fold features}."""
    sources = {}
    for provenance in Run(run_dir).provenances():
        info = read_json(provenance)
        for uid in info["studies"]:
            sources[uid] = info["fold"]
    return sources
