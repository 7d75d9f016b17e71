"""The run layer: paths, atomic writes, checkpoints; the stage list; what inference imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from cspine.checkpoints import (
    CHECKPOINT_SCHEMA,
    CheckpointError,
    SequenceMeta,
    SliceMeta,
    load_checkpoint,
    load_sequence_model,
    load_slice_model,
    save_checkpoint,
    save_model,
)
from cspine.config import load_config
from cspine.inputs import SliceReading
from cspine.models import SequenceNet, SliceNet
from cspine.runs import Run, atomic_path, write_text

READING = SliceReading(size=48, crop="study", margin=0.05, input_size=48, context=0)


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "table.csv"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]  # no temporary left behind
    with atomic_path(target) as tmp:
        assert tmp.name.endswith(".part") and not tmp.name.endswith(".csv")  # never matched by *.csv globs
        tmp.write_text("new\n")
    assert target.read_text() == "new\n"


def test_slice_model_round_trip_keeps_weights_architecture_and_inputs(tmp_path):
    torch.manual_seed(0)
    model = SliceNet("test_resnet", dropout=0.1, box_head=True, context=1).eval()
    saved = SliceMeta(READING, fold=1, epoch=2, val_loss=0.5, trained_on=["a", "b"], config={})
    path = save_model(model, tmp_path / "best.pt", saved)
    state = load_checkpoint(path, "slice-cnn")
    assert state["schema"] == CHECKPOINT_SCHEMA and state["kind"] == "slice-cnn"
    loaded, meta = load_slice_model(path)
    assert meta == saved and isinstance(meta.reading, SliceReading)  # typed again, nested too
    assert loaded.context == 1 and loaded.box_head is not None
    x = torch.randn(2, 9, 48, 48)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_sequence_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SequenceNet(3, hidden=8).eval()
    save_model(model, tmp_path / "inner0.pt", SequenceMeta("fracture", 4, False, 0, ["a"]))
    loaded, meta = load_sequence_model(tmp_path / "inner0.pt")
    x, lengths = torch.randn(1, 4, 3), torch.tensor([4])
    assert meta.bins == 4 and meta.fold == 0
    with torch.inference_mode():
        assert torch.equal(model(x, lengths), loaded(x, lengths))


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(tmp_path, damage):
    path = save_model(
        SequenceNet(3, hidden=8), tmp_path / "inner0.pt", SequenceMeta("fracture", 0, False, 0, [])
    )
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="inner0.pt.*damaged"):
        load_sequence_model(path)


def test_checkpoints_of_another_schema_or_kind_are_refused(tmp_path):
    torch.save({"model": {}, "arch": {}}, tmp_path / "old.pt")  # as an earlier cspine wrote them
    with pytest.raises(CheckpointError, match="old.pt: checkpoint schema None"):
        load_checkpoint(tmp_path / "old.pt", "slice-cnn")
    save_checkpoint({"epoch": 3}, tmp_path / "last.pt", "slice-resume")
    with pytest.raises(CheckpointError, match="not a 'slice-cnn'"):
        load_slice_model(tmp_path / "last.pt")
    save_model(SequenceNet(3, hidden=8), tmp_path / "other.pt", SequenceMeta("fracture", 0, False, 0, []))
    state = torch.load(tmp_path / "other.pt", weights_only=False)
    torch.save({**state, "meta": {**state["meta"], "source_fold": 0}}, tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError, match="other.pt: its SequenceMeta holds"
    ):  # fields of another version
        load_sequence_model(tmp_path / "other.pt")


def test_run_paths_and_record_names(tmp_path):
    run = Run(tmp_path)
    assert run.slice_best(2) == tmp_path / "slice" / "fold2" / "best.pt"
    assert run.blstm(128, 1, 0) == tmp_path / "seq" / "h128" / "fold1" / "inner0.pt"
    assert run.blstm(128, 1, None).name == "model.pt"
    assert run.cache.index == tmp_path / "cache" / "index.csv"
    with pytest.raises(ValueError, match="not a slice record"):
        run.slice_file(0, "best.pt.bak")
    save_checkpoint({}, run.slice_best(0), "slice-cnn")
    save_checkpoint({}, run.slice_best(3), "slice-cnn")
    assert run.slice_checkpoints() == {0: run.slice_best(0), 3: run.slice_best(3)}


def test_slice_pools_split_by_study_and_drop_unknown_labels():
    from cspine.train_slices import slice_pools

    index = pd.DataFrame(
        {
            "StudyInstanceUID": ["a", "a", "b", "b", "c", "c"],
            "order": [0, 1] * 3,
            "label": [0, 1, -1, -1, 0, -1],
        }
    )
    folds = pd.DataFrame({"StudyInstanceUID": ["a", "b", "c"], "fold": [0, 1, 1]})
    train, val = slice_pools(index, folds, 1)
    assert set(train["StudyInstanceUID"]) == {"a"} and len(train) == 2
    assert set(val["StudyInstanceUID"]) == {"c"} and list(val["label"]) == [0]  # c's unknown slice dropped
    train, val = slice_pools(index, folds, 0)
    assert set(train["StudyInstanceUID"]) == {"c"} and set(val["StudyInstanceUID"]) == {"a"}


def test_validation_subset_keeps_both_labels_in_the_folds_proportions():
    from cspine.train_slices import validation_subset

    val = pd.DataFrame({"StudyInstanceUID": "s", "order": range(1000), "label": [1] * 700 + [0] * 300})
    sub = validation_subset(val, 200, seed=0)
    assert len(sub) == 200 and sub["label"].value_counts().to_dict() == {1: 140, 0: 60}
    rare = pd.DataFrame({"StudyInstanceUID": "s", "order": range(1000), "label": [1] + [0] * 999})
    assert validation_subset(rare, 50, seed=0)["label"].sum() == 1  # a lone positive is kept
    assert validation_subset(val, 0, seed=0) is val


def test_run_stages_runs_only_unfinished_stages_in_order(monkeypatch, tmp_path):
    import cspine.pipeline as pipeline
    from cspine.config import Config

    ran = []
    fake = tuple(
        pipeline.Stage(name, lambda job, n=name: n == "b", lambda job, n=name: ran.append(n))
        for name in ("a", "b", "c", "d")
    )
    monkeypatch.setattr(pipeline, "STAGES", fake)
    monkeypatch.setattr(pipeline, "STAGE_NAMES", ("a", "b", "c", "d"))
    pipeline.run_stages(Config(), tmp_path, tmp_path, until="c")
    assert ran == ["a", "c"]  # b was done, d comes after `until`
    with pytest.raises(ValueError, match="until"):
        pipeline.run_stages(Config(), tmp_path, tmp_path, until="e")


def test_every_stage_is_a_cli_command():
    from cspine.cli import build_parser
    from cspine.pipeline import STAGE_NAMES

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert set(STAGE_NAMES) <= commands


def test_step_bars_stay_off_when_stderr_is_not_a_terminal(monkeypatch):
    from cspine.progress import progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress(range(3), "steps", steps=True).disable
    study_bar = progress(range(3), "studies")
    assert not study_bar.disable and study_bar.mininterval == 30.0
    assert progress(range(3), "rank 1", enabled=False).disable


def test_no_stage_imports_another_stage_and_no_library_module_imports_a_stage():
    """A stage module is named after its command (`pipeline.STAGES`, and the commands outside `run`); it
    imports library modules only, and a library module imports no stage: what two stages share lives in a
    library module. Function-level imports count."""
    import ast
    from pathlib import Path

    import cspine
    from cspine.pipeline import STAGE_NAMES

    package = Path(cspine.__file__).parent
    stages = {name.replace("-", "_") for name in STAGE_NAMES} | {"synthetic", "explain", "kaggle"}
    modules = {p.stem: p for p in package.glob("*.py")}
    assert stages <= set(modules), f"stage modules missing: {sorted(stages - set(modules))}"
    wrong = []
    for name, path in modules.items():
        # the stage list, the command line, the rehearsal (which runs the stage list, then the bundle) and the
        # held-out score (predict, then the report)
        if name in ("pipeline", "cli", "__main__", "rehearse", "holdout"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cspine."):
                imported = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                imported = [a.name.split(".")[1] for a in node.names if a.name.startswith("cspine.")]
            else:
                continue
            wrong += [f"{name} imports {m}" for m in imported if m in stages and m != name]
    assert not wrong


def test_no_function_in_the_package_is_longer_than_a_screen():
    """One function, one job: a function over 80 lines (its docstring included) is two."""
    import ast
    from pathlib import Path

    import cspine

    long = [
        f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(Path(cspine.__file__).parent.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long


def test_inference_imports_no_training_module():
    code = (
        "import sys, cspine.predict, cspine.evaluate, cspine.explain, cspine.kaggle; "
        "print(' '.join(m for m in ('cspine.train_slices', 'cspine.train_seq', 'cspine.data', "
        "'cspine.segment', 'cspine.train_vertebrae', 'cspine.crop', 'cspine.train_crops', 'albumentations', "
        "'iterstrat', 'zarr') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == ""


def test_the_predict_command_imports_no_training_module(tmp_path):
    """The Kaggle bundle installs cspine without its training dependencies: `python -m cspine predict` must
    not import them on its way (here it stops at the missing data, after its imports)."""
    code = (
        "import sys\nfrom cspine.cli import main\n"
        f"rc = main(['predict', '--models', {str(tmp_path)!r}, '--data', {str(tmp_path / 'none')!r}])\n"
        "print(rc, ' '.join(m for m in ('cspine.pipeline', 'cspine.train_slices', 'cspine.data', 'cspine.segment', "
        "'albumentations', 'iterstrat', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1"]


def test_study_input_max_pools_log_odds_into_bins():
    from cspine.inputs import study_input

    probs = np.full((6, 15), 0.5, np.float32)
    probs[2, 0] = 0.9
    x = study_input(None, probs, "fracture", bins=3)
    assert x.shape == (3, 1) and x[1, 0] == pytest.approx(np.log(9.0), rel=1e-3) and x[0, 0] == 0


def test_every_artifact_is_written_through_the_run_layer():
    """No module writes a file directly: each goes through `cspine.runs` (temporary name, then rename), so a
    kill never leaves half a file under a real name. The DICOM writer is the exception: the synthetic
    generator writes each study into a temporary folder and renames it when whole; the Kaggle script (the
    standard library alone) writes only a temporary constraints file."""
    import re
    from pathlib import Path

    import cspine

    direct = re.compile(
        r"\.write_text\(|\.write_bytes\(|\.to_csv\(|torch\.save\(|\.savefig\(|np\.savez?\(|"
        r"nib\.save\(|\.save_as\(|open\([^)]*[\"'][wa]b?[\"']"
    )
    allowed = {"runs.py", "checkpoints.py", "dicom_writer.py", "kaggle_inference.py"}
    offenders = []
    for path in sorted(Path(cspine.__file__).parent.glob("*.py")):
        if path.name in allowed:
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            inside_atomic = any("atomic_path(" in above for above in lines[max(0, i - 1) : i + 1])
            if direct.search(line) and not inside_atomic:
                offenders.append(f"{path.name}:{i + 1}: {line.strip()}")
    assert not offenders, offenders


def test_the_segmentation_runs_when_either_labels_or_the_vertebra_track_need_it():
    from cspine.pipeline import needs_vertebrae

    assert not needs_vertebrae(load_config())
    assert needs_vertebrae(load_config(None, ["slice.labels=vertebrae"]))
    # boxes for the CNN, vertebrae for the track
    assert needs_vertebrae(load_config(None, ["vert.enabled=true"]))


def test_a_run_folder_is_held_by_one_process_at_a_time(tmp_path, synthetic_root):
    import json
    import socket

    from cspine.pipeline import run
    from cspine.runs import RunLocked, run_lock

    folder = Run(tmp_path / "run")
    with run_lock(folder):
        held = json.loads(folder.lock.read_text())
        assert held["pid"] == os.getpid()
        with pytest.raises(RunLocked, match=rf"in use by process {os.getpid()} on {socket.gethostname()}"):
            run(load_config("smoke"), synthetic_root, folder.root, tmp_path / "submission.csv")
        assert not folder.config.exists()  # refused before anything was written
    assert not folder.lock.exists()  # released
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    folder.lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with run_lock(folder):  # killed with -9: the lock is stale and taken over
        assert json.loads(folder.lock.read_text())["pid"] == os.getpid()
    folder.lock.write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    with pytest.raises(RunLocked, match="another-machine"):
        with run_lock(folder):
            pass


def test_a_lock_that_names_no_process_is_taken_over_once_it_is_old(tmp_path):
    """An empty run.lock was reported as "in use by process ? on ?" forever."""
    from cspine.runs import UNNAMED_LOCK_SECONDS, RunLocked, run_lock

    folder = Run(tmp_path / "run")
    folder.root.mkdir()
    folder.lock.write_text("")  # just made: perhaps a process about to write its name
    with pytest.raises(RunLocked, match="in use by a process .*delete the lock file if no cspine command"):
        with run_lock(folder):
            pass
    old = time.time() - UNNAMED_LOCK_SECONDS - 5
    os.utime(folder.lock, (old, old))
    with run_lock(folder):
        assert json.loads(folder.lock.read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("stage", ["prepare", "segment", "train-slices", "blend", "evaluate", "explain"])
def test_every_stage_command_takes_the_run_lock(tmp_path, synthetic_root, capsys, stage):
    """Only `run` took the lock: a stage command beside a `run` on the same folder wrote into it."""
    from cspine.cli import main
    from cspine.runs import run_lock

    folder = Run(tmp_path / "run")
    folder.root.mkdir()
    folder.cache.root.mkdir()
    folder.cache.index.write_text("StudyInstanceUID\n")  # train-slices checks for a cache first
    with run_lock(folder):
        data = ["--data", str(synthetic_root)] if stage in ("prepare", "train-slices", "explain") else []
        code = main([stage, "--config", "smoke", "--out", str(folder.root), *data])
        assert code == 1 and json.loads(folder.lock.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"in use by process {os.getpid()}" in err and "Traceback" not in err
    assert not folder.config.exists()  # refused before anything was written
