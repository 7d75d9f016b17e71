"""The held-out score: studies drawn in the run's phantom settings that share nothing with its data, read
as `predict` reads them, scored per track and for the submission, shown in the report."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest

from cspine import TARGETS
from cspine.competition import TRUTH_DIR, read_test
from cspine.config import ConfigError, load_config
from cspine.metrics import weighted_log_loss
from cspine.runs import Run, read_json, write_json
from cspine.synthetic import synthetic_settings

from .conftest import SMOKE_CONFIG

pytestmark = pytest.mark.slow


def _volumes(root) -> dict[str, str]:
    """{study: a digest of its pixels}: every generated volume, whatever its UIDs."""
    out = {}
    for study in (root / split for split in ("train_images", "test_images")):
        for folder in sorted(study.iterdir()) if study.is_dir() else []:
            pixels = b"".join(
                pydicom.dcmread(f).PixelData for f in sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem))
            )
            out[folder.name] = hashlib.sha256(pixels).hexdigest()
    return out


@pytest.fixture(scope="module")
def held_out(smoke_run, tmp_path_factory):
    from cspine.holdout import holdout

    run = Run(tmp_path_factory.mktemp("holdout") / "run")
    shutil.copytree(smoke_run, run.root)
    cfg = load_config(SMOKE_CONFIG)
    table = holdout(cfg, run.root, studies=6)
    return run, cfg, table


def test_the_held_out_set_shares_no_study_seed_or_volume_with_the_runs_data(held_out, synthetic_root):
    run, cfg, _ = held_out
    record = read_json(run.holdout_dir / "record.json")
    data = synthetic_root.with_name(
        f"{synthetic_root.name}-holdout{synthetic_settings(synthetic_root)['seed'] + 1}"
    )
    assert record["data"] == str(data)
    mine, theirs = synthetic_settings(synthetic_root), synthetic_settings(data)
    assert theirs["seed"] != mine["seed"] and theirs["n_test"] == 6 and theirs["n_train"] == 0
    assert {k: v for k, v in theirs.items() if k not in ("seed", "n_train", "n_test")} == {
        k: v for k, v in mine.items() if k not in ("seed", "n_train", "n_test")
    }  # the run's phantom settings
    held, seen = _volumes(data), _volumes(synthetic_root)
    assert len(held) == 6 and not set(held) & set(seen) and not set(held.values()) & set(seen.values())
    labels = pd.read_csv(data / TRUTH_DIR / "labels.csv", dtype={"StudyInstanceUID": str})
    assert sorted(labels["StudyInstanceUID"]) == sorted(held)
    with pytest.raises(ConfigError, match="would repeat its studies"):
        from cspine.holdout import holdout

        holdout(cfg, run.root, studies=6, seed=mine["seed"])


def test_each_track_is_scored_and_the_submission_is_what_predict_writes(held_out, tmp_path):
    """The submitted answers are `predict`'s own; the losses are the competition's on the recorded labels."""
    from cspine.predict import predict

    run, cfg, table = held_out
    data = read_json(run.holdout_dir / "record.json")["data"]
    answers = pd.read_csv(run.holdout_dir / "answers.csv", dtype={"StudyInstanceUID": str})
    assert set(answers["track"]) == {"paper", "submitted"}  # smoke: no track, a blend
    sub = predict(cfg, data, run.root, tmp_path / "submission.csv")
    test = read_test(data)
    submitted = answers[answers["track"] == "submitted"].set_index("StudyInstanceUID")
    for uid in test["StudyInstanceUID"].unique():
        rows = sub.set_index("row_id").loc[[f"{uid}_{t}" for t in TARGETS], "fractured"].to_numpy()
        assert np.allclose(rows, submitted.loc[uid, [f"p_{t}" for t in TARGETS]].to_numpy(float), atol=1e-6)
    labels = pd.read_csv(f"{data}/{TRUTH_DIR}/labels.csv", dtype={"StudyInstanceUID": str}).set_index(
        "StudyInstanceUID"
    )
    for track, row in zip(["paper", "submitted"], table.itertuples(index=False)):
        frame = answers[answers["track"] == track].set_index("StudyInstanceUID")
        loss = weighted_log_loss(
            labels.loc[frame.index, list(TARGETS)].to_numpy(), frame[[f"p_{t}" for t in TARGETS]].to_numpy()
        )
        assert row[1].startswith(f"{loss:.3f} [")
    assert (
        table.iloc[1]["submitted − this [95%]"] == "—" and table.iloc[0]["submitted − this [95%]"][0] in "+-"
    )
    assert table.iloc[2]["model"].startswith("constant prior") and (
        table.iloc[2]["AUC patient_overall"] == 0.5 or np.isnan(table.iloc[2]["AUC patient_overall"])
    )
    # beside each, its out-of-fold loss: the submission's is the blend's (it was NaN when the report's name
    # for what is submitted changed)
    losses = pd.read_csv(run.report / "loss.csv").set_index("model")["loss per study"]
    assert table.iloc[1]["out-of-fold loss"] == round(losses["blend (level 2)"], 3)
    assert table.iloc[0]["out-of-fold loss"] == round(losses[table.iloc[0]["model"]], 3)


def test_the_report_shows_the_table_while_the_models_are_the_same_and_answers_are_reused(
    held_out, monkeypatch
):
    import cspine.holdout
    from cspine.evaluate import evaluate
    from cspine.holdout import holdout

    run, cfg, table = held_out
    assert "## Held out" in (run.report / "report.md").read_text()
    monkeypatch.setattr(cspine.holdout, "predict_studies", lambda *a, **k: pytest.fail("read again"))
    assert holdout(cfg, run.root, studies=6).equals(table)  # the same models: the answers are reused
    record = read_json(run.holdout_dir / "record.json")
    write_json({**record, "models": {"slice/fold0/best.pt": "another"}}, run.holdout_dir / "record.json")
    evaluate(cfg, run.root)
    report = (run.report / "report.md").read_text()
    assert "## Held out" not in report and "made with other models" in report
