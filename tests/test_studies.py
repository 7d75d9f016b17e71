"""Reading test studies ahead in worker processes: a dead worker costs its own study, never the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from cspine.studies import StudyReader, WorkerDied

from .readers import dies_on_request


@pytest.mark.parametrize("ahead", [1, 3])
def test_a_dead_reading_process_costs_only_its_own_study(ahead):
    paths = [Path(p) for p in ("a", "bb", "die", "ccc", "bad", "dddd", "die2", "eeeee")]
    with StudyReader(2, 4, "study", 0.05, 1, reader=dies_on_request) as reader:
        results = list(reader.read(paths, ahead=ahead))
    assert len(results) == len(paths)
    for path, result in zip(paths, results):
        if path.name.startswith("die"):
            assert isinstance(result, WorkerDied) and str(path) in str(result)
        elif path.name.startswith("bad"):
            assert isinstance(result, ValueError)
        else:
            assert int(result.images[0, 0, 0, 0]) == len(path.name)  # its own study, in order
