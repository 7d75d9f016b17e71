"""Study readers for the reading-process tests: module level, so a spawned worker process imports them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cspine.studies import ReadStudy


def dies_on_request(path: Path, size: int, *args) -> ReadStudy:
    """Kills its process on a study named ``die*`` (as the OOM killer or a decoder's segfault would),
    raises on ``bad*``, and reads any other as a study of one slice whose value is its name's length."""
    name = Path(path).name
    if name.startswith("die"):
        os._exit(139)
    if name.startswith("bad"):
        raise ValueError(f"{name}: unreadable")
    return ReadStudy(np.full((1, size, size, 3), len(name), np.uint8))


def sleeps(path: Path, size: int, *args) -> ReadStudy:
    """Reads nothing for a minute: a worker busy when its parent is killed."""
    import time

    time.sleep(60)
    return ReadStudy(np.zeros((1, size, size, 3), np.uint8))
