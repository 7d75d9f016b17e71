"""cspine.metrics and cspine.submission: the metric against hand values and scikit-learn; valid submissions."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, matthews_corrcoef, roc_auc_score

from cspine import TARGETS
from cspine.metrics import (
    balanced_indices,
    best_constant,
    binary_report,
    competition_score,
    cv_table,
    target_weights,
    weighted_log_loss,
    write_table,
)
from cspine.submission import (
    SubmissionError,
    make_submission,
    prior_from_train,
    validate_submission,
    write_submission,
)


def _solution(y):
    df = pd.DataFrame(y, columns=list(TARGETS))
    df.insert(0, "StudyInstanceUID", [f"1.2.{i}" for i in range(len(y))])
    return df


def _submission(uids, p):
    return pd.DataFrame({"row_id": [f"{u}_{t}" for u in uids for t in TARGETS], "fractured": np.ravel(p)})


def test_constant_half_scores_ln2():
    y = np.random.default_rng(0).integers(0, 2, (20, 8))
    y[:, 0] = y[:, 1:].max(axis=1)
    assert weighted_log_loss(y, np.full(y.shape, 0.5)) == pytest.approx(math.log(2))
    assert weighted_log_loss(y, np.full(y.shape, 0.5), "global") == pytest.approx(math.log(2))


def test_hand_computed_study():
    y = np.array([[1, 0, 1, 0, 0, 0, 0, 0]])
    p = np.array([[0.9, 0.2, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1]])
    w = np.array([14, 1, 2, 1, 1, 1, 1, 1])
    bce = -np.array([math.log(0.9), math.log(0.8), math.log(0.6)] + [math.log(0.9)] * 5)
    assert weighted_log_loss(y, p) == pytest.approx((w * bce).sum() / w.sum())


def test_study_and_global_forms_differ_and_global_matches_sklearn():
    rng = np.random.default_rng(1)
    y = (rng.random((50, 8)) < 0.2).astype(int)
    y[:, 0] = y[:, 1:].max(axis=1)
    p = rng.uniform(0.01, 0.99, y.shape)
    w = target_weights(y)
    expected = log_loss(y.ravel(), p.ravel(), sample_weight=w.ravel())
    assert weighted_log_loss(y, p, "global") == pytest.approx(expected)
    assert weighted_log_loss(y, p, "study") != pytest.approx(expected)
    sol = _solution(y)
    assert competition_score(sol, _submission(sol["StudyInstanceUID"], p)) == pytest.approx(
        weighted_log_loss(y, p)
    )


def test_best_constant_minimises_the_loss():
    q = 0.2
    y = np.zeros((1000, 8), int)
    y[: int(q * 1000), 3] = 1
    y[:, 0] = y[:, 1:].max(axis=1)

    def loss(c):
        p = np.full(y.shape, 0.01)
        p[:, 3] = c
        p[:, 0] = best_constant(q)
        return weighted_log_loss(y, p, "global")

    best = best_constant(q)
    assert best == pytest.approx(2 * q / (1 + q))
    assert loss(best) < loss(best - 0.02) and loss(best) < loss(best + 0.02) and loss(best) < loss(q)


def test_float32_with_exact_zero_and_one_is_finite():
    y = np.eye(8, dtype=int)[:, :8]
    p = y.astype(np.float32)
    p[0, 0] = 0.0  # confident and wrong
    value = weighted_log_loss(y, p)
    assert np.isfinite(value) and value > 1


def test_binary_report_matches_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    prob = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    r = binary_report(y, prob, threshold=0.5)
    pred = prob >= 0.5
    tp, tn = ((pred == 1) & (y == 1)).sum(), ((pred == 0) & (y == 0)).sum()
    fp, fn = ((pred == 1) & (y == 0)).sum(), ((pred == 0) & (y == 1)).sum()
    assert r["TPR"] == pytest.approx(tp / (tp + fn)) and r["TNR"] == pytest.approx(tn / (tn + fp))
    assert r["PPV"] == pytest.approx(tp / (tp + fp)) and r["NPV"] == pytest.approx(tn / (tn + fn))
    assert r["MCC"] == pytest.approx(matthews_corrcoef(y, pred))
    assert r["AUC"] == pytest.approx(roc_auc_score(y, prob))  # from probabilities, not labels
    assert r["AUC"] != pytest.approx(roc_auc_score(y, pred))
    assert math.isnan(binary_report([0, 0], [0.1, 0.7])["AUC"])
    assert all(math.isnan(v) for v in binary_report([], []).values())


def test_balanced_subset_and_cv_table(tmp_path):
    y = np.array([1] * 10 + [0] * 90)
    idx = balanced_indices(y, seed=0)
    assert y[idx].sum() == 10 and len(idx) == 20
    reports = [
        {"Model": "m", "Data": d, **binary_report(y, np.r_[np.full(10, 0.9), np.full(90, s)])}
        for d in ("Imblcd.", "Blcd.")
        for s in (0.1, 0.6)
    ]
    table = cv_table(reports)
    assert list(table.columns) == [
        "Model",
        "Data",
        "TPR",
        "TNR",
        "PPV",
        "NPV",
        "F1",
        "Acc",
        "MCC",
        "AUC",
        "folds",
    ]
    assert table.loc[0, "TPR"] == "100.00 ± 0.0" and table.loc[0, "TNR"] == "50.00 ± 50.0"
    md, csv = write_table(table, tmp_path / "table2", title="Table 2")
    assert "| Model" in md.read_text() and pd.read_csv(csv).shape == table.shape


@pytest.fixture
def test_csv():
    uids = ["1.2.1", "1.2.2", "1.2.3"]
    return pd.DataFrame(
        [
            {"row_id": f"{u}_{t}", "StudyInstanceUID": u, "prediction_type": t}
            for u in uids
            for t in ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "patient_overall")
        ]
    )


def test_make_submission_keeps_order_and_fills_the_prior(test_csv):
    probs = {"1.2.1": {t: 0.9 for t in TARGETS}, "1.2.3": {t: 0.0 for t in TARGETS}}
    train = pd.DataFrame({t: [1, 0, 0, 0] for t in TARGETS})
    prior = prior_from_train(train)
    sub = make_submission(test_csv, probs, prior=prior)
    assert sub["row_id"].tolist() == test_csv["row_id"].tolist()
    assert (sub.iloc[:8]["fractured"] == 0.9).all()
    np.testing.assert_allclose(sub.iloc[8:16]["fractured"], 2 * 0.25 / 1.25)  # 2q/(1+q), q = 0.25
    assert sub.iloc[16:]["fractured"].min() == pytest.approx(1e-4)  # clipped
    validate_submission(sub, test_csv)


@pytest.mark.parametrize(
    "breakage,message",
    [
        (lambda s: s.rename(columns={"fractured": "prob"}), "header"),
        (lambda s: s.iloc[1:], "missing"),
        (lambda s: pd.concat([s, s.iloc[:1]]), "duplicate"),
        (
            lambda s: pd.concat([s, pd.DataFrame({"row_id": ["9.9_C1"], "fractured": [0.5]})]),
            "not in test.csv",
        ),
        (lambda s: s.assign(fractured=s["fractured"].where(s.index != 3, np.nan)), "numeric"),
        (lambda s: s.assign(fractured=s["fractured"].where(s.index != 3, 1.5)), r"outside \[0, 1\]"),
    ],
)
def test_validator_rejects_each_bad_case(test_csv, breakage, message, tmp_path):
    sub = make_submission(test_csv, {})
    bad = breakage(sub)
    with pytest.raises(SubmissionError, match=message):
        validate_submission(bad, test_csv)
    with pytest.raises(SubmissionError):
        write_submission(bad, test_csv, tmp_path / "submission.csv")
    assert not (tmp_path / "submission.csv").exists() and not list(tmp_path.iterdir())


def test_write_submission_is_atomic_and_valid(test_csv, tmp_path):
    path = write_submission(make_submission(test_csv, {}), test_csv, tmp_path / "out" / "submission.csv")
    back = pd.read_csv(path)
    validate_submission(back, test_csv)
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]


def test_a_target_the_training_set_never_shows_gets_a_smoothed_prior():
    """A run that saw no C1 fracture wrote 0.0001 for every study's C1 (the clip of 2q/(1+q) at q = 0)."""
    train = pd.DataFrame({t: [1, 0, 0, 0, 0, 0, 0] for t in TARGETS}).assign(C1=0, C2=1)
    prior = prior_from_train(train)
    q = 0.5 / 8  # (positives + 1/2) / (studies + 1)
    assert prior["C1"] == pytest.approx(2 * q / (1 + q)) and prior["C1"] > 0.1
    assert prior["C2"] == pytest.approx(2 * (7.5 / 8) / (1 + 7.5 / 8))  # always shown: not 1 either
    assert prior["C3"] == pytest.approx(2 * (1 / 7) / (1 + 1 / 7))  # seen both ways: the prevalence itself
