"""Reading test studies ahead in worker processes: a dead worker costs its own study, never the others."""

from __future__ import annotations

import sys
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_reading_processes_end_with_their_parent_even_under_kill_9(tmp_path):
    import os
    import signal
    import subprocess
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing as mp, time\n"
        "from multiprocessing import resource_tracker\n"
        "from pathlib import Path\n"
        "from cspine.studies import StudyReader\n"
        "from tests.readers import sleeps\n"
        "if __name__ == '__main__':\n"
        "    reader = StudyReader(2, 4, 'study', 0.05, 1, reader=sleeps)\n"
        "    for path in ('a', 'b'):\n"
        "        reader._submit(Path(path))\n"
        "    time.sleep(4)\n"
        "    tracker = resource_tracker._resource_tracker._pid  # the spawned pool's, which leaked semaphores need\n"
        "    print(' '.join(str(p.pid) for p in mp.active_children()), tracker, flush=True)\n"
        "    time.sleep(60)\n"
    )
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    workers = [int(p) for p in parent.stdout.readline().split()]
    assert len(workers) == 3, "the pool started no process, or no resource tracker"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in workers if _running(p)]
    assert not alive, f"reading processes or the resource tracker ({alive}) outlived their killed parent"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is dead, waiting to be reaped
    except FileNotFoundError:
        return False
