"""Inference cost per study, split into its parts; `predict`'s overlap of CPU and models; the Kaggle budget.

A study shaped like the real ones (`real_shaped.py`: 512², 352 slices, JPEG Lossless SV1, real CT noise)
is read and predicted with randomly initialised networks of each config's shape (speed does not depend on
the weights):
1. parts, each config: decode (`load_series`, every core), preprocess (one core), the CNN (every fold;
   on CPU the paper's ResNet-50 is timed on --paper-slices and scaled), the BLSTMs; the CNN's GFLOP/s;
2. `predict`'s loop on --studies copies of the study, the demo config: reading each study in this process
   and then predicting it (the baseline), against `cspine.studies.StudyReader`'s worker processes reading
   the next studies while this one is predicted, as `predict` does (the pool started beforehand: it
   starts once per `predict`, in about a second a process).

    python benchmarks/bench_infer.py [--slices 352] [--paper-slices 16] [--studies 8]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cspine.cache import MIN_SLICES
from cspine.checkpoints import SequenceMeta
from cspine.config import load_config
from cspine.dicom import default_workers, load_series
from cspine.ensemble import Ensemble
from cspine.features import study_features
from cspine.inputs import SLICE_OUTPUTS, SliceReading
from cspine.models import SequenceNet, SliceNet
from cspine.predict import blstm_outputs, predict_images
from cspine.preprocess import preprocess_study
from cspine.runtime import amp_dtype, pick_device
from cspine.studies import StudyReader, read_study
from real_shaped import REAL_MEAN_SLICES, write_real_shaped_study


def cnn_flops(model: SliceNet, size: int) -> float:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.features_and_logits(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def ensemble_of(config: str, device: torch.device) -> tuple[Ensemble, object]:
    """Random networks of a config's shape, as `predict` would load them."""
    cfg = load_config(config)
    size = cfg.slice.input_size or cfg.prepare.size
    cnns = {
        k: SliceNet(cfg.slice.backbone, width=cfg.slice.width).to(device).eval()
        for k in range(cfg.folds.n_splits)
    }
    dim = cnns[0].num_features if cfg.seq.input == "features" else (15 if cfg.seq.input == "probs" else 1)
    blstms = [
        (
            SequenceMeta(cfg.seq.input, cfg.seq.bins, False, k, []),
            SequenceNet(dim, cfg.seq.hidden).to(device).eval(),
        )
        for k in cnns
    ]
    reading = SliceReading(cfg.prepare.size, cfg.prepare.crop, cfg.prepare.margin, size, 0)
    return Ensemble(
        cnns,
        {cfg.seq.hidden: blstms},
        cfg.seq.hidden,
        reading,
        {},
        cfg.seq.input,
        cfg.seq.bins,
        False,
        devices=[device],
    ), cfg


def parts(config: str, study_dir: Path, cnn_slices: int, device: torch.device) -> dict:
    ensemble, cfg = ensemble_of(config, device)
    i = ensemble.reading
    t0 = time.perf_counter()
    series = load_series(study_dir)
    t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    images, _ = preprocess_study(series.hu, i.size, i.crop, i.margin)
    t_pre = time.perf_counter() - t0
    model = ensemble.cnns[0]
    dtype = amp_dtype(device, cfg.slice.amp)
    sample = images[:cnn_slices]
    study_features(model, sample[:4], i.input_size, device, cfg.predict.batch_size, dtype)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    feats, probs = study_features(model, sample, i.input_size, device, cfg.predict.batch_size, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_slice = (time.perf_counter() - t0) / len(sample)
    flops = cnn_flops(SliceNet(cfg.slice.backbone, width=cfg.slice.width).eval(), i.input_size)
    per_fold = {
        k: (
            np.resize(feats, (len(images), feats.shape[1])),
            np.resize(probs, (len(images), len(SLICE_OUTPUTS))),
        )
        for k in ensemble.cnns
    }
    t0 = time.perf_counter()
    with torch.inference_mode():
        blstm_outputs(per_fold, ensemble, cfg.seq.hidden, device)
    t_blstm = time.perf_counter() - t0
    folds = len(ensemble.cnns)
    return {
        "config": config,
        "slices": len(series),
        "decode": t_decode,
        "preprocess": t_pre,
        "cnn": per_slice * len(images) * folds,
        "blstm": t_blstm,
        "folds": folds,
        "size": i.input_size,
        "gflops": flops / per_slice / 1e9,
        "flops_per_image": flops,
        "backbone": cfg.slice.backbone,
        "width": cfg.slice.width,
    }


def loop(paths: list[Path], ensemble: Ensemble, cfg, reader: StudyReader | None = None) -> float:
    """Seconds a study for `predict`'s loop, reading in this process or ahead in the reader's processes."""
    i = ensemble.reading
    started = time.perf_counter()
    if reader is not None:
        for study in reader.read(paths, 2 * default_workers()):
            predict_images(study, ensemble, cfg)
    else:
        for path in paths:
            predict_images(read_study(path, i.size, i.crop, i.margin, MIN_SLICES), ensemble, cfg)
    return (time.perf_counter() - started) / len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=REAL_MEAN_SLICES)
    parser.add_argument(
        "--paper-slices",
        type=int,
        default=16,
        help="slices the paper config's CNN is timed on, on CPU (scaled to the study)",
    )
    parser.add_argument("--studies", type=int, default=8, help="studies in the predict-loop comparison")
    parser.add_argument("--loop-only", action="store_true", help="only the predict-loop comparison")
    args = parser.parse_args()
    device = pick_device("auto")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        study = write_real_shaped_study(Path(tmp) / "study", args.slices)
        rows = (
            []
            if args.loop_only
            else [
                parts("demo", study, args.slices, device),
                parts("paper", study, args.paper_slices if device.type == "cpu" else args.slices, device),
            ]
        )
        print(
            f"device: {name}, {default_workers()} cores; one 512² study of {args.slices} slices, JPEG Lossless "
            "SV1, real CT noise\n"
        )
        print(
            "| config | CNN | decode s | preprocess s | CNN s (all folds) | BLSTM s | s/study | CNN GFLOP/s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            total = r["decode"] + r["preprocess"] + r["cnn"] + r["blstm"]
            print(
                f"| {r['config']} | {r['folds']} × {r['backbone']} ×{r['width']} @{r['size']} "
                f"({r['flops_per_image'] / 1e9:.2f} GFLOP/img) | {r['decode']:.2f} | {r['preprocess']:.2f} | "
                f"{r['cnn']:.1f} | {r['blstm']:.2f} | {total:.1f} | {r['gflops']:.0f} |"
            )
        paths = [study]
        for k in range(1, args.studies):
            paths.append(Path(tmp) / f"copy{k}")
            shutil.copytree(study, paths[-1])
        ensemble, cfg = ensemble_of("demo", device)
        loop(paths[:1], ensemble, cfg)  # warm-up
        serial = loop(paths, ensemble, cfg)
        i = ensemble.reading
        with StudyReader(0, i.size, i.crop, i.margin, MIN_SLICES) as reader:
            # the processes started, as once per predict
            loop(paths[: default_workers()], ensemble, cfg, reader)
            ahead = loop(paths, ensemble, cfg, reader)
        print(
            f"\npredict's loop, demo config, {args.studies} studies: read in this process then predicted "
            f"{serial:.2f} s/study; read ahead by {default_workers()} worker processes {ahead:.2f} s/study "
            f"({serial / ahead:.2f}×)"
        )


if __name__ == "__main__":
    main()
