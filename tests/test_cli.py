"""`python -m cspine`: clear errors and exit codes, and the stage commands on a tiny competition."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from cspine.cli import main

from .conftest import SMOKE_CONFIG


def test_unknown_config_key_exits_2_naming_it(capsys):
    assert main(["prepare", "--config", str(SMOKE_CONFIG), "slice.epoch=3"]) == 2
    assert "slice.'epoch'" in capsys.readouterr().err


def test_wrong_data_path_exits_1_listing_it(tmp_path, capsys):
    assert (
        main(
            [
                "prepare",
                "--config",
                str(SMOKE_CONFIG),
                "--data",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 1
    )
    assert "nowhere" in capsys.readouterr().err


def test_train_slices_without_a_cache_says_what_to_run(tmp_path, capsys):
    assert main(["train-slices", "--config", str(SMOKE_CONFIG), "--out", str(tmp_path), "fold=0"]) == 1
    assert "python -m cspine prepare" in capsys.readouterr().err


def test_synth_and_prepare_commands(tmp_path):
    data = tmp_path / "data"
    assert (
        main(
            ["synth", "--config", str(SMOKE_CONFIG), "--out", str(data), "synth.n_train=3", "synth.n_test=1"]
        )
        == 0
    )
    assert len(pd.read_csv(data / "train.csv")) == 3
    assert (
        main(["prepare", "--config", str(SMOKE_CONFIG), "--data", str(data), "--out", str(tmp_path / "run")])
        == 0
    )
    assert (tmp_path / "run" / "cache" / "index.csv").is_file()


def test_synth_writes_over_its_own_kind_only_and_replaces_it_whole(tmp_path, capsys):
    """`synth` wrote into an existing competition (old studies and masks stayed mixed in) and into a run."""
    small = ["--config", str(SMOKE_CONFIG), "synth.n_train=3", "synth.n_test=1"]
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), *small]) == 0
    stray = data / "train_images" / "1.2.3.4"  # a study of an earlier competition in the same folder
    stray.mkdir()
    assert (
        main(["synth", "--out", str(data), *small[:-2], "synth.n_train=4", "synth.n_test=1", "synth.seed=9"])
        == 0
    )
    assert not stray.exists() and len(list((data / "train_images").iterdir())) == 4
    assert not data.with_name("data.part").exists()
    assert (
        main(["prepare", "--config", str(SMOKE_CONFIG), "--data", str(data), "--out", str(tmp_path / "run")])
        == 0
    )
    capsys.readouterr()
    for folder in (tmp_path / "run", tmp_path / "real"):
        if folder.name == "real":  # the real data: train.csv and the images, no synthetic marker
            (folder / "train_images").mkdir(parents=True)
            (folder / "train.csv").write_text("StudyInstanceUID\n")
        before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
        assert main(["synth", "--out", str(folder), *small]) == 1
        err = capsys.readouterr().err
        assert f"{folder} is not a synthetic competition" in err and "Traceback" not in err
        assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_module_entry_point_lists_every_stage():
    out = subprocess.run(
        [sys.executable, "-m", "cspine", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for stage in (
        "run",
        "synth",
        "prepare",
        "segment",
        "train-slices",
        "extract",
        "train-seq",
        "evaluate",
        "predict",
        "explain",
        "package-kaggle",
    ):
        assert stage in out


def test_an_error_in_a_data_loading_worker_is_printed_as_its_own_message():
    from torch.utils.data import DataLoader, Dataset

    from cspine.cli import error_message
    from cspine.competition import DataError

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DataError("input/x/1.dcm: pixel data cut short")

    with pytest.raises(DataError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)  # what torch hands the main process
    assert error_message(caught.value) == "input/x/1.dcm: pixel data cut short (in a data-loading worker)"
    assert error_message(DataError("a: b\nc")) == "a: b\nc"  # raised in the main process: as it is
