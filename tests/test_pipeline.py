"""Stage 2, evaluation, prediction and `run`, on the smoke pipeline (run once per session)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from cspine import TARGETS
from cspine.checkpoints import load_sequence_model, load_slice_model
from cspine.competition import read_test
from cspine.config import load_config
from cspine.dicom_writer import Encoding, write_series
from cspine.predict import predict
from cspine.runs import Run
from cspine.submission import validate_submission

from .conftest import SMOKE_CONFIG

pytestmark = pytest.mark.slow


def test_run_writes_every_output(smoke_run, synthetic_root):
    sub = pd.read_csv(smoke_run / "submission.csv")
    validate_submission(sub, read_test(synthetic_root))
    for path in (
        "report/report.md",
        "report/table2.csv",
        "report/table3.csv",
        "report/scores.csv",
        "report/roc.png",
        "report/calibration.png",
        "folds.csv",
        "labels.csv",
        "config.yaml",
    ):
        assert (smoke_run / path).is_file(), path


def test_second_run_resumes_and_skips_finished_stages(smoke_run, synthetic_root):
    from cspine.pipeline import run

    stamps = {p: p.stat().st_mtime_ns for p in smoke_run.glob("slice/fold*/best.pt")}
    stamps.update({p: p.stat().st_mtime_ns for p in smoke_run.glob("features/fold*/*.npz")})
    stamps.update({p: p.stat().st_mtime_ns for p in smoke_run.glob("cache/*.npy")})
    run(load_config(SMOKE_CONFIG), synthetic_root, smoke_run, smoke_run / "submission.csv")
    assert stamps and all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_features_never_come_from_a_model_that_saw_the_study(smoke_run):
    """The studies each CNN trained on, as its checkpoint records them (not as the fold split says they
    should be), never include a study whose out-of-fold features it wrote."""
    run = Run(smoke_run)
    folds = run.read_folds()
    seen = set()
    for fold, checkpoint in run.slice_checkpoints().items():
        trained_on = set(load_slice_model(checkpoint)[1].trained_on)
        assert trained_on and trained_on <= set(folds.loc[folds["fold"] != fold, "StudyInstanceUID"])
        extracted = {p.stem for p in run.features_dir(fold).glob("*.npz")}
        assert extracted and not extracted & trained_on
        assert set(json.loads(run.provenance(fold).read_text())["trained_on"]) == trained_on
        seen |= extracted
    assert seen == set(folds["StudyInstanceUID"])  # every study has out-of-fold features
    models = list(smoke_run.glob("seq/h*/fold*/*.pt"))
    assert models
    for model_path in models:
        meta = load_sequence_model(model_path)[1]
        fold = int(model_path.parent.name.removeprefix("fold"))
        in_fold = set(folds.loc[folds["fold"] == fold, "StudyInstanceUID"])
        # a BLSTM reads features of its own fold's CNN, on that fold's studies
        if meta.input == "features":
            assert meta.fold == fold and set(meta.trained_on) <= in_fold
        else:  # across folds: it never trains on the fold it scores
            assert meta.fold is None and not set(meta.trained_on) & in_fold


def test_every_study_is_predicted_out_of_fold_by_a_blstm_that_never_saw_it(smoke_run):
    for hidden_dir in smoke_run.glob("seq/h*"):
        oof = pd.read_csv(hidden_dir / "oof.csv", dtype={"StudyInstanceUID": str})
        assert oof["StudyInstanceUID"].is_unique
        for fold_dir in hidden_dir.glob("fold*"):
            scored = set(
                pd.read_csv(fold_dir / "oof.csv", dtype={"StudyInstanceUID": str})["StudyInstanceUID"]
            )
            inner = [load_sequence_model(p)[1] for p in fold_dir.glob("inner*.pt")]
            assert len(inner) >= 2
            # the inner splits partition the fold: each study is held out by exactly one inner model
            for uid in scored:
                assert sum(uid not in set(meta.trained_on) for meta in inner) == 1, uid


def _features_only_run(smoke_run, run_dir):
    """A run folder with the smoke run's folds, labels and out-of-fold features, for training BLSTMs anew."""
    run_dir.mkdir()
    source, run = Run(smoke_run), Run(run_dir)
    for src, dst in ((source.folds, run.folds), (source.labels, run.labels)):
        shutil.copy(src, dst)
    shutil.copytree(smoke_run / "features", run_dir / "features")
    return run_dir


def test_probs_input_trains_across_folds_and_scores_only_the_held_out_fold(smoke_run, tmp_path):
    from cspine.train_seq import train_seq_fold

    run_dir = _features_only_run(smoke_run, tmp_path / "probs_run")
    cfg = load_config(SMOKE_CONFIG, ["seq.input=probs", "seq.hidden=16", "seq.train_on=other_folds"])
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"StudyInstanceUID": str})
    for fold in sorted(folds["fold"].unique()):
        oof = train_seq_fold(cfg, run_dir, fold)
        in_fold = set(folds.loc[folds["fold"] == fold, "StudyInstanceUID"])
        assert set(oof["StudyInstanceUID"]) == in_fold
        assert oof[[f"p_{t}" for t in TARGETS]].apply(lambda c: c.between(0, 1)).all().all()
        model, meta = load_sequence_model(Run(run_dir).blstm(16, fold, None))
        assert meta.input == "probs" and model.lstm.input_size == 15
        # every other fold, none of its own
        assert set(meta.trained_on) == set(folds["StudyInstanceUID"]) - in_fold


def test_own_fold_blstms_train_on_their_fold_through_its_cnn_only(smoke_run, tmp_path):
    from cspine.train_seq import train_seq_fold

    run_dir = _features_only_run(smoke_run, tmp_path / "own_run")
    cfg = load_config(SMOKE_CONFIG, ["seq.input=fracture", "seq.hidden=16", "seq.inner_folds=2"])
    assert cfg.seq.train_on == "own_fold"  # the default
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"StudyInstanceUID": str})
    for fold in sorted(folds["fold"].unique()):
        oof = train_seq_fold(cfg, run_dir, fold)
        in_fold = set(folds.loc[folds["fold"] == fold, "StudyInstanceUID"])
        assert set(oof["StudyInstanceUID"]) == in_fold
        models = Run(run_dir).blstm_checkpoints(16)
        models = [m for m in models if m.parent.name == f"fold{fold}"]
        assert [m.name for m in models] == ["inner0.pt", "inner1.pt"]
        scored = set()
        for path in models:
            _, meta = load_sequence_model(path)
            assert meta.fold == fold and set(meta.trained_on) < in_fold  # CNN k's studies only
            scored |= in_fold - set(meta.trained_on)
        assert scored == in_fold  # every study scored by an inner BLSTM that did not train on it
    with pytest.raises(ValueError, match="other_folds"):  # features of two CNNs are never mixed
        train_seq_fold(load_config(SMOKE_CONFIG, ["seq.train_on=other_folds"]), run_dir, 0)


@pytest.mark.parametrize("train_on", ["other_folds", "own_fold"])
def test_predict_feeds_a_blstm_exactly_what_it_trained_on(smoke_run, tmp_path, train_on):
    """Out-of-fold scores from training equal `predict`'s for the same CNN outputs (log-odds, slice bins)."""
    from cspine.ensemble import Ensemble
    from cspine.features import load_features
    from cspine.predict import blstm_outputs
    from cspine.train_seq import train_seq_fold

    run_dir = _features_only_run(smoke_run, tmp_path / "binned_run")
    cfg = load_config(
        SMOKE_CONFIG,
        [
            "seq.input=fracture",
            "seq.bins=5",
            "seq.hidden=16",
            "seq.inner_folds=2",
            f"seq.train_on={train_on}",
        ],
    )
    oof = train_seq_fold(cfg, run_dir, 0).set_index("StudyInstanceUID")
    paths = sorted(Run(run_dir).seq_fold_dir(16, 0).glob("*.pt"))
    blstms = [load_sequence_model(path)[::-1] for path in paths]  # (meta, model), as in Ensemble
    assert len(blstms) == (1 if train_on == "other_folds" else 2) and all(m.bins == 5 for m, _ in blstms)
    for uid, row in oof.iterrows():
        scorer = [(meta, model) for meta, model in blstms if uid not in meta.trained_on]
        ensemble = Ensemble(
            cnns={},
            blstms={16: scorer},
            hidden=16,
            reading=None,
            arch={},
            input="fracture",
            bins=5,
            tta=False,
        )
        # fold 0's CNN reads the study, as in training; fold 1's reading must not reach an own_fold BLSTM
        own = load_features(run_dir, 0, uid)
        features = {0: own, 1: (None, np.zeros_like(own[1]))}
        if train_on == "other_folds":
            features = {0: features[0]}
        ((probs,),) = blstm_outputs(features, ensemble, 16, torch.device("cpu")).values()
        assert np.allclose(probs, row[[f"p_{t}" for t in TARGETS]].to_numpy(float), atol=1e-5), uid


def test_tta_extraction_is_recorded_and_predict_follows_it(smoke_run, synthetic_root, tmp_path, monkeypatch):
    """`predict.tta` re-extracts a fold's features; its BLSTMs record it and `predict` reads slices alike."""
    import cspine.predict
    from cspine.config import ConfigError
    from cspine.ensemble import check_config, load_ensemble
    from cspine.extract import extract_fold
    from cspine.features import load_features
    from cspine.predict import predict_images
    from cspine.studies import read_study
    from cspine.train_seq import train_seq_fold

    run_dir = _features_only_run(smoke_run, tmp_path / "tta_run")
    for name in ("cache", "slice"):
        (run_dir / name).symlink_to(smoke_run / name)
    cfg = load_config(SMOKE_CONFIG, ["predict.tta=true"])
    assert load_ensemble(smoke_run, cfg.seq.hidden, [torch.device("cpu")]).tta is False  # plain slices
    extract_fold(cfg, run_dir, 0)
    with pytest.raises(RuntimeError, match="some folds"):  # fold 0 re-read mirrored, fold 1 not yet
        train_seq_fold(cfg, run_dir, 0)
    for fold in (0, 1):
        extract_fold(cfg, run_dir, fold)
        assert json.loads(Run(run_dir).provenance(fold).read_text())["tta"] is True
    uid = next(iter(json.loads(Run(run_dir).provenance(0).read_text())["studies"]))
    assert not np.allclose(load_features(run_dir, 0, uid)[1], load_features(smoke_run, 0, uid)[1])  # re-read
    for fold in (0, 1):
        train_seq_fold(cfg, run_dir, fold)
    plain_cfg = load_config(SMOKE_CONFIG)  # the config at predict time says no tta
    ensemble = load_ensemble(run_dir, plain_cfg.seq.hidden, [torch.device("cpu")])
    assert ensemble.tta is True  # the BLSTMs' training features decide how slices are read
    with pytest.raises(ConfigError, match="predict.tta"):  # and a config that says otherwise is refused
        check_config(plain_cfg, ensemble)
    readings, study_features = [], cspine.predict.study_features

    def recording(*args, **kwargs):
        readings.append(kwargs.get("tta"))
        return study_features(*args, **kwargs)

    monkeypatch.setattr(cspine.predict, "study_features", recording)
    i = ensemble.reading
    study = read_study(sorted((synthetic_root / "test_images").iterdir())[0], i.size, i.crop, i.margin, 2)
    predict_images(study, ensemble, plain_cfg)
    assert readings == [True] * len(ensemble.cnns)  # every fold's CNN read the study mirrored too


def test_blstms_train_again_when_their_features_or_settings_change(smoke_run, tmp_path):
    from cspine.train_seq import is_seq_trained

    run_dir = _features_only_run(smoke_run, tmp_path / "stale_run")
    shutil.copytree(smoke_run / "seq", run_dir / "seq")
    cfg = load_config(SMOKE_CONFIG)
    h = cfg.seq.hidden
    assert is_seq_trained(cfg, run_dir, 0, h) and is_seq_trained(cfg, run_dir, 1, h)
    provenance_path = Run(run_dir).provenance(1)
    provenance = json.loads(provenance_path.read_text())
    provenance_path.write_text(json.dumps({**provenance, "checkpoint_sha": "0" * 16}))  # CNN 1 retrained
    assert not is_seq_trained(cfg, run_dir, 0, h)  # any CNN retrained: every fold's (conservative)
    provenance_path.write_text(json.dumps(provenance))
    assert is_seq_trained(cfg, run_dir, 0, h)
    other = load_config(SMOKE_CONFIG, ["seq.epochs=4"])
    assert not is_seq_trained(other, run_dir, 0, h)  # another seq setting
    sizes = load_config(SMOKE_CONFIG, ["seq.hidden=32", "seq.compare_hidden=[32]"])
    assert is_seq_trained(sizes, run_dir, 0, h)  # the sizes to train are not how one size trained


def test_report_tables_have_the_papers_rows_and_columns(smoke_run):
    table3 = pd.read_csv(smoke_run / "report" / "table3.csv")
    assert list(table3.columns) == [
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
    models = set(table3["Model"])
    for hidden in (96, 128, 256):
        assert any(m.endswith(f"BLSTM-{hidden}") for m in models), hidden
    assert any("max pooling" in m for m in models) and any("mean pooling" in m for m in models)
    assert set(table3["Data"]) == {"Imblcd.", "Blcd."}
    table2 = pd.read_csv(smoke_run / "report" / "table2.csv")
    assert set(table2["Data"]) <= {"Imblcd.", "Blcd."}
    scores = pd.read_csv(smoke_run / "report" / "scores.csv")
    assert {"loss (per study)", "loss (global)", *[f"AUC {t}" for t in TARGETS]} <= set(scores.columns)
    prior_row = scores[scores["Model"].str.contains("prior")].iloc[0]
    assert 0 < prior_row["loss (per study)"] < np.log(2) + 0.2


def test_predict_survives_every_kind_of_bad_study(smoke_run, synthetic_root, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "test_images", data / "test_images")
    good = sorted(p.name for p in (data / "test_images").iterdir())
    corrupt_uid, empty_uid, non_ct_uid, one_uid, absent_uid = (f"1.2.826.0.1.3680043.77{i}" for i in range(5))
    shutil.copytree(data / "test_images" / good[0], data / "test_images" / corrupt_uid)
    victim = sorted((data / "test_images" / corrupt_uid).iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:600])  # one corrupt slice: the study still predicts
    (data / "test_images" / empty_uid).mkdir()
    (data / "test_images" / non_ct_uid).mkdir()
    (data / "test_images" / non_ct_uid / "1.dcm").write_text("this is not a CT slice")
    write_series(
        np.zeros((1, 64, 64)),
        data / "test_images" / one_uid,
        spacing=(1, 1, 1),
        study_uid=one_uid,
        encoding=Encoding(),
    )
    uids = [*good, corrupt_uid, empty_uid, non_ct_uid, one_uid, absent_uid]
    test = pd.DataFrame(
        [{"row_id": f"{u}_{t}", "StudyInstanceUID": u, "prediction_type": t} for u in uids for t in TARGETS]
    )
    test.to_csv(data / "test.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # half the studies are bad on purpose: the failure limit (test_predict_guards) is lifted to see each
        sub = predict(
            load_config(SMOKE_CONFIG, ["predict.max_failed=1"]), data, smoke_run, tmp_path / "sub.csv"
        )
    validate_submission(pd.read_csv(tmp_path / "sub.csv"), test)
    assert len(sub) == 8 * len(uids)
    for uid in (empty_uid, non_ct_uid, one_uid):
        assert uid in caplog.text  # named in the log
    assert "IndexError" not in caplog.text and "no readable slice" in caplog.text
    assert "1 of 7 studies in test.csv have no folder" in caplog.text
    values = sub.set_index("row_id")["fractured"]
    prior_like = values[f"{empty_uid}_patient_overall"]
    assert values[f"{absent_uid}_patient_overall"] == pytest.approx(prior_like)
    assert values[f"{corrupt_uid}_patient_overall"] == pytest.approx(
        values[f"{good[0]}_patient_overall"], abs=0.05
    )


def test_package_kaggle_bundles_models_and_script(smoke_run, tmp_path):
    from cspine.kaggle import package_kaggle

    out = package_kaggle(load_config(SMOKE_CONFIG), smoke_run, tmp_path / "bundle", wheels=False)
    assert len(list(out.glob("models/slice/fold*/best.pt"))) == 2
    assert list(out.glob("models/seq/h128/fold*/*.pt"))
    assert load_config(out / "models" / "config.yaml") == load_config(SMOKE_CONFIG)
    script = (out / "kaggle_inference.py").read_text()
    assert (
        "--no-index" in script and "HF_HUB_OFFLINE" in script and "/kaggle/working/submission.csv" in script
    )


def test_predict_rejects_a_config_that_contradicts_the_checkpoints(smoke_run, synthetic_root, tmp_path):
    from cspine.config import ConfigError

    with pytest.raises(ConfigError, match=r"prepare.size=32 \(the models: 48\)"):
        predict(
            load_config(SMOKE_CONFIG, ["prepare.size=32"]), synthetic_root, smoke_run, tmp_path / "sub.csv"
        )
    assert not (tmp_path / "sub.csv").exists()


def test_predict_command_reads_the_runs_own_config(smoke_run, synthetic_root, tmp_path, capsys, monkeypatch):
    from cspine.cli import main

    from .conftest import REPO

    monkeypatch.chdir(REPO)  # where configs/demo.yaml, the default config, would contradict the smoke models
    common = [
        "predict",
        "--models",
        str(smoke_run),
        "--data",
        str(synthetic_root),
        "--out",
        str(tmp_path / "s.csv"),
    ]
    assert main(common) == 0
    validate_submission(pd.read_csv(tmp_path / "s.csv"), read_test(synthetic_root))
    assert main([*common, "--config", str(SMOKE_CONFIG), "prepare.crop=slice"]) == 2
    assert "prepare.crop='slice' (the models: 'study')" in capsys.readouterr().err


def test_package_kaggle_never_replaces_what_it_did_not_create(smoke_run, tmp_path):
    from cspine.kaggle import MARKER, package_kaggle

    from .conftest import REPO

    cfg = load_config(SMOKE_CONFIG)
    for out in (smoke_run, smoke_run.parent, REPO, REPO.parent):  # the models, the repository, their parents
        with pytest.raises(FileExistsError, match="holds"):
            package_kaggle(cfg, smoke_run, out, wheels=False)
    assert Run(smoke_run).slice_best(0).is_file()
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a cspine bundle"):
        package_kaggle(cfg, smoke_run, work, wheels=False)
    assert (work / "notes.txt").read_text() == "mine"
    bundle = package_kaggle(cfg, smoke_run, tmp_path / "bundle", wheels=False)
    assert (bundle / MARKER).is_file()
    (bundle / "stale.txt").write_text("from an earlier bundle")
    package_kaggle(cfg, smoke_run, bundle, wheels=False)  # its own bundle: replaced whole
    assert not (bundle / "stale.txt").exists() and (bundle / "kaggle_inference.py").is_file()


def test_package_kaggle_refuses_a_damaged_checkpoint(smoke_run, tmp_path):
    from cspine.kaggle import package_kaggle
    from cspine.runs import CheckpointError

    models = tmp_path / "models"
    shutil.copytree(smoke_run / "slice", models / "slice")
    shutil.copytree(smoke_run / "seq", models / "seq")
    victim = sorted(models.glob("seq/h128/fold1/*.pt"))[0]
    victim.write_bytes(b"")  # as a kill mid-write once left it
    with pytest.raises(CheckpointError, match=victim.name):
        package_kaggle(load_config(SMOKE_CONFIG), models, tmp_path / "bundle", wheels=False)
    assert not (tmp_path / "bundle").exists()


OFFLINE_PREDICT = """
import socket, sys
attempts = []

def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("the network is off in this test")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
import cspine.data  # albumentations: would ask the package index for updates
from cspine.config import load_config
from cspine.predict import predict
config, data, models, out = sys.argv[1:]
predict(load_config(config), data, models, out)
print("network attempts:", len(attempts))
"""


def test_predict_runs_with_the_network_off(smoke_run, synthetic_root, tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE")}
    out = tmp_path / "sub.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            OFFLINE_PREDICT,
            str(SMOKE_CONFIG),
            str(synthetic_root),
            str(smoke_run),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "network attempts: 0" in result.stdout  # `import cspine` switched the update check off itself
    validate_submission(pd.read_csv(out), read_test(synthetic_root))


def test_predict_gives_the_same_submission_with_more_study_workers_and_folds_spread_over_devices(
    smoke_run, synthetic_root, tmp_path
):
    from cspine.ensemble import load_ensemble
    from cspine.predict import predict_images
    from cspine.studies import read_study

    one = predict(
        load_config(SMOKE_CONFIG, ["predict.workers=1"]), synthetic_root, smoke_run, tmp_path / "1.csv"
    )
    two = predict(
        load_config(SMOKE_CONFIG, ["predict.workers=2"]), synthetic_root, smoke_run, tmp_path / "2.csv"
    )
    pd.testing.assert_frame_equal(one, two)
    cfg = load_config(SMOKE_CONFIG)
    single = load_ensemble(smoke_run, cfg.seq.hidden, [torch.device("cpu")])
    spread = load_ensemble(smoke_run, cfg.seq.hidden, [torch.device("cpu"), torch.device("cpu")])
    i = single.reading
    study = read_study(sorted((synthetic_root / "test_images").iterdir())[0], i.size, i.crop, i.margin, 2)
    assert predict_images(study, spread, cfg) == predict_images(study, single, cfg)
    submitted = one.set_index("row_id")["fractured"]
    uid = sorted((synthetic_root / "test_images").iterdir())[0].name
    assert submitted[f"{uid}_C3"] == pytest.approx(predict_images(study, single, cfg)["C3"], abs=1e-6)


def test_a_run_of_some_folds_trains_them_and_leaves_the_rest_for_the_run_that_completes_them(
    synthetic_root, tmp_path, caplog
):
    """The README's "split it by folds": `folds.folds=[0]` ended in the blend's ValueError traceback; it
    trains fold 0 and says what waits, and the run that trains the last fold blends and submits."""
    from cspine.pipeline import run

    run_dir, submission = tmp_path / "run", tmp_path / "submission.csv"
    with caplog.at_level("WARNING", logger="cspine.pipeline"):
        outputs = run(load_config(SMOKE_CONFIG, ["folds.folds=[0]"]), synthetic_root, run_dir, submission)
    assert (
        outputs == {"run": run_dir} and "folds [1] left; folds.folds=[] trains what is missing" in caplog.text
    )
    folder = Run(run_dir)
    assert folder.slice_best(0).is_file() and not folder.slice_best(1).exists()
    assert not folder.blend_model.exists() and not submission.exists()
    run(load_config(SMOKE_CONFIG), synthetic_root, run_dir, submission)
    assert folder.slice_best(1).is_file() and folder.blend_model.is_file() and submission.is_file()


def test_a_run_whose_studies_mostly_cannot_be_read_stops_after_prepare(synthetic_root, tmp_path):
    """With 5 of 8 training studies unreadable, `run` trained the slice CNN and then died in scikit-learn
    ("n_splits=2 greater than the number of samples")."""
    from cspine.competition import DataError
    from cspine.pipeline import run

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    for folder in sorted((data / "train_images").iterdir())[:5]:
        for dcm in folder.glob("*.dcm"):
            dcm.write_bytes(b"")
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=r"prepare read \d studies of fold \d.*failed.txt"):
        run(load_config(SMOKE_CONFIG), data, run_dir, tmp_path / "submission.csv")
    assert not (run_dir / "slice").exists()  # nothing trained
