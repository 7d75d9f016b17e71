"""The benchmark scripts that other documents quote: they run, and they read what they claim to read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_the_gpu_budget_script_runs_its_every_part_at_toy_sizes(tmp_path):
    """Device time is short: the script that spends it must have run whole on a CPU first."""
    out = tmp_path / "budget.json"
    done = subprocess.run(
        [sys.executable, "gpu_budget.py", "--tiny", "--steps", "1", "--slices", "8", "--out", str(out)],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["training"]["fp32"]) == {
        "slice CNN, slices/s",
        "segmentation, planes/s",
        "crop model, crop slices/s",
    }
    parts = result["inference"]["fp32"]
    assert {"decode (CPU)", "cutting the crops (CPU)"} <= set(parts) and all(v > 0 for v in parts.values())
    assert "| crop model, crop slices/s |" in done.stdout


@pytest.mark.slow
def test_the_gpu_rehearsal_script_runs_both_parts_at_toy_sizes(tmp_path):
    """The script a lent GPU runs once: the rehearsal and the budget, their results where docs/gpu.md reads."""
    done = subprocess.run(
        [sys.executable, "gpu_rehearsal.py", "--tiny", "--out", str(tmp_path)],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (tmp_path / "rehearsal.log").read_text()[-3000:]
    rehearsal = json.loads((tmp_path / "rehearsal.json").read_text())
    assert [c["exit"] for c in rehearsal["checks"]] == [0, 0]
    assert "| kaggle hidden rerun |" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "gpu_budget.json").read_text())["training"]


def test_bench_run_reads_each_stages_latest_time(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_run import stage_seconds, table
    finally:
        sys.path.remove(str(BENCHMARKS))
    log = tmp_path / "run.log"
    log.write_text(
        "10:00:01 INFO cspine.pipeline: stage prepare: 8.8 s\n"
        "10:05:00 INFO cspine.pipeline: stage segment: 300.0 s\n"
        "11:00:00 INFO cspine.pipeline: stage segment: nothing to do\n"
        "12:00:00 INFO cspine.pipeline: stage segment: 120.5 s\n"
    )
    seconds = stage_seconds(log)
    assert seconds == {"prepare": (8.8, "10:00:01"), "segment": (120.5, "12:00:00")}
    assert "**129.3** (2.2 min)" in table(seconds)


def test_the_budgets_flop_counts_are_the_rsna_configs():
    """docs/gpu.md's budget divides counted FLOPs by measured rates: the counts it quotes must be the
    `rsna` config's models as they are."""
    import re

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cspine.config import load_config
    from cspine.crops import crop_channels, crop_spec
    from cspine.models import CropNet, SliceNet
    from cspine.segmenter import build_segmenter, plane_width

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from gpu_budget import real_plane_rows
    finally:
        sys.path.remove(str(BENCHMARKS))

    def gflop(model, *x):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model.eval()(*x)
        return counter.get_total_flops() / 1e9

    cfg = load_config("rsna")
    s, g, c = cfg.slice, cfg.seg, cfg.crop
    size = s.input_size or cfg.prepare.size
    spec = crop_spec(c.size, c.slices, c.context, c.margin)
    counted = {
        "rows": real_plane_rows(g),
        "slice": gflop(SliceNet(s.backbone, width=s.width), torch.zeros(1, 3, size, size)),
        "plane": gflop(
            build_segmenter(g.encoder, g.context),
            torch.zeros(1, 3 * (2 * g.context + 1), real_plane_rows(g), plane_width(cfg.prepare.size)),
        ),
        "crop slice": gflop(
            CropNet(c.backbone, crop_channels(spec), c.hidden, c.width),
            torch.zeros(1, c.slices, crop_channels(spec), c.size, c.size, dtype=torch.uint8),
            torch.zeros(1, dtype=torch.long),
        )
        / c.slices,
    }
    text = (Path(__file__).resolve().parents[1] / "docs" / "gpu.md").read_text()
    quoted = {
        "slice": r"ResNet-50 at 256 px ([\d.]+) GFLOP a slice",
        "plane": r"padded\) ([\d.]+) GFLOP a plane",
        "rows": r"resnet10t, 15 × (\d+) × 256 planes",
        "crop slice": r"the crop model ([\d.]+) GFLOP a\s+crop slice",
    }
    for what, pattern in quoted.items():
        match = re.search(pattern, text)
        assert match, f"docs/gpu.md no longer quotes the {what}'s FLOPs"
        assert float(match.group(1)) == pytest.approx(counted[what], abs=0.06), what
