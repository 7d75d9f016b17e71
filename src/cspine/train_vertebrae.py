"""Stage `train-vertebrae`: the vertebra track, each vertebra's own fracture probability.

    python -m cspine train-vertebrae --config demo fold=0

Stage 1's CNN has read every slice of every study out of fold (`extract`). For vertebra k of a study,
this track takes the CNN's outputs on the slices k spans (its extent from the `segment` stage, widened by
``vert.margin``): the slice-fracture, k-fracture and k-presence log-odds, max-pooled into ``vert.bins``
runs, with a one-hot of k. A small BiLSTM (`SequenceNet`) shared by the seven vertebrae gives p_k.
patient_overall comes from the study BLSTM (``vert.overall="blstm"``, the default) or is 1 − Π(1 − p_k)
(``"vertebrae"``), as the competition's winners combined theirs.

Fold k's BiLSTMs train as the study BLSTMs do (``seq.train_on="own_fold"``): in ``vert.inner_folds`` inner folds
of fold k's studies, as CNN k reads them, so every study is scored by a BiLSTM and a CNN that never trained
on it (``<run>/vertebra/fold<k>/oof.csv``).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold

from cspine import TARGETS, VERTEBRAE
from cspine.checkpoints import VertebraMeta, save_model
from cspine.config import Config, VertebraConfig
from cspine.features import extracted_with_tta, features_signature, load_features, oof_sources
from cspine.inputs import VERTEBRA_FEATURES, combine, vertebra_inputs
from cspine.metrics import oof_table, read_oof, weighted_log_loss
from cspine.models import SequenceNet
from cspine.runs import Run, digest, read_json, write_csv, write_json
from cspine.runtime import pick_device, seed_everything
from cspine.stacking import extents_by_study

log = logging.getLogger(__name__)


def vertebra_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE with the metric's vertebra weights (a fractured vertebra counts twice)."""
    return (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * (1 + y)).sum() / (1 + y).sum()


@torch.inference_mode()
def score(model: SequenceNet, x: np.ndarray, device: torch.device) -> np.ndarray:
    """[S, 7] probabilities for inputs [S, 7, bins, F]."""
    model.eval()
    s, v, b, f = x.shape
    flat = torch.from_numpy(x.reshape(s * v, b, f)).to(device)
    logits = model(flat, torch.full((s * v,), b))[:, 0]
    return torch.sigmoid(logits).cpu().numpy().reshape(s, v)


def fit(
    x: np.ndarray, y: np.ndarray, v: VertebraConfig, device: torch.device, seed: int
) -> tuple[SequenceNet, list]:
    """A BiLSTM (`SequenceNet`, one output) trained on inputs [S, 7, bins, F] and labels [S, 7]."""
    seed_everything(seed)
    flat_x = torch.from_numpy(x.reshape(-1, *x.shape[2:]))
    flat_y = torch.from_numpy(y.reshape(-1).astype(np.float32))
    model = SequenceNet(VERTEBRA_FEATURES, v.hidden, 1, v.dropout, n_outputs=1).to(device)
    model.fit_standardization(flat_x.reshape(-1, VERTEBRA_FEATURES).to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=v.lr, weight_decay=v.weight_decay)
    rng = np.random.default_rng(seed)
    lengths = torch.full((v.batch_size,), x.shape[2])
    history = []
    for _ in range(v.epochs):
        model.train()
        order = rng.permutation(len(flat_x))
        total = 0.0
        for start in range(0, len(order), v.batch_size):
            idx = order[start : start + v.batch_size]
            loss = vertebra_loss(
                model(flat_x[idx].to(device), lengths[: len(idx)])[:, 0], flat_y[idx].to(device)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(flat_x))
    return model, history


def _record(run: Run, cfg: Config, fold: int) -> dict:
    """What a fold's track was made from: the features, the segmentation's extents, the study BLSTM's
    out-of-fold predictions (with ``vert.overall="blstm"``), the settings."""

    def made(path):
        return digest(path) if path is not None and path.is_file() else None

    blstm = run.seq_file(cfg.seq.hidden, fold, "oof.csv") if cfg.vert.overall == "blstm" else None
    return {
        "features": features_signature(run),
        "extents": made(run.seg_file("extents.csv")),
        "blstm": made(blstm),
        "vert": dataclasses.asdict(cfg.vert),
    }


def is_vert_trained(cfg: Config, run_dir: str | os.PathLike, fold: int) -> bool:
    """Whether fold ``fold``'s track was made from the run's current inputs with the current settings."""
    run = Run(run_dir)
    if not run.vert_file(fold, "oof.csv").is_file() or not run.vert_file(fold, "record.json").is_file():
        return False
    return read_json(run.vert_file(fold, "record.json")) == _record(run, cfg, fold)


def train_vertebra_fold(cfg: Config, run_dir: str | os.PathLike, fold: int) -> pd.DataFrame:
    """Trains fold ``fold``'s BiLSTMs in inner folds and returns their out-of-fold predictions (TARGETS order)."""
    run, v = Run(run_dir), cfg.vert
    device = pick_device(cfg.device)
    folds, labels = run.read_folds(), run.read_labels()
    source = oof_sources(run)
    tta = extracted_with_tta(features_signature(run))
    extents = extents_by_study(pd.read_csv(run.seg_file("extents.csv"), dtype={"StudyInstanceUID": str}))
    uids = [u for u in folds.loc[folds["fold"] == fold, "StudyInstanceUID"] if u in source]
    x = np.stack(
        [
            vertebra_inputs(load_features(run, source[u], u)[1], extents.get(u, {}), v.margin, v.bins)
            for u in uids
        ]
    )
    y = labels.loc[uids, list(VERTEBRAE)].to_numpy(np.float32)
    for stale in [*run.vert_dir(fold).glob("*.pt"), run.vert_file(fold, "record.json")]:
        stale.unlink(missing_ok=True)
    overall = labels.loc[uids, "patient_overall"].to_numpy(int)
    n_inner = max(2, min(v.inner_folds, len(uids)))
    strata = overall if np.bincount(overall, minlength=2).min() >= n_inner else np.zeros_like(overall)
    splitter = StratifiedKFold(n_splits=n_inner, shuffle=True, random_state=v.seed + fold)
    p, histories = np.zeros_like(y), {}
    for inner, (tr, va) in enumerate(splitter.split(np.zeros(len(uids)), strata)):
        model, history = fit(x[tr], y[tr], v, device, v.seed + 100 * fold + inner)
        p[va] = score(model, x[va], device)
        meta = VertebraMeta(v.margin, v.bins, v.overall, tta, fold, [uids[i] for i in tr])
        save_model(model, run.vert_model(fold, inner), meta)
        histories[f"inner{inner}"] = history
    write_json(histories, run.vert_file(fold, "history.json"))
    probs = combine(p)
    if v.overall == "blstm":
        blstm = read_oof(run.seq_file(cfg.seq.hidden, fold, "oof.csv"))
        probs[:, 0] = blstm.set_index("StudyInstanceUID").loc[uids, "p_patient_overall"].to_numpy()
    elif v.overall != "vertebrae":
        raise ValueError(f"vert.overall must be 'blstm' or 'vertebrae', not {v.overall!r}")
    oof = oof_table(uids, fold, probs)
    write_csv(oof, run.vert_file(fold, "oof.csv"))
    # last: the fold counts as trained
    write_json(_record(run, cfg, fold), run.vert_file(fold, "record.json"))
    log.info(
        "train-vertebrae fold %d: %d studies scored out of fold, loss %.4f",
        fold,
        len(uids),
        weighted_log_loss(labels.loc[uids, list(TARGETS)].to_numpy(), probs),
    )
    return oof
