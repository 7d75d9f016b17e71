"""A submission that is always valid: built from test.csv, filled with the prior, checked, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cspine import TARGETS
from cspine.metrics import best_constant
from cspine.runs import write_csv

# Real training-set prevalences (docs/competition.md), the fallback when no train.csv is at hand.
TRAIN_PREVALENCE = {
    "patient_overall": 0.476,
    "C1": 0.072,
    "C2": 0.141,
    "C3": 0.036,
    "C4": 0.054,
    "C5": 0.080,
    "C6": 0.137,
    "C7": 0.195,
}


class PredictionError(RuntimeError):
    """Too many test studies failed for a submission to mean anything (`cspine.predict`); names the causes."""


class SubmissionError(ValueError):
    """A submission Kaggle would reject or score wrongly; the message says which rows."""


def prior_from_train(train: pd.DataFrame | None = None) -> dict[str, float]:
    """The best constant per target (2q/(1+q)) from a training set's prevalence q, or the real data's.

    A target the training set never (or always) shows takes q = (positives + ½) / (studies + 1): its
    prevalence is not known to be 0, and the clip's 0.0001 would cost a study that has the fracture
    ~9 nats at the metric's weight of 2 (a small run, or a subset, can miss a rare vertebra)."""
    if train is None:
        prevalence = TRAIN_PREVALENCE
    else:
        prevalence = {}
        for t in TARGETS:
            positives, n = float(train[t].sum()), len(train)
            prevalence[t] = positives / n if 0 < positives < n else (positives + 0.5) / (n + 1)
    return {t: best_constant(q) for t, q in prevalence.items()}


def make_submission(
    test: pd.DataFrame,
    study_probs: dict[str, dict[str, float]],
    prior: dict[str, float] | None = None,
    clip: float = 1e-4,
) -> pd.DataFrame:
    """Rows in test.csv's order, one per row_id; a study without predictions gets the prior.

    Args:
        test: test.csv (row_id, StudyInstanceUID, prediction_type).
        study_probs: {StudyInstanceUID: {target: probability}}.
        prior: {target: probability} for missing studies (default: `prior_from_train()`).
        clip: probabilities clipped to [clip, 1 - clip]; 0 leaves them as they are.
    """
    prior = prior or prior_from_train()
    values = []
    for uid, target in zip(test["StudyInstanceUID"], test["prediction_type"]):
        probs = study_probs.get(uid)
        value = probs[target] if probs is not None and target in probs else prior[target]
        values.append(float(value))
    fractured = np.asarray(values, dtype=np.float64)
    if clip:
        fractured = np.clip(fractured, clip, 1 - clip)
    return pd.DataFrame({"row_id": test["row_id"].to_numpy(), "fractured": fractured})


def validate_submission(sub: pd.DataFrame, test: pd.DataFrame) -> None:
    """Raises SubmissionError on a wrong header, missing, duplicate or unknown row_ids, NaN, or out of [0, 1]."""
    if list(sub.columns) != ["row_id", "fractured"]:
        raise SubmissionError(f"header must be row_id,fractured, not {','.join(map(str, sub.columns))}")
    duplicated = sub.loc[sub["row_id"].duplicated(), "row_id"].tolist()
    if duplicated:
        raise SubmissionError(f"{len(duplicated)} duplicate row_ids, e.g. {duplicated[:3]}")
    expected, given = set(test["row_id"]), set(sub["row_id"])
    missing, unknown = sorted(expected - given), sorted(given - expected)
    if missing:
        raise SubmissionError(f"{len(missing)} row_ids of test.csv are missing, e.g. {missing[:3]}")
    if unknown:
        raise SubmissionError(f"{len(unknown)} row_ids are not in test.csv, e.g. {unknown[:3]}")
    values = pd.to_numeric(sub["fractured"], errors="coerce")
    bad = sub.loc[values.isna(), "row_id"].tolist()
    if bad:
        raise SubmissionError(f"{len(bad)} rows have no numeric probability, e.g. {bad[:3]}")
    outside = sub.loc[(values < 0) | (values > 1), "row_id"].tolist()
    if outside:
        raise SubmissionError(f"{len(outside)} probabilities lie outside [0, 1], e.g. {outside[:3]}")


def write_submission(sub: pd.DataFrame, test: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validates, then writes atomically (a temporary file beside ``path``, renamed into place)."""
    validate_submission(sub, test)
    return write_csv(sub, path)


def default_submission_path() -> Path:
    """Kaggle's /kaggle/working/submission.csv inside a Kaggle notebook, else submissions/submission.csv."""
    kaggle = Path("/kaggle/working")
    return kaggle / "submission.csv" if kaggle.is_dir() else Path("submissions/submission.csv")
