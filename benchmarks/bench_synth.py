"""Synthetic generation speed: default-size studies written in the competition layout, on one core.

Target: 100 default-size studies (160 px, 60–120 slices) in under 60 s with one process.

    python benchmarks/bench_synth.py [--studies 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from cspine.config import SynthConfig
from cspine.phantom import PhantomConfig, render_study
from cspine.synthetic import make_competition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100)
    args = parser.parse_args()
    start = time.perf_counter()
    for i in range(10):
        render_study(np.random.default_rng([0, i]), PhantomConfig())
    render_only = (time.perf_counter() - start) / 10
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_competition(tmp, SynthConfig(n_train=args.studies, n_test=0, seed=0), workers=1)
        elapsed = time.perf_counter() - start
    print(
        f"{args.studies} default-size studies (render + DICOM + CSVs + masks), one process: {elapsed:.1f} s "
        f"({elapsed / args.studies:.2f} s/study; rendering alone {render_only:.2f} s/study) "
        f"-> target < 60 s: {'met' if elapsed < 60 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
