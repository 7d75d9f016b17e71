"""The competition metric, the paper's binary metrics, and its cross-validation tables.

Competition: weighted multi-label log loss over patient_overall and C1..C7. Weights: C1..C7 negative 1,
positive 2; patient_overall negative 7, positive 14. Per study, Σ w·BCE / Σ w, then the mean over studies
(the form the community and MLE-bench use); ``normalize="global"`` gives Σ w·BCE / Σ w over everything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, matthews_corrcoef, roc_auc_score

from cspine import TARGETS
from cspine.runs import write_csv, write_text

EPS = 1e-15
NEGATIVE_WEIGHT = {"patient_overall": 7.0, **{t: 1.0 for t in TARGETS[1:]}}
POSITIVE_WEIGHT = {"patient_overall": 14.0, **{t: 2.0 for t in TARGETS[1:]}}
REPORT_COLUMNS = ["TPR", "TNR", "PPV", "NPV", "F1", "Acc", "MCC", "AUC"]


def p_columns(targets=TARGETS) -> list[str]:
    """The columns of an out-of-fold table holding ``targets``' probabilities: ``p_<target>``."""
    return [f"p_{t}" for t in targets]


def oof_table(uids, fold, probs: np.ndarray, targets=TARGETS) -> pd.DataFrame:
    """An out-of-fold table, as every stage writes one: StudyInstanceUID, fold (one, or one per study), and
    ``probs`` [S, len(targets)] as `p_columns`."""
    probs = np.asarray(probs)
    return pd.DataFrame(
        {"StudyInstanceUID": list(uids), "fold": fold, **dict(zip(p_columns(targets), probs.T))}
    )


def read_oof(path: str | os.PathLike) -> pd.DataFrame:
    """An out-of-fold table (`oof_table`) as written, the study UIDs as strings."""
    return pd.read_csv(path, dtype={"StudyInstanceUID": str})


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC, or NaN when one class is absent (a rare vertebra in a small run)."""
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def target_weights(y: np.ndarray) -> np.ndarray:
    """Competition weights for labels y [S, 8] in TARGETS order."""
    neg = np.array([NEGATIVE_WEIGHT[t] for t in TARGETS])
    pos = np.array([POSITIVE_WEIGHT[t] for t in TARGETS])
    return np.where(np.asarray(y) == 1, pos, neg)


def weighted_log_loss(y: np.ndarray, p: np.ndarray, normalize: Literal["study", "global"] = "study") -> float:
    """The competition loss of labels y and probabilities p, both [S, 8] in TARGETS order (float64)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(TARGETS):
        raise ValueError(
            f"labels {y.shape} and probabilities {p.shape} must both be [studies, {len(TARGETS)}]"
        )
    w = target_weights(y)
    bce = -(y * np.log(p) + (1 - y) * np.log1p(-p))
    if normalize == "study":
        return float(np.mean((w * bce).sum(axis=1) / w.sum(axis=1)))
    if normalize == "global":
        return float((w * bce).sum() / w.sum())
    raise ValueError(f"normalize must be 'study' or 'global', not {normalize!r}")


def study_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """float [S]: each study's competition loss (their mean is `weighted_log_loss`), for paired comparisons."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    w = target_weights(y)
    return (w * -(y * np.log(p) + (1 - y) * np.log1p(-p))).sum(axis=1) / w.sum(axis=1)


def bootstrap_mean(
    values: np.ndarray, n: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """The mean of ``values`` (one a study) and its percentile bootstrap interval, studies resampled."""
    values = np.asarray(values, dtype=np.float64)
    draws = values[np.random.default_rng(seed).integers(0, len(values), (n, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return float(values.mean()), float(lo), float(hi)


def loss_by_target(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """float [8]: each target's part of the per-study competition loss (they add up to it).

    Per study, target t contributes w_t·BCE_t / Σ w; the parts are those contributions' means over studies.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    w = target_weights(y)
    bce = -(y * np.log(p) + (1 - y) * np.log1p(-p))
    return (w * bce / w.sum(axis=1, keepdims=True)).mean(axis=0)


def target_log_loss(y: np.ndarray, p: np.ndarray, target: str) -> float:
    """One target's weighted log loss on its own: Σ w·BCE / Σ w with that target's weights (y, p: [S])."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    w = np.where(y == 1, POSITIVE_WEIGHT[target], NEGATIVE_WEIGHT[target])
    return float(-(w * (y * np.log(p) + (1 - y) * np.log1p(-p))).sum() / w.sum())


def bootstrap_auc(
    y: np.ndarray, p: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """AUC and its percentile bootstrap interval (studies resampled within each class, so every draw has
    both). NaNs when one class is absent.

    With few positives the interval is wide: six fractured C1 studies make an AUC that one study moves by
    a sixth of its range.
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return float("nan"), float("nan"), float("nan")
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    idx = np.concatenate([rng.choice(pos, (n, len(pos))), rng.choice(neg, (n, len(neg)))], axis=1)
    ranks = rankdata(p[idx], axis=1)  # ties share their mean rank, as in roc_auc_score
    n_pos, n_neg = len(pos), len(neg)
    draws = (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return float(roc_auc_score(y, p)), float(lo), float(hi)


def submission_to_matrix(submission: pd.DataFrame, uids: list[str]) -> np.ndarray:
    """row_id,fractured → [S, 8] in TARGETS order for the given studies (missing rows raise)."""
    values = submission.set_index("row_id")["fractured"]
    row_ids = [f"{uid}_{t}" for uid in uids for t in TARGETS]
    missing = [r for r in row_ids if r not in values.index]
    if missing:
        raise ValueError(f"submission lacks {len(missing)} row_ids, e.g. {missing[:3]}")
    return values.loc[row_ids].to_numpy(dtype=np.float64).reshape(len(uids), len(TARGETS))


def competition_score(
    solution: pd.DataFrame, submission: pd.DataFrame, normalize: Literal["study", "global"] = "study"
) -> float:
    """Weighted log loss of a submission against a solution.

    Args:
        solution: train.csv form (StudyInstanceUID, patient_overall, C1..C7).
        submission: row_id, fractured (row_id = <StudyInstanceUID>_<target>).
        normalize: "study" (per-study weights, then the mean) or "global".
    """
    uids = solution["StudyInstanceUID"].tolist()
    return weighted_log_loss(
        solution[list(TARGETS)].to_numpy(), submission_to_matrix(submission, uids), normalize
    )


def best_constant(prevalence: float) -> float:
    """The constant that minimises a target's weighted log loss under 2:1 positive weights: 2q/(1+q)."""
    return 2 * prevalence / (1 + prevalence)


def binary_report(y_true: np.ndarray, y_prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """The paper's metrics: TPR, TNR, PPV, NPV, F1, Acc, MCC at a threshold, and AUC from probabilities.

    Values are fractions in [0, 1] (NaN where undefined, e.g. AUC with one class present).
    """
    y = np.asarray(y_true).astype(int)
    prob = np.asarray(y_prob, dtype=np.float64)
    if len(y) == 0:  # e.g. the balanced subset of a fold without positives
        return {name: float("nan") for name in REPORT_COLUMNS}
    pred = (prob >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()

    def ratio(a: float, b: float) -> float:
        return float(a / b) if b else float("nan")

    tpr, ppv = ratio(tp, tp + fn), ratio(tp, tp + fp)
    return {
        "TPR": tpr,
        "TNR": ratio(tn, tn + fp),
        "PPV": ppv,
        "NPV": ratio(tn, tn + fn),
        "F1": ratio(2 * tp, 2 * tp + fp + fn),
        "Acc": ratio(tp + tn, len(y)),
        "MCC": float(matthews_corrcoef(y, pred))
        if len(np.unique(y)) > 1 or len(np.unique(pred)) > 1
        else 0.0,
        "AUC": float(roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else float("nan"),
    }


def balanced_indices(y_true: np.ndarray, seed: int = 0) -> np.ndarray:
    """The paper's balanced test set: every positive and as many negatives, drawn without replacement."""
    y = np.asarray(y_true).astype(int)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    take = rng.choice(neg, size=min(len(pos), len(neg)), replace=False)
    return np.sort(np.concatenate([pos, take]))


def paper_reports(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float = 0.5, seed: int = 0
) -> dict[str, dict[str, float]]:
    """`binary_report` on the imbalanced (natural) set and on the paper's balanced subset."""
    idx = balanced_indices(y_true, seed)
    return {
        "Imblcd.": binary_report(y_true, y_prob, threshold),
        "Blcd.": binary_report(np.asarray(y_true)[idx], np.asarray(y_prob)[idx], threshold),
    }


def cv_table(reports: list[dict], row_keys: tuple[str, ...] = ("Model", "Data")) -> pd.DataFrame:
    """Mean ± std in percent over folds, laid out like the paper's Tables 2 and 3.

    Args:
        reports: one dict per fold and row, holding the row keys (e.g. Model, Data) and the metrics.
        row_keys: the columns that name a row.

    Returns:
        A frame with the row keys and one "mean ± std" string column per metric, plus ``folds``.
    """
    df = pd.DataFrame(reports)
    keys = [k for k in row_keys if k in df.columns]
    rows = []
    for name, group in df.groupby(keys, sort=False):
        name = name if isinstance(name, tuple) else (name,)
        row = dict(zip(keys, name))
        for metric in REPORT_COLUMNS:
            values = 100 * group[metric].astype(float)
            row[metric] = (
                f"{np.nanmean(values):05.2f} ± {np.nanstd(values):.1f}" if values.notna().any() else "n/a"
            )
        row["folds"] = len(group)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, *REPORT_COLUMNS, "folds"])


def write_table(table: pd.DataFrame, path_stem: str | os.PathLike, title: str = "") -> tuple[Path, Path]:
    """Writes a table as ``<stem>.md`` and ``<stem>.csv``."""
    stem = Path(path_stem)
    write_csv(table, stem.with_suffix(".csv"))
    write_text(
        stem.with_suffix(".md"), (f"{title}\n\n" if title else "") + table.to_markdown(index=False) + "\n"
    )
    return stem.with_suffix(".md"), stem.with_suffix(".csv")
