"""cspine.config: defaults, YAML diffs, overrides, unknown keys rejected, resolved config saved."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import yaml

from cspine.config import (
    Config,
    ConfigError,
    config_path,
    diff_from_defaults,
    load_config,
    save_config,
    shipped_configs,
)

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "cspine" / "configs"


def test_defaults_and_overrides_are_typed():
    cfg = load_config(
        None, ["slice.epochs=3", "slice.amp=false", "seq.compare_hidden=[32,64]", "slice.lr=0.01"]
    )
    assert cfg.slice.epochs == 3 and cfg.slice.amp is False and cfg.seq.compare_hidden == (32, 64)
    assert cfg.slice.lr == 0.01 and cfg.prepare == Config().prepare


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"slice\.'epoch'.*slice\.epochs"):
        load_config(None, ["slice.epoch=3"])
    with pytest.raises(ConfigError, match="not a valid int"):
        load_config(None, ["slice.epochs=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("seq:\n  hiden: 96\n")
    with pytest.raises(ConfigError, match=f"{bad}.*seq.'hiden'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["slice.epochs"])


@pytest.mark.parametrize("name", ["smoke", "demo", "paper", "rsna"])
def test_shipped_configs_load_and_hold_only_differences(name):
    path = CONFIGS / f"{name}.yaml"
    cfg = load_config(path)
    written = yaml.safe_load(path.read_text())
    assert diff_from_defaults(cfg) == written  # nothing in the file repeats a default


def test_shipped_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    assert set(shipped_configs()) == {"smoke", "demo", "bench", "paper", "rsna"}
    monkeypatch.chdir(tmp_path)  # no configs/ here: the names still resolve, inside the package
    assert load_config("demo") == load_config("demo.yaml") == load_config(CONFIGS / "demo.yaml")
    assert load_config("demo").name == "demo"
    with pytest.raises(
        ConfigError, match="'dmeo' is neither a file nor a shipped config; shipped: bench, demo, paper"
    ):
        load_config("dmeo")
    (tmp_path / "demo.yaml").write_text("name: mine\n")
    assert config_path("demo.yaml") == Path("demo.yaml")  # a file the user names wins over a shipped name
    assert load_config("demo.yaml").name == "mine"


def test_the_wheel_ships_the_configs(tmp_path):
    from cspine.kaggle import build_cspine_wheel

    build_cspine_wheel(tmp_path)  # the wheel the Kaggle bundle ships
    (wheel,) = tmp_path.glob("cspine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"cspine/configs/{n}.yaml" for n in shipped_configs()} <= names


def test_paper_config_is_the_papers():
    cfg = load_config(CONFIGS / "paper.yaml")
    s, q = cfg.slice, cfg.seq
    assert (s.backbone, s.lr, s.step_size, s.gamma, s.batch_size, s.epochs) == (
        "resnet50",
        1e-3,
        5,
        0.2,
        16,
        50,
    )
    assert (s.hflip, s.rotate, s.pretrained_file) == (0.5, 10.0, "")
    assert (q.lr, q.epochs, q.batch_size, q.hidden) == (1e-6, 100, 4, 128)
    assert cfg.prepare.size == 384 and cfg.folds.n_splits == 7


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["name=x", "seq.hidden=96"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["seq"]["hidden"] == 96 and data["slice"]["epochs"] == Config().slice.epochs
    assert load_config(path) == cfg


def test_bench_is_the_demo_on_more_studies_and_folds():
    """The yardstick differs from the demo only in its size, the crop track and the sagittal planes its
    segmentation reads, so what it measures is the demo's models."""
    import dataclasses

    bench, demo = load_config("bench"), load_config("demo")
    assert (bench.synth.n_train, bench.folds.n_splits) == (256, 3)
    assert bench.crop.enabled and not demo.crop.enabled  # the crop track: the bench has the minutes for it
    # the segmentation reads every plane on the bench: the same models, read densely
    assert bench.seg.plane_stride == 1 < demo.seg.plane_stride
    assert (
        dataclasses.replace(
            bench,
            name="demo",
            synth=dataclasses.replace(bench.synth, n_train=96),
            folds=dataclasses.replace(bench.folds, n_splits=2),
            seg=dataclasses.replace(bench.seg, plane_stride=demo.seg.plane_stride),
            crop=demo.crop,
        )
        == demo
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["prepare.size=[48"], r"override 'prepare.size=\[48': not a valid value"),
        (["predict.workers=-1"], r"predict.workers=-1: must be at least 0"),
        (["synth.n_train=-3"], r"synth.n_train=-3: must be at least 2"),
        (["synth.n_train=0"], r"synth.n_train=0: must be at least 2"),
        (["synth.n_test=-1"], r"synth.n_test=-1: must be at least 1"),
        (["synth.image_size=100000"], r"synth.image_size=100000: must be from 32 to 2048"),
        (["predict.max_failed=2"], r"predict.max_failed=2.0: must be from 0 to 1"),
    ],
)
def test_ordinary_mistakes_are_one_line_naming_the_value_and_the_rule(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides)


def test_a_config_file_that_is_not_yaml_is_named(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("slice:\n  epochs: [3\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: not valid YAML"):
        load_config(bad)


def test_synth_refuses_bad_sizes_before_writing_anything(tmp_path):
    from cspine.cli import main

    assert main(["synth", "--out", str(tmp_path / "s"), "synth.n_test=-1"]) == 2
    assert not (tmp_path / "s").exists()


def test_a_blend_over_unknown_models_or_over_none_of_the_runs_is_refused_when_the_config_loads():
    """Both were found only after hours: an unknown name at the blend stage, and a blend of the crop track
    alone on a run without it fitted over zero inputs and submitted one constant a target."""
    with pytest.raises(ConfigError, match=r"blend.models=\['foo'\]: name one or more of"):
        load_config("smoke", ["blend.models=[foo]"])
    with pytest.raises(ConfigError, match="names only tracks this config does not train.*one constant"):
        load_config("smoke", ["blend.models=[crop]"])
    load_config("smoke", ["blend.models=[crop]", "blend.enabled=false"])  # no blend: nothing to read
    load_config("smoke", ["blend.models=[crop,cnn]"])  # the CNN is always there
