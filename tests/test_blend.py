"""The level-2 blend: its inputs, its fit, that it never scores a study it saw, that predict applies it."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from cspine import TARGETS, VERTEBRAE
from cspine.blend import blend, fit_blend, fit_target, fit_vertebrae, metric_weights
from cspine.checkpoints import CheckpointError, load_blend, save_checkpoint
from cspine.config import BlendConfig, load_config
from cspine.metrics import best_constant, bootstrap_auc, loss_by_target, weighted_log_loss
from cspine.runs import Run, read_json
from cspine.stacking import (
    TargetModel,
    apply_blend,
    fold_standards,
    logit,
    standardise,
    study_inputs,
    target_inputs,
)

from .conftest import SMOKE_CONFIG


def _probs(n: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.01, 0.2, size=(n, 15))


def test_study_inputs_pool_the_study_and_each_vertebras_own_slices():
    probs = _probs()
    probs[3, 0] = 0.99  # a bright slice on C1's slices (0..4)
    probs[15, 0] = 0.9  # and one outside them
    probs[12, 1 + 2] = 0.95  # C3's head on slice 12, inside C3's extent (10..13)
    probs[18, 1 + 2] = 0.97  # and outside it
    extents = {"C1": (0, 4), "C3": (10, 13)}
    x = study_inputs(probs, extents, {128: np.full(8, 0.3)}, np.linspace(0.1, 0.7, 7), top_k=2, margin=0)
    assert x["cnn:max"] == pytest.approx(logit(0.99))
    assert x["cnn:top"] == pytest.approx((logit(0.99) + logit(0.9)) / 2)
    assert x["cnn:mean"] == pytest.approx(logit(probs[:, 0]).mean())
    assert x["cnn:frac@C1"] == pytest.approx(logit(0.99))
    assert x["cnn:C3"] == pytest.approx(logit(0.95))  # slice 18 lies outside C3: not read
    assert x["cnn:C2"] == pytest.approx(logit(probs[:, 2]).max())  # not found: the whole study
    assert x["blstm128:C4"] == pytest.approx(logit(0.3))
    assert x["vert:max"] == pytest.approx(logit(0.7))
    assert x["vert:noisy_or"] == pytest.approx(logit(1 - np.prod(1 - np.linspace(0.1, 0.7, 7))))


def test_each_target_reads_only_its_own_inputs():
    available = list(
        study_inputs(
            _probs(), None, {96: np.full(8, 0.3), 128: np.full(8, 0.3)}, np.full(7, 0.2), top_k=3, margin=1
        )
    )
    assert target_inputs("C2", available) == ["blstm128:C2", "blstm96:C2", "cnn:C2", "cnn:frac@C2", "vert:C2"]
    overall = target_inputs("patient_overall", available)
    assert (
        "vert:noisy_or" in overall
        and "cnn:max" in overall
        and not any("C" in n.split(":")[1] for n in overall)
    )
    assert target_inputs("C2", [n for n in available if not n.startswith("vert")])[-1] == "cnn:frac@C2"


def test_a_saved_blend_answers_as_the_fitted_regression():
    rng = np.random.default_rng(1)
    x = pd.DataFrame({"a": rng.normal(3, 2, 60), "b": rng.normal(-1, 0.5, 60)})
    y = (x["a"] + rng.normal(0, 2, 60) > 3).to_numpy(int)
    model = fit_target(x, y, "patient_overall", C=0.5)
    mean, scale = x.to_numpy().mean(0), x.to_numpy().std(0)
    reference = LogisticRegression(C=0.5, max_iter=2000).fit(
        (x - mean) / scale, y, sample_weight=metric_weights(y, "patient_overall")
    )
    p = apply_blend({t: model for t in TARGETS}, x)
    assert np.allclose(p[:, 0], reference.predict_proba((x - mean) / scale)[:, 1], atol=1e-9)
    assert model.coef[0] > 0  # "a" carries the signal


def test_the_metric_weights_lift_a_rare_targets_probabilities():
    """Weighted as the metric weighs (positives twice), the fitted mean sits near 2q/(1+q), not q."""
    rng = np.random.default_rng(2)
    x = pd.DataFrame({"noise": rng.normal(size=400)})
    y = (rng.random(400) < 0.1).astype(int)
    p = apply_blend({t: fit_target(x, y, "C1", C=0.01) for t in TARGETS}, x)[:, 1]
    assert p.mean() == pytest.approx(best_constant(y.mean()), abs=0.01)


def test_the_vertebrae_share_one_model_that_reads_each_vertebras_own_inputs():
    rng = np.random.default_rng(5)
    n = 80
    labels = pd.DataFrame({v: (rng.random(n) < 0.1 + 0.03 * i).astype(int) for i, v in enumerate(VERTEBRAE)})
    inputs = pd.DataFrame(
        {
            **{f"vert:{v}": 3 * labels[v] + rng.normal(size=n) for v in VERTEBRAE},
            **{f"cnn:{v}": rng.normal(size=n) for v in VERTEBRAE},
        }
    )
    models = fit_vertebrae(inputs, labels, C=3.0)
    assert models["C3"].inputs == ["cnn:C3", "vert:C3"]
    assert all(models[v].coef == models["C1"].coef for v in VERTEBRAE)  # one model for the seven
    assert models["C1"].coef[1] > 1  # the track's own vertebra carries the signal
    assert models["C7"].intercept > models["C1"].intercept  # each keeps its own prevalence
    p = apply_blend({"patient_overall": models["C1"], **models}, inputs)
    assert all(np.corrcoef(p[:, 1 + i], labels[v])[0, 1] > 0.5 for i, v in enumerate(VERTEBRAE))


def test_one_class_alone_gives_the_best_constant():
    x = pd.DataFrame({"a": np.arange(5.0)})
    model = fit_target(x, np.zeros(5, int), "C1", C=1.0)
    assert model.coef == [0.0] and model.intercept == pytest.approx(logit(best_constant(0.0)))


def test_the_floor_lifts_patient_overall_to_the_largest_vertebra():
    constant = {
        t: TargetModel([], [], [], [], float(logit(q)))
        for t, q in zip(TARGETS, (0.2, 0.1, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1))
    }
    rows = pd.DataFrame(index=[0, 1])
    assert apply_blend(constant, rows, floor=True)[:, 0] == pytest.approx([0.6, 0.6])
    assert apply_blend(constant, rows, floor=False)[:, 0] == pytest.approx([0.2, 0.2])


def test_loss_parts_add_up_to_the_competition_loss():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=(30, 8))
    y[:, 0] = y[:, 1:].max(axis=1)
    p = rng.uniform(0.05, 0.95, size=(30, 8))
    parts = loss_by_target(y, p)
    assert parts.sum() == pytest.approx(weighted_log_loss(y, p))
    assert parts[0] > parts[1]  # patient_overall's weights are seven times a vertebra's


def test_bootstrap_interval_holds_the_auc_and_narrows_with_more_positives():
    rng = np.random.default_rng(4)

    def interval(n_pos):
        y = np.r_[np.ones(n_pos), np.zeros(90)].astype(int)
        return bootstrap_auc(y, y * 0.8 + rng.normal(size=len(y)))

    auc, lo, hi = interval(6)
    assert lo <= auc <= hi
    auc_many, lo_many, hi_many = interval(60)
    assert hi_many - lo_many < hi - lo


@pytest.fixture(scope="module")
def blended(smoke_run):
    return Run(smoke_run), load_config(SMOKE_CONFIG)


@pytest.mark.slow
def test_a_blend_never_scores_a_study_it_saw(blended):
    """From the recorded study lists: each fold is scored by a blend fitted on the other folds' studies alone
    (as its checkpoint records them), every study once, and refitting that blend on the recorded studies
    gives the out-of-fold rows."""
    run, cfg = blended
    folds = run.read_folds()
    labels = run.read_labels()
    splits = read_json(run.blend_file("record.json"))["splits"]
    inputs = pd.read_csv(run.blend_file("inputs.csv"), dtype={"StudyInstanceUID": str}).set_index(
        "StudyInstanceUID"
    )
    oof = pd.read_csv(run.blend_file("oof.csv"), dtype={"StudyInstanceUID": str}).set_index(
        "StudyInstanceUID"
    )
    assert sorted(oof.index) == sorted(folds["StudyInstanceUID"]) and oof.index.is_unique
    for fold in sorted(folds["fold"].unique()):
        in_fold = set(folds.loc[folds["fold"] == fold, "StudyInstanceUID"])
        split = splits[str(fold)]
        assert set(split["scored"]) == in_fold and set(oof.loc[oof["fold"] == fold].index) == in_fold
        trained_on = set(load_blend(run.blend_scorer(fold)).trained_on)
        assert trained_on == set(split["trained_on"]) and trained_on and not trained_on & in_fold
        refit = fit_blend(  # from the other folds' labels alone (the standards read no label)
            inputs.loc[split["trained_on"]].reset_index(),
            labels.loc[split["trained_on"], list(TARGETS)].reset_index(drop=True),
            cfg.blend.C,
            fold_standards(inputs.reset_index()),
        )
        p = apply_blend(
            refit,
            inputs.loc[split["scored"]].reset_index(),
            cfg.blend.floor,
            fold_standards(inputs.reset_index()),
        )
        assert np.allclose(p, oof.loc[split["scored"], [f"p_{t}" for t in TARGETS]].to_numpy(), atol=1e-9)
    assert set(load_blend(run.blend_model).trained_on) == set(folds["StudyInstanceUID"])


@pytest.mark.slow
def test_predict_computes_the_blends_inputs_as_the_blend_stage_read_them(blended, synthetic_root):
    """The CNN's inputs of fold k's blend, computed by predict's path from the study's DICOM, equal those the
    blend stage read from the out-of-fold features."""
    from cspine.ensemble import load_ensemble
    from cspine.features import study_features
    from cspine.predict import blend_inputs, blstm_outputs, predict_images
    from cspine.studies import read_study

    run, cfg = blended
    ensemble = load_ensemble(run, cfg.seq.hidden, [torch.device("cpu")])
    assert ensemble.blend.folds == [0, 1] and set(ensemble.blstms) == set(cfg.seq.sizes)
    inputs = pd.read_csv(run.blend_file("inputs.csv"), dtype={"StudyInstanceUID": str}).set_index(
        "StudyInstanceUID"
    )
    uid = inputs.index[(inputs["fold"] == 0).argmax()]
    i = ensemble.reading
    study = read_study(synthetic_root / "train_images" / uid, i.size, i.crop, i.margin, 2)
    per_fold = {0: study_features(ensemble.cnns[0], study.images, i.input_size, torch.device("cpu"), 16)}
    blstm = {h: blstm_outputs(per_fold, ensemble, h, torch.device("cpu")) for h in ensemble.blstms}
    x = blend_inputs(0, ensemble.blend, per_fold, None, blstm, None)
    cnn = [c for c in inputs.columns if c.startswith("cnn:")]
    assert np.allclose([x[c] for c in cnn], inputs.loc[uid, cnn].to_numpy(float), atol=2e-3)
    assert set(x) == set(inputs.columns) - {"fold"}
    p = predict_images(study, ensemble, cfg)
    assert set(p) == set(TARGETS) and all(0 < v < 1 for v in p.values())


@pytest.mark.slow
def test_a_run_without_blstms_or_a_vertebra_track_still_blends_what_it_has(blended, tmp_path):
    run, _ = blended
    copy = Run(tmp_path / "run")
    copy.root.mkdir()
    for name in ("folds.csv", "labels.csv"):
        shutil.copy(run.root / name, copy.root / name)
    shutil.copytree(run.root / "features", copy.root / "features")  # no BLSTMs, no segmentation
    copy.cache.root.mkdir()
    shutil.copy(run.cache.index, copy.cache.index)  # which studies were read
    cfg = load_config(SMOKE_CONFIG, ["blend.models=[cnn,vertebra]"])  # the track is off in smoke: ignored
    oof = blend(cfg, copy, [0, 1])
    assert len(oof) and oof[[f"p_{t}" for t in TARGETS]].apply(lambda c: c.between(0, 1)).all().all()
    saved = load_blend(copy.blend_model)
    assert saved.sizes == [] and not saved.vertebra and not saved.extents
    assert all(n.startswith("cnn:") for t in TARGETS for n in saved.targets[t].inputs)
    with pytest.raises(FileNotFoundError, match="oof.csv"):  # BLSTMs asked for, absent: named
        blend(load_config(SMOKE_CONFIG), copy, [0, 1])
    with pytest.raises(ValueError, match="two folds"):
        blend(cfg, copy, [0])


@pytest.mark.slow
def test_a_damaged_or_incomplete_blend_checkpoint_is_named(blended, tmp_path):
    from cspine.ensemble import load_ensemble

    run, cfg = blended
    copy = Run(tmp_path / "run")
    shutil.copytree(run.root, copy.root, ignore=shutil.ignore_patterns("cache"))
    copy.blend_model.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"blend/blend\.pt"):
        load_ensemble(copy, cfg.seq.hidden, [torch.device("cpu")])
    save_checkpoint({"blend": {"targets": {"patient_overall": {}}, "floor": True}}, copy.blend_model, "blend")
    with pytest.raises(CheckpointError, match=r"blend/blend\.pt.*C1"):
        load_ensemble(copy, cfg.seq.hidden, [torch.device("cpu")])
    shutil.copy(run.blend_model, copy.blend_model)
    load_ensemble(copy, cfg.seq.hidden, [torch.device("cpu")])  # its own models: accepted
    # fold 1's CNN trained again (here: another model in its place): the blend weighs outputs it never saw
    shutil.copy(copy.slice_best(0), copy.slice_best(1))
    with pytest.raises(CheckpointError, match=r"slice/fold1/best\.pt not the models it was fitted through"):
        load_ensemble(copy, cfg.seq.hidden, [torch.device("cpu")])
    shutil.rmtree(copy.slice_dir(1))  # the blend reads fold 1's CNN: its absence is named
    with pytest.raises(CheckpointError, match=r"slice/fold1/best\.pt missing"):
        load_ensemble(copy, cfg.seq.hidden, [torch.device("cpu")])


@pytest.mark.slow
def test_the_bundle_carries_the_blends_and_every_blstm_size_they_read(blended, tmp_path):
    from cspine.ensemble import load_ensemble
    from cspine.kaggle import package_kaggle

    run, cfg = blended
    bundle = package_kaggle(cfg, run.root, tmp_path / "bundle", wheels=False)
    assert (bundle / "models" / "blend" / "blend.pt").is_file()
    for size in cfg.seq.sizes:
        assert list(bundle.glob(f"models/seq/h{size}/fold*/*.pt")), size
    ensemble = load_ensemble(bundle / "models", cfg.seq.hidden, [torch.device("cpu")])
    assert ensemble.blend.folds == [0, 1]


@pytest.mark.slow
def test_the_report_says_what_is_submitted_and_where_the_loss_is(blended):
    run, _ = blended
    report = (run.report / "report.md").read_text()
    assert "The submission takes every target from **blend (level 2)**." in report
    for heading in (
        "## Where the loss is",
        "## AUC with 95% bootstrap intervals",
        "## The blend's coefficients",
    ):
        assert heading in report
    losses = pd.read_csv(run.report / "loss.csv")
    assert "blend (level 2)" in set(losses["model"])
    intervals = pd.read_csv(run.report / "auc_intervals.csv")
    assert intervals.iloc[0]["model"] == "fractured studies"
    assert [c for c in intervals.columns if c != "model"] == list(TARGETS)
    assert set(VERTEBRAE) <= set(intervals.columns)


def test_per_fold_standards_let_a_blend_read_a_fold_whose_models_are_more_confident():
    """Fold 1's models give the same evidence as fold 0's at three times the scale (a CNN that trained to
    surer outputs): standardised within its fold, it reads as fold 0's; a blend fitted on fold 0 then gives
    fold 1's studies fold 0's answers, where without the standards it is overconfident on them."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=40)
    y = (z + rng.normal(scale=0.7, size=40) > 0).astype(int)
    names = ["cnn:max", "cnn:top", "cnn:mean"]
    rows = [
        {"StudyInstanceUID": f"{f}.{i}", "fold": f, **{n: (1 + 2 * f) * v for n in names}}
        for f in (0, 1)
        for i, v in enumerate(z)
    ]
    inputs = pd.DataFrame(rows)
    standards = fold_standards(inputs)
    same = standardise(inputs, standards)
    assert np.allclose(
        same.loc[same["fold"] == 0, names].to_numpy(), same.loc[same["fold"] == 1, names].to_numpy()
    )
    labels = pd.DataFrame({t: np.concatenate([y, y]) for t in TARGETS})
    fitted = inputs["fold"] == 0
    C = BlendConfig().C
    with_standards = fit_blend(inputs[fitted], labels[fitted], C, standards)
    without = fit_blend(inputs[fitted], labels[fitted], C)
    p0, p1 = (
        apply_blend(with_standards, inputs[inputs["fold"] == f], standards=standards)[:, 0] for f in (0, 1)
    )
    assert np.allclose(p0, p1)
    raw1 = apply_blend(without, inputs[inputs["fold"] == 1])[:, 0]
    # three times the scale, read as evidence
    assert np.abs(logit(raw1)).mean() > 2 * np.abs(logit(p0)).mean()
    with pytest.raises(KeyError):
        standardise(inputs.assign(fold=2), standards)


@pytest.mark.slow
def test_a_bad_out_of_fold_input_is_named_before_the_blend_fits(blended, tmp_path):
    """A NaN gave scikit-learn's "Input X contains NaN", a missing row a bare KeyError, and a study without
    features was left out of the blend with an INFO line."""
    from cspine.competition import DataError

    run, cfg = blended
    copy = Run(tmp_path / "run")
    shutil.copytree(run.root, copy.root, ignore=shutil.ignore_patterns("blend"))
    oof = copy.seq_file(cfg.seq.hidden, 0, "oof.csv")
    table = pd.read_csv(oof, dtype={"StudyInstanceUID": str})
    broken = table.copy()
    broken.loc[1, "p_C3"] = np.nan
    broken.to_csv(oof, index=False)
    with pytest.raises(
        DataError, match=rf"{oof}: p_C3 is not a probability for study {table.loc[1, 'StudyInstanceUID']}"
    ):
        blend(cfg, copy, [0, 1])
    table.drop(index=2).to_csv(oof, index=False)
    with pytest.raises(
        DataError, match=rf"{oof} has no row for 1 of the fold's .* {table.loc[2, 'StudyInstanceUID']}"
    ):
        blend(cfg, copy, [0, 1])
    table.to_csv(oof, index=False)
    gone = sorted(copy.features_dir(1).glob("*.npz"))[0]
    gone.unlink()
    with pytest.raises(
        DataError, match=rf"1 studies of fold 1 have no features .*{gone.stem}.*extract fold=1"
    ):
        blend(cfg, copy, [0, 1])
