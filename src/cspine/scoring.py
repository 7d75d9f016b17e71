"""Scoring a run's models out of fold: what the report (`cspine.evaluate`) and the held-out score
(`cspine.holdout`) measure, and the names they give the models.

Every table here is computed from the run's out-of-fold files (`cspine.metrics.oof_table`), the slice CNN's
out-of-fold outputs, the segmentation's outputs and, on the synthetic competition, its truth. Nothing here
draws or writes the report.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cspine import TARGETS, VERTEBRAE, ensemble
from cspine.cache import read_meta
from cspine.checkpoints import load_blend
from cspine.competition import THORACIC, TRUTH_DIR, read_truth_labels, truth_labels_dir
from cspine.config import Config
from cspine.features import load_features, oof_sources
from cspine.inputs import FRACTURE, SLICE_OUTPUTS, fractured
from cspine.labels import UNKNOWN
from cspine.metrics import (
    auc,
    bootstrap_auc,
    loss_by_target,
    oof_table,
    p_columns,
    paper_reports,
    read_oof,
    target_log_loss,
    weighted_log_loss,
)
from cspine.preprocess import labels_in_cache_frame
from cspine.runs import Run
from cspine.segmenter import dice_per_vertebra, load_labels
from cspine.stacking import TargetModel

# the models as the report and the held-out table name them
VERTEBRA_TRACK = "vertebra track (segmentation + CNN in each vertebra's slices + BiLSTM)"
CROP_TRACK = "crop track (each vertebra cut at full resolution + CNN + BiGRU)"
BLEND = "blend (level 2)"
BLEND_UNFLOORED = "blend, patient_overall without the floor"
PRIOR = "constant prior (2q/(1+q))"


def model_name(cfg: Config) -> str:
    """The slice CNN as the report names it, e.g. "ResNet-50" or "resnet10t ×0.5"."""
    name = {"resnet50": "ResNet-50"}.get(cfg.slice.backbone, cfg.slice.backbone)
    return name + (f" ×{cfg.slice.width:g}" if cfg.slice.width != 1 else "")


def _answering(cfg: Config) -> dict[str, str]:
    """{target: the model that answers it} (`cspine.ensemble.answering`), asked of the config's models."""
    return ensemble.answering(cfg.blend.enabled, cfg.vert.enabled, cfg.crop.enabled, cfg.vert.overall)


def _report_names(cfg: Config) -> dict[str, str]:
    """{model that can answer a target (`cspine.ensemble.answering`'s names): its name in the report}."""
    return {
        ensemble.BLEND: BLEND,
        ensemble.BLSTM: f"{model_name(cfg)} + BLSTM-{cfg.seq.hidden}",
        ensemble.VERTEBRA: VERTEBRA_TRACK,
        ensemble.CROP: CROP_TRACK,
    }


def submitted_columns(cfg: Config) -> dict[str, str]:
    """{target: the model whose output `predict` submits for it}, as the report names the models: the rule
    `cspine.ensemble.answering` gives predict, asked of the config's models."""
    names = _report_names(cfg)
    return {t: names[model] for t, model in _answering(cfg).items()}


def submitted_out_of_fold(cfg: Config, run: Run) -> pd.DataFrame:
    """What `predict` submits, out of fold (`submitted_predictions`), from the run's out-of-fold files
    (the BLSTMs' and the tracks' as `evaluate` gathers them)."""
    files = {
        ensemble.BLEND: run.blend_file("oof.csv"),
        ensemble.BLSTM: run.seq_oof(cfg.seq.hidden),
        ensemble.VERTEBRA: run.vert_oof(),
        ensemble.CROP: run.crop_oof(),
    }
    names = _report_names(cfg)
    return submitted_predictions(cfg, {names[m]: read_oof(files[m]) for m in set(_answering(cfg).values())})


def submitted_predictions(cfg: Config, models: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """What `predict` submits, out of fold: each target's column from the model `submitted_columns` names
    (a track's table holds its 1 − Π(1 − p_k) as patient_overall)."""
    columns = submitted_columns(cfg)
    frames = {name: models[name].set_index("StudyInstanceUID") for name in set(columns.values())}
    first = frames[columns[TARGETS[0]]]
    out = pd.DataFrame({"StudyInstanceUID": first.index, "fold": first["fold"].to_numpy()})
    for t, name in columns.items():
        out[f"p_{t}"] = frames[name].loc[first.index, f"p_{t}"].to_numpy()
    return out


def submitted_summary(cfg: Config, bold: bool = False) -> str:
    """What is submitted, in words: the model's name when one answers every target, else "patient_overall
    from X; C1, ..., C7 from Y" (the models' names in markdown bold with ``bold``)."""
    by_model: dict[str, list[str]] = {}
    for t, name in submitted_columns(cfg).items():
        overall = t == TARGETS[0] and name in (VERTEBRA_TRACK, CROP_TRACK)
        name += ", 1 − Π(1 − p_k)" if overall else ""
        by_model.setdefault(f"**{name}**" if bold else name, []).append(t)
    if len(by_model) == 1:
        return next(iter(by_model))
    return "; ".join(f"{', '.join(ts)} from {name}" for name, ts in by_model.items())


def oof_slice_probs(run_dir: str | os.PathLike) -> dict[str, tuple[int, np.ndarray]]:
    """{study: (fold, slice probabilities [N, 15])}, each from the CNN that never trained on the study."""
    return {uid: (fold, load_features(run_dir, fold, uid)[1]) for uid, fold in oof_sources(run_dir).items()}


def pooled_predictions(
    slice_probs: dict[str, tuple[int, np.ndarray]], uids: list[str], how: str
) -> pd.DataFrame:
    """The paper's argument as a baseline: a study's probabilities from its slices' by max or mean pooling.

    patient_overall pools the slice-fracture probability; C1..C7 pool the per-vertebra fracture outputs.
    """
    pool = np.max if how == "max" else np.mean
    pooled = np.array([pool(slice_probs[uid][1], axis=0) for uid in uids], np.float64).reshape(
        -1, len(SLICE_OUTPUTS)
    )
    columns = [FRACTURE, *(fractured(k) for k in range(len(VERTEBRAE)))]
    return oof_table(uids, [slice_probs[uid][0] for uid in uids], pooled[:, columns])


def image_level_reports(slice_probs: dict[str, tuple[int, np.ndarray]], index: pd.DataFrame) -> list[dict]:
    """Table 2's rows per fold: labelled slices of each fold's studies, scored by that fold's CNN."""
    slice_labels = {
        uid: part.sort_values("order")["label"].to_numpy() for uid, part in index.groupby("StudyInstanceUID")
    }
    reports = []
    for fold in sorted({f for f, _ in slice_probs.values()}):
        y, p = [], []
        for uid, (f, probs) in slice_probs.items():
            if f != fold:
                continue
            known = slice_labels[uid] != UNKNOWN
            y.append(slice_labels[uid][known])
            p.append(probs[known, FRACTURE])
        y, p = np.concatenate(y), np.concatenate(p)
        if len(np.unique(y)) < 2:
            continue
        for data, metrics in paper_reports(y, p, seed=fold).items():
            reports.append({"Data": data, "fold": fold, **metrics})
    return reports


def case_level_reports(name: str, oof: pd.DataFrame, labels: pd.DataFrame) -> list[dict]:
    """Table 3's rows per fold for one model (patient_overall, threshold 0.5)."""
    reports = []
    for fold, part in oof.groupby("fold"):
        y = labels.loc[part["StudyInstanceUID"], "patient_overall"].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        for data, metrics in paper_reports(y, part["p_patient_overall"].to_numpy(), seed=int(fold)).items():
            reports.append({"Model": name, "Data": data, "fold": fold, **metrics})
    return reports


def scores(name: str, oof: pd.DataFrame, labels: pd.DataFrame) -> dict:
    """Competition loss (both forms) and per-target AUCs of one model's out-of-fold predictions."""
    y = labels.loc[oof["StudyInstanceUID"], list(TARGETS)].to_numpy()
    p = oof[p_columns()].to_numpy()
    row = {
        "Model": name,
        "loss (per study)": weighted_log_loss(y, p, "study"),
        "loss (global)": weighted_log_loss(y, p, "global"),
    }
    for i, t in enumerate(TARGETS):
        row[f"AUC {t}"] = auc(y[:, i], p[:, i])
    return row


def loss_table(models: dict[str, pd.DataFrame], labels: pd.DataFrame) -> pd.DataFrame:
    """Per model: the per-study loss, how much of it patient_overall and C1..C7 carry, and the AUCs."""
    rows = []
    for name, oof in models.items():
        y = labels.loc[oof["StudyInstanceUID"], list(TARGETS)].to_numpy()
        p = oof[p_columns()].to_numpy()
        parts = loss_by_target(y, p)
        aucs = [auc(y[:, i], p[:, i]) for i in range(1, len(TARGETS))]
        rows.append(
            {
                "model": name,
                "loss per study": parts.sum(),
                "of which patient_overall": f"{parts[0]:.3f} ({parts[0] / parts.sum():.0%})",
                "C1..C7 together": parts[1:].sum(),
                "patient_overall's own weighted loss": target_log_loss(y[:, 0], p[:, 0], "patient_overall"),
                "AUC patient_overall": auc(y[:, 0], p[:, 0]),
                "AUC C1..C7 mean / min": f"{np.nanmean(aucs):.3f} / {np.nanmin(aucs):.3f}",
            }
        )
    return pd.DataFrame(rows)


def auc_interval_table(models: dict[str, pd.DataFrame], labels: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Each model's AUC per target with its 95% bootstrap interval; the first row counts the positives."""
    uids = next(iter(models.values()))["StudyInstanceUID"]
    counts = {t: f"{int(labels.loc[uids, t].sum())} of {len(uids)}" for t in TARGETS}
    rows = [{"model": "fractured studies", **counts}]
    for name, oof in models.items():
        y = labels.loc[oof["StudyInstanceUID"]]
        row = {"model": name}
        for t in TARGETS:
            value, lo, hi = bootstrap_auc(y[t].to_numpy(), oof[f"p_{t}"].to_numpy(), seed=seed)
            row[t] = f"{value:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(value) else "n/a"
        rows.append(row)
    return pd.DataFrame(rows)


def segmentation_scores(run: Run) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Out-of-fold Dice per vertebra (masked studies), and slice-level agreement with the true vertebra of
    every slice where the data has it (the synthetic competition's ``truth/``; evaluation only).

    Returns:
        The Dice table (one row per masked study), and per group of studies (with a mask: out of fold;
        without: all fold models) the share of slices whose level (the vertebra with most pixels) and
        whose set of C1..C7 shown both match the truth, or None without truth.
    """
    dice = pd.read_csv(run.seg_file("dice.csv"), dtype={"StudyInstanceUID": str})
    data_dir = run.data_dir()
    truth_path = data_dir / TRUTH_DIR / "vertebrae.csv" if data_dir else None
    if truth_path is None or not truth_path.is_file():
        return dice, None
    table = pd.read_csv(run.seg_file("vertebrae.csv"), dtype={"StudyInstanceUID": str})
    truth = pd.read_csv(truth_path, dtype={"StudyInstanceUID": str})
    both = table.merge(truth, on=["StudyInstanceUID", "slice_number"], suffixes=("", "_true"))
    both["group"] = np.where(
        both["StudyInstanceUID"].isin(dice["StudyInstanceUID"]), "with a mask (out of fold)", "without a mask"
    )
    if run.seg_file("checks.csv").is_file():  # does the check find the studies segmented wrong?
        passed = both["StudyInstanceUID"].map(run.read_checks().set_index("StudyInstanceUID")["passed"])
        both["group"] += np.where(passed, ", check passed", ", check failed")
    # the segmentation has one thoracic class (8); the truth names T2 (9) too
    both["level ok"] = both["level"] == both["level_true"].clip(upper=THORACIC)
    both["vertebrae ok"] = (
        both[list(VERTEBRAE)].to_numpy() == both[[f"{v}_true" for v in VERTEBRAE]].to_numpy()
    ).all(1)
    how = {
        "studies": ("StudyInstanceUID", "nunique"),
        "slices": ("level", "size"),
        "slice level": ("level ok", "mean"),
        "vertebrae shown": ("vertebrae ok", "mean"),
    }
    accuracy = pd.concat(
        [both.groupby("group").agg(**how), both.assign(group="every study").groupby("group").agg(**how)]
    ).reset_index()
    return dice, accuracy


def study_truth_labels(run: Run, data_dir: Path, uid: str, size: int) -> np.ndarray | None:
    """A study's true labels uint8 [N, size, size] in the frame of the run's cache (the synthetic
    competition's ``truth/labels``, cut and resized as its mask would be; 8 = T1, 9 = T2), or None without
    truth."""
    truth = read_truth_labels(data_dir, uid)
    if truth is None:
        return None
    labels, numbers = truth
    meta = read_meta(run.cache.root, uid)
    row_of = {int(n): k for k, n in enumerate(numbers)}
    rows = labels[[row_of[int(n)] for n in meta["slice_numbers"]]]
    boxes = meta["crop"] * len(rows) if len(meta["crop"]) == 1 else meta["crop"]
    return labels_in_cache_frame(rows, boxes, size)


def study_truth_dice(run: Run, data_dir: Path, uid: str) -> dict | None:
    """One study's Dice per vertebra between its predicted labels and its true ones (`study_truth_labels`),
    and whether the scan reaches T2; None without truth or without the run's labels of it."""
    if not run.seg_labels(uid).is_file():
        return None
    pred = load_labels(run.seg_labels(uid))
    true = study_truth_labels(run, data_dir, uid, pred.shape[1])
    if true is None:
        return None
    return {"StudyInstanceUID": uid, "long": bool((true > THORACIC).any()), **dice_per_vertebra(pred, true)}


def truth_dice(run: Run) -> pd.DataFrame | None:
    """Dice per vertebra on every study whose true labels the data holds (`study_truth_dice`), with its group
    (a masked study is segmented out of fold; the others by every fold model) and scan length; None
    without truth (the real competition)."""
    data_dir = run.data_dir()
    if data_dir is None or not truth_labels_dir(data_dir).is_dir():
        return None
    masked = set(pd.read_csv(run.seg_file("dice.csv"), dtype={"StudyInstanceUID": str})["StudyInstanceUID"])
    uids = run.cache.read_index()["StudyInstanceUID"].unique()
    rows = [r for r in (study_truth_dice(run, data_dir, u) for u in uids) if r is not None]
    if not rows:
        return None
    table = pd.DataFrame(rows)
    table.insert(
        1,
        "group",
        np.where(table["StudyInstanceUID"].isin(masked), "with a mask (out of fold)", "without a mask"),
    )
    return table


def truth_dice_table(table: pd.DataFrame) -> pd.DataFrame:
    """`truth_dice`'s mean Dice per vertebra (and over C1..C7) per group and scan length, and over every study."""
    table = table.assign(scan=np.where(table["long"], "reaching T2", "shorter"))
    parts = [
        table.groupby(["group", "scan"])[list(VERTEBRAE)]
        .mean()
        .assign(studies=table.groupby(["group", "scan"]).size()),
        table.assign(group="every study", scan="all")
        .groupby(["group", "scan"])[list(VERTEBRAE)]
        .mean()
        .assign(studies=len(table)),
    ]
    out = pd.concat(parts).reset_index()
    out["mean"] = out[list(VERTEBRAE)].mean(axis=1)
    return out[["group", "scan", "studies", *VERTEBRAE, "mean"]]


def _coefficients(model: TargetModel, target: str) -> dict[str, float]:
    """{input: coefficient} of one target's model; a vertebra's name is written Ck (the shared model)."""
    if target == "patient_overall":
        return {**dict(zip(model.inputs, model.coef)), "intercept": model.intercept}
    generic = {name.replace(target, "Ck"): c for name, c in zip(model.inputs, model.coef)}
    return {**generic, f"intercept ({target})": model.intercept}


def coefficient_table(run: Run) -> pd.DataFrame | None:
    """Per input, the coefficient on the standardised input of the submitted blend (fitted on every study)
    and of each blend that scored a fold (fitted on the others): patient_overall's model, then the model
    the vertebrae share (inputs written Ck) with each vertebra's intercept. None without a blend."""
    if not run.blend_model.is_file():
        return None
    submitted = load_blend(run.blend_model)
    scorers = {f"scored fold {k}": load_blend(run.blend_scorer(k)) for k in submitted.folds}
    columns = {}
    for label, b in {"submitted": submitted, **scorers}.items():
        values = {
            ("patient_overall", name): c
            for name, c in _coefficients(b.targets["patient_overall"], "patient_overall").items()
        }
        for v in VERTEBRAE:  # the shared coefficients repeat in every vertebra: one row each
            values.update({("C1..C7", name): c for name, c in _coefficients(b.targets[v], v).items()})
        columns[label] = values
    keys = list(dict.fromkeys(k for values in columns.values() for k in values))
    rows = [
        {
            "target": t,
            "input": name,
            **{
                label: round(values[(t, name)], 3) if (t, name) in values else None
                for label, values in columns.items()
            },
        }
        for t, name in keys
    ]
    return pd.DataFrame(rows)
