"""Training throughput: is the data loader the bottleneck, and what does the CNN achieve?

1. At a config (default: demo), batches/s of the DataLoader alone (0 and 2 workers) against batches/s of
   the training step alone (on fixed tensors; NCHW, then channels_last), in one run. The loader must be
   at least 1.5× the step.
2. ResNet-50 at 384×384: forward images/s on this CPU and the achieved GFLOP/s (FLOPs counted by torch).
3. With CUDA: the paper config's training images/s with AMP and channels_last.

    python benchmarks/bench_train.py [--config demo] [--run runs/demo] [--batches 20]

Needs a prepared cache (``python -m cspine run`` or ``prepare``) in --run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cspine.config import load_config
from cspine.data import SliceDataset, build_transforms, seed_worker
from cspine.models import SliceNet
from cspine.runs import Run
from cspine.train_slices import slice_loss


def loader_rate(cfg, run_dir: Path, batches: int, workers: int) -> float:
    cache = Run(run_dir).cache
    index = cache.read_index()
    index = index[index["label"] != -1].sample(frac=1.0, random_state=0)
    size = cfg.slice.input_size or cfg.prepare.size
    dataset = SliceDataset(cache.root, index, build_transforms(cfg.slice, True, size, seed=0))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.slice.batch_size,
        num_workers=workers,
        worker_init_fn=seed_worker if workers else None,
        shuffle=False,
    )
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - start)


def step_rate(cfg, batches: int, device: torch.device, channels_last: bool = False) -> float:
    size = cfg.slice.input_size or cfg.prepare.size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = SliceNet(cfg.slice.backbone, dropout=cfg.slice.dropout, width=cfg.slice.width).to(
        device, memory_format=fmt
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.slice.lr)
    x = torch.randn(cfg.slice.batch_size, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.zeros(cfg.slice.batch_size, 15, device=device)
    known = torch.ones_like(y)
    for i in range(batches + 2):
        if i == 2:
            start = time.perf_counter()
        loss = slice_loss(model(x), y, known, 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return batches / (time.perf_counter() - start)


def forward_gflops(
    device: torch.device, batch: int = 8, size: int = 384, repeats: int = 3
) -> tuple[float, float]:
    model = SliceNet("resnet50").to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            model(x)
        flops = counter.get_total_flops()
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        elapsed = (time.perf_counter() - start) / repeats
    return batch / elapsed, flops / elapsed / 1e9


def cuda_training(batches: int = 30) -> float:
    cfg = load_config("paper")
    model = SliceNet("resnet50").cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    b = cfg.slice.batch_size
    x = torch.randn(b, 3, 384, 384, device="cuda").contiguous(memory_format=torch.channels_last)
    y, known = torch.zeros(b, 15, device="cuda"), torch.ones(b, 15, device="cuda")
    for i in range(batches + 5):
        if i == 5:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.amp.autocast("cuda", dtype=dtype):
            logits = model(x)
        scaler.scale(slice_loss(logits, y, known, 0.5)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return batches * b / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    cfg = load_config(args.config)
    cpu = torch.device("cpu")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; config {args.config} "
        f"({cfg.slice.backbone} at width {cfg.slice.width:g}, batch {cfg.slice.batch_size}, "
        f"{cfg.slice.input_size or cfg.prepare.size} px)"
    )
    step = step_rate(cfg, args.batches, cpu)
    print(f"training step alone:   {step:6.2f} batches/s ({step * cfg.slice.batch_size:.0f} images/s)")
    nhwc = step_rate(cfg, args.batches, cpu, channels_last=True)
    print(
        f"  with channels_last:  {nhwc:6.2f} batches/s = {nhwc / step:.2f}× (train-slices uses it where slice.channels_last)"
    )
    for workers in sorted({0, 2, cfg.slice.workers}):
        rate = loader_rate(cfg, args.run, args.batches * 3, workers)
        print(
            f"data loader, {workers} workers: {rate:6.2f} batches/s = {rate / step:.1f}× the step "
            f"({'OK' if rate >= 1.5 * step else 'BOTTLENECK'})"
        )
    images, gflops = forward_gflops(cpu)
    print(f"ResNet-50 @384 forward on CPU: {images:.1f} images/s, {gflops:.0f} GFLOP/s achieved")
    if torch.cuda.is_available():
        images, gflops = forward_gflops(torch.device("cuda"), batch=64, repeats=10)
        print(
            f"ResNet-50 @384 forward on {torch.cuda.get_device_name()}: {images:.0f} images/s, {gflops:.0f} GFLOP/s"
        )
        print(f"paper config training with AMP + channels_last: {cuda_training():.0f} images/s")


if __name__ == "__main__":
    main()
