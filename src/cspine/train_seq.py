"""Stage 2: the BLSTM study model over a study's slice features, trained without leaks.

    python -m cspine train-seq --config demo fold=0

Trains every BLSTM size the report compares (``seq.compare_hidden``, and ``seq.hidden``, the one
`predict` uses), skipping sizes already trained on the run's current features with the current settings.

Two protocols (``seq.train_on``), both leak-free:

- ``own_fold`` (the default, and the only one for the paper's ``seq.input=features``): fold k's BLSTMs
  train in ``seq.inner_folds`` inner folds over fold k's studies, read by CNN k. A BLSTM then meets one
  CNN's features or outputs, on the scale it learned, in training and in `predict` alike. CNNs of
  different folds learn unrelated feature spaces, and even their outputs sit on different scales: on the
  demo, one fold's healthy studies peak at −0.2 log-odds and the other's at −3.1.
- ``other_folds`` (``seq.input=probs``, all 15 slice outputs, or ``fracture``, the slice-fracture output
  alone): fold k's BLSTM trains on every other fold's out-of-fold outputs and is scored on fold k. More
  studies to train on, read by other CNNs than the one it is scored through.

Either way every study gets an out-of-fold prediction (``<run>/seq/h<H>/oof.csv``) from a BLSTM that never
trained on it, fed by a CNN that never trained on it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold, train_test_split

from cspine import TARGETS
from cspine.checkpoints import SequenceMeta, save_model
from cspine.config import Config, SeqConfig
from cspine.features import extracted_with_tta, features_signature, load_features, oof_sources
from cspine.inputs import CNN_OUTPUTS, study_input
from cspine.metrics import oof_table, p_columns, target_weights, weighted_log_loss
from cspine.models import SequenceNet
from cspine.runs import Run, read_json, write_csv, write_json
from cspine.runtime import pick_device, seed_everything

log = logging.getLogger(__name__)


@dataclass
class Study:
    uid: str
    x: np.ndarray  # float32 [N, D]
    y: np.ndarray  # float32 [8] in TARGETS order


def collate(studies: list[Study]):
    """Pads studies into x [B, T, D], lengths [B], y [B, 8]."""
    lengths = torch.tensor([len(study.x) for study in studies])
    batch = torch.zeros(len(studies), int(lengths.max()), studies[0].x.shape[1])
    for i, study in enumerate(studies):
        batch[i, : len(study.x)] = torch.from_numpy(study.x)
    return batch, lengths, torch.from_numpy(np.stack([study.y for study in studies]))


def sequence_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """ "competition": the metric's weighted BCE, normalised per study; "case": plain BCE on the case labels."""
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    if kind == "case":
        return bce.mean()
    if kind == "competition":
        w = torch.from_numpy(target_weights(y.cpu().numpy())).to(bce)
        return ((w * bce).sum(1) / w.sum(1)).mean()
    raise ValueError(f"seq.loss must be 'case' or 'competition', not {kind!r}")


@torch.inference_mode()
def score_studies(
    model: SequenceNet, studies: list[Study], device: torch.device, batch_size: int = 16
) -> np.ndarray:
    """Probabilities [S, 8] in TARGETS order."""
    model.eval()
    out = []
    for start in range(0, len(studies), batch_size):
        x, lengths, _ = collate(studies[start : start + batch_size])
        out.append(torch.sigmoid(model(x.to(device), lengths)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(TARGETS)))


def split_for_stopping(studies: list[Study], fraction: float, seed: int) -> tuple[list[Study], list[Study]]:
    """(fit, stop): ``fraction`` of the training studies held back to choose the epoch, stratified by case label.

    Early stopping on the studies being scored would pick the epoch that suits them best and flatter the
    out-of-fold figures; the held-back share comes out of the training studies instead.
    """
    n_stop = round(len(studies) * fraction)
    if fraction <= 0 or n_stop < 2 or len(studies) - n_stop < 2:
        return studies, []
    y = np.array([st.y[0] for st in studies]).astype(int)
    strata = y if np.bincount(y, minlength=2).min() >= 2 else None
    fit, stop = train_test_split(
        np.arange(len(studies)), test_size=n_stop, random_state=seed, stratify=strata
    )
    return [studies[i] for i in fit], [studies[i] for i in stop]


def fit_sequence_model(
    train: list[Study], stop: list[Study], seq: SeqConfig, hidden: int, device: torch.device, seed: int
) -> tuple[SequenceNet, list[dict]]:
    """Trains one BLSTM on ``train``; early stopping on the competition loss of ``stop`` (all epochs if empty)."""
    seed_everything(seed)
    model = SequenceNet(train[0].x.shape[1], hidden, seq.layers, seq.dropout).to(device)
    model.fit_standardization(torch.from_numpy(np.concatenate([st.x for st in train])).to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=seq.lr, weight_decay=seq.weight_decay)
    rng = np.random.default_rng(seed)
    best, best_state, bad, history = math.inf, None, 0, []
    for epoch in range(seq.epochs):
        model.train()
        order = rng.permutation(len(train))
        total = 0.0
        for start in range(0, len(order), seq.batch_size):
            x, lengths, y = collate([train[i] for i in order[start : start + seq.batch_size]])
            loss = sequence_loss(model(x.to(device), lengths), y.to(device), seq.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(x)
        row = {"epoch": epoch + 1, "train_loss": total / len(train)}
        if stop:
            probs = score_studies(model, stop, device)
            row["stop_loss"] = weighted_log_loss(np.stack([v.y for v in stop]), probs)
            if row["stop_loss"] < best:
                best, bad = row["stop_loss"], 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
        history.append(row)
        if stop and bad >= seq.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, history


def _fit_and_score(
    train: list[Study], scored: list[Study], seq: SeqConfig, hidden: int, device: torch.device, seed: int
) -> tuple[SequenceNet, list[dict], np.ndarray]:
    """A BLSTM trained on ``train`` (early stopping on a share of it) and its predictions for ``scored``."""
    fit, stop = split_for_stopping(train, seq.stop_fraction, seed)
    model, history = fit_sequence_model(fit, stop, seq, hidden, device, seed)
    return model, history, score_studies(model, scored, device)


def _load_studies(
    run: Run, uids: list[str], labels: pd.DataFrame, mode: str, source: dict[str, int], bins: int
) -> list[Study]:
    studies = []
    for uid in uids:
        feats, probs = load_features(run, source[uid], uid)
        y = labels.loc[uid, list(TARGETS)].to_numpy(np.float32)
        studies.append(Study(uid, study_input(feats, probs, mode, bins), y))
    return studies


def _save(
    model: SequenceNet, path, seq: SeqConfig, source_fold: int | None, trained_on: list[str], tta: bool
) -> None:
    """The BLSTM and how its inputs were made (``tta``: slices read mirrored too), for `predict` to match."""
    save_model(model, path, SequenceMeta(seq.input, seq.bins, tta, source_fold, trained_on))


def train_seq(cfg: Config, run_dir: str | os.PathLike, fold: int) -> list[int]:
    """Trains fold ``fold``'s BLSTMs of every size in ``cfg.seq.sizes`` not trained yet; returns those sizes."""
    todo = [h for h in cfg.seq.sizes if not is_seq_trained(cfg, run_dir, fold, h)]
    for hidden in todo:
        train_seq_fold(cfg, run_dir, fold, hidden)
    return todo


def train_seq_fold(
    cfg: Config, run_dir: str | os.PathLike, fold: int, hidden: int | None = None
) -> pd.DataFrame:
    """Trains fold ``fold``'s BLSTM(s) and returns their out-of-fold predictions for the fold's studies."""
    run = Run(run_dir)
    seq = cfg.seq
    hidden = hidden or seq.hidden
    device = pick_device(cfg.device)
    folds, labels = run.read_folds(), run.read_labels()
    source, signature = oof_sources(run), features_signature(run)
    tta = extracted_with_tta(signature)
    if seq.train_on not in ("own_fold", "other_folds"):
        raise ValueError(f"seq.train_on must be 'own_fold' or 'other_folds', not {seq.train_on!r}")
    if seq.train_on == "other_folds" and seq.input not in CNN_OUTPUTS:
        raise ValueError(
            "seq.train_on='other_folds' needs seq.input 'probs' or 'fracture': CNNs of "
            "different folds learn unrelated feature spaces, so a BLSTM reads one CNN's "
            "features only"
        )
    in_fold = [u for u in folds.loc[folds["fold"] == fold, "StudyInstanceUID"] if u in source]
    # `predict` loads every BLSTM here, so none may survive from another protocol; and until this training
    # ends, the fold must not count as trained (`is_seq_trained` reads features.json)
    for stale in [*run.seq_fold_dir(hidden, fold).glob("*.pt"), run.seq_file(hidden, fold, "features.json")]:
        stale.unlink(missing_ok=True)
    rows = []
    if seq.train_on == "other_folds":
        others = [u for u in folds.loc[folds["fold"] != fold, "StudyInstanceUID"] if u in source]
        train = _load_studies(run, others, labels, seq.input, source, seq.bins)
        val = _load_studies(run, in_fold, labels, seq.input, source, seq.bins)
        model, history, probs = _fit_and_score(train, val, seq, hidden, device, seq.seed + fold)
        _save(model, run.blstm(hidden, fold, None), seq, None, others, tta)
        rows.append((val, probs))
        histories = {"model": history}
    else:
        studies = _load_studies(run, in_fold, labels, seq.input, source, seq.bins)
        y = np.array([st.y[0] for st in studies]).astype(int)
        n_inner = max(2, min(seq.inner_folds, len(y)))
        # too few to stratify
        strata = y if np.bincount(y, minlength=2).min() >= n_inner else np.zeros_like(y)
        splitter = StratifiedKFold(n_splits=n_inner, shuffle=True, random_state=seq.seed + fold)
        histories = {}
        for inner, (tr, va) in enumerate(splitter.split(np.zeros(len(y)), strata)):
            train, val = [studies[i] for i in tr], [studies[i] for i in va]
            model, history, probs = _fit_and_score(
                train, val, seq, hidden, device, seq.seed + 100 * fold + inner
            )
            _save(model, run.blstm(hidden, fold, inner), seq, fold, [st.uid for st in train], tta)
            rows.append((val, probs))
            histories[f"inner{inner}"] = history
    write_json(histories, run.seq_file(hidden, fold, "history.json"))
    scored = [(st.uid, p) for val, probs in rows for st, p in zip(val, probs)]
    oof = oof_table([u for u, _ in scored], fold, np.array([p for _, p in scored]).reshape(-1, len(TARGETS)))
    write_csv(oof, run.seq_file(hidden, fold, "oof.csv"))
    # written last: until it exists the fold's BLSTMs do not count as trained (`is_seq_trained`)
    write_json(
        {"features": signature, "seq": _seq_signature(seq)}, run.seq_file(hidden, fold, "features.json")
    )
    log.info(
        "train-seq fold %d, BLSTM-%d (%s): %d studies scored out of fold, loss %.4f",
        fold,
        hidden,
        seq.input,
        len(oof),
        weighted_log_loss(
            labels.loc[oof["StudyInstanceUID"], list(TARGETS)].to_numpy(),
            oof[p_columns()].to_numpy(),
        )
        if len(oof)
        else float("nan"),
    )
    return oof


def _seq_signature(seq: SeqConfig) -> dict:
    """The ``seq`` settings a fold's BLSTMs were trained with (the size is the folder's, so not here)."""
    return {k: v for k, v in dataclasses.asdict(seq).items() if k not in ("hidden", "compare_hidden")}


def is_seq_trained(cfg: Config, run_dir: str | os.PathLike, fold: int, hidden: int) -> bool:
    """Whether fold ``fold``'s BLSTM(s) of size ``hidden`` trained on the run's current features with the
    ``seq`` settings of ``cfg`` (a CNN retrained, features read another way, or another ``seq`` setting means
    training them again)."""
    run = Run(run_dir)
    record = run.seq_file(hidden, fold, "features.json")
    if not run.seq_file(hidden, fold, "oof.csv").is_file() or not record.is_file():
        return False
    recorded = read_json(record)
    current = {"features": features_signature(run_dir), "seq": _seq_signature(cfg.seq)}
    return recorded == json.loads(json.dumps(current))  # through JSON, as recorded: tuples become lists
