"""Where a run's minutes go: each stage's seconds from a run folder's log, as a table.

    python benchmarks/bench_run.py                  # runs/demo
    python benchmarks/bench_run.py runs/bench-crop  # any run folder

`cspine.pipeline.run_stages` logs ``stage <name>: <seconds> s`` for every stage it runs into
``<run>/run.log``; a stage that had nothing to do logs no time. The table takes each stage's latest timing
and says when it was made, so a resumed run's stages from different days are told apart. For a fresh
measurement, delete the run folder (the synthetic data may stay) and run `python -m cspine run`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

STAGE = re.compile(
    r"^(?P<time>\d\d:\d\d:\d\d) INFO cspine\.pipeline: stage (?P<stage>[\w-]+): (?P<seconds>[\d.]+) s$"
)
TOTAL = re.compile(r"run \S+ finished in (?P<minutes>[\d.]+) min")


def stage_seconds(log: Path) -> dict[str, tuple[float, str]]:
    """{stage: (seconds, clock time logged)}, the latest timing of each stage in ``log``."""
    out: dict[str, tuple[float, str]] = {}
    for line in log.read_text().splitlines():
        m = STAGE.match(line.strip())
        if m:
            out[m["stage"]] = (float(m["seconds"]), m["time"])
    return out


def table(seconds: dict[str, tuple[float, str]]) -> str:
    total = sum(s for s, _ in seconds.values())
    rows = ["| stage | seconds | share | logged at |", "|---|---:|---:|---|"]
    for stage, (s, when) in sorted(seconds.items(), key=lambda kv: -kv[1][0]):
        rows.append(f"| {stage} | {s:.1f} | {s / total:.0%} | {when} |")
    rows.append(f"| **all stages** | **{total:.1f}** ({total / 60:.1f} min) | | |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    run = Path(argv[0] if argv else "runs/demo")
    log = run / "run.log"
    if not log.is_file():
        print(f"{log} not found: run `python -m cspine run` first (or name a run folder)")
        return 1
    seconds = stage_seconds(log)
    if not seconds:
        print(f"{log} holds no stage timings")
        return 1
    print(
        f"{run}: each stage's latest timing (synthetic data generation is not a stage: see the run's log)\n"
    )
    print(table(seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
