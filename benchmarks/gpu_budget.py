"""The `rsna` recipe's rates on this machine's GPU: what the budget table in docs/gpu.md is computed from.

    python benchmarks/gpu_budget.py                      # on a GPU: about 5 minutes
    python benchmarks/gpu_budget.py --tiny               # on a CPU: the same code at toy sizes, seconds

Times, with randomly initialised networks of the `rsna` config's shapes (speed does not depend on the
weights), in every precision the GPU runs natively (fp16 always; bf16 from compute capability 8):
1. training steps on fixed tensors, after a warm-up: the slice CNN (ResNet-50 at 256 px, batch 32), the
   segmentation U-Net (a real-shaped study's sagittal planes at the config's mm a row), the crop model (8 vertebrae of 15 slices,
   six channels, 256 px); images (planes, crop slices) a second, the step alone (no loader);
2. one real-shaped study (`real_shaped.py`: 512², 352 slices, JPEG Lossless, real CT noise) predicted with
   every track, split into its parts: decode and preprocess (the CPU side, which `predict` overlaps with
   the GPU), the five folds' slice CNNs, the segmentation (every fold's model), cutting the crops, the five
   crop models; seconds a study.

Writes the figures as JSON (``--out``, default ``$OUT/gpu_budget.json`` when $OUT is set) and prints them as
tables. docs/gpu.md turns them into the budget: nothing here assumes a rate.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cspine.config import load_config
from cspine.crops import bone_u8, crop_channels, crop_spec, cut_study, place_vertebrae
from cspine.dicom import load_series
from cspine.features import study_features
from cspine.models import CropNet, SliceNet, crop_probabilities
from cspine.preprocess import preprocess_study
from cspine.runtime import pick_device
from cspine.segmenter import (
    SEG_CLASSES,
    build_segmenter,
    padded_rows,
    plane_rows,
    plane_width,
    reading,
    segment_study,
    vertebra_extents,
)
from real_shaped import REAL_MEAN_SLICES, REAL_SPACING_MM, write_real_shaped_study


def precisions(device: torch.device) -> list[torch.dtype | None]:
    """fp16 and, at compute capability 8 and above, bf16 on a GPU; fp32 (None) on a CPU."""
    if device.type != "cuda":
        return [None]
    native_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
    return [torch.float16, *([torch.bfloat16] if native_bf16 else [])]


def _name(dtype: torch.dtype | None) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(
    model: torch.nn.Module,
    batch,
    loss_fn,
    images_a_step: int,
    steps: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> float:
    """Images a second of ``steps`` training steps (AdamW, AMP with a scaler for fp16) after 10 warm-up steps."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    started = 0.0
    for step in range(10 + steps):
        if step == 10:
            _sync(device)
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model, *batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    _sync(device)
    return images_a_step * steps / (time.perf_counter() - started)


def training(cfg, device: torch.device, dtype: torch.dtype | None, steps: int) -> dict[str, float]:
    """Images (slices, sagittal planes, crop slices) a second of each training step of the recipe."""
    s, g, c = cfg.slice, cfg.seg, cfg.crop
    size = s.input_size or cfg.prepare.size
    channels_last = device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    cnn = SliceNet(s.backbone, width=s.width).to(device, memory_format=fmt)
    x = torch.randn(s.batch_size, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (s.batch_size, 15), device=device).float()
    slice_rate = train_rate(
        cnn,
        (x, y),
        lambda m, x, y: F.binary_cross_entropy_with_logits(m(x).float(), y),
        s.batch_size,
        steps,
        device,
        dtype,
    )

    unet = build_segmenter(g.encoder, g.context).to(device)
    rows = real_plane_rows(g)
    planes = torch.randn(
        g.batch_size, 3 * (2 * g.context + 1), rows, plane_width(cfg.prepare.size), device=device
    )
    target = torch.randint(0, SEG_CLASSES, (g.batch_size, rows, plane_width(cfg.prepare.size)), device=device)
    seg_rate = train_rate(
        unet,
        (planes, target),
        lambda m, x, t: F.cross_entropy(m(x).float(), t),
        g.batch_size,
        steps,
        device,
        dtype,
    )

    spec = crop_spec(c.size, c.slices, c.context, c.margin)
    net = CropNet(c.backbone, crop_channels(spec), c.hidden, c.width).to(device)
    crops = torch.randint(
        0,
        255,
        (c.batch_size, c.slices, crop_channels(spec), c.size, c.size),
        dtype=torch.uint8,
        device=device,
    )
    which = torch.randint(0, 7, (c.batch_size,), device=device)
    labels = torch.randint(0, 2, (c.batch_size,), device=device).float()
    crop_rate = train_rate(
        net,
        (crops, which, labels),
        lambda m, x, v, t: F.binary_cross_entropy_with_logits(m(x, v, channels_last).float(), t),
        c.batch_size * c.slices,
        steps,
        device,
        dtype,
    )
    return {
        "slice CNN, slices/s": slice_rate,
        "segmentation, planes/s": seg_rate,
        "crop model, crop slices/s": crop_rate,
    }


def real_plane_rows(g) -> int:
    """Rows of a real-shaped study's sagittal plane as the segmentation reads it (padded)."""
    return padded_rows(plane_rows(REAL_MEAN_SLICES, REAL_SPACING_MM[0], g.row_mm))


def inference(
    cfg, study_dir: Path, device: torch.device, dtype: torch.dtype | None, folds: int
) -> dict[str, float]:
    """Seconds of each part of predicting one study with every track (``folds`` models of each kind)."""
    s, g, c = cfg.slice, cfg.seg, cfg.crop
    size = s.input_size or cfg.prepare.size
    out = {}
    started = time.perf_counter()
    series = load_series(study_dir)
    out["decode (CPU)"] = time.perf_counter() - started
    started = time.perf_counter()
    images, boxes = preprocess_study(series.hu, cfg.prepare.size, cfg.prepare.crop, cfg.prepare.margin)
    bone = bone_u8(series.hu)
    out["preprocess (CPU)"] = time.perf_counter() - started
    channels_last = device.type == "cuda"
    cnn = SliceNet(s.backbone, width=s.width).to(device).eval()
    if channels_last:
        cnn = cnn.to(memory_format=torch.channels_last)
    study_features(cnn, images[:8], size, device, cfg.predict.batch_size, dtype, channels_last)  # warm-up
    _sync(device)
    started = time.perf_counter()
    study_features(
        cnn, images, size, device, cfg.predict.batch_size, dtype, channels_last, tta=cfg.predict.tta
    )
    _sync(device)
    out[f"slice CNNs ({folds} folds)"] = (time.perf_counter() - started) * folds
    unets = [build_segmenter(g.encoder, g.context).to(device).eval() for _ in range(g.folds)]
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        labels = segment_study(unets, images, series.spacing[0], reading(g), device)
    _sync(device)
    out[f"segmentation ({g.folds} models)"] = time.perf_counter() - started
    started = time.perf_counter()
    _, found = vertebra_extents(labels, g.min_pixels)
    spec = crop_spec(c.size, c.slices, c.context, c.margin)
    crops = cut_study(
        bone, labels, place_vertebrae(found, len(labels), labels.shape[1]), boxes, labels.shape[1], spec
    )
    out["cutting the crops (CPU)"] = time.perf_counter() - started
    net = CropNet(c.backbone, crop_channels(spec), c.hidden, c.width).to(device).eval()
    crop_probabilities(net, crops[None], device, dtype, channels_last)  # warm-up
    _sync(device)
    started = time.perf_counter()
    crop_probabilities(net, crops[None], device, dtype, channels_last)
    _sync(device)
    out[f"crop models ({folds} folds)"] = (time.perf_counter() - started) * folds
    return out


def tiny():
    """The recipe at toy sizes: the same code paths, seconds on a CPU (for testing this script)."""
    return load_config(
        "rsna",
        [
            "prepare.size=64",
            "slice.backbone=resnet10t",
            "slice.batch_size=4",
            "seg.row_mm=8",
            "seg.batch_size=2",
            "seg.folds=2",
            "crop.size=32",
            "crop.slices=4",
            "crop.backbone=resnet10t",
            "crop.hidden=16",
            "crop.batch_size=2",
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed training steps of each model")
    parser.add_argument(
        "--slices", type=int, default=REAL_MEAN_SLICES, help="slices of the real-shaped study"
    )
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ["OUT"]) / "gpu_budget.json" if "OUT" in os.environ else None,
    )
    args = parser.parse_args()
    device = pick_device("auto")
    cfg = tiny() if args.tiny else load_config("rsna")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = {
        "device": name,
        "torch": torch.__version__,
        "config": "rsna" + (" (tiny)" if args.tiny else ""),
        "study_slices": args.slices,
        "training": {},
        "inference": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        study = write_real_shaped_study(Path(tmp) / "study", args.slices)
        for dtype in precisions(device):
            result["training"][_name(dtype)] = training(cfg, device, dtype, args.steps)
            result["inference"][_name(dtype)] = inference(cfg, study, device, dtype, cfg.folds.n_splits)
    print(f"{name}, torch {torch.__version__}; the rsna recipe{' at toy sizes' if args.tiny else ''}\n")
    print("| training step (fixed tensors) | " + " | ".join(result["training"]) + " |")
    print("|---|" + "---|" * len(result["training"]))
    for key in next(iter(result["training"].values())):
        print(f"| {key} | " + " | ".join(f"{r[key]:,.0f}" for r in result["training"].values()) + " |")
    print(f"\n| one study of {args.slices} slices, s | " + " | ".join(result["inference"]) + " |")
    print("|---|" + "---|" * len(result["inference"]))
    for key in next(iter(result["inference"].values())):
        print(f"| {key} | " + " | ".join(f"{r[key]:.2f}" for r in result["inference"].values()) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
