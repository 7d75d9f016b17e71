"""Real data: a demo config refused on it, and a stratified subset of the studies for a small disk."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from cspine import TARGETS
from cspine.competition import COMPLETE_MARKER, DataError, read_train, select_studies
from cspine.config import ConfigError, load_config
from cspine.pipeline import setup_run
from cspine.runs import Run
from cspine.runtime import NoGPU


@pytest.fixture
def real_looking(synthetic_root, tmp_path):
    """The synthetic competition without its marker: to the kit, a real competition folder."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data, ignore=shutil.ignore_patterns("test_images"))
    (data / COMPLETE_MARKER).unlink()
    return data


def test_a_demo_config_is_refused_on_real_data_and_says_which_to_use(real_looking, synthetic_root, tmp_path):
    for name in ("smoke", "demo"):
        with pytest.raises(
            ConfigError, match=rf"config '{name}' is a CPU demo.*--config rsna.*meant_for=any"
        ):
            setup_run(load_config(name), real_looking, tmp_path / name)
        assert not (tmp_path / name / "config.yaml").exists()  # refused before anything is written
    from cspine.cli import main

    # the demo, by default
    assert main(["prepare", "--data", str(real_looking), "--out", str(tmp_path / "cli")]) == 2
    assert not (tmp_path / "cli" / "config.yaml").exists()  # nothing bound to the refused config
    setup_run(load_config("smoke", ["meant_for=any"]), real_looking, tmp_path / "asked")  # unless asked
    small = ["folds.n_splits=2", "seq.inner_folds=2", "seg.folds=2"]
    if not torch.cuda.is_available():  # the rsna recipe is made for a GPU: refused at once without one
        with pytest.raises(NoGPU, match="device=auto"):
            setup_run(load_config("rsna", small), real_looking, tmp_path / "rsna")
    setup_run(load_config("rsna", [*small, "device=auto"]), real_looking, tmp_path / "rsna")
    setup_run(load_config("smoke"), synthetic_root, tmp_path / "phantoms")  # the phantoms it is made for
    with pytest.raises(ConfigError, match="meant_for='gpu'"):
        setup_run(load_config("smoke", ["meant_for=gpu"]), synthetic_root, tmp_path / "bad")


def test_run_stops_before_the_first_stage_when_images_are_missing_or_the_disk_is_short(
    real_looking, tmp_path, monkeypatch
):
    import cspine.pipeline

    cfg = load_config("smoke", ["meant_for=any"])
    folders = sorted((real_looking / "train_images").iterdir())
    for folder in folders[4:]:
        shutil.rmtree(folder)
    with pytest.raises(
        DataError,
        match=rf"{len(folders) - 4} of the {len(folders)} studies .* no folder in "
        rf".*train_images \(first: {folders[4].name}",
    ):
        setup_run(cfg, real_looking, tmp_path / "missing")
    assert not (tmp_path / "missing" / "config.yaml").exists()
    listed = tmp_path / "present.txt"  # the subset that has its images goes on
    listed.write_text("\n".join(f.name for f in folders[:4]) + "\n")
    subset = ["meant_for=any", f"prepare.study_list={listed}", "seq.inner_folds=2"]
    setup_run(load_config("smoke", subset), real_looking, tmp_path / "present")

    class Full:
        free = 10_000

    monkeypatch.setattr(cspine.pipeline.shutil, "disk_usage", lambda path: Full)
    with pytest.raises(DataError, match=r"needs about 0\.\d GB.*0\.0 GB free.*prepare\.format=zarr"):
        setup_run(load_config("smoke", subset), real_looking, tmp_path / "full")


def _train(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    vert = (rng.random((n, 7)) < [0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.19]).astype(int)
    return pd.DataFrame(
        {
            "StudyInstanceUID": [f"1.2.{i}" for i in range(n)],
            "patient_overall": vert.max(1),
            **{f"C{k + 1}": vert[:, k] for k in range(7)},
        }
    )[["StudyInstanceUID", *TARGETS]]


def test_a_subset_is_stratified_keeps_every_masked_study_and_is_the_same_each_time(tmp_path):
    train = _train(2000)
    (tmp_path / "segmentations").mkdir()
    masked = train["StudyInstanceUID"].iloc[[3, 500, 1999]].tolist()
    for uid in masked:
        (tmp_path / "segmentations" / f"{uid}.nii").touch()
    for studies, n in ((300, 300), (0.1, 200), (0, 2000), (5000, 2000)):
        sub = select_studies(train, tmp_path, studies=studies)
        assert len(sub) == n and set(masked) <= set(sub["StudyInstanceUID"])
    sub = select_studies(train, tmp_path, studies=400)
    share = sub[list(TARGETS)].mean() - train[list(TARGETS)].mean()
    assert share.abs().max() < 0.015  # every target's share within 1.5 points of the whole set's
    pd.testing.assert_frame_equal(sub, select_studies(train, tmp_path, studies=400))
    assert not sub.equals(select_studies(train, tmp_path, studies=400, seed=7))
    with pytest.raises(DataError, match=r"prepare.studies=2.5"):
        select_studies(train, tmp_path, studies=2.5)


def test_a_study_list_is_read_as_lines_or_as_a_csv_and_unknown_studies_are_named(tmp_path):
    train = _train(50)
    uids = train["StudyInstanceUID"].iloc[:10].tolist()
    (tmp_path / "lines.txt").write_text("\n".join(uids) + "\n")
    train.iloc[:10].to_csv(tmp_path / "table.csv", index=False)
    for name in ("lines.txt", "table.csv"):
        assert (
            select_studies(train, tmp_path, study_list=str(tmp_path / name))["StudyInstanceUID"].tolist()
            == uids
        )
    assert len(select_studies(train, tmp_path, studies=4, study_list=str(tmp_path / "lines.txt"))) == 4
    (tmp_path / "bad.txt").write_text("1.2.3\n9.9.9\n")
    with pytest.raises(DataError, match=r"bad.txt: 1 studies are not in train.csv.*9\.9\.9"):
        select_studies(train, tmp_path, study_list=str(tmp_path / "bad.txt"))


@pytest.mark.slow
def test_a_run_on_a_subset_labels_folds_and_caches_only_the_subset(synthetic_root, tmp_path):
    from cspine.prepare import prepare

    cfg = load_config("smoke", ["prepare.studies=6", "seq.inner_folds=2"])
    run = Run(tmp_path / "run")
    train = setup_run(cfg, synthetic_root, run.root)
    assert len(train) == 6 and len(run.read_labels()) == 6 and len(run.read_folds()) == 6
    index = prepare(cfg, synthetic_root, run.cache.root)
    assert set(index["StudyInstanceUID"]) == set(train["StudyInstanceUID"])
    assert len(read_train(synthetic_root)) == 8


def test_a_notebook_takes_the_rsna_config_on_real_data_and_the_smoke_scale_on_phantoms(
    real_looking, synthetic_root, tmp_path, monkeypatch
):
    from cspine.notebook import NOTEBOOK_SMOKE, notebook_setup

    cfg, data_dir, run_dir = notebook_setup(
        real_looking, work_dir=tmp_path, overrides=["prepare.studies=0.25"]
    )
    assert (cfg.name, cfg.meant_for, cfg.prepare.studies) == ("rsna", "real", 0.25)
    assert data_dir == real_looking and run_dir == tmp_path / "runs" / "rsna"
    monkeypatch.setenv("CSPINE_DATA", str(real_looking))  # found, as on a Kaggle fork with the data attached
    assert notebook_setup(work_dir=tmp_path).cfg.name == "rsna"
    smoke = load_config("smoke", NOTEBOOK_SMOKE)
    cfg, data_dir, run_dir = notebook_setup(synthetic_root, work_dir=tmp_path)
    assert cfg == smoke and data_dir == synthetic_root and run_dir == tmp_path / "runs" / "notebooks"
    cfg, _, run_dir = notebook_setup(synthetic_root, work_dir=tmp_path, smoke=False)
    assert cfg == load_config("demo") and run_dir == tmp_path / "runs" / "demo"
    cfg, _, run_dir = notebook_setup(
        synthetic_root, work_dir=tmp_path, smoke_overrides=["vert.enabled=true"], variant="-vertebrae"
    )
    assert cfg.vert.enabled and run_dir == tmp_path / "runs" / "notebooks-vertebrae"


def test_an_empty_or_header_only_study_list_is_named(tmp_path):
    train = _train(20)
    for text in ("", "StudyInstanceUID\n"):
        listed = tmp_path / "list.csv"
        listed.write_text(text)
        with pytest.raises(DataError, match=r"list\.csv lists no study"):
            select_studies(train, tmp_path, study_list=str(listed))


def test_run_stops_before_the_first_stage_when_the_segment_stage_lacks_segmentations(real_looking, tmp_path):
    """The vertebra and crop tracks need the segment stage, which needs masks: counted before prepare, not
    found hours later."""
    vertebrae = ["meant_for=any", "slice.labels=vertebrae", "seg.folds=2"]
    masks = sorted((real_looking / "segmentations").iterdir())
    for mask in masks[3:]:
        mask.unlink()
    with pytest.raises(
        DataError, match=r"3 of the \d+ studies .* segmentation.*at least 4.*vert.enabled=false"
    ):
        setup_run(load_config("smoke", vertebrae), real_looking, tmp_path / "few")
    setup_run(load_config("smoke", ["meant_for=any"]), real_looking, tmp_path / "boxes")  # no segment stage


def test_the_real_recipe_says_which_cnns_train_from_scratch(caplog, tmp_path):
    from cspine.pipeline import warn_from_scratch

    with caplog.at_level("WARNING", logger="cspine.pipeline"):
        warn_from_scratch(load_config("rsna"))
    assert (
        "slice.pretrained_file and crop.pretrained_file not set: the CNNs train from scratch" in caplog.text
    )
    caplog.clear()
    weights = tmp_path / "resnet50.pth"
    with caplog.at_level("WARNING", logger="cspine.pipeline"):
        warn_from_scratch(
            load_config("rsna", [f"slice.pretrained_file={weights}", f"crop.pretrained_file={weights}"])
        )
        warn_from_scratch(load_config("demo"))  # a demo on phantoms: from scratch by design, said nowhere
    assert not caplog.text
