"""Stage `blend`: level 2, the answer where the loss is: per target, a calibrated blend of every model.

    python -m cspine blend --config demo

patient_overall carries most of the competition loss (its weights are 7 and 14 against 1 and 2), and no
single model gives it best: the slice CNN's max pooling ranks studies well but is no probability, the
BLSTM is a probability but ranks worse. Per target, a logistic regression (scikit-learn, L2, on
standardised log-odds, the metric's weights as sample weights) learns how to weigh and calibrate them
all (`cspine.stacking` lists the inputs).

Every study's inputs are its out-of-fold outputs: read through the models of its own fold, which never
trained on it. Fold k is scored by a blend fitted on the other folds' studies (``blend/fold<k>.pt``), so a
study is never scored by a blend that saw it; those studies were read by the other folds' models, so the
score also measures what `predict` meets: a blend applied to outputs of models it was not fitted through.
`predict` applies the blend fitted on every study (``blend/blend.pt``) to each fold's models' outputs on a
test study and averages the folds' answers. Writes ``<run>/blend/``: the blends (coefficients,
`cspine.checkpoints.save_blend`), ``inputs.csv`` (what they read), ``oof.csv`` and ``record.json`` (the
inputs' digests, the settings, and the studies each scoring blend was fitted on).

Fitting each fold's blend on that fold's own studies alone (as the BLSTMs train) was measured and not
adopted: with 36 studies an inner fold, eight inputs overfit (docs/experiments.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from cspine import TARGETS, VERTEBRAE
from cspine.checkpoints import save_blend
from cspine.competition import DataError
from cspine.config import Config, blend_models
from cspine.features import features_signature, load_features
from cspine.metrics import (
    NEGATIVE_WEIGHT,
    POSITIVE_WEIGHT,
    best_constant,
    oof_table,
    p_columns,
    read_oof,
    weighted_log_loss,
)
from cspine.runs import Run, digest, read_json, write_csv, write_json
from cspine.stacking import (
    OVERALL,
    Blend,
    TargetModel,
    apply_blend,
    extents_by_study,
    fold_standards,
    logit,
    standardise,
    study_inputs,
    target_inputs,
)

log = logging.getLogger(__name__)


def _sources(run: Run, cfg: Config, fold: int) -> dict[str, object]:
    """The files fold ``fold``'s blend reads, by what they are (a missing one is named)."""
    models = blend_models(cfg)  # checked when the config loads
    files = {}
    if "blstm" in models:
        files.update({f"blstm{h}": run.seq_file(h, fold, "oof.csv") for h in cfg.seq.sizes})
    if "vertebra" in models:
        files["vertebra"] = run.vert_file(fold, "oof.csv")
    if "crop" in models:
        files["crop"] = run.crop_file(fold, "oof.csv")
    if run.seg_file("extents.csv").is_file():
        files["extents"] = run.seg_file("extents.csv")
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the blend of fold {fold} reads {', '.join(missing)}, which do not exist: run the "
            "stages before `blend` first"
        )
    return files


def _oof(path, uids: list[str], complete: bool = True) -> pd.DataFrame:
    """An out-of-fold table's rows for ``uids``, checked: every probability a number in [0, 1], and (with
    ``complete``) every study there.

    Raises:
        DataError: naming the file, the column and the first study at fault, and how to make it anew.
    """
    frame = read_oof(path).set_index("StudyInstanceUID")
    columns = [c for c in frame.columns if c.startswith("p_")]
    bad = frame[columns].isna() | (frame[columns] < 0) | (frame[columns] > 1)
    if bad.any().any():
        column = bad.any()[bad.any()].index[0]
        raise DataError(
            f"{path}: {column} is not a probability for study {bad.index[bad[column]][0]} "
            f"({int(bad.to_numpy().sum())} values in all); delete the file and run its stage again"
        )
    missing = [u for u in uids if u not in frame.index]
    if complete and missing:
        raise DataError(
            f"{path} has no row for {len(missing)} of the fold's {len(uids)} studies (first: {missing[0]}); "
            "delete the file and run its stage again"
        )
    return frame.reindex(uids)


def fold_inputs(cfg: Config, run_dir: str | os.PathLike, fold: int) -> pd.DataFrame:
    """One row per study of fold ``fold`` (StudyInstanceUID, fold, then every level-2 input), read from
    the out-of-fold outputs of fold ``fold``'s models, in folds.csv's order."""
    run, b = Run(run_dir), cfg.blend
    files = _sources(run, cfg, fold)
    models = blend_models(cfg)  # checked when the config loads
    extents = (
        extents_by_study(pd.read_csv(files["extents"], dtype={"StudyInstanceUID": str}))
        if "extents" in files
        else None
    )
    folds = run.read_folds()
    cached = set(run.cache.read_index()["StudyInstanceUID"])  # a study prepare could not read has nothing
    uids = [u for u in folds.loc[folds["fold"] == fold, "StudyInstanceUID"] if u in cached]
    unread = [u for u in uids if not run.features_file(fold, u).is_file()]
    if unread:
        raise DataError(
            f"{len(unread)} studies of fold {fold} have no features in {run.features_dir(fold)} (first: "
            f"{unread[0]}); run `python -m cspine extract fold={fold}` (it reads the missing ones)"
        )
    blstm = {h: _oof(files[f"blstm{h}"], uids) for h in _sizes(cfg)}
    vert = _oof(files["vertebra"], uids) if "vertebra" in files else None
    crop = None
    # a study whose crops could not be cut reads the fold's mean, as predict gives the prior
    if "crop" in files:
        crop = _oof(files["crop"], uids, complete=False)
        crop = crop.fillna(crop.mean(numeric_only=True))
    rows = []
    for uid in uids:
        probs = load_features(run, fold, uid)[1]
        rows.append(
            {
                "StudyInstanceUID": uid,
                "fold": fold,
                **study_inputs(
                    probs,
                    None if extents is None else extents.get(uid, {}),
                    {h: frame.loc[uid, p_columns()].to_numpy(float) for h, frame in blstm.items()},
                    None if vert is None else vert.loc[uid, p_columns(VERTEBRAE)].to_numpy(float),
                    b.top_k,
                    b.margin,
                    None if crop is None else crop.loc[uid, p_columns(VERTEBRAE)].to_numpy(float),
                ),
            }
        )
    frame = pd.DataFrame(rows)
    keep = [c for c in frame.columns[2:] if not c.startswith("cnn:") or "cnn" in models]
    return frame[["StudyInstanceUID", "fold", *keep]]


def metric_weights(y: np.ndarray, target: str) -> np.ndarray:
    """The competition's weights of one target's labels, normalised to mean 1."""
    w = np.where(y == 1, POSITIVE_WEIGHT[target], NEGATIVE_WEIGHT[target])
    return w / w.mean()


def fit_target(x: pd.DataFrame, y: np.ndarray, target: str, C: float) -> TargetModel:
    """One target's model: a logistic regression on standardised inputs ``x`` [S, F], weighted as the metric.

    With one class alone in ``y`` (a rare vertebra in a small fold) it is the best constant, 2q/(1+q).
    """
    names = list(x.columns)
    values = x.to_numpy(np.float64)
    mean, scale = values.mean(axis=0), values.std(axis=0)
    scale[scale < 1e-6] = 1.0
    if len(np.unique(y)) < 2 or not names:
        constant = best_constant(float(np.mean(y)))
        return TargetModel(names, mean.tolist(), scale.tolist(), [0.0] * len(names), float(logit(constant)))
    model = LogisticRegression(C=C, max_iter=2000)
    model.fit((values - mean) / scale, y, sample_weight=metric_weights(y, target))
    return TargetModel(
        names, mean.tolist(), scale.tolist(), model.coef_[0].tolist(), float(model.intercept_[0])
    )


def fit_vertebrae(inputs: pd.DataFrame, labels: pd.DataFrame, C: float) -> dict[str, TargetModel]:
    """One logistic regression shared by C1..C7, on every (study, vertebra) pair; {vertebra: its model}.

    Each vertebra alone has a handful of fractured studies (4 to 17 of 96 in the demo): seven separate
    regressions on two or three positives each would fit noise. Shared, the model sees every fractured
    vertebra, each read through its own inputs (the BLSTMs' Ck, the CNN on Ck's slices, the track's Ck);
    a vertebra's own intercept keeps its prevalence. As for every target, the metric's weights apply.
    """
    available = [c for c in inputs.columns if c not in ("StudyInstanceUID", "fold")]
    names = {v: target_inputs(v, available) for v in VERTEBRAE}
    x = np.concatenate([inputs[names[v]].to_numpy(np.float64) for v in VERTEBRAE])
    y = np.concatenate([labels[v].to_numpy(int) for v in VERTEBRAE])
    which = np.repeat(np.eye(len(VERTEBRAE)), len(inputs), axis=0)  # one column per vertebra: its intercept
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    if len(np.unique(y)) < 2:
        return {v: fit_target(inputs[names[v]], labels[v].to_numpy(int), v, C) for v in VERTEBRAE}
    model = LogisticRegression(C=C, fit_intercept=False, max_iter=2000)
    model.fit(np.hstack([(x - mean) / scale, which]), y, sample_weight=metric_weights(y, VERTEBRAE[0]))
    shared, intercepts = model.coef_[0][: x.shape[1]], model.coef_[0][x.shape[1] :]
    return {
        v: TargetModel(names[v], mean.tolist(), scale.tolist(), shared.tolist(), float(intercepts[i]))
        for i, v in enumerate(VERTEBRAE)
    }


def fit_blend(
    inputs: pd.DataFrame, labels: pd.DataFrame, C: float, standards: dict | None = None
) -> dict[str, TargetModel]:
    """Every target's model, fitted on studies' inputs (`fold_inputs` rows) and their labels (same order):
    patient_overall's own, and one shared by the vertebrae (`fit_vertebrae`). With ``standards``
    (`fold_standards`), the inputs are standardised within their folds first."""
    if standards:
        inputs = standardise(inputs, standards)
    available = [c for c in inputs.columns if c not in ("StudyInstanceUID", "fold")]
    overall = fit_target(inputs[target_inputs(OVERALL, available)], labels[OVERALL].to_numpy(int), OVERALL, C)
    return {OVERALL: overall, **fit_vertebrae(inputs, labels, C)}


def _sizes(cfg: Config) -> list[int]:
    """The BLSTM sizes the blend reads."""
    return list(cfg.seq.sizes) if "blstm" in blend_models(cfg) else []


def _tracks(cfg: Config) -> tuple[bool, bool]:
    """Whether the blend reads the vertebra track, and the crop track."""
    models = blend_models(cfg)  # checked when the config loads
    return "vertebra" in models, "crop" in models


def _made(run: Run, cfg: Config, folds: list[int]) -> dict:
    """What the blend is made from: its input files' digests, the checkpoints it reads through (theirs),
    the features, the settings."""
    tracks = _tracks(cfg)
    segment = run.seg_file("extents.csv").is_file() or any(tracks)
    return {
        "through": run.digests(run.blend_reads(folds, _sizes(cfg), *tracks, segment)),
        "files": {
            f"fold{k}:{name}": digest(path) for k in folds for name, path in _sources(run, cfg, k).items()
        },
        "features": features_signature(run),
        "blend": json_safe(dataclasses.asdict(cfg.blend)),
        "sizes": list(cfg.seq.sizes),
        "folds": folds,
    }


def json_safe(value):
    """Tuples as lists, as JSON stores them, so a record compares equal to its reading."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return [json_safe(v) for v in value] if isinstance(value, (list, tuple)) else value


def is_blended(cfg: Config, run_dir: str | os.PathLike, folds: list[int]) -> bool:
    """Whether the blend was fitted on the run's current outputs of ``folds`` with the current settings."""
    run = Run(run_dir)
    if not all(
        p.is_file() for p in (run.blend_model, run.blend_file("oof.csv"), run.blend_file("record.json"))
    ):
        return False
    try:
        return read_json(run.blend_file("record.json"))["made"] == _made(run, cfg, folds)
    except FileNotFoundError:
        return False


def _blend(
    run: Run,
    cfg: Config,
    targets: dict[str, TargetModel],
    standards: dict | None,
    folds: list[int],
    trained_on,
) -> Blend:
    """A fitted blend with what it reads: predict computes the same inputs, and checks that it reads them
    through the checkpoints the blend was fitted through (``through``, their digests)."""
    b, (vertebra, crop) = cfg.blend, _tracks(cfg)
    sizes, extents = _sizes(cfg), run.seg_file("extents.csv").is_file()
    return Blend(
        targets=targets,
        floor=b.floor,
        standards=standards,
        top_k=b.top_k,
        margin=b.margin,
        sizes=sizes,
        extents=extents,
        vertebra=vertebra,
        crop=crop,
        folds=folds,
        models=blend_models(cfg),
        through=run.digests(run.blend_reads(folds, sizes, vertebra, crop, extents or vertebra or crop)),
        trained_on=list(trained_on),
    )


def blend(cfg: Config, run_dir: str | os.PathLike, folds: list[int]) -> pd.DataFrame:
    """Fits the blend on the out-of-fold outputs of ``folds`` (at least two); returns its out-of-fold
    predictions (``p_<target>`` as submitted, and ``p_patient_overall_unfloored``, before the floor)."""
    run, b = Run(run_dir), cfg.blend
    if len(folds) < 2:
        raise ValueError(
            f"the blend scores each fold with a blend fitted on the others: it needs two folds or "
            f"more, not {folds} (folds.folds)"
        )
    run.blend_file("record.json").unlink(missing_ok=True)  # until the end, the run is not blended
    inputs = pd.concat([fold_inputs(cfg, run, k) for k in folds], ignore_index=True)
    labels = run.read_labels().loc[inputs["StudyInstanceUID"], list(TARGETS)].reset_index(drop=True)
    uids = inputs["StudyInstanceUID"].to_numpy()
    standards = fold_standards(inputs) if b.per_fold else None  # label-free: each fold's own outputs' spread
    p, raw, splits = np.zeros((len(inputs), len(TARGETS))), np.zeros(len(inputs)), {}
    for k in folds:
        scored, fitted = (inputs["fold"] == k).to_numpy(), (inputs["fold"] != k).to_numpy()
        others = [f for f in folds if f != k]
        scorer = _blend(
            run,
            cfg,
            fit_blend(inputs[fitted], labels[fitted], b.C, standards),
            standards,
            others,
            uids[fitted],
        )
        p[scored] = scorer.answer(inputs[scored])
        raw[scored] = apply_blend(scorer.targets, inputs[scored], False, standards)[:, 0]
        save_blend(scorer, run.blend_scorer(k))
        splits[str(k)] = {"trained_on": uids[fitted].tolist(), "scored": uids[scored].tolist()}
    submitted = _blend(run, cfg, fit_blend(inputs, labels, b.C, standards), standards, folds, uids)
    save_blend(submitted, run.blend_model)
    write_csv(inputs, run.blend_file("inputs.csv"))
    oof = oof_table(uids, inputs["fold"], p).assign(p_patient_overall_unfloored=raw)
    write_csv(oof, run.blend_file("oof.csv"))
    write_json({"made": _made(run, cfg, folds), "splits": splits}, run.blend_file("record.json"))  # last
    log.info(
        "blend: %d studies, each scored by a blend fitted on the other folds: loss %.4f",
        len(oof),
        weighted_log_loss(labels.to_numpy(), p),
    )
    return oof
