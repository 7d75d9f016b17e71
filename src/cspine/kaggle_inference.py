"""Kaggle notebook cell (internet off): find the cspine bundle, check it fits this Python, install it
offline, write the submission. Run it in a cell as `notebooks/kaggle_submission.ipynb` does (`exec` of the
file, so that a failure stops the notebook: `%run` would print it and go on), or paste it.

It installs only what this Python lacks of what inference needs, from the bundle's wheels, with every
installed package pinned to its version (Kaggle's CUDA torch stays as it is), and refuses in one line when an
installed package is older than the kit needs, naming it.

CSPINE_BUNDLE (the bundle folder), CSPINE_KAGGLE_INPUT (where to look for it) and CSPINE_SUBMISSION (the
output) override the defaults; CSPINE_UPGRADE (names, comma-separated) lets the bundle's wheels replace those
installed packages. The competition data is found as `python -m cspine predict` finds it.

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
import tempfile
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


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """{canonical distribution name: version} of everything this Python has installed."""
    from importlib.metadata import distributions

    return {canonical(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}


def _numbers(version: str) -> tuple[int, ...]:
    """A version's leading release numbers ("2.4.1+cu121" → (2, 4, 1)): enough to compare with a ``>=``."""
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0].split("rc")[0])[:4])


def plan_install(manifest: dict, wheels: list[str], have: dict[str, str], upgrade: set[str]) -> list[str]:
    """The requirements to install from the bundle: those this Python lacks (or, named in ``upgrade``, has
    too old) and the bundle holds a wheel of (``wheels``: canonical names).

    Raises:
        BundleError: in one line, the installed packages older than the kit needs, or those neither this
            Python nor the bundle has.
    """
    install, old, lacking = [], [], []
    for requirement in manifest["requirements"]:
        name, least = (part.strip() for part in requirement.split(">="))
        present = [canonical(n) for n in [name, *manifest.get("provided_by", {}).get(name, [])]]
        version = next((have[n] for n in present if n in have), None)
        if version is not None and _numbers(version) >= _numbers(least):
            continue
        if version is not None and canonical(name) not in upgrade:
            old.append(f"{name} {version} (needs >={least})")
        elif canonical(name) in wheels:
            install.append(requirement)
        else:
            lacking.append(requirement)
    if old:
        raise BundleError(
            f"cspine: too old for the kit in this Python: {', '.join(old)}; the bundle never replaces an "
            "installed package: set CSPINE_UPGRADE to the names the bundle's wheels may replace "
            f"(CSPINE_UPGRADE={','.join(o.split()[0] for o in old)}), or build the models with the versions "
            "this image has"
        )
    if lacking:
        without = " (it was made with --no-wheels)" if not manifest["wheels"] else ""
        raise BundleError(
            f"cspine: this Python lacks {', '.join(lacking)}, and the bundle holds no wheel of it{without}; "
            "install them, or rebuild the bundle without --no-wheels"
        )
    return install


def constraints(have: dict[str, str], upgrade: set[str]) -> str:
    """Every installed distribution pinned to its version (less ``upgrade``, and cspine itself): installing
    the bundle's wheels then never upgrades, downgrades or replaces one."""
    pinned = [
        f"{name}=={version}"
        for name, version in sorted(have.items())
        if name not in upgrade and name != "cspine" and re.fullmatch(r"[0-9][0-9A-Za-z.+!_-]*", version)
    ]
    return "\n".join(pinned) + "\n"


def main() -> None:
    bundle = find_bundle()
    manifest = json.loads((bundle / MARKER).read_text())
    check_interpreter(bundle, manifest)
    os.environ.update(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")  # no network call, ever
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(bundle / "wheels")]
    have = installed_versions()
    upgrade = {canonical(n) for n in os.environ.get("CSPINE_UPGRADE", "").split(",") if n.strip()}
    wheels = [canonical(w.name.split("-")[0]) for w in (bundle / "wheels").glob("*.whl")]
    install = plan_install(manifest, wheels, have, upgrade)
    # forced: a cspine already installed (an older bundle's, a pip install) must not answer for this one
    subprocess.run(pip + ["--no-deps", "--force-reinstall", "cspine"], check=True)
    if install:
        pins = Path(tempfile.mkdtemp()) / "installed.txt"
        pins.write_text(constraints(have, upgrade))
        done = subprocess.run(pip + ["--constraint", str(pins), *install])
        if done.returncode:
            raise BundleError(
                f"cspine: installing {', '.join(install)} from the bundle without changing an installed "
                "package failed (pip's message above names the conflict); rebuild the bundle for this image"
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
