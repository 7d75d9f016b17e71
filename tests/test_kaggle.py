"""The Kaggle bundle as a Kaggle notebook meets it: found under /kaggle/input whatever its name, checked
against the interpreter, installed offline into Kaggle's preinstalled set, and writing a valid submission."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cspine.competition import read_test
from cspine.config import load_config
from cspine.kaggle import MARKER, package_kaggle
from cspine.rehearse import kaggle_python
from cspine.submission import validate_submission

from .conftest import SMOKE_CONFIG

pytestmark = pytest.mark.slow
HERE = f"{sys.version_info.major}.{sys.version_info.minor}"


def _run_as_a_cell(script, env, python=sys.executable):
    """The script as a pasted notebook cell runs it: no __file__."""
    code = f"exec(compile(open({str(script)!r}).read(), 'cell', 'exec'), {{'__name__': '__main__'}})"
    return subprocess.run([python, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)


def test_the_bundle_records_what_it_is_for_and_how_to_upload_it(smoke_run, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    with caplog.at_level("WARNING", logger="cspine.kaggle"):
        out = package_kaggle(
            load_config(SMOKE_CONFIG),
            smoke_run,
            tmp_path / "b",
            wheels=False,
            python="3.10",
            dataset="my-cspine",
        )
    assert "YOUR-KAGGLE-USERNAME: set $KAGGLE_USERNAME" in caplog.text  # the owner to fill in, said aloud
    manifest = json.loads((out / MARKER).read_text())
    assert manifest["python"] == "3.10" and "segmentation-models-pytorch>=0.6" in manifest["requirements"]
    meta = json.loads((out / "dataset-metadata.json").read_text())
    assert meta["id"].endswith("/my-cspine") and meta["title"] == "my-cspine"


def test_the_script_finds_the_bundle_under_any_name_and_refuses_another_python(smoke_run, tmp_path):
    kaggle_input = tmp_path / "input"
    bundle = package_kaggle(
        load_config(SMOKE_CONFIG),
        smoke_run,
        kaggle_input / "whatever-i-called-it" / "v2",
        wheels=False,
        python="3.9",
    )
    (kaggle_input / "rsna-2022-cervical-spine-fracture-detection").mkdir()
    done = _run_as_a_cell(bundle / "kaggle_inference.py", {"CSPINE_KAGGLE_INPUT": str(kaggle_input)})
    assert done.returncode != 0
    # found, then checked
    assert f"wheels are for Python 3.9, this notebook runs Python {HERE}" in done.stderr
    assert f"--python {HERE}" in done.stderr
    shutil.copytree(bundle, kaggle_input / "a-second-copy")
    done = _run_as_a_cell(bundle / "kaggle_inference.py", {"CSPINE_KAGGLE_INPUT": str(kaggle_input)})
    assert "2 bundles" in done.stderr and "a-second-copy" in done.stderr and "CSPINE_BUNDLE" in done.stderr


def test_the_script_is_the_packages_file_and_names_the_packages_marker(smoke_run, tmp_path):
    from cspine import kaggle_inference

    assert kaggle_inference.MARKER == MARKER
    bundle = package_kaggle(load_config(SMOKE_CONFIG), smoke_run, tmp_path / "b", wheels=False)
    assert (bundle / "kaggle_inference.py").read_text() == Path(kaggle_inference.__file__).read_text()


def test_a_no_wheels_bundle_still_holds_cspine_and_installs_where_the_dependencies_are(
    smoke_run, synthetic_root, tmp_path
):
    """--no-wheels leaves out the dependencies only: the script installs cspine's own wheel, checks the
    dependencies are there, and predicts; where they are not, it stops naming them."""
    kaggle_input = tmp_path / "input"
    bundle = package_kaggle(load_config(SMOKE_CONFIG), smoke_run, kaggle_input / "nowheels", wheels=False)
    assert [w.name.split("-")[0] for w in (bundle / "wheels").glob("*.whl")] == ["cspine"]
    assert json.loads((bundle / MARKER).read_text())["wheels"] is False
    data = kaggle_input / "rsna-2022-cervical-spine-fracture-detection"
    shutil.copytree(synthetic_root, data)
    submission = tmp_path / "working" / "submission.csv"
    env = {
        "CSPINE_KAGGLE_INPUT": str(kaggle_input),
        "CSPINE_DATA": str(data),
        "CSPINE_SUBMISSION": str(submission),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/none",
    }
    bare = tmp_path / "bare"  # a Python without the dependencies
    subprocess.run([sys.executable, "-m", "venv", str(bare)], check=True)
    done = _run_as_a_cell(bundle / "kaggle_inference.py", env, python=bare / "bin" / "python")
    assert done.returncode != 0 and "made with --no-wheels" in done.stderr and "pydicom>=3.0" in done.stderr
    assert not submission.exists()
    # one that has them: this environment's, seen from a fresh one (`venv --system-site-packages` would show
    # the base interpreter's packages, not those of the virtual environment the tests may run in)
    full = kaggle_python(tmp_path / "full")
    done = _run_as_a_cell(bundle / "kaggle_inference.py", env, python=full)
    assert done.returncode == 0, done.stderr[-3000:]
    validate_submission(pd.read_csv(submission), read_test(data))


# what a Kaggle GPU image lacks of the inference requirements (the bundle installs them), and one it has
# too old in the test (pyyaml 5.0 stands in for it)
KAGGLE_LACKS = (
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "dicomsdl",
    "tabulate",
)


def _torch_files() -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file of the installed torch, from its record."""
    from importlib.metadata import distribution

    dist = distribution("torch")
    return {
        str(f): (os.stat(dist.locate_file(f)).st_size, os.stat(dist.locate_file(f)).st_mtime_ns)
        for f in dist.files
    }


def test_the_bundle_installs_only_what_the_image_lacks_never_touching_torch_and_writes_a_valid_submission(
    smoke_run, synthetic_root, tmp_path
):
    """The bundle brought its own CPU torch (301 MB of wheels against 38 MB of models), and installing it
    could replace Kaggle's CUDA build. Now: the wheels of what a Kaggle image may lack, no dependency; into
    an environment that has torch and lacks `KAGGLE_LACKS`, it installs those alone, torch's files
    untouched; an installed package too old is refused by name. Needs the package index for the wheels
    (skips without it); inference then runs with pip's configuration and indexes switched off."""
    from cspine.kaggle import BUNDLED

    kaggle_input = tmp_path / "input"
    try:
        bundle = package_kaggle(
            load_config(SMOKE_CONFIG), smoke_run, kaggle_input / "someones-models", wheels=True
        )
    except OSError as exc:
        pytest.skip(f"the package index is unreachable: {exc}")
    wheels = sorted(w.name.split("-")[0].replace("_", "-") for w in (bundle / "wheels").glob("*.whl"))
    assert wheels == sorted(["cspine", *(r.split(">=")[0] for r in BUNDLED)])  # no torch, numpy, timm
    assert sum(w.stat().st_size for w in (bundle / "wheels").glob("*.whl")) < 120e6
    python = kaggle_python(tmp_path / "kaggle-image", hide=(*KAGGLE_LACKS, "pyyaml"))
    purelib = next((tmp_path / "kaggle-image" / "lib").glob("python3*/site-packages"))
    fresh = {p.name.split("-")[0].lower() for p in purelib.glob("*.dist-info")}  # pip's own
    old_yaml = purelib / "PyYAML-5.0.dist-info"
    old_yaml.mkdir()
    (old_yaml / "METADATA").write_text("Metadata-Version: 2.1\nName: PyYAML\nVersion: 5.0\n")
    (old_yaml / "RECORD").write_text("PyYAML-5.0.dist-info/METADATA,,\nPyYAML-5.0.dist-info/RECORD,,\n")
    data = kaggle_input / "rsna-2022-cervical-spine-fracture-detection"
    shutil.copytree(synthetic_root, data)
    submission = tmp_path / "working" / "submission.csv"
    offline = {
        "CSPINE_KAGGLE_INPUT": str(kaggle_input),
        "CSPINE_DATA": str(data),
        "CSPINE_SUBMISSION": str(submission),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_FIND_LINKS": "",
        "PIP_INDEX_URL": "http://127.0.0.1:9/none",
    }
    torch_before = _torch_files()
    done = _run_as_a_cell(bundle / "kaggle_inference.py", offline, python=python)
    assert (
        done.returncode != 0 and "too old for the kit in this Python: pyyaml 5.0 (needs >=6.0)" in done.stderr
    )
    assert "CSPINE_UPGRADE=pyyaml" in done.stderr and not submission.exists()
    done = _run_as_a_cell(
        bundle / "kaggle_inference.py", {**offline, "CSPINE_UPGRADE": "pyyaml"}, python=python
    )
    assert done.returncode == 0, done.stderr[-3000:]
    validate_submission(pd.read_csv(submission), read_test(data))
    assert _torch_files() == torch_before
    added = {p.name.split("-")[0].lower() for p in purelib.glob("*.dist-info")} - fresh
    assert added == {"cspine", "pyyaml", *(n.replace("-", "_") for n in KAGGLE_LACKS)}, added
    public = kaggle_input / "public-rerun"  # test.csv lists studies whose images are absent
    shutil.copytree(data, public, ignore=shutil.ignore_patterns("test_images"))
    done = _run_as_a_cell(
        bundle / "kaggle_inference.py", {**offline, "CSPINE_DATA": str(public)}, python=python
    )
    assert done.returncode == 0 and "cspine self-test: 3 training studies" in done.stdout, done.stderr[-3000:]
    broken = kaggle_input / "broken"  # every test study unreadable: the notebook must fail, with the cause
    shutil.copytree(data, broken)
    for dcm in (broken / "test_images").rglob("*.dcm"):
        dcm.write_bytes(b"")
    done = _run_as_a_cell(
        bundle / "kaggle_inference.py", {**offline, "CSPINE_DATA": str(broken)}, python=python
    )
    assert done.returncode != 0 and "test studies failed" in done.stderr and "DicomError" in done.stderr
    assert _torch_files() == torch_before


def test_a_failed_packaging_keeps_the_old_bundle(smoke_run, tmp_path, monkeypatch):
    """The wheels' download fails (no package index): the old bundle stays whole, nothing half-made is left,
    and the error says so in one line (no traceback at the command line: an OSError)."""
    import cspine.kaggle
    from cspine.kaggle import PackagingError

    out = package_kaggle(load_config(SMOKE_CONFIG), smoke_run, tmp_path / "bundle", wheels=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def no_index(wheel_dir, python):
        raise subprocess.CalledProcessError(1, [sys.executable, "-m", "pip", "download", "-q"])

    monkeypatch.setattr(cspine.kaggle, "download_wheels", no_index)
    with pytest.raises(PackagingError, match=r"`pip download` failed.*bundle is unchanged"):
        package_kaggle(load_config(SMOKE_CONFIG), smoke_run, out, wheels=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert json.loads((out / MARKER).read_text())["wheels"] is False
    assert not (tmp_path / "bundle.partial").exists() and isinstance(PackagingError("x"), OSError)
