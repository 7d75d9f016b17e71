"""Stage `blend`: level 2, the answer where the loss is: per target, a calibrated blend of every model.

    python -m cspine blend --config demo             # every fold; or fold=K

patient_overall carries most of the competition loss (its weights are 7 and 14 against 1 and 2), and no
single model gives it best: the slice CNN's max pooling ranks studies well but is no probability, the
BLSTM is a probability but ranks worse. Per target, a logistic regression (scikit-learn, L2, on
standardised log-odds, the metric's weights as sample weights) learns how to weigh and calibrate them
all (`cspine.stacking` lists the inputs).

Leak-free like the BLSTMs (``seq.train_on="own_fold"``): fold k's blend trains on fold k's studies as
fold k's models read them out of fold, scored in ``blend.inner_folds`` inner folds, so a study is never
scored by a blend that saw it, and a blend meets one CNN's scale. The blend `predict` uses for fold k is
fitted on all of fold k's studies and applied to fold k's models' outputs; the folds' answers are then
averaged. Writes ``<run>/blend/fold<k>/``: ``blend.pt`` (coefficients, `cspine.checkpoints.save_blend`),
``inputs.csv`` (what it read), ``oof.csv`` and ``record.json`` (the inputs' digests, the settings, and each
inner split's studies).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from cspine import TARGETS, VERTEBRAE
from cspine.checkpoints import save_blend
from cspine.config import BlendConfig, Config
from cspine.extract import features_signature, load_features
from cspine.metrics import NEGATIVE_WEIGHT, POSITIVE_WEIGHT, best_constant, weighted_log_loss
from cspine.runs import Run, digest, read_json, write_csv, write_json
from cspine.stacking import apply_blend, extents_by_study, logit, study_inputs, target_inputs

log = logging.getLogger(__name__)

MODELS = ("blstm", "cnn", "vertebra")


def _models(cfg: Config) -> list[str]:
    """The models whose outputs the blend reads: ``blend.models``, less the vertebra track without it."""
    unknown = sorted(set(cfg.blend.models) - set(MODELS))
    if unknown or not cfg.blend.models:
        raise ValueError(f"blend.models={list(cfg.blend.models)}: name one or more of {MODELS}")
    return [m for m in cfg.blend.models if m != "vertebra" or cfg.vert.enabled]


def _sources(run: Run, cfg: Config, fold: int) -> dict[str, object]:
    """The files fold ``fold``'s blend reads, by what they are (a missing one is named)."""
    models = _models(cfg)
    files = {}
    if "blstm" in models:
        files.update({f"blstm{h}": run.seq_file(h, fold, "oof.csv") for h in cfg.seq.sizes})
    if "vertebra" in models:
        files["vertebra"] = run.vert_file(fold, "oof.csv")
    if run.seg_file("extents.csv").is_file():
        files["extents"] = run.seg_file("extents.csv")
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the blend of fold {fold} reads {', '.join(missing)}, which do not exist: run the "
                                "stages before `blend` first")
    return files


def _oof(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")


def fold_inputs(cfg: Config, run_dir: str | os.PathLike, fold: int) -> pd.DataFrame:
    """One row per study of fold ``fold`` (StudyInstanceUID, fold, then every level-2 input), read from
    the out-of-fold outputs of fold ``fold``'s models, in the fold's order of the BLSTM or features."""
    run, b = Run(run_dir), cfg.blend
    files = _sources(run, cfg, fold)
    models = _models(cfg)
    extents = extents_by_study(pd.read_csv(files["extents"], dtype={"StudyInstanceUID": str})) \
        if "extents" in files else None
    blstm = {int(name[5:]): _oof(path) for name, path in files.items() if name.startswith("blstm")}
    vert = _oof(files["vertebra"]) if "vertebra" in files else None
    folds = run.read_folds()
    uids = [u for u in folds.loc[folds["fold"] == fold, "StudyInstanceUID"] if run.features_file(fold, u).is_file()]
    rows = []
    for uid in uids:
        probs = load_features(run, fold, uid)[1]
        rows.append({"StudyInstanceUID": uid, "fold": fold, **study_inputs(
            probs, None if extents is None else extents.get(uid, {}),
            {h: frame.loc[uid, [f"p_{t}" for t in TARGETS]].to_numpy(float) for h, frame in blstm.items()},
            None if vert is None else vert.loc[uid, [f"p_{v}" for v in VERTEBRAE]].to_numpy(float),
            b.top_k, b.margin)})
    frame = pd.DataFrame(rows)
    keep = [c for c in frame.columns[2:] if (c.startswith("blstm") and "blstm" in models)
            or (c.startswith("cnn:") and "cnn" in models) or (c.startswith("vert:") and "vertebra" in models)]
    return frame[["StudyInstanceUID", "fold", *keep]]


def metric_weights(y: np.ndarray, target: str) -> np.ndarray:
    """The competition's weights of one target's labels, normalised to mean 1."""
    w = np.where(y == 1, POSITIVE_WEIGHT[target], NEGATIVE_WEIGHT[target])
    return w / w.mean()


def fit_target(x: pd.DataFrame, y: np.ndarray, target: str, C: float) -> dict:
    """One target's model: a logistic regression on standardised inputs ``x`` [S, F], weighted as the metric.

    With one class alone in ``y`` (a rare vertebra in a small fold) it is the best constant, 2q/(1+q).
    """
    names = list(x.columns)
    values = x.to_numpy(np.float64)
    mean, scale = values.mean(axis=0), values.std(axis=0)
    scale[scale < 1e-6] = 1.0
    if len(np.unique(y)) < 2 or not names:
        constant = best_constant(float(np.mean(y)))
        return {"inputs": names, "mean": mean.tolist(), "scale": scale.tolist(), "coef": [0.0] * len(names),
                "intercept": float(logit(constant))}
    model = LogisticRegression(C=C, max_iter=2000)
    model.fit((values - mean) / scale, y, sample_weight=metric_weights(y, target))
    return {"inputs": names, "mean": mean.tolist(), "scale": scale.tolist(), "coef": model.coef_[0].tolist(),
            "intercept": float(model.intercept_[0])}


def fit_blend(inputs: pd.DataFrame, labels: pd.DataFrame, b: BlendConfig) -> dict:
    """Every target's model, fitted on studies' inputs (`fold_inputs` rows) and their labels (same order)."""
    available = [c for c in inputs.columns if c not in ("StudyInstanceUID", "fold")]
    targets = {t: fit_target(inputs[target_inputs(t, available)], labels[t].to_numpy(int), t, b.C) for t in TARGETS}
    return {"targets": targets, "floor": b.floor}


def _inner_splits(y: np.ndarray, b: BlendConfig, fold: int) -> list[tuple[np.ndarray, np.ndarray]]:
    n_inner = max(2, min(b.inner_folds, len(y)))
    strata = y if np.bincount(y, minlength=2).min() >= n_inner else np.zeros_like(y)  # too few to stratify
    splitter = StratifiedKFold(n_splits=n_inner, shuffle=True, random_state=b.seed + fold)
    return list(splitter.split(np.zeros(len(y)), strata))


def _made(run: Run, cfg: Config, fold: int) -> dict:
    """What fold ``fold``'s blend is made from: its input files' digests, the features, the settings."""
    return {"files": {name: digest(path) for name, path in _sources(run, cfg, fold).items()},
            "features": features_signature(run), "blend": json_safe(dataclasses.asdict(cfg.blend)),
            "sizes": list(cfg.seq.sizes)}


def json_safe(value):
    """Tuples as lists, as JSON stores them, so a record compares equal to its reading."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return [json_safe(v) for v in value] if isinstance(value, (list, tuple)) else value


def is_blended(run_dir: str | os.PathLike, fold: int, cfg: Config) -> bool:
    """Whether fold ``fold``'s blend was fitted on the run's current outputs with the current settings."""
    run = Run(run_dir)
    paths = [run.blend_model(fold), run.blend_file(fold, "oof.csv"), run.blend_file(fold, "record.json")]
    if not all(p.is_file() for p in paths):
        return False
    try:
        return read_json(run.blend_file(fold, "record.json"))["made"] == _made(run, cfg, fold)
    except FileNotFoundError:
        return False


def blend_fold(cfg: Config, run_dir: str | os.PathLike, fold: int) -> pd.DataFrame:
    """Fits fold ``fold``'s blend; returns its out-of-fold predictions (``p_<target>`` as submitted, and
    ``p_patient_overall_unfloored``, before the floor)."""
    run, b = Run(run_dir), cfg.blend
    run.blend_file(fold, "record.json").unlink(missing_ok=True)  # until the end, the fold is not blended
    inputs = fold_inputs(cfg, run, fold)
    uids = inputs["StudyInstanceUID"].tolist()
    labels = run.read_labels().loc[uids, list(TARGETS)].reset_index(drop=True)
    p, raw, splits = np.zeros((len(uids), len(TARGETS))), np.zeros(len(uids)), []
    for tr, va in _inner_splits(labels["patient_overall"].to_numpy(int), b, fold):
        blend = fit_blend(inputs.iloc[tr], labels.iloc[tr], b)
        p[va] = apply_blend(blend, inputs.iloc[va])
        raw[va] = apply_blend({**blend, "floor": False}, inputs.iloc[va])[:, 0]
        splits.append({"trained_on": [uids[i] for i in tr], "scored": [uids[i] for i in va]})
    blend = fit_blend(inputs, labels, b)
    save_blend({**blend, "top_k": b.top_k, "margin": b.margin, "sizes": sorted({int(c[5:].split(":")[0])
               for c in inputs.columns if c.startswith("blstm")}), "extents": run.seg_file("extents.csv").is_file(),
                "vertebra": any(c.startswith("vert:") for c in inputs.columns), "fold": fold, "trained_on": uids},
               run.blend_model(fold))
    write_csv(inputs, run.blend_file(fold, "inputs.csv"))
    oof = pd.DataFrame({"StudyInstanceUID": uids, "fold": fold, **{f"p_{t}": p[:, i] for i, t in enumerate(TARGETS)},
                        "p_patient_overall_unfloored": raw})
    write_csv(oof, run.blend_file(fold, "oof.csv"))
    write_json({"made": _made(run, cfg, fold), "splits": splits}, run.blend_file(fold, "record.json"))  # last
    log.info("blend fold %d: %d studies scored by inner blends that never saw them, loss %.4f", fold, len(uids),
             weighted_log_loss(labels.to_numpy(), p))
    return oof
