"""On a GPU: the `rsna` rehearsal and the recipe's rates together, in one script of under 8 minutes.

    OUT=/tmp/out python benchmarks/gpu_rehearsal.py            # on a lent GPU machine
    python benchmarks/gpu_rehearsal.py --out /tmp/out --tiny   # on a CPU: the same code at toy sizes

1. `python -m cspine rehearse` (the `rsna` config on real-shaped phantoms, time cut; `cspine.rehearse`): every
   stage, the bundle and both Kaggle reruns, with the GPU's peak memory per stage;
2. `gpu_budget.py`: each model's training step and one real-shaped study predicted, in each precision.

Writes to ``$OUT`` (or --out): ``rehearsal.json``, ``table.md``, ``gpu_budget.json``, and the two logs; docs/gpu.md
takes its figures from them. Each part is given its share of the time, and a part that fails leaves the
other's results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_part(command: list[str], log: Path, timeout: float) -> int:
    """Runs one part with its output in ``log``; its exit code (124 when out of time)."""
    with open(log, "w") as f:
        try:
            return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\nstopped after {timeout:.0f} s\n")
            return 124


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_rehearsal")))
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU")
    parser.add_argument("--minutes", type=float, default=7.5, help="for both parts together")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    budget = args.minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        rehearse = [
            sys.executable,
            "-m",
            "cspine",
            "rehearse",
            "--out",
            f"{tmp}/run",
            "--data",
            f"{tmp}/data",
        ]
        if args.tiny:
            rehearse += ["--config", "smoke", "--size", "64", "--slices", "16,24", "--head", "8,14"]
        code = run_part(rehearse, args.out / "rehearsal.log", 0.6 * budget)
        for name in ("rehearsal.json", "table.md"):
            if (Path(tmp) / "run" / "rehearsal" / name).is_file():
                shutil.copy(Path(tmp) / "run" / "rehearsal" / name, args.out / name)
    budget_cmd = [sys.executable, str(HERE / "gpu_budget.py"), "--out", str(args.out / "gpu_budget.json")]
    budget_cmd += ["--tiny", "--steps", "3"] if args.tiny else ["--steps", "60"]
    code_budget = run_part(budget_cmd, args.out / "gpu_budget.log", 0.4 * budget)
    print(f"rehearsal: exit {code}; gpu_budget: exit {code_budget}; results in {args.out}")
    sys.exit(code or code_budget)


if __name__ == "__main__":
    main()
