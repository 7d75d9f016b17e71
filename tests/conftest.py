"""Shared test fixtures: paths to the real CT files and small synthetic series written as DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cspine.config import SynthConfig, config_path

REPO = Path(__file__).resolve().parents[1]
# One real CT slice in many transfer syntaxes, with its source and MIT licence (README.md, LICENSE there)
TRANSFER_SYNTAX_FIXTURES = REPO / "tests" / "fixtures" / "ct-transfer-syntaxes"


@pytest.fixture(scope="session")
def transfer_syntax_dir() -> Path:
    return TRANSFER_SYNTAX_FIXTURES


def ramp_volume(n: int = 6, size: int = 32, seed: int = 0) -> np.ndarray:
    """float32 [n, size, size] HU with a distinct value per slice (slice k holds 100·k + noise)."""
    rng = np.random.default_rng(seed)
    base = np.arange(n, dtype=np.float32)[:, None, None] * 100.0
    return (base + rng.integers(-1000, 1000, size=(n, size, size))).astype(np.float32)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic competition (8 train with boxes and masks on most, 2 test), made once per run."""
    from cspine.synthetic import make_competition

    root = tmp_path_factory.mktemp("synthetic")
    return make_competition(
        root,
        SynthConfig(
            n_train=8,
            n_test=2,
            seed=11,
            image_size=96,
            n_slices=40,
            box_fraction=1.0,
            mask_fraction=0.75,
            min_masks=0,
        ),
    )


SMOKE_CONFIG = config_path("smoke")


@pytest.fixture(scope="session")
def smoke_run(synthetic_root, tmp_path_factory) -> Path:
    """The whole pipeline at the smoke config on the shared synthetic competition, run once."""
    from cspine.config import load_config
    from cspine.pipeline import run

    run_dir = tmp_path_factory.mktemp("smoke_run")
    run(load_config(SMOKE_CONFIG), synthetic_root, run_dir, run_dir / "submission.csv")
    return run_dir
