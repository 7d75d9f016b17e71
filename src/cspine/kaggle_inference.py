"""Kaggle notebook cell (internet off): find the cspine bundle, check it fits this Python, install it
offline, write the submission. Run it in a cell as `notebooks/kaggle_submission.ipynb` does (`exec` of the
file, so that a failure stops the notebook: `%run` would print it and go on), or paste it.

CSPINE_BUNDLE (the bundle folder), CSPINE_KAGGLE_INPUT (where to look for it) and CSPINE_SUBMISSION (the
output) override the defaults; the competition data is found as `python -m cspine predict` finds it.

`python -m cspine package-kaggle` copies this file into the bundle as it is; it imports nothing but the
standard library (and `packaging`, where present), since cspine is not installed yet when it runs. On
Kaggle's public rerun, whose test images are absent, predict runs the models on a few training studies and
prints how they did (`cspine.predict.self_test`); when most test studies fail it stops with their causes.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

MARKER = "cspine-bundle.json"  # the bundle's manifest (`cspine.kaggle.MARKER`)


class BundleError(RuntimeError):
    """Why the bundle cannot submit. An exception, not `sys.exit`: IPython's `%run` shows a SystemExit and
    carries on, so a notebook would end "successfully" with no submission; an exception stops the cell, and
    `nbconvert --execute` and Kaggle's commit with it."""


def find_bundle() -> Path:
    if os.environ.get("CSPINE_BUNDLE"):
        return Path(os.environ["CSPINE_BUNDLE"])
    if "__file__" in globals() and (Path(__file__).resolve().parent / MARKER).is_file():
        return Path(__file__).resolve().parent
    root = Path(os.environ.get("CSPINE_KAGGLE_INPUT", "/kaggle/input"))
    found = sorted({p.parent for depth in ("*", "*/*", "*/*/*") for p in root.glob(f"{depth}/{MARKER}")})
    if len(found) != 1:
        listed = ", ".join(sorted(p.name for p in root.iterdir())) if root.is_dir() else "nothing"
        raise BundleError(
            f"cspine: {len(found)} bundles (folders holding {MARKER}) under {root}: "
            f"{', '.join(map(str, found)) or 'none'}; attached there: {listed}. Attach the bundle dataset, "
            "or set CSPINE_BUNDLE to its folder"
        )
    return found[0]


def check_interpreter(bundle: Path, manifest: dict) -> None:
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != have:
        raise BundleError(
            f"cspine: the bundle's wheels are for Python {manifest['python']}, this notebook runs Python "
            f"{have} ({sys.executable}); rebuild it with `python -m cspine package-kaggle --python {have}`"
        )
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        return  # the version check above stands alone
    supported = set(sys_tags())
    unusable = [
        w.name
        for w in sorted((bundle / "wheels").glob("*.whl"))
        if not set(parse_wheel_filename(w.name)[3]) & supported
    ]
    if unusable:
        raise BundleError(
            f"cspine: {len(unusable)} wheels of the bundle do not install on this interpreter "
            f"({sys.executable}, Python {have}): {', '.join(unusable)}"
        )


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements with no installed distribution (names only: versions are not compared)."""
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for requirement in requirements:
        try:
            version(re.split(r"[<>=!~; \[]", requirement, maxsplit=1)[0])
        except PackageNotFoundError:
            missing.append(requirement)
    return missing


def main() -> None:
    bundle = find_bundle()
    manifest = json.loads((bundle / MARKER).read_text())
    check_interpreter(bundle, manifest)
    os.environ.update(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")  # no network call, ever
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(bundle / "wheels")]
    # forced: a cspine already installed (an older bundle's, a pip install) must not answer for this one
    subprocess.run(pip + ["--no-deps", "--force-reinstall", "cspine"], check=True)
    if manifest["wheels"]:
        subprocess.run(pip + manifest["requirements"], check=True)
    else:
        missing = missing_requirements(manifest["requirements"])
        if missing:
            raise BundleError(
                f"cspine: the bundle was made with --no-wheels, and this Python lacks {', '.join(missing)}; "
                "install them, or rebuild the bundle without --no-wheels"
            )
    out = os.environ.get("CSPINE_SUBMISSION", "/kaggle/working/submission.csv")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cspine",
            "predict",
            "--config",
            str(bundle / "models" / "config.yaml"),
            "--models",
            str(bundle / "models"),
            "--out",
            out,
        ]
    )
    if done.returncode:
        raise BundleError(
            f"cspine: predict failed (exit {done.returncode}; its log above says why); no submission written"
        )
    print("submission written to", out)


if __name__ == "__main__":
    main()
