"""predict cannot fail quietly: the public rerun runs the models on training studies, and a submission whose
studies mostly failed is refused rather than written as the prior."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from cspine.competition import read_test
from cspine.config import load_config
from cspine.predict import predict
from cspine.submission import PredictionError, prior_from_train, validate_submission

from .conftest import SMOKE_CONFIG

pytestmark = pytest.mark.slow


def _copy(root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(root, data)
    return data


def test_the_public_rerun_runs_the_models_on_training_studies_and_writes_the_prior(
    smoke_run, synthetic_root, tmp_path, capsys
):
    data = _copy(synthetic_root, tmp_path)
    shutil.rmtree(data / "test_images")  # Kaggle's public rerun: test.csv lists studies it does not have
    out = tmp_path / "submission.csv"
    sub = predict(load_config(SMOKE_CONFIG, ["predict.self_test=2"]), data, smoke_run, out)
    printed = capsys.readouterr().out
    assert "cspine self-test: 2 training studies on cpu (float32)" in printed and "0 failed" in printed
    assert printed.count("patient_overall ") == 2  # each study's answers, from the real models
    validate_submission(pd.read_csv(out), read_test(data))
    prior = prior_from_train(None)
    assert sub["fractured"].round(6).isin({round(v, 6) for v in prior.values()}).all()


def test_a_self_test_that_fails_says_so_and_fails_the_public_rerun(
    smoke_run, synthetic_root, tmp_path, capsys
):
    data = _copy(synthetic_root, tmp_path)
    shutil.rmtree(data / "test_images")
    for dcm in (data / "train_images").rglob("*.dcm"):
        dcm.write_bytes(b"not a DICOM file")
    out = tmp_path / "s.csv"
    with pytest.raises(PredictionError, match=r"self-test: 1 training studies failed.*DicomError"):
        predict(load_config(SMOKE_CONFIG, ["predict.self_test=1"]), data, smoke_run, out)
    assert "cspine self-test FAILED on" in capsys.readouterr().out
    assert not out.exists()  # no prior-filled submission that would score as a working bundle


def test_predict_refuses_to_write_a_submission_when_most_studies_fail(smoke_run, synthetic_root, tmp_path):
    data = _copy(synthetic_root, tmp_path)
    for dcm in (data / "test_images").rglob("*.dcm"):
        dcm.write_bytes(b"not a DICOM file")
    out = tmp_path / "submission.csv"
    with pytest.raises(PredictionError, match=r"2 of 2 test studies failed.*First causes: .*DicomError"):
        predict(load_config(SMOKE_CONFIG), data, smoke_run, out)
    assert not out.exists()
    predict(load_config(SMOKE_CONFIG, ["predict.max_failed=1"]), data, smoke_run, out)  # asked for: written
    validate_submission(pd.read_csv(out), read_test(data))


def test_the_cli_exits_non_zero_with_the_causes(smoke_run, synthetic_root, tmp_path, capfd):
    from cspine.cli import main

    data = _copy(synthetic_root, tmp_path)
    for dcm in (data / "test_images").rglob("*.dcm"):
        dcm.write_bytes(b"")
    code = main(
        ["predict", "--models", str(smoke_run), "--data", str(data), "--out", str(tmp_path / "s.csv")]
    )
    assert code == 1
    assert "2 of 2 test studies failed" in capfd.readouterr().err


def test_a_model_set_missing_a_fold_is_refused_by_predict_and_by_the_bundle(
    smoke_run, synthetic_root, tmp_path
):
    from cspine.checkpoints import CheckpointError
    from cspine.kaggle import package_kaggle

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("cache", "blend"))
    shutil.rmtree(run / "slice" / "fold1")
    cfg = load_config(SMOKE_CONFIG, ["blend.enabled=false"])  # without a blend, nothing else would notice
    with pytest.raises(CheckpointError, match=r"missing: slice/fold1/best\.pt"):
        predict(cfg, synthetic_root, run, tmp_path / "submission.csv")
    with pytest.raises(CheckpointError, match=r"slice/fold1/best\.pt"):
        package_kaggle(cfg, run, tmp_path / "bundle", wheels=False)
    for blstm in (run / "seq" / "h128" / "fold0").glob("*.pt"):
        blstm.unlink()
    shutil.copytree(smoke_run / "slice" / "fold1", run / "slice" / "fold1")
    with pytest.raises(CheckpointError, match=r"missing: seq/h128/fold0/\*\.pt"):
        predict(cfg, synthetic_root, run, tmp_path / "submission.csv")


def test_predict_says_when_demo_models_meet_real_data_or_kaggle_has_no_gpu(
    smoke_run, synthetic_root, tmp_path, monkeypatch, caplog
):
    import cspine.predict
    from cspine.competition import COMPLETE_MARKER

    data = _copy(synthetic_root, tmp_path)
    (data / COMPLETE_MARKER).unlink()  # to the kit, a real competition folder
    monkeypatch.setattr(cspine.predict, "KAGGLE_WORKING", tmp_path)  # as inside a Kaggle notebook
    with caplog.at_level("WARNING", logger="cspine.predict"):
        predict(load_config(SMOKE_CONFIG), data, smoke_run, tmp_path / "submission.csv")
    assert "a CPU demo made for the synthetic phantoms" in caplog.text
    assert "no GPU is visible in this Kaggle notebook" in caplog.text


def test_a_gpu_asked_for_and_absent_is_one_line(monkeypatch):
    import torch

    from cspine.runtime import NoGPU, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoGPU, match="device='cuda' asked for, but no GPU is visible.*accelerator"):
        pick_device("cuda")
    assert isinstance(NoGPU("x"), OSError)  # the command line prints it as one line


def test_a_scan_without_a_spine_gets_the_prior_and_counts_as_failed(
    smoke_run, synthetic_root, tmp_path, caplog
):
    """A scan of pure air got patient_overall 0.9999 and did not count as failed."""
    import numpy as np

    from cspine.dicom_writer import Encoding, write_series

    data = _copy(synthetic_root, tmp_path)
    air = sorted((data / "test_images").iterdir())[0]
    shutil.rmtree(air)
    write_series(
        np.full((16, 64, 64), -1000.0, np.float32),
        air,
        spacing=(2.0, 0.6, 0.6),
        study_uid=air.name,
        encoding=Encoding("explicit", signed=True, intercept=0.0, bits_stored=16),
    )
    out = tmp_path / "submission.csv"
    with pytest.raises(PredictionError, match=rf"1 of 2 test studies failed.*{air.name}: NoSpineError"):
        predict(load_config(SMOKE_CONFIG), data, smoke_run, out)
    sub = predict(load_config(SMOKE_CONFIG, ["predict.max_failed=1"]), data, smoke_run, out)
    assert f"study {air.name} failed (NoSpineError: no spine to read: 0 of its" in caplog.text
    prior = prior_from_train(None)
    rows = sub[sub["row_id"].str.startswith(air.name)].set_index("row_id")["fractured"]
    assert rows.round(6).isin({round(v, 6) for v in prior.values()}).all()


def test_a_deleted_blend_is_named_not_taken_for_another_config(smoke_run, synthetic_root, tmp_path):
    """With blend/blend.pt deleted, predict said the config contradicted the models and to predict with the
    run's own config, which it already was."""
    from cspine.runs import CheckpointError, Run

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    Run(run).blend_model.unlink()
    with pytest.raises(CheckpointError, match=r"blend\.pt: the blend is missing.*python -m cspine blend"):
        predict(load_config(SMOKE_CONFIG), synthetic_root, run, tmp_path / "submission.csv")
    sub = predict(load_config(SMOKE_CONFIG, ["blend.enabled=false"]), synthetic_root, run, tmp_path / "s.csv")
    validate_submission(sub, read_test(synthetic_root))
