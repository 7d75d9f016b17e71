"""What every notebook's setup cell does: its parameters → the config, the data folder and the run folder.

    from cspine.notebook import notebook_setup
    cfg, data_dir, run_dir = notebook_setup(DATA_DIR, CONFIG, OVERRIDES, SMOKE, WORK_DIR)

On synthetic data (none found, none given) a notebook runs the smoke config at a scale worth looking at, or
the demo (the main job's, sharing its run folder). On the real competition (given, or found, as on a Kaggle
fork with the data attached) it takes the ``rsna`` config, since the CPU demos are refused there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from cspine.competition import is_complete
from cspine.config import Config, load_config
from cspine.pipeline import resolve_data
from cspine.runs import default_work_dir

# The notebooks' smoke scale: the smoke config with studies large enough to look at.
NOTEBOOK_SMOKE = ["synth.n_train=12", "synth.n_test=2", "synth.image_size=128", "synth.n_slices=48"]


class NotebookSetup(NamedTuple):
    cfg: Config
    data_dir: Path
    run_dir: Path


def notebook_setup(
    data_dir: str | os.PathLike | None = None,
    config: str | None = None,
    overrides: list[str] | tuple = (),
    smoke: bool = True,
    work_dir: str | os.PathLike | None = None,
    smoke_overrides: list[str] | tuple = (),
    variant: str = "",
) -> NotebookSetup:
    """The config, data and run folder from a notebook's parameters, printed on one line.

    Args:
        data_dir: the competition folder; None finds one (``$CSPINE_DATA``, ``input/``, ``/kaggle/input/``) or
            generates a synthetic competition under ``<work>/input/``.
        config: a shipped config's name or a YAML path; None: ``rsna`` on real data, else ``smoke`` or ``demo``.
        overrides: ``key=value`` settings on top (e.g. ``prepare.studies=0.25`` for Kaggle's disk).
        smoke: on synthetic data, the smoke scale (a minute on a CPU) rather than the demo.
        work_dir: where ``input/`` and ``runs/`` go (`cspine.runs.default_work_dir`).
        smoke_overrides: what this notebook adds to the smoke scale (06: the vertebrae on).
        variant: suffix of the smoke scale's folders, for a notebook whose smoke run differs from the others'.
    """
    work = default_work_dir(work_dir)
    overrides = list(overrides)
    base = "smoke" if smoke else "demo"
    scale = [*NOTEBOOK_SMOKE, *smoke_overrides] if smoke else []
    synthetic = load_config(config or base, [*scale, *overrides] if not config else overrides)
    synthetic_dir = work / "input" / (f"synthetic-notebooks{variant}" if smoke else "synthetic")
    found = resolve_data(synthetic, data_dir, synthetic=synthetic_dir)
    if is_complete(found):
        cfg = synthetic
        run_dir = work / "runs" / (f"notebooks{variant}" if smoke and not config else cfg.name)
    else:
        cfg = load_config(config or "rsna", overrides)
        run_dir = work / "runs" / cfg.name
    print(f"data: {found} | run: {run_dir} | config: {cfg.name}")
    return NotebookSetup(cfg, found, run_dir)
