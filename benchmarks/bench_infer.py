"""Inference cost per study, split into decode, preprocess, CNN and BLSTM, and the Kaggle time budget.

Synthetic 512×512 studies in JPEG Lossless (the real data's compressed syntax) are predicted with
randomly initialised networks of each config's shape (speed does not depend on the weights):
- demo: the demo config's CNN at its size, every fold;
- paper: ResNet-50 at 384×384, every fold (7), BLSTM-128 on 2,048 features.
The CNN's achieved GFLOP/s is printed, and the measured per-slice costs are scaled to the hidden test
set (about 1,500 studies × 300 slices) against Kaggle's 9-hour limit. On a GPU the CNN runs there.

    python benchmarks/bench_infer.py [--slices 300] [--paper-slices 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cspine.config import load_config
from cspine.dicom import load_series
from cspine.dicom_writer import Encoding, write_series
from cspine.extract import study_features
from cspine.models import SequenceNet, SliceNet
from cspine.phantom import PhantomConfig, render_study
from cspine.preprocess import preprocess_study
from cspine.runtime import amp_dtype, pick_device

KAGGLE_STUDIES, KAGGLE_SLICES, KAGGLE_HOURS = 1500, 300, 9.0


def cnn_flops(model: SliceNet, size: int) -> float:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.features_and_logits(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def measure(config: str, study_dir: Path, n_slices_limit: int, device: torch.device) -> dict:
    cfg = load_config(config)
    size = cfg.slice.input_size or cfg.prepare.size
    folds = cfg.folds.n_splits
    t0 = time.perf_counter()
    series = load_series(study_dir)
    t_decode = time.perf_counter() - t0
    hu = series.hu[:n_slices_limit]
    t0 = time.perf_counter()
    images, _ = preprocess_study(hu, cfg.prepare.size, cfg.prepare.crop, cfg.prepare.margin)
    t_pre = (time.perf_counter() - t0) / len(hu) * len(series)
    model = SliceNet(cfg.slice.backbone, width=cfg.slice.width).to(device).eval()
    flops = cnn_flops(SliceNet(cfg.slice.backbone, width=cfg.slice.width).eval(), size)
    dtype = amp_dtype(device, cfg.slice.amp)
    study_features(model, images[:4], size, device, cfg.predict.batch_size, dtype)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    feats, probs = study_features(model, images, size, device, cfg.predict.batch_size, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_cnn_one = time.perf_counter() - t0
    per_slice_cnn = t_cnn_one / len(images)
    gflops = flops * len(images) / t_cnn_one / 1e9
    x = torch.from_numpy((feats if cfg.seq.input == "features" else probs).astype(np.float32))
    x = torch.cat([x] * int(np.ceil(len(series) / len(x))))[:len(series)][None]
    blstm = SequenceNet(x.shape[-1], cfg.seq.hidden).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(folds):
            blstm(x, torch.tensor([x.shape[1]]))
    t_blstm = time.perf_counter() - t0
    t_cnn = per_slice_cnn * len(series) * folds
    return {"config": config, "slices": len(series), "decode": t_decode, "preprocess": t_pre, "cnn": t_cnn,
            "blstm": t_blstm, "folds": folds, "gflops": gflops, "flops_per_image": flops, "size": size,
            "per_slice": (t_decode + t_pre + t_cnn + t_blstm) / len(series), "cnn_per_slice": per_slice_cnn * folds,
            "cpu_per_slice": (t_decode + t_pre) / len(series)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="slices of the synthetic test study")
    parser.add_argument("--paper-slices", type=int, default=40,
                        help="slices the paper config's CNN is timed on, on CPU (scaled to the study)")
    args = parser.parse_args()
    device = pick_device("auto")
    study = render_study(np.random.default_rng(2), PhantomConfig(image_size=512, n_slices=args.slices))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "study"
        write_series(study.hu, folder, spacing=study.spacing, study_uid="1.2.826.0.1.3680043.99998",
                     encoding=Encoding("jpeg_lossless", signed=False, intercept=-1024.0, bits_stored=12))
        rows = [measure("demo", folder, args.slices, device),
                measure("paper", folder, args.paper_slices if device.type == "cpu" else args.slices, device)]
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads; one 512² study of {args.slices} slices, JPEG Lossless\n")
    print("| config | CNN | decode s | preprocess s | CNN s (all folds) | BLSTM s | s/study | CNN GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        total = r["decode"] + r["preprocess"] + r["cnn"] + r["blstm"]
        print(f"| {Path(r['config']).stem} | {r['folds']}× @{r['size']} ({r['flops_per_image'] / 1e9:.1f} GFLOP/img) | "
              f"{r['decode']:.2f} | {r['preprocess']:.2f} | {r['cnn']:.1f} | {r['blstm']:.2f} | {total:.1f} | "
              f"{r['gflops']:.0f} |")
    paper = rows[1]
    total_slices = KAGGLE_STUDIES * KAGGLE_SLICES
    cpu_hours = total_slices * paper["cpu_per_slice"] / 3600
    flops_total = total_slices * paper["flops_per_image"] * paper["folds"]
    print(f"\nKaggle estimate, paper config, {KAGGLE_STUDIES} studies × {KAGGLE_SLICES} slices = {total_slices:,} slices:")
    print(f"- decode + preprocess at this machine's per-slice cost: {cpu_hours:.1f} h of one process "
          "(Kaggle's 4 CPU cores overlap it with the GPU)")
    print(f"- CNN: {flops_total / 1e15:.0f} PFLOP for {paper['folds']} folds; at a sustained 20 TFLOP/s (T4/P100, "
          f"fp16) {flops_total / 20e12 / 3600:.1f} h, at this device's measured {paper['gflops']:.0f} GFLOP/s "
          f"{flops_total / (paper['gflops'] * 1e9) / 3600:.1f} h")
    print(f"- limit: {KAGGLE_HOURS:.0f} h")


if __name__ == "__main__":
    main()
